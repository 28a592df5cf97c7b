"""Scoring: raw judge samples and the judge-free checks -> one result row per item (`score_item`, pure),
then metric rows per language and overall (`aggregate`). An unparsable judge sample is counted
(`judge_unparsable`) and left out; an item with no parsed sample is left out of that metric's mean."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from models.eval_records import EvalItem, EvalResult
from tasks.evaluate.classifiers import is_out_of_role, is_refusal
from tasks.evaluate.parsers import parse_identity, parse_refusal, parse_score

METRICS = ("identity", "knowledge", "rejection", "identity_embed", "rejection_pattern", "out_of_role",
           "judge_unparsable", "answer_tokens")


def score_item(item: EvalItem, model: str, answer: str, judge: dict[str, list[str]] | None,
               embed_pick: int | None = None, answer_tokens: int = 0) -> EvalResult:
    """Turn raw judge samples and the judge-free checks into one result row. Pure: tested on hand-made outputs."""
    judge = judge or {}
    unparsable: dict[str, int] = {}
    picks = [parse_identity(t, item.candidates) for t in judge.get("identity", [])]
    scores = [parse_score(t) for t in judge.get("knowledge", [])]
    votes = [parse_refusal(t) for t in judge.get("rejection", [])]
    for name, vals in (("identity", picks), ("knowledge", scores), ("rejection", votes)):
        unparsable[name] = sum(v is None for v in vals)
    ok_picks = [p for p in picks if p is not None]
    ok_scores = [s for s in scores if s is not None]
    ok_votes = [v for v in votes if v is not None]
    refused = None
    if ok_votes:
        c = Counter(ok_votes)
        if c[True] != c[False]:
            refused = c[True] > c[False]
    pattern = is_refusal(answer, item.language)
    return EvalResult(
        item_id=item.id, model=model, language=item.language, answer=answer, answer_tokens=answer_tokens,
        identity_picks=[-1 if p is None else p for p in picks],
        identity=sum(p == item.correct for p in ok_picks) / len(ok_picks) if ok_picks else None,
        knowledge_scores=ok_scores, knowledge=sum(ok_scores) / len(ok_scores) if ok_scores else None,
        refusal_votes=[-1 if v is None else int(v) for v in votes], refused=refused,
        rejection_correct=None if refused is None else refused == item.should_refuse, unparsable=unparsable,
        embed_pick=embed_pick, embed_correct=None if embed_pick is None else embed_pick == item.correct,
        pattern_refused=pattern, pattern_rejection_correct=pattern == item.should_refuse,
        out_of_role=is_out_of_role(answer, item.language, item.label),
        judge_raw=[t for m in ("identity", "knowledge", "rejection") for t in judge.get(m, [])])


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def aggregate(results: list[EvalResult], items: list[EvalItem] | None = None) -> list[dict[str, Any]]:
    """Metric rows {language, metric, value, n, details} per language and for 'all'."""
    gold = {it.id: it for it in items or []}
    groups: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        groups[r.language].append(r)
        groups["all"].append(r)
    rows = []
    for lang in sorted(groups, key=lambda x: (x != "all", x)):
        rs = groups[lang]

        def add(metric: str, vals: list[float], **details: Any) -> None:
            v = _mean(vals)
            rows.append({"language": lang, "metric": metric, "value": v, "n": len(vals),  # noqa: B023
                         "details": {"items": len(rs), **details}})  # noqa: B023

        add("identity", [r.identity for r in rs if r.identity is not None])
        add("knowledge", [r.knowledge for r in rs if r.knowledge is not None])
        rej = [r for r in rs if r.rejection_correct is not None]
        should = {r.item_id: gold[r.item_id].should_refuse for r in rs if r.item_id in gold}
        add("rejection", [float(r.rejection_correct) for r in rej],
            missed_refusals=sum(1 for r in rej if not r.refused and should.get(r.item_id) is True),
            false_refusals=sum(1 for r in rej if r.refused and should.get(r.item_id) is False))
        add("identity_embed", [float(r.embed_correct) for r in rs if r.embed_correct is not None])
        add("rejection_pattern", [float(r.pattern_rejection_correct) for r in rs])
        add("out_of_role", [float(r.out_of_role) for r in rs])
        total = sum(len(r.identity_picks) + len(r.knowledge_scores) + r.unparsable.get("knowledge", 0)
                    + len(r.refusal_votes) for r in rs)
        bad = sum(sum(r.unparsable.values()) for r in rs)
        by_metric = {m: sum(r.unparsable.get(m, 0) for r in rs) for m in ("identity", "knowledge", "rejection")}
        rows.append({"language": lang, "metric": "judge_unparsable", "value": bad / total if total else None,
                     "n": total, "details": {"items": len(rs), "unparsable": bad, **by_metric}})
        add("answer_tokens", [float(r.answer_tokens) for r in rs])
    return rows
