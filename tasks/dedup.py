"""The dedup stage: exact and near duplicates across the whole run, after the per-turn filters.

    prepare: one global step over every filter shard (signatures per shard, one LSH pass, decisions per
             shard; tasks/filters/dedup.py; config section `dedup`), whose per-shard digest enters each
             dedup shard's key; its signatures and decisions are catalog artifacts, reused by content key
    run:     drop the shard's duplicate turns from its sessions; a session left with fewer than
             sessions.min_turns turns is dropped too

It is a stage of its own, after `filter`, so the per-turn chain (with the LLM judge, the expensive part)
depends on its own shard only: when regenerated turns elsewhere change which copy of a duplicate group
is kept, only the cheap dedup shards and what follows them are rebuilt, never the judge's work.
Every dropped turn becomes a Rejection ('exact_dup' / 'near_dup' with the kept copy's id, 'min_turns');
rows_in == rows_out + sum(dropped), counted in turns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from models.config import RunConfig
from models.records import Session
from tasks.base import Prepared, ShardOutput, Stage, StageContext, Stats
from tasks.filters import dedup as dedup_mod
from tasks.sessions import reject_short_session


class DedupStage(Stage):
    name = "dedup"
    output = Session
    inputs = {"filter": Session}

    @staticmethod
    def active(config: RunConfig) -> bool:
        return config.filter.enabled and (config.dedup.exact or config.dedup.near)

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        return {"active": self.active(config),
                "dedup": config.dedup.model_dump(mode="json"),
                "min_turns": config.sessions.min_turns}

    def prepare(self, config: RunConfig, home: Path, run_id: str,
                upstream: dict[str, dict[int, str]]) -> Prepared | None:
        if not self.active(config):
            return None
        return dedup_mod.prepare(config.dedup, home, run_id, upstream.get("filter") or {})

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        t0 = time.perf_counter()
        sessions = inputs.get("filter") or []
        stats = Stats(rows_in=sum(len(s["turns"]) for s in sessions))
        out = ShardOutput(rows=[], stats=stats)
        dcfg = ctx.config.dedup
        decisions: dict[str, dict[str, Any]] = {}
        if self.active(ctx.config):
            dup_file = (ctx.extra or {}).get("dup_file")
            stats.extra["dedup_scope"] = "run" if dup_file else "shard"
            if dup_file:
                decisions = dedup_mod.load_decisions(dup_file)
            else:  # no global step (the stage run alone): duplicates within this shard only
                turns = [t for s in sessions for t in s["turns"]]
                decisions = dedup_mod.shard_decisions([t["turn_id"] for t in turns], [t["answer"] for t in turns],
                                                      dcfg)
        for s in sessions:
            keep = []
            for t in s["turns"]:
                d = decisions.get(t["turn_id"])
                if d is None or not (dcfg.exact if d["filter"] == "exact_dup" else dcfg.near):
                    keep.append(t)
                    continue
                ctx.reject(out, t["turn_id"], d["filter"], f"duplicate of {d['dup_of']}",
                           score=d["score"], character_id=s["character_id"], text=t["answer"])
            if reject_short_session(ctx, out, s["character_id"], [(t["turn_id"], t["answer"]) for t in keep],
                                    after="dedup"):
                continue
            out.rows.append(Session.model_validate({**s, "turns": keep, "parents": [t["turn_id"] for t in keep]}))
        stats.rows_out = sum(len(s.turns) for s in out.rows)
        stats.extra["sessions"] = len(out.rows)
        stats.seconds = time.perf_counter() - t0
        return out
