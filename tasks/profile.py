"""A character's profile as prompt text, cut to a token budget (with a flag when cut)."""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def estimate_tokens(text: str) -> int:
    """Cheap, conservative token estimate: ~1 token per CJK character, ~1 per 3.5 other characters."""
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk) * 2 // 7 + 1


def cut_to_tokens(text: str, budget: int) -> tuple[str, bool]:
    """Cut at a sentence end within the budget; returns (text, truncated)."""
    if estimate_tokens(text) <= budget:
        return text, False
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix within budget
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    end = max(cut.rfind(p) for p in (". ", "。", "! ", "? ", "\n"))
    if end > lo // 2:
        cut = cut[:end + 1]
    return cut.rstrip(), True


def profile_text(character: dict, budget: int) -> tuple[str, bool]:
    """Summary first, then the rest of the article, within the budget."""
    summary = (character.get("summary") or "").strip()
    article = (character.get("article") or "").strip()
    if article.startswith(summary[:200]) and summary:
        body = article
    else:
        body = "\n\n".join(p for p in (summary, article) if p)
    return cut_to_tokens(body, budget)
