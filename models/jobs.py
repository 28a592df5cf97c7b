"""Typed objects the build flow passes around: what a shard task is asked to do (ShardJob), what it
returns (ShardResult), what the catalog holds of a shard (ShardRecord), and the per-shard decision
(skip / reuse / run), a pure function over them (`plan_shard`) so the whole decision table is tested
without Prefect, DuckDB or files.

A decision needs three facts besides the shard's key: the shard as this run registered it, the newest
done shard with the same key in any run (for reuse), and whether the shard's upstream was rebuilt in
this invocation (stale). Whether a registered file is whole (size and sha256 as registered) is checked
by the caller and passed in `whole`: a shard whose file is gone or differs is a missing shard.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardRecord(_Model):
    """A shard as the catalog registered it (a `shards` row), plus `whole` from the caller."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    stage: str
    shard: int
    input_hash: str | None = None
    status: str = "pending"
    rows: int | None = None
    path: str | None = None
    bytes: int | None = None
    rejects_path: str | None = None
    rejects_bytes: int | None = None
    rejected_rows: int | None = None
    reused_from: str | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    sha256: str | None = None
    rejects_sha256: str | None = None
    whole: bool = Field(True, description="file and rejects file exist with the registered size/hash")

    @field_validator("stats", mode="before")
    @classmethod
    def _stats_json(cls, v: Any) -> Any:
        if v is None or v == "":
            return {}
        return json.loads(v) if isinstance(v, str) else v

    @property
    def done(self) -> bool:
        return self.status == "done"


class ShardJob(_Model):
    """One shard task's input: small, JSON-able (Prefect records task inputs; never pass row data)."""

    config: str = Field(description="the run config as JSON")
    stage: str
    shard: int
    num_shards: int
    input_hash: str
    home: str
    run_id: str
    upstream: dict[str, str] = Field(default_factory=dict, description="upstream stage -> shard file")
    extra: dict[str, Any] = Field(default_factory=dict, description="the global step's output for this shard")


class ShardResult(_Model):
    """What a shard task returns and the flow registers."""

    stage: str
    shard: int
    input_hash: str
    path: str
    rows: int
    bytes: int
    rejects_path: str | None = None
    rejects_bytes: int | None = None
    rejected_rows: int = 0
    sha256: str | None = None
    rejects_sha256: str | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    reused_from: str | None = None

    @classmethod
    def from_record(cls, rec: ShardRecord) -> ShardResult:
        return cls(stage=rec.stage, shard=rec.shard, input_hash=rec.input_hash or "", path=rec.path or "",
                   rows=rec.rows or 0, bytes=rec.bytes or 0, rejects_path=rec.rejects_path,
                   rejects_bytes=rec.rejects_bytes,
                   rejected_rows=rec.rejected_rows or 0, sha256=rec.sha256, rejects_sha256=rec.rejects_sha256,
                   stats=rec.stats, reused_from=rec.reused_from)


class SourceJob(_Model):
    """The source stage's task input: the whole input is read once and partitioned."""

    config: str
    stage: str
    home: str
    run_id: str
    num_shards: int | None = None
    fingerprint: dict[str, Any] = Field(default_factory=dict)
    code: str = Field("", description="the stage's code hash (flows.stages.code_hash)")
    snapshots: dict[str, Any] = Field(
        default_factory=dict, description="source snapshots known and pinned by the run "
                                          "(tasks/sources/dump_snapshot.snapshot_job)")


class SourceResult(_Model):
    num_shards: int
    shards: list[ShardResult]
    warnings: list[str] = Field(default_factory=list)
    snapshots: list[dict[str, Any]] = Field(default_factory=list, description="source snapshots used: registered "
                                                                              "and pinned to the run by the flow")


class Action(StrEnum):
    SKIP = "skip"  # done in this run for the same key, file whole: nothing to do
    REUSE = "reuse"  # done in an earlier run for the same key: registered here with reused_from
    RUN = "run"  # compute


class Plan(_Model):
    action: Action
    reason: str
    reused: ShardRecord | None = Field(None, description="the earlier shard, for reuse")
    rebuilt: bool = Field(False, description="the output may differ from a shard with the same key (its "
                          "file was lost or its upstream rebuilt): downstream shards must not be skipped "
                          "or reused")


def plan_shard(input_hash: str, current: ShardRecord | None, earlier: ShardRecord | None, *,
               stale: bool, fresh: bool) -> Plan:
    """The per-shard decision.

    current: this run's registration of the shard (any status) or None; earlier: the newest done shard
    with this key in another run (None when there is none or it is not whole); stale: an upstream shard
    was rebuilt in this invocation; fresh: --fresh (never reuse across runs).
    """
    same = current is not None and current.done and current.input_hash == input_hash
    if same and not stale and current.whole:
        return Plan(action=Action.SKIP, reason="done for this key")
    if stale:
        return Plan(action=Action.RUN, reason="upstream rebuilt in this run", rebuilt=True)
    if same:  # registered done for this key, but its file is gone or not what was registered
        return Plan(action=Action.RUN, reason="registered file missing or damaged", rebuilt=True)
    if earlier is not None and not fresh and earlier.whole:
        return Plan(action=Action.REUSE, reason=f"same key done in run {earlier.run_id}", reused=earlier)
    if current is None:
        return Plan(action=Action.RUN, reason="new shard")
    if current.status == "failed":
        return Plan(action=Action.RUN, reason="failed before")
    if current.done:
        return Plan(action=Action.RUN, reason="key changed")
    return Plan(action=Action.RUN, reason=f"{current.status} (interrupted or never finished)")


__all__ = ["Action", "Plan", "ShardJob", "ShardRecord", "ShardResult", "SourceJob", "SourceResult", "plan_shard"]
