"""Stage `characters`: source characters (Wikidata + Wikipedia, the bundled offline corpus, or a
user's JSONL/CSV) into one `Character` row per character and language, top-N per language by
popularity, every dropped candidate kept as a Rejection. Sources and their bad-input decisions are
documented in tasks/sources/.

What a run read is kept as a source snapshot under its inputs' identity (tasks/sources/dump_snapshot.py):
a new run over unchanged inputs reads none of them, and a run's reruns use the rows it pinned."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from models.config import RunConfig
from models.config.characters import CharactersConfig
from models.records import Character, Rejection
from tasks.base import SourceStage
from tasks.sources import bundled, userfile, wikidata
from tasks.sources.dump_snapshot import SnapshotStore
from tasks.sources.wikidata import KIND_DATA, _columns

Collector = Callable[[CharactersConfig], tuple[list[Character], list[Rejection]]]

SOURCES: dict[str, Collector] = {
    "wikidata": wikidata.collect,
    "bundled": bundled.collect,
    "jsonl": userfile.collect,
    "csv": userfile.collect,
}
# settings that change how an input is read, never what is read: in no key
OPERATIONAL = ("read_workers",)


def input_files(cfg: CharactersConfig) -> list[str]:
    if cfg.source == "wikidata":
        return [f for f in [cfg.wikidata_dump, *cfg.wikipedia] if f]
    if cfg.source == "bundled":
        try:
            return [str(bundled.bundled_path(cfg))]
        except FileNotFoundError:
            return [cfg.bundled_file] if cfg.bundled_file else []
    return [cfg.path] if cfg.path else []


def collect_characters(cfg: CharactersConfig, store: SnapshotStore | None = None
                       ) -> tuple[list[Character], list[Rejection]]:
    if cfg.source == "wikidata":
        return wikidata.collect(cfg, store)
    return SOURCES[cfg.source](cfg)


def settings(cfg: CharactersConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in OPERATIONAL}


def sources_code_digest() -> str:
    """A hash of the code that turns inputs into characters (tasks/sources/*.py and this module)."""
    here = Path(__file__).parent / "sources"
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")) + [Path(__file__)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def encode(rows: list[Character], rejects: list[Rejection]) -> pa.Table:
    data = [("row", r.model_dump_json()) for r in rows] + [("reject", r.model_dump_json()) for r in rejects]
    return _columns(KIND_DATA, [k for k, _ in data], [d for _, d in data])


def decode(table: pa.Table) -> tuple[list[Character], list[Rejection]]:
    rows, rejects = [], []
    for kind, data in zip(table.column("kind").to_pylist(), table.column("data").to_pylist(), strict=True):
        if kind == "row":
            rows.append(Character.model_validate(json.loads(data)))
        else:
            rejects.append(Rejection.model_validate(json.loads(data)))
    return rows, rejects


def collect_snapshot(cfg: CharactersConfig, store: SnapshotStore) -> tuple[list[Character], list[Rejection]]:
    """The run's pinned rows if it has them, else the snapshot of the current inputs (read when new)."""
    table = store.pinned_table("characters")
    if table is None:
        table = store.load_or_build("characters", input_files(cfg),
                                    {"characters": settings(cfg), "code": sources_code_digest()},
                                    lambda: encode(*collect_characters(cfg, store)))
    return decode(table)


class CharactersStage(SourceStage):
    name = "characters"
    output = Character

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        # the inputs' content enters each shard's key through its rows' hash (flows/build.py), so a
        # touched but unchanged file, or a rerun over the rows the run pinned, keeps every key
        cfg = config.characters
        return {"characters": settings(cfg), "inputs": [str(Path(f).expanduser()) for f in input_files(cfg)]}

    def collect(self, config: RunConfig) -> tuple[list[Character], list[Rejection]]:
        return collect_characters(config.characters)

    def collect_pinned(self, config: RunConfig, home: str | Path, snapshots: dict[str, Any] | None,
                       run_id: str = "") -> tuple[list[Character], list[Rejection], list[dict[str, Any]]]:
        """`collect` through the source snapshots: (rows, rejects, the snapshots used, for the flow to
        register and pin). `snapshots` is `dump_snapshot.snapshot_job(...)` from the flow."""
        store = SnapshotStore.from_job(home, snapshots, run_id)
        rows, rejects = collect_snapshot(config.characters, store)
        return rows, rejects, store.used_list()

    def describe_input(self, config: RunConfig) -> str:
        return f"characters.source={config.characters.source}: " + (", ".join(input_files(config.characters))
                                                                    or "(no file)")

    @staticmethod
    def shard_key(row: Character) -> str:
        # the character id, not id@language: both language versions land in the same shard
        return row.id
