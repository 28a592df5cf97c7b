"""Per-shard accounting. Each shard stores `Stats.as_dict()`; the catalog sums the fields into stage_stats,
whose columns it derives from this dataclass (storage/catalog.py `stats_columns`): a field added here is a
column of every catalog, old ones included, with no SQL to edit. An `int` or `float` field is summed over
the stage's shards, a `Counter` merged key by key; `extra` (free-form, e.g. generation-cache hits) stays
with the shard only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

PER_SHARD = {"per_shard": True}  # field metadata: kept in the shard's stats, not summed into stage_stats


@dataclass
class Stats:
    rows_in: int = 0
    rows_out: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    format_failures: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)  # rows dropped, per reason
    extra: dict[str, Any] = field(default_factory=dict, metadata=PER_SHARD)

    def count_generations(self, gens: list) -> None:
        self.requests += len(gens)
        self.prompt_tokens += sum(g.prompt_tokens for g in gens)
        self.completion_tokens += sum(g.completion_tokens for g in gens)
        cached = [g for g in gens if getattr(g, "cached", False)]  # served by the generation cache
        self.extra["cache_hits"] = self.extra.get("cache_hits", 0) + len(cached)
        self.extra["cache_misses"] = self.extra.get("cache_misses", 0) + len(gens) - len(cached)
        if cached:  # tokens counted above that no engine spent this time
            for key in ("prompt_tokens", "completion_tokens"):
                self.extra[f"cached_{key}"] = self.extra.get(f"cached_{key}", 0) + sum(getattr(g, key) for g in cached)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("per_shard")}
        for name, value in out.items():
            if isinstance(value, Counter):
                out[name] = dict(value)
        out["seconds"] = round(self.seconds, 4)
        out["tokens_per_second"] = round(self.completion_tokens / self.seconds, 2) if self.seconds else 0.0
        return {**out, **self.extra}
