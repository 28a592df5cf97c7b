"""Parsers of the judge's output, one per judge prompt (tasks/prompts/eval_*.<lang>.txt): the candidate the
identity judge named, the knowledge judge's 1-10 score and the rejection judge's refused/answered vote.
Each returns None when the output cannot be read; the caller counts that as unparsable."""

from __future__ import annotations

import re

from models.eval_records import Candidate

_ROLE_RE = [re.compile(r"most suitable role is\s*\[([^\]\n]+)\]", re.I), re.compile(r"最符合的角色为\s*\[([^\]\n]+)\]"),
            re.compile(r"most suitable role is\s*[:\"“]?\s*([^\n.\"”]+)", re.I),
            re.compile(r"最符合的角色为\s*[:：\"“「]?\s*([^\n。\"”」]+)")]


def _norm(s: str) -> str:
    return re.sub(r"[\s\"'“”‘’「」\[\]().,。:：*-]+", " ", s).strip().lower()


def parse_identity(text: str, candidates: list[Candidate]) -> int | None:
    """The candidate index the judge named ("The most suitable role is [name]"), else None."""
    names = [_norm(c.label) for c in candidates]
    for rx in _ROLE_RE:
        matches = rx.findall(text or "")
        if not matches:
            continue
        got = _norm(matches[-1])
        if got in names:
            return names.index(got)
        if got.isdigit() and 1 <= int(got) <= len(candidates):
            return int(got) - 1
        hits = [i for i, n in enumerate(names) if n and (n in got or got in n)] if got else []
        if len(hits) == 1:
            return hits[0]
    # No closing sentence: no pick. (Accepting "the one candidate mentioned" would reward judges that
    # echo the prompt, whose question often names the character.)
    return None


def parse_score(text: str) -> float | None:
    """1-10 from "Score: N" (or the last line holding a lone number), else None."""
    text = (text or "").strip()
    m = re.findall(r"(?:score|分数|评分|得分)\s*[:：]?\s*(\d+(?:\.\d+)?)", text, re.I)
    cands = m or re.findall(r"^\s*\[*(\d+(?:\.\d+)?)\]*\s*(?:/\s*10)?\s*$", text.splitlines()[-1] if text else "")
    if not cands:
        return None
    v = float(cands[-1])
    return v if 1 <= v <= 10 else None


def parse_refusal(text: str) -> bool | None:
    """The judge's 1 (refused) / 0 (answered), also yes/no and 是/否; else None."""
    t = (text or "").strip().strip("`*\"'.。 ").lower()
    if t in ("1", "yes", "是", "refused", "拒答"):
        return True
    if t in ("0", "no", "否", "answered"):
        return False
    m = re.findall(r"(?:answer|reply|回复|答案)\s*[:：]\s*([01])\b", t) or re.findall(r"(?<![\d.])([01])(?![\d.])", t)
    if len(set(m)) == 1:
        return m[0] == "1"
    return None
