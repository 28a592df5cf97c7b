"""Identity consistency without an LLM: embed the answer and k candidate characters (the true one and k-1
others of the shard) and require the true character to rank first. The margin (cosine to the true
character minus the best other) is kept as the score 'identity_margin'. The embedding model is loaded
once per process (tasks/embeddings.py)."""

from __future__ import annotations

import random

from models.config.filter import IdentityConfig
from models.records import character_row_id
from tasks.embeddings import embed
from tasks.filters import Drop, Filter, Item


def character_text(c: dict, profile_chars: int) -> str:
    desc = (c.get("description") or "").strip()
    text = f"{c['label']}: {desc}" if desc else c["label"]
    summary = (c.get("summary") or "").strip()[:profile_chars]
    return f"{text}. {summary}" if summary else text


class IdentityFilter(Filter):
    name = "identity"

    def __init__(self, cfg: IdentityConfig, characters: dict[str, dict], seed: int = 0):
        self.cfg = cfg
        self.characters = characters
        self.seed = seed
        self.pools: dict[tuple, list[str]] = {}
        for cid, c in sorted(characters.items()):
            self.pools.setdefault((c.get("language"),), []).append(cid)
            self.pools.setdefault((c.get("language"), c.get("category")), []).append(cid)

    def candidates(self, item: Item) -> list[str]:
        """The true character first, then k-1 others (same language, or same language and category,
        topped up from the language pool when the category is short), drawn by the turn's id."""
        c = item.character
        true = character_row_id(c)
        need = self.cfg.k - 1
        rng = random.Random(f"{self.seed}:{item.id}")
        picked: list[str] = []
        pools = [(c.get("language"), c.get("category"))] if self.cfg.candidates == "category" else []
        pools.append((c.get("language"),))
        for key in pools:
            pool = [x for x in self.pools.get(key, []) if x != true and x not in picked]
            picked += rng.sample(pool, min(need - len(picked), len(pool)))
            if len(picked) >= need:
                break
        return [true] + picked

    def apply(self, items: list[Item]) -> list[Drop | None]:
        out: list[Drop | None] = [None] * len(items)
        todo = [(n, it, self.candidates(it)) for n, it in enumerate(items)
                if it.character is not None and it.language in self.cfg.languages
                and it.row.get("kind") in self.cfg.kinds]
        todo = [t for t in todo if len(t[2]) > 1]  # nobody to confuse it with: no check
        if not todo:
            return out
        cids = sorted({cid for _, _, cands in todo for cid in cands})
        cfg = self.cfg
        cvec = embed([character_text(self.characters[cid], cfg.profile_chars) for cid in cids], cfg.model,
                     cfg.max_seq_length, cfg.batch_size)
        cindex = {cid: i for i, cid in enumerate(cids)}
        avec = embed([it.answer for _, it, _ in todo], cfg.model, cfg.max_seq_length, cfg.batch_size)
        for (n, it, cands), a in zip(todo, avec, strict=True):
            sims = cvec[[cindex[c] for c in cands]] @ a
            margin = round(float(sims[0] - sims[1:].max()), 5)  # decided on the stored value: re-thresholding agrees
            it.scores["identity_margin"] = margin
            if margin <= self.cfg.min_margin:
                best = cands[1 + int(sims[1:].argmax())]
                out[n] = Drop("identity", f"answer closer to {self.characters[best]['label']!r} than to its own "
                                          f"character (margin {margin:.3f} <= {self.cfg.min_margin})", margin)
        return out
