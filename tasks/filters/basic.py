"""Cheap per-turn checks: format, length, language."""

from __future__ import annotations

import re
import threading

import numpy as np

from models.config.filter import FormatFilterConfig, LanguageFilterConfig, LengthFilterConfig
from tasks.filters import Drop, Item, RowFilter
from tasks.filters.text import KANA, cjk_ratio, token_estimate, trim_to_sentence

# frequent English words that are not also frequent words of German, French, Spanish, Dutch or Italian
EN_FUNCTION = frozenset("the and of to is i my it that for with you this have had were be not but they his her he "
                        "she we our me are at from by on or been would could there their what which".split())
_EN_FUNCTION = re.compile(r"\b(?:" + "|".join(sorted(EN_FUNCTION)) + r")\b")
_KANA_OR_HANGUL = re.compile(rf"[{KANA}\uac00-\ud7af]")
_LATIN_RUN = re.compile(r"[A-Za-z][A-Za-z'’-]*(?:[\s,;:.!?\"]+[A-Za-z][A-Za-z'’-]*)+")

_TEMPLATE = re.compile(
    r"\{(?:label|description|aliases|claims|profile|question|answer|name|role)\}"
    r"|<<<\s*PROFILE|PROFILE\s*>>>|\[(?:system|user|assistant)\]"
    r"|<\|[a-z_]+\|>|</s>|<s>|\[/?INST\]"
    r"|^\s*(?:#{2,}\s*)?(?:user|assistant|system|human)\s*[:：]"
    r"|^\s*(?:用户|助手|系统)\s*[:：]",
    re.IGNORECASE | re.MULTILINE)
_JSON = re.compile(r"^\s*(?:\{\s*\"|\[\s*[{\"])|\"(?:question|answer|reason|score|response)\"\s*:|```", re.IGNORECASE)


def format_check(answer: str, finish_reason: str, cfg: FormatFilterConfig) -> tuple[str, Drop | None, bool]:
    """(answer as kept, drop or None, trimmed). Shared with the dedup signatures so both see the same text."""
    text = (answer or "").strip()
    if not text:
        return text, Drop("format", "empty answer"), False
    m = _TEMPLATE.search(text)
    if m:
        return text, Drop("format", f"template or chat-markup fragment {m.group(0).strip()[:40]!r}"), False
    m = _JSON.search(text)
    if m:
        return text, Drop("format", f"JSON or code fragment {m.group(0).strip()[:40]!r}"), False
    if finish_reason == "length":
        if cfg.truncated == "drop":
            return text, Drop("format", "cut off at max_tokens (finish_reason=length)"), False
        cut = trim_to_sentence(text)
        if len(cut) < cfg.min_chars_after_trim:
            return text, Drop("format", "cut off at max_tokens and no complete sentence to keep"), False
        return cut, None, True
    return text, None, False


class FormatFilter(RowFilter):
    name = "format"

    def __init__(self, cfg: FormatFilterConfig):
        self.cfg = cfg

    def check(self, item: Item) -> Drop | None:
        finish = (item.row.get("gen") or {}).get("finish_reason", "")
        text, drop, trimmed = format_check(item.answer, finish, self.cfg)
        if drop is None:
            item.answer = text
            if trimmed:
                item.scores["trimmed"] = 1.0
        return drop


class LengthFilter(RowFilter):
    name = "length"

    def __init__(self, cfg: LengthFilterConfig):
        self.cfg = cfg

    def check(self, item: Item) -> Drop | None:
        n = token_estimate(item.answer)
        item.scores["tokens"] = float(n)
        b = self.cfg.bounds.get(item.language, self.cfg.default)
        if n < b.min:
            return Drop("length", f"{n} tokens < min {b.min} ({item.language})", float(n))
        if n > b.max:
            return Drop("length", f"{n} tokens > max {b.max} ({item.language})", float(n))
        return None


class _LangId:
    """langid's model with a sparse dot product: langid's own dense uint32 x float32 product misses BLAS
    and runs at ~80 texts/s; the sparse form gives the same probabilities far faster."""

    _lock = threading.Lock()
    _inst: _LangId | None = None

    def __init__(self):
        from langid.langid import LanguageIdentifier, model

        self.ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        self.classes = list(self.ident.nb_classes)
        self.index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def get(cls) -> _LangId:
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls()
            return cls._inst

    def probs(self, text: str) -> np.ndarray:
        fv = self.ident.instance2fv(text)
        nz = np.flatnonzero(fv)
        logp = fv[nz].astype(np.float32) @ self.ident.nb_ptc[nz] + self.ident.nb_pc
        logp = logp - logp.max()
        p = np.exp(logp)
        return p / p.sum()

    def prob(self, text: str, lang: str) -> tuple[float, str]:
        """(probability of `lang`, most likely language)."""
        p = self.probs(text)
        best = self.classes[int(p.argmax())]
        i = self.index.get(lang)
        return (float(p[i]) if i is not None else 0.0), best


class LanguageFilter(RowFilter):
    """The answer must be in the session's language. Script first (CJK share); clear cases are decided
    there (zh: mostly CJK and no kana/hangul; en: many English function words) and scored lang=1.0; the rest
    goes to langid (score: its probability of the session language) when long enough to judge; short
    texts pass on script alone."""

    name = "language"

    def __init__(self, cfg: LanguageFilterConfig):
        self.cfg = cfg
        self.langid = _LangId.get()

    def check(self, item: Item) -> Drop | None:
        lang, text = item.language, item.answer
        ratio = cjk_ratio(text[:self.cfg.max_chars * 2])
        if lang == "zh":
            if ratio < self.cfg.min_cjk_ratio:
                return Drop("language", f"expected zh, CJK share {ratio:.2f} < {self.cfg.min_cjk_ratio}", ratio)
            run = max((len(m.group(0).split()) for m in _LATIN_RUN.finditer(text)), default=0)
            if run > self.cfg.max_foreign_words:
                return Drop("language", f"expected zh, a run of {run} Latin-script words", ratio)
        elif lang not in ("ja", "ko") and ratio > 0.3:
            return Drop("language", f"expected {lang}, CJK share {ratio:.2f}", ratio)
        if len(text) < self.cfg.min_chars or lang not in self.langid.index:
            return None
        head = text[:self.cfg.max_chars]
        if lang == "zh" and ratio >= 0.6 and not _KANA_OR_HANGUL.search(head):
            item.scores["lang"] = 1.0
            return None
        if lang == "en" and ratio == 0:
            words = len(head.split())
            if words >= 8 and len(_EN_FUNCTION.findall(head.lower())) >= 0.2 * words:
                item.scores["lang"] = 1.0
                return None
        p, best = self.langid.prob(text[:self.cfg.max_chars], lang)
        item.scores["lang"] = round(p, 4)
        if p < self.cfg.min_confidence:
            return Drop("language", f"expected {lang}, langid says {best} (p({lang})={p:.2f})", p)
        return None
