"""The step contract. A stage is plain logic over one shard, testable without Prefect:

    stage.run(ctx, inputs) -> ShardOutput(rows, rejects, stats)

`inputs` maps each upstream stage name to the rows (dicts) of the same shard. A source stage
(characters) instead implements `collect(cfg) -> (rows, rejects)` over its whole input; the flow
partitions the rows into shards by a hash of `shard_key(row)`. A stage with a global step (near-dup
detection across shards) implements `prepare(...)`, whose per-shard digest enters the shard hash.
The Prefect task in flows/build.py is a thin wrapper adding retries, names and tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from models.base import Record
from models.config import RunConfig
from models.config.engine import EngineConfig
from models.records import Rejection
from models.stats import Stats


@dataclass
class ShardOutput:
    rows: list[Record | dict]
    rejects: list[Rejection] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


@dataclass
class StageContext:
    run_id: str
    stage: str
    shard: int
    num_shards: int
    config: RunConfig
    home: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def engine(self, config: EngineConfig | None = None):
        """The process engine; behind the home's generation cache (engines/cache.py) when `engine.cache`
        is on, bound to this run, stage and shard (so the cache records which keys each run used). An engine
        that is not `cacheable` (injected faults, engines/faults.py) bypasses the cache: its outputs are not
        the model's and must neither be stored under the model's keys nor be replaced by stored ones."""
        from engines import get_engine

        cfg = config or self.config.engine
        engine = get_engine(cfg)
        if not cfg.cache or self.home is None or not getattr(engine, "cacheable", True):
            return engine
        from engines.cache import cached_engine

        return cached_engine(engine, cfg, self.home, run_id=self.run_id, stage=self.stage, shard=self.shard)

    @cached_property
    def seed(self) -> int:
        return self.config.seed

    def reject(self, out: ShardOutput, row_id: str, filter: str, reason: str, *, score: float | None = None,
               character_id: str = "", text: str = "") -> Rejection:
        """Drop a row with its reason: the Rejection goes to `out.rejects` and counts in
        `out.stats.dropped[filter]`, so a stage never counts drops by hand (rows_in == rows_out + dropped)."""
        rejection = Rejection(row_id=row_id, stage=self.stage, shard=self.shard, filter=filter, reason=reason,
                              score=score, character_id=character_id, text=text[:4000])
        out.rejects.append(rejection)
        out.stats.dropped[filter] += 1
        return rejection


class Stage:
    name: ClassVar[str]
    output: ClassVar[type[Record]]
    inputs: ClassVar[dict[str, type[Record]]] = {}  # upstream stage -> the record type it must produce

    def engine_configs(self, config: RunConfig) -> list[EngineConfig]:
        """The engines this stage generates with under `config` (none: it asks no model). The flow loads them
        when the run starts and accounts their requests under the stage's name."""
        return []

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        """Everything that decides this stage's output besides its input rows: config section, prompt
        text, model id. Hashed (with the package version and upstream hashes) into the shard's key."""
        raise NotImplementedError

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        raise NotImplementedError

    # optional global step over all upstream shards; returns {shard: small json-able dict}, or a Prepared
    def prepare(self, config: RunConfig, home: Path, run_id: str,
                upstream: dict[str, dict[int, str]]) -> dict[int, dict[str, Any]] | None:
        return None


class Prepared(dict):
    """A global step's result: {shard: small json-able dict} (each shard's job gets its entry; its `digest`
    enters the shard's key), plus the artifacts the step built (storage/artifacts.py), which the flow process
    registers in the catalog: the step reads the catalog's snapshot and never writes the catalog."""

    def __init__(self, shards: dict[int, dict[str, Any]] | None = None, artifacts: list[Any] | None = None):
        super().__init__(shards or {})
        self.artifacts = list(artifacts or [])


class SourceStage(Stage):
    def collect(self, config: RunConfig) -> tuple[list[Record], list[Rejection]]:
        raise NotImplementedError

    def describe_input(self, config: RunConfig) -> str:
        """Where the rows come from, for error messages."""
        return ""

    @staticmethod
    def shard_key(row: Record) -> str:
        return row.id
