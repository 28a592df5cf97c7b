"""The dedup stage's config (tasks/dedup.py): exact and near duplicates across the whole run, after the
per-turn filter chain. Its own section, `dedup:`, since it is a stage of its own (it was `filter.dedup`
before: a stored run config with that key is moved here, a user's config is refused naming the key)."""

from __future__ import annotations

from pydantic import Field

from models.base import Strict


class DedupConfig(Strict):
    exact: bool = Field(True, description="drop exact duplicates (hash of normalised text) across the whole run "
                                          "(dedup runs when filter.enabled and exact or near)")
    near: bool = Field(True, description="drop near duplicates (MinHash LSH) across the whole run")
    threshold: float = Field(0.7, gt=0, le=1, description="estimated Jaccard of shingle sets that makes a near duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (uint32 each)")
    shingle: int = Field(2, ge=1, le=10, description="shingle size in tokens (words; CJK characters)")
    seed: int = Field(1, description="MinHash permutation seed")
    bands: int | None = Field(None, ge=2, description="LSH bands (rows = num_perm // bands); None: datasketch's optimum")
    workers: int = Field(0, ge=0, description="processes signing shards in the global step; 0: one per CPU core "
                                              "when there are at least 20,000 turns to sign, else 1")
