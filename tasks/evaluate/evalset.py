"""The evaluation set from held-out characters: one item per question turn of their sessions, with the gold
label (role_specific: should answer, contrastive: should refuse), the evidence and the identity candidates."""

from __future__ import annotations

import random
from collections.abc import Iterable

from models.config.eval import EvalConfig
from models.eval_records import Candidate, EvalItem
from models.ids import content_hash, row_id
from models.records import base_id, character_row_id


class EvalError(RuntimeError):
    pass


def pick_candidates(character: dict, pool: list[dict], k: int, mode: str, seed: str) -> tuple[list[Candidate], int]:
    """The true role plus up to k-1 distractors of the same language (and category when mode='category')."""
    same = [c for c in pool if c["language"] == character["language"] and base_id(c["id"]) != base_id(character["id"])
            and c["label"] != character["label"]]
    if mode == "category":
        narrowed = [c for c in same if c.get("category") == character.get("category")]
        same = narrowed if len(narrowed) >= k - 1 else same
    rng = random.Random(seed)
    picked = rng.sample(sorted(same, key=lambda c: c["id"]), min(k - 1, len(same)))
    cands = [Candidate(label=c["label"], description=c.get("description") or "") for c in picked]
    pos = rng.randrange(len(cands) + 1)
    cands.insert(pos, Candidate(label=character["label"], description=character.get("description") or ""))
    return cands, pos


def build_eval_set(characters: Iterable[dict], sessions: Iterable[dict], heldout: set[str], cfg: EvalConfig,
                   seed: int) -> list[EvalItem]:
    """Items from the sessions of held-out characters (`heldout`: row ids `QID@lang` or base QIDs). Gold:
    role_specific -> should answer, contrastive -> should refuse; evidence: the character's summary."""
    chars = {character_row_id(c): c for c in characters}
    pool = list(chars.values())
    chosen = [s for s in sessions if s["character_id"] in heldout or base_id(s["character_id"]) in heldout]
    chosen.sort(key=lambda s: s["character_id"])
    if cfg.max_characters:
        keep = sorted({base_id(s["character_id"]) for s in chosen})[:cfg.max_characters]
        chosen = [s for s in chosen if base_id(s["character_id"]) in keep]
    items = []
    for s in chosen:
        ch = chars.get(s["character_id"])
        if ch is None:
            continue
        cands, correct = pick_candidates(ch, pool, cfg.candidates, cfg.distractors, f"{seed}:{s['id']}")
        turns = s["turns"][:cfg.max_turns_per_character] if cfg.max_turns_per_character else s["turns"]
        for i, t in enumerate(turns):
            items.append(EvalItem(
                id=row_id("eval", s["id"], t["turn_id"]), session_id=s["id"], turn=i, character_id=s["character_id"],
                label=ch["label"], description=ch.get("description") or "", language=s["language"],
                category=ch.get("category") or "", system=s["system"], question=t["question"],
                should_refuse=t["kind"] == "contrastive", evidence=ch.get("summary") or ch.get("article", "")[:2000],
                summary=ch.get("description") or "", candidates=cands, correct=correct, source="heldout"))
    return items


def items_hash(items: list[EvalItem]) -> str:
    return content_hash([it.model_dump(mode="json") for it in items])
