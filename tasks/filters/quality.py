"""Answer checks beyond the role: degeneration (repeated n-grams, run-on lists) and relevance (the answer
is about its question, by embedding cosine). Both store their score on the turn ('repeat', 'relevance')
so a stricter threshold can be re-applied without regenerating."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from models.config.filter import DegenerationConfig, RelevanceConfig
from tasks.filters import Drop, Filter, Item, RowFilter
from tasks.filters.text import tokens

_ITEM_LINE = re.compile(r"(?m)^\s*(?:\(?\d{1,3}[.)、）]|[-*•·]|[一二三四五六七八九十]+、|（\d{1,3}）)\s*\S")
_SEGMENT = re.compile(r"[,，、;；]")
_INLINE_ITEM = re.compile(r"(?:^|\s)\d{1,3}[.、)）](?!\d)\s*(?=\S)")


def _tokens(text: str) -> list[str]:
    return text.lower().split() if text.isascii() else tokens(text)


def repeated_share(toks: list[str], n: int) -> tuple[float, tuple[str, ...] | None]:
    """Share of n-gram occurrences that repeat an earlier n-gram of the same text, and the most repeated."""
    grams = list(zip(*(toks[i:] for i in range(n)), strict=False))  # the shorter tails end it
    if not grams:
        return 0.0, None
    share = 1.0 - len(set(grams)) / len(grams)
    if share == 0:
        return 0.0, None
    top, k = Counter(grams).most_common(1)[0]
    return share, (top if k > 1 else None)


def longest_run_on(text: str, zh: bool) -> int:
    """The longest run of short comma/、-separated segments (list items strung into one sentence)."""
    best = run = 0
    for seg in _SEGMENT.split(text):
        k = len(_tokens(seg))
        run = run + 1 if 0 < k <= (4 if zh else 3) else 0
        best = max(best, run)
    return best


def degeneration(text: str, language: str, cfg: DegenerationConfig) -> tuple[str | None, float]:
    """(reason or None, repeated n-gram share)."""
    zh = language == "zh"
    toks = [t.strip(".,;:!?\"'()") for t in _tokens(text)] if text.isascii() else tokens(text)
    n = cfg.ngram_zh if zh else cfg.ngram
    share, top = (repeated_share(toks, n) if len(toks) >= cfg.min_tokens else (0.0, None))
    share = round(share, 4)
    if share > cfg.max_repeated_share:
        sep = "" if zh else " "
        return (f"repeated {n}-grams: {share:.0%} of them repeat, e.g. {sep.join(top or ())!r}", share)
    if "\n" in text:
        items = len(_ITEM_LINE.findall(text))
        if items > cfg.max_list_items:
            return f"run-on list: {items} list items > {cfg.max_list_items}", share
    inline = len(_INLINE_ITEM.findall(text))
    if inline > 2 * cfg.max_list_items:
        return f"run-on list: {inline} numbered items", share
    if sum(text.count(c) for c in ",，、;；") >= 2 * cfg.max_list_items - 1:
        run = longest_run_on(text, zh)
        if run >= 2 * cfg.max_list_items:
            return f"run-on list: {run} short items in a row", share
    return None, share


class DegenerationFilter(RowFilter):
    name = "degeneration"

    def __init__(self, cfg: DegenerationConfig):
        self.cfg = cfg

    def check(self, item: Item) -> Drop | None:
        why, share = degeneration(item.answer, item.language, self.cfg)
        item.scores["repeat"] = share
        return Drop("degeneration", why, share) if why else None


def similarities(questions: list[str], answers: list[str], cfg: RelevanceConfig) -> np.ndarray:
    """cosine(question_i, answer_i) with the configured sentence-transformers model (loaded once)."""
    from tasks.embeddings import embed

    if not answers:
        return np.zeros(0, dtype=np.float32)
    uq = sorted(set(questions))
    qv = embed(uq, cfg.model, cfg.max_seq_length, cfg.batch_size)
    qi = {q: i for i, q in enumerate(uq)}
    av = embed(answers, cfg.model, cfg.max_seq_length, cfg.batch_size)
    return np.einsum("ij,ij->i", qv[[qi[q] for q in questions]], av)


class RelevanceFilter(Filter):
    """The answer must be about its question: cosine(question, answer) of the embeddings at least the
    language's min_similarity. Calibrated on tests/data/quality (benchmarks/quality_gate.py)."""

    name = "relevance"

    def __init__(self, cfg: RelevanceConfig):
        self.cfg = cfg

    def apply(self, items: list[Item]) -> list[Drop | None]:
        out: list[Drop | None] = [None] * len(items)
        todo = [n for n, it in enumerate(items) if it.language in self.cfg.min_similarity
                and it.row.get("kind") in self.cfg.kinds and (it.row.get("question") or "").strip()]
        if not todo:
            return out
        sims = similarities([items[n].row["question"] for n in todo], [items[n].answer for n in todo], self.cfg)
        for n, s in zip(todo, sims, strict=True):
            it = items[n]
            s = round(float(s), 4)  # decided on the stored value: re-thresholding agrees
            it.scores["relevance"] = s
            thr = self.cfg.min_similarity[it.language]
            if s < thr:
                out[n] = Drop("relevance", f"answer unrelated to the question: cosine {s:.3f} < {thr}", s)
        return out
