"""Source snapshots: what the characters stage read from its inputs, kept under the inputs' identity,
so a new run over unchanged inputs reads none of them and a run's reruns use the rows it used.

Identity of an input file: resolved path, size, mtime (ns) and a hash of its first and last MiB (the
whole file's sha256 when it is at most 64 MiB, e.g. a user's JSONL). A snapshot's id is a hash of its
kind, the identities of its inputs and the parameters its content depends on (configuration and a
hash of the source code), so an unchanged dump read with the same settings is the same snapshot.

Kinds: `wikidata-dump` (the dump's ranked candidate pool, the labels it references, its rejections:
reused when only the Wikipedia files or rendering settings change) and `characters` (the stage's
final rows and rejections, for every source: wikidata + wikipedia, user JSONL/CSV, bundled).

Data: Parquet under <home>/sources/<kind>/<id>.parquet, written atomically; rows in the catalog table
`source_snapshots` (path relative to the home, size, sha256), and `source_pins` (run, stage, kind ->
snapshot) say which snapshot a run used. Only the flow process writes the catalog: the source task
gets the known and pinned rows in its job (`snapshot_job`) and returns what it used, which the flow
registers (`register_snapshots`) before it registers the stage's shards.

Rerun: the pinned `characters` snapshot is used whatever the input files look like now. If its data
is gone, an input that still has the pinned identity is read again (the same rows); one that changed
is a `SnapshotGoneError` naming the file and what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from models.ids import content_hash
from tasks.sources import CharacterSourceError

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "sources"
BLOCK = 1 << 20
FULL_HASH_LIMIT = 64 << 20
IDENTITY_KEYS = ("size", "mtime_ns", "blocks", "sha256")


class SnapshotGoneError(CharacterSourceError):
    """A run's pinned snapshot is gone and an input it was read from has changed."""


class InputChangedError(CharacterSourceError):
    """An input file changed while it was being read."""


def input_identity(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
        with p.open("rb") as fh:
            if st.st_size <= FULL_HASH_LIMIT:
                data = fh.read()
                full = hashlib.sha256(data).hexdigest()
                blocks = hashlib.sha256(data[:BLOCK] + data[-BLOCK:]).hexdigest()[:32]
            else:
                h = hashlib.sha256(fh.read(BLOCK))
                fh.seek(-BLOCK, 2)
                h.update(fh.read(BLOCK))
                full, blocks = None, h.hexdigest()[:32]
    except OSError as exc:
        return {"path": str(p), "missing": True, "error": exc.strerror or str(exc)}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "blocks": blocks, "sha256": full}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between two identities of a file, or None."""
    if new.get("missing"):
        return f"{old['path']} is gone ({new.get('error', 'missing')})"
    parts = []
    if old.get("size") != new.get("size"):
        parts.append(f"size {old.get('size')} -> {new.get('size')} bytes")
    if old.get("mtime_ns") != new.get("mtime_ns"):
        def ts(ns: Any) -> str:
            return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds") if ns else "?"
        parts.append(f"modified {ts(old.get('mtime_ns'))} -> {ts(new.get('mtime_ns'))}")
    if old.get("blocks") != new.get("blocks") or old.get("sha256") != new.get("sha256"):
        parts.append("content differs")
    return f"{old['path']} changed since it was read ({', '.join(parts)})" if parts else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class SnapshotStore:
    """Snapshots as the source task sees them: the catalog rows the flow passed in, files under the home,
    and what this collect used (returned to the flow for registration and pinning)."""

    def __init__(self, home: str | Path, known: Iterable[dict[str, Any]] = (),
                 pinned: dict[str, dict[str, Any]] | None = None, fresh: bool = False, run_id: str = ""):
        self.home = Path(home)
        self.known = {r["snapshot_id"]: self._relative(r) for r in known}
        self.pinned = {k: self._relative(v) for k, v in (pinned or {}).items()}
        self.fresh, self.run_id = fresh, run_id
        self.used: dict[str, dict[str, Any]] = {}

    def _relative(self, row: dict[str, Any]) -> dict[str, Any]:
        """Snapshot paths are stored relative to the home (the catalog hands them back absolute)."""
        row = dict(row)
        try:
            row["path"] = Path(row["path"]).relative_to(self.home).as_posix()
        except ValueError:
            pass
        return row

    @classmethod
    def from_job(cls, home: str | Path, job: dict[str, Any] | None, run_id: str = "") -> SnapshotStore:
        job = job or {}
        return cls(home, job.get("known", ()), job.get("pinned"), bool(job.get("fresh")), run_id)

    def tmp_dir(self) -> Path:
        d = self.home / SNAPSHOT_DIR / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def file_of(self, meta: dict[str, Any]) -> Path:
        return self.home / meta["path"]

    def whole(self, meta: dict[str, Any]) -> bool:
        f = self.file_of(meta)
        try:
            return f.stat().st_size == meta["bytes"] and _sha256(f) == meta["sha256"]
        except OSError:
            return False

    def _read(self, meta: dict[str, Any]) -> pa.Table:
        from storage.shards import read_table

        return read_table(self.file_of(meta))

    def pinned_table(self, kind: str) -> pa.Table | None:
        """The run's pinned snapshot of `kind`; None when there is none, or when it is gone but every input
        it was read from is unchanged (reading again yields the same rows). Gone and changed: an error."""
        pin = self.pinned.get(kind)
        if not pin:
            return None
        if self.whole(pin):
            self.used[kind] = {**pin, "new": False}
            log.info("%s: using snapshot %s pinned by run %s", kind, pin["snapshot_id"], self.run_id)
            return self._read(pin)
        inputs = json.loads(pin["inputs"]) if isinstance(pin["inputs"], str) else pin["inputs"]
        changes = [c for c in (describe_change(i, input_identity(i["path"])) for i in inputs) if c]
        if changes:
            raise SnapshotGoneError(
                f"run {self.run_id or '?'}: the {kind} rows this run used (snapshot {pin['snapshot_id']}, "
                f"{self.file_of(pin)}) are gone and {'; '.join(changes)}: a rerun cannot use the rows the run "
                f"used; start a new run to read the current input")
        log.warning("%s: pinned snapshot %s is gone; its inputs are unchanged, reading them again", kind,
                    pin["snapshot_id"])
        return None

    def load_or_build(self, kind: str, inputs: list[str | Path], params: dict[str, Any],
                      build: Callable[[], pa.Table]) -> pa.Table:
        """The snapshot of these inputs and params, read from the home if one is whole, else built and
        written (atomically). The inputs must not change while they are read."""
        from storage.shards import write_table

        before = [input_identity(p) for p in inputs]
        sid = content_hash({"kind": kind, "inputs": before, "params": params})
        meta = None if self.fresh else self.known.get(sid)
        if meta is not None and self.whole(meta):
            self.used[kind] = {**meta, "new": False}
            log.info("%s: snapshot %s reused, inputs not read", kind, sid)
            return self._read(meta)
        table = build()
        after = [input_identity(p) for p in inputs]
        for old, new in zip(before, after, strict=True):
            change = describe_change(old, new)
            if change:
                raise InputChangedError(f"{change} while it was being read; read it again when it is complete")
        rel = Path(SNAPSHOT_DIR) / kind / f"{sid}.parquet"
        nbytes = write_table(table, self.home / rel)
        self.used[kind] = {"snapshot_id": sid, "kind": kind, "inputs": before, "params": params, "path": str(rel),
                           "rows": table.num_rows, "bytes": nbytes, "sha256": _sha256(self.home / rel),
                           "new": True}
        return table

    def used_list(self) -> list[dict[str, Any]]:
        return [dict(v) for v in self.used.values()]


# -- the flow side: the catalog (only the flow process calls these) ---------------------------------
def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if k in ("inputs", "params", "stats") and isinstance(v, str):
            v = json.loads(v)
        elif isinstance(v, datetime):
            v = v.isoformat()
        out[k] = v
    return out


def snapshot_job(cat: Any, run_id: str, stage: str, fresh: bool = False) -> dict[str, Any]:
    """What the source task needs: every known snapshot and this run's pins (small tables)."""
    known = [_jsonable(r) for r in cat.query("SELECT * FROM source_snapshots")]
    by_id = {r["snapshot_id"]: r for r in known}
    pins = cat.query("SELECT kind, snapshot_id FROM source_pins WHERE run_id=? AND stage=?", [run_id, stage])
    pinned = {p["kind"]: by_id[p["snapshot_id"]] for p in pins if p["snapshot_id"] in by_id}
    return {"known": known, "pinned": pinned, "fresh": fresh}


def register_snapshots(cat: Any, run_id: str, stage: str, used: list[dict[str, Any]]) -> None:
    """Record new snapshots and pin every used one to the run (before its shards are registered)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    for m in used or []:
        cat._tx("INSERT INTO source_snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (snapshot_id) DO UPDATE "
                "SET path=excluded.path, rows=excluded.rows, bytes=excluded.bytes, sha256=excluded.sha256",
                [m["snapshot_id"], m["kind"], json.dumps(m["inputs"]), json.dumps(m["params"]), m["path"], m["rows"],
                 m["bytes"], m["sha256"], json.dumps(m.get("stats") or {}), now])
        cat._tx("INSERT INTO source_pins VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, stage, kind) DO UPDATE SET "
                "snapshot_id=excluded.snapshot_id, pinned_at=excluded.pinned_at",
                [run_id, stage, m["kind"], m["snapshot_id"], now])
    if used:
        cat.snapshot()


__all__ = ["InputChangedError", "SnapshotGoneError", "SnapshotStore", "describe_change", "input_identity",
           "register_snapshots", "snapshot_job"]
