"""The generation cache's durable store: every generation under its request key, in chunks.

Layout under `<home>/gencache/`:

    chunks/<aa>/<chunk>.parquet   the generations, immutable Parquet chunks (key, text, tokens, finish
                                  reason, model, and the run/stage/shard that produced them), written
                                  atomically like shards (temp file, fsync, rename)
    used/<run_id>/<chunk>.parquet which keys each run used, per stage and shard (hits and misses): what
                                  `ditto gc --keep-runs K` keeps
    index.sqlite                  key -> (chunk, row), a B-tree on disk (SQLite, WAL): a lookup is one
                                  indexed read whatever the cache size, memory stays bounded by SQLite's
                                  page cache plus an LRU of decoded chunks (`lru_chunks`)

One writer thread per process appends: results are buffered and written as a chunk every `chunk_rows`
results or `flush_seconds` seconds, whichever comes first. A caller that fills a chunk waits until that
chunk is durable, so a process killed at any moment loses fewer than `chunk_rows` results (plus at most
`flush_seconds` of a slow trickle). Results still buffered are visible to lookups in this process.

Crash safety: before a chunk is written its name is recorded in the index (rows NULL); after the rename
its keys are indexed in one transaction. On open, chunks left half-registered by a killed process are
indexed if their file is whole, forgotten if not. The chunks are the truth: `rebuild_index()` recreates
the index from them (done automatically when the index is missing or unreadable).

Tuning (environment): DITTO_GENCACHE_CHUNK_ROWS (default 512), DITTO_GENCACHE_FLUSH_SECONDS (default 10).
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.shards import TMP_PREFIX, write_table

log = logging.getLogger(__name__)

CACHE_DIR = "gencache"
FIELDS = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "model")
CHUNK_SCHEMA = pa.schema([
    ("key", pa.string()), ("text", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("finish_reason", pa.string()), ("model", pa.string()), ("run_id", pa.string()), ("stage", pa.string()),
    ("shard", pa.int32()), ("created_at", pa.timestamp("us")),
])
USED_SCHEMA = pa.schema([("run_id", pa.string()), ("stage", pa.string()), ("shard", pa.int32()),
                         ("key", pa.string())])
INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, rows INTEGER,
                                   bytes INTEGER, created REAL);
CREATE TABLE IF NOT EXISTS gens (key BLOB PRIMARY KEY, chunk INTEGER NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gens_chunk ON gens (chunk);
"""
USED_FLUSH = 16384  # buffered use records that trigger a write of their own


class GenCacheError(RuntimeError):
    pass


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        raise GenCacheError(f"{name}={os.environ[name]!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    try:
        return max(0.01, float(os.environ.get(name, default)))
    except ValueError:
        raise GenCacheError(f"{name}={os.environ[name]!r} is not a number") from None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _chunk_path(chunks: Path, name: str) -> Path:
    return chunks / name[:2] / f"{name}.parquet"


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process; chunks are fsynced anyway
    con.executescript(INDEX_SCHEMA)
    return con


class GenStore:
    """One per cache folder and process (see `open_store`); thread-safe."""

    def __init__(self, root: str | Path, *, chunk_rows: int | None = None, flush_seconds: float | None = None,
                 lru_chunks: int = 32):
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.used_dir = self.root / "used"
        self.index_path = self.root / "index.sqlite"
        try:
            self.chunks_dir.mkdir(parents=True, exist_ok=True)
            self.used_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GenCacheError(f"cannot create the generation cache at {self.root}: {exc.strerror}") from None
        self.chunk_rows = chunk_rows or _env_int("DITTO_GENCACHE_CHUNK_ROWS", 512)
        self.flush_seconds = flush_seconds or _env_float("DITTO_GENCACHE_FLUSH_SECONDS", 10.0)
        self.lru_chunks = lru_chunks
        self._db_lock = threading.Lock()
        self._db = self._open_index()
        self._heal()
        self._cv = threading.Condition()
        self._pending: dict[str, dict[str, Any]] = {}    # key -> record, not yet written
        self._writing: dict[str, dict[str, Any]] = {}    # the batch being written: still visible
        self._used: set[tuple[str, str, int, str]] = set()
        self._oldest = 0.0
        self._epoch = 0          # batches handed to the writer
        self._durable = -1       # last batch written
        self._flush_asked = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lru: OrderedDict[str, dict[str, list]] = OrderedDict()
        self._lru_lock = threading.Lock()
        self.counts = {"written": 0, "chunks": 0, "write_errors": 0, "lookups": 0, "found": 0}
        self.last_error: str | None = None

    # -- index -------------------------------------------------------------------------------------
    def _open_index(self) -> sqlite3.Connection:
        try:
            con = _connect(self.index_path)
            con.execute("SELECT count(*) FROM chunks").fetchone()
            return con
        except sqlite3.DatabaseError as exc:
            aside = self.index_path.with_name(f"index.corrupt-{int(time.time())}.sqlite")
            log.warning("generation cache index %s unreadable (%s): moved to %s, rebuilding from the chunks",
                        self.index_path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.index_path) + suffix)
                if p.exists():
                    p.rename(Path(str(aside) + suffix))
            con = _connect(self.index_path)
            self._rebuild(con)
            return con

    def _index_chunk(self, con: sqlite3.Connection, chunk_id: int, path: Path) -> int:
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("INSERT OR IGNORE INTO gens VALUES (?, ?, ?)",
                            ((bytes.fromhex(k), chunk_id, i) for i, k in enumerate(keys)))
            con.execute("UPDATE chunks SET rows=?, bytes=? WHERE id=?", [len(keys), path.stat().st_size, chunk_id])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return len(keys)

    def _heal(self) -> None:
        """Chunks a killed process registered but did not finish: index the whole ones, forget the rest."""
        with self._db_lock:
            rows = self._db.execute("SELECT id, name FROM chunks WHERE rows IS NULL").fetchall()
            for cid, name in rows:
                path = _chunk_path(self.chunks_dir, name)
                if not path.exists():
                    # the writer may still be running in another process: only forget old intents
                    created = self._db.execute("SELECT created FROM chunks WHERE id=?", [cid]).fetchone()[0] or 0
                    if time.time() - created > 3600:
                        self._db.execute("DELETE FROM chunks WHERE id=?", [cid])
                    continue
                try:
                    self._index_chunk(self._db, cid, path)
                except (pa.ArrowInvalid, OSError) as exc:
                    log.warning("generation cache: dropping unreadable chunk %s (%s)", path, exc)
                    self._db.execute("DELETE FROM chunks WHERE id=?", [cid])

    def _rebuild(self, con: sqlite3.Connection) -> int:
        n = 0
        for path in sorted(self.chunks_dir.glob("*/*.parquet")):
            if path.name.startswith(TMP_PREFIX):
                continue
            cur = con.execute("INSERT OR IGNORE INTO chunks (name, rows, created) VALUES (?, NULL, ?)",
                              [path.stem, path.stat().st_mtime])
            cid = cur.lastrowid if cur.rowcount else con.execute(
                "SELECT id FROM chunks WHERE name=?", [path.stem]).fetchone()[0]
            try:
                n += self._index_chunk(con, cid, path)
            except (pa.ArrowInvalid, OSError) as exc:
                log.warning("generation cache: skipping unreadable chunk %s (%s)", path, exc)
                con.execute("DELETE FROM chunks WHERE id=?", [cid])
        return n

    def rebuild_index(self) -> int:
        """Recreate the index from the chunk files; returns the generations indexed."""
        self.flush()
        with self._db_lock:
            self._db.execute("DELETE FROM gens")
            self._db.execute("DELETE FROM chunks")
            return self._rebuild(self._db)

    # -- reads -------------------------------------------------------------------------------------
    def _chunk(self, name: str) -> dict[str, list] | None:
        with self._lru_lock:
            cols = self._lru.get(name)
            if cols is not None:
                self._lru.move_to_end(name)
                return cols
        try:
            cols = pq.read_table(_chunk_path(self.chunks_dir, name), columns=["key", *FIELDS]).to_pydict()
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("generation cache: chunk %s unreadable (%s): treated as a miss", name, exc)
            return None
        with self._lru_lock:
            self._lru[name] = cols
            while len(self._lru) > self.lru_chunks:
                self._lru.popitem(last=False)
        return cols

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored generation (text, tokens, finish_reason, model) for a request key, or None."""
        with self._cv:
            rec = self._pending.get(key) or self._writing.get(key)
        if rec is not None:
            return {f: rec[f] for f in FIELDS}
        with self._db_lock:
            self.counts["lookups"] += 1
            row = self._db.execute("SELECT c.name, g.row FROM gens g JOIN chunks c ON c.id = g.chunk "
                                   "WHERE g.key = ?", [bytes.fromhex(key)]).fetchone()
        if row is None:
            return None
        cols = self._chunk(row[0])
        if cols is None or row[1] >= len(cols["key"]) or cols["key"][row[1]] != key:
            return None
        self.counts["found"] += 1
        return {f: cols[f][row[1]] for f in FIELDS}

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # -- writes ------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"gencache-writer-{self.root.name}", daemon=True)
            self._thread.start()

    def put(self, key: str, record: dict[str, Any], *, run_id: str | None = None, stage: str | None = None,
            shard: int | None = None, wait: bool = True) -> int | None:
        """Buffer one generation. When this fills a chunk, wait (if `wait`) until it is durable; with
        wait=False return the batch number to pass to `wait_durable` (None when no chunk filled)."""
        rec = {f: record.get(f) for f in FIELDS}
        rec.update(run_id=run_id, stage=stage, shard=shard, created_at=_now())
        with self._cv:
            if self._closed:
                raise GenCacheError(f"generation cache {self.root} is closed")
            self._start()
            if not self._pending and not self._used:
                self._oldest = time.monotonic()
            self._pending[key] = rec
            full = len(self._pending) >= self.chunk_rows
            mine = self._epoch
            if full:
                self._cv.notify_all()
        if full and wait:
            self.wait_durable(mine)
        return mine if full else None

    def note_use(self, run_id: str | None, stage: str | None, shard: int | None, key: str) -> None:
        """Record that a run used this key (hits and misses alike): `gc` keeps what recent runs used."""
        if run_id is None:
            return
        with self._cv:
            self._start()
            if not self._pending and not self._used:
                self._oldest = time.monotonic()
            self._used.add((run_id, stage or "", -1 if shard is None else shard, key))
            if len(self._used) >= USED_FLUSH:
                self._cv.notify_all()

    def wait_durable(self, epoch: int, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._durable < epoch and not self._closed and time.monotonic() < deadline:
                self._cv.wait(timeout=1.0)

    def flush(self) -> None:
        """Write everything buffered now and wait for it."""
        with self._cv:
            if not self._pending and not self._used:
                return
            self._start()
            mine = self._epoch
            self._flush_asked = True
            self._cv.notify_all()
        self.wait_durable(mine)

    def _due(self) -> bool:
        if self._flush_asked or self._closed:
            return bool(self._pending or self._used)
        if len(self._pending) >= self.chunk_rows or len(self._used) >= USED_FLUSH:
            return True
        return bool(self._pending or self._used) and time.monotonic() - self._oldest >= self.flush_seconds

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._due():
                    if self._closed:
                        return
                    self._cv.wait(timeout=min(1.0, self.flush_seconds))
                # everything buffered: a chunk is chunk_rows results, a few more when producers race
                batch, self._pending = self._pending, {}
                self._writing = batch
                used, self._used = self._used, set()
                epoch = self._epoch
                self._epoch += 1
                self._flush_asked = False
                self._oldest = 0.0
            try:
                if batch:
                    self._write_chunk(batch)
                if used:
                    self._write_used(used)
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: never fail a run over it
                self.counts["write_errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("generation cache: could not write %d generations to %s: %s", len(batch), self.root,
                            self.last_error)
            with self._cv:
                self._writing = {}
                self._durable = epoch
                self._cv.notify_all()

    def _write_chunk(self, batch: dict[str, dict[str, Any]]) -> None:
        name = _new_chunk_name()
        path = _chunk_path(self.chunks_dir, name)
        keys = list(batch)
        cols: dict[str, list] = {"key": keys}
        for f in CHUNK_SCHEMA.names[1:]:
            cols[f] = [batch[k][f] for k in keys]
        table = pa.Table.from_pydict(cols, schema=CHUNK_SCHEMA)
        con = self._writer_db()
        cid = con.execute("INSERT INTO chunks (name, rows, created) VALUES (?, NULL, ?)", [name, time.time()]).lastrowid
        write_table(table, path)
        self._index_chunk(con, cid, path)
        self.counts["written"] += len(keys)
        self.counts["chunks"] += 1

    def _writer_db(self) -> sqlite3.Connection:
        con = getattr(self, "_wdb", None)
        if con is None:
            con = self._wdb = _connect(self.index_path)
        return con

    def _write_used(self, used: set[tuple[str, str, int, str]]) -> None:
        by_run: dict[str, list[tuple[str, str, int, str]]] = {}
        for u in sorted(used):
            by_run.setdefault(u[0], []).append(u)
        for run_id, rows in by_run.items():
            table = pa.Table.from_pydict({"run_id": [r[0] for r in rows], "stage": [r[1] for r in rows],
                                          "shard": [r[2] for r in rows], "key": [r[3] for r in rows]},
                                         schema=USED_SCHEMA)
            write_table(table, self.used_dir / _safe(run_id) / f"{uuid.uuid4().hex}.parquet")

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._flush_asked = True
            self._cv.notify_all()
        if self._thread is not None:
            self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._db_lock:
            self._db.close()
        wdb = getattr(self, "_wdb", None)
        if wdb is not None:
            wdb.close()

    # -- inspection --------------------------------------------------------------------------------
    def size(self) -> dict[str, int]:
        with self._db_lock:
            gens = self._db.execute("SELECT count(*) FROM gens").fetchone()[0]
            chunks, nbytes = self._db.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM chunks "
                                              "WHERE rows IS NOT NULL").fetchone()
        return {"generations": gens, "chunks": chunks, "bytes": nbytes, "buffered": len(self._pending)}


def _new_chunk_name() -> str:
    """<2 hex: the fan-out folder><UTC time>-<random>: unique across processes, time-ordered per folder."""
    u = uuid.uuid4().hex
    return f"{u[:2]}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{u[2:14]}"


def _safe(run_id: str) -> str:
    """Run ids are validated by the flow; keep the folder name safe all the same."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in run_id) or "_"


# -- the process-wide stores ---------------------------------------------------------------------------
_stores: dict[Path, GenStore] = {}
_stores_lock = threading.Lock()


def cache_root(home: str | Path) -> Path:
    return Path(home) / CACHE_DIR


def open_store(home: str | Path) -> GenStore:
    """The store of this home for this process (one writer thread per process and home)."""
    root = cache_root(home).resolve()
    with _stores_lock:
        store = _stores.get(root)
        if store is None:
            store = _stores[root] = GenStore(root)
        return store


def close_store(home: str | Path) -> None:
    root = cache_root(home).resolve()
    with _stores_lock:
        store = _stores.pop(root, None)
    if store is not None:
        store.close()


def close_stores() -> None:
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for s in stores:
        try:
            s.close()
        except Exception as exc:  # noqa: BLE001 - at exit: report, do not raise
            log.warning("generation cache %s: %s", s.root, exc)


atexit.register(close_stores)


# -- pruning -------------------------------------------------------------------------------------------
def keep_set(runs: list[dict], shards: list[dict], keep_runs: int) -> tuple[list[str], set[tuple[str, str, int]]]:
    """What `gc` keeps: the last `keep_runs` runs of each dataset (by start time), every shard of them,
    and for a shard they reused, the shard of the run that produced it (its generations are what a
    rebuild of that shard would ask for). Returns (kept run ids, {(run_id, stage, shard)})."""
    if keep_runs < 1:
        raise GenCacheError("--keep-runs must be at least 1")
    per: dict[str, list[dict]] = {}
    for r in runs:
        per.setdefault(r.get("dataset") or "", []).append(r)
    kept: list[str] = []
    for rows in per.values():
        rows.sort(key=lambda r: (r.get("started_at") is not None, r.get("started_at")), reverse=True)
        kept += [r["run_id"] for r in rows[:keep_runs]]
    kept_set = set(kept)
    keep: set[tuple[str, str, int]] = set()
    for s in shards:
        if s["run_id"] not in kept_set:
            continue
        keep.add((s["run_id"], s["stage"], int(s["shard"])))
        if s.get("reused_from"):
            keep.add((s["reused_from"], s["stage"], int(s["shard"])))
    return sorted(kept), keep


def gc(home: str | Path, keep: Iterable[tuple[str, str, int]], *, dry_run: bool = False,
       compact_rows: int | None = None) -> dict[str, Any]:
    """Delete every cached generation no kept (run, stage, shard) used. Chunks with no live row are
    deleted; chunks with some (and small chunks) are rewritten together into chunks of `compact_rows`.
    Runs out of core (DuckDB over the key columns), so memory stays bounded at any cache size.
    The caller holds the catalog's writer lock, so no run writes meanwhile."""
    import duckdb

    close_store(home)  # this process's buffered generations first
    root = cache_root(home)
    store = GenStore(root)
    compact_rows = compact_rows or max(store.chunk_rows * 8, 4096)
    keep = set(keep)
    runs_kept = {r for r, _, _ in keep}
    con = duckdb.connect(":memory:")
    tmpdir = root / ".tmp-gc"
    tmpdir.mkdir(exist_ok=True)
    con.execute(f"SET temp_directory='{str(tmpdir).replace(chr(39), chr(39) * 2)}'")
    con.execute("CREATE TABLE keep (run_id VARCHAR, stage VARCHAR, shard INTEGER)")
    if keep:
        con.executemany("INSERT INTO keep VALUES (?, ?, ?)", sorted(keep))
    used_files = [str(p) for d in sorted(store.used_dir.iterdir()) if d.is_dir() and d.name in
                  {_safe(r) for r in runs_kept} for p in sorted(d.glob("*.parquet"))]
    con.execute("CREATE TABLE live (key VARCHAR)")
    if used_files:
        con.execute("INSERT INTO live SELECT DISTINCT u.key FROM read_parquet(?) u "
                    "JOIN keep k ON u.run_id = k.run_id AND u.stage = k.stage AND u.shard = k.shard", [used_files])
    with store._db_lock:
        chunks = store._db.execute("SELECT id, name, rows, bytes FROM chunks WHERE rows IS NOT NULL").fetchall()
    files = {str(_chunk_path(store.chunks_dir, name)): (cid, name, rows, nbytes) for cid, name, rows, nbytes in chunks}
    live_per: dict[str, int] = {}
    present = [f for f in files if Path(f).exists()]
    if present:
        for fname, n_live in con.execute(
                "SELECT c.filename, count(l.key) FROM read_parquet(?, filename=true) c "
                "LEFT JOIN live l ON c.key = l.key GROUP BY c.filename", [present]).fetchall():
            live_per[fname] = n_live
    before = {"generations": sum(r for _, _, r, _ in chunks), "chunks": len(chunks),
              "bytes": sum(b or 0 for *_, b in chunks)}
    dead, rewrite = [], []
    for f, (cid, _name, rows, _nbytes) in files.items():
        n_live = live_per.get(f, 0)
        if n_live == 0:
            dead.append((cid, f))
        elif n_live < rows or rows < store.chunk_rows // 2:
            rewrite.append((cid, f))
    if len(rewrite) == 1 and live_per[rewrite[0][1]] == files[rewrite[0][1]][2]:
        rewrite = []  # one small chunk, all live: nothing to merge it with
    removed = sum(files[f][2] for _, f in dead) + sum(files[f][2] - live_per[f] for _, f in rewrite)
    res: dict[str, Any] = {"runs_kept": sorted(runs_kept), "shards_kept": len(keep), "before": before,
                           "chunks_deleted": len(dead), "chunks_rewritten": len(rewrite),
                           "generations_removed": removed, "dry_run": dry_run}
    if dry_run:
        con.close()
        store.close()
        res["after"] = {**before, "generations": before["generations"] - removed}
        return res
    # rewrite first (new chunks indexed over the old pointers), then delete
    if rewrite:
        buf: list[pa.Table] = []
        nbuf = 0
        for _, f in rewrite:
            cur = con.execute("SELECT c.* FROM read_parquet(?) c SEMI JOIN live l ON c.key = l.key", [f])
            t = cur.to_arrow_table() if hasattr(cur, "to_arrow_table") else cur.fetch_arrow_table()
            buf.append(t.cast(CHUNK_SCHEMA))
            nbuf += t.num_rows
            if nbuf >= compact_rows:
                _write_compacted(store, pa.concat_tables(buf))
                buf, nbuf = [], 0
        if buf:
            _write_compacted(store, pa.concat_tables(buf))
        dead += rewrite
    con.close()
    db = store._writer_db()
    for cid, f in dead:
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM gens WHERE chunk=?", [cid])
        db.execute("DELETE FROM chunks WHERE id=?", [cid])
        db.execute("COMMIT")
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
    for d in store.used_dir.iterdir():
        if d.is_dir() and d.name not in {_safe(r) for r in runs_kept}:
            for p in d.iterdir():
                p.unlink()
            d.rmdir()
    for d in store.chunks_dir.iterdir():
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    for p in tmpdir.iterdir():
        p.unlink()
    tmpdir.rmdir()
    db.execute("VACUUM")
    res["after"] = store.size()
    res["after"].pop("buffered", None)
    store.close()
    return res


def _write_compacted(store: GenStore, table: pa.Table) -> None:
    name = _new_chunk_name()
    path = _chunk_path(store.chunks_dir, name)
    con = store._writer_db()
    cid = con.execute("INSERT INTO chunks (name, rows, created) VALUES (?, NULL, ?)", [name, time.time()]).lastrowid
    write_table(table, path)
    keys = table.column("key").to_pylist()
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT OR REPLACE INTO gens VALUES (?, ?, ?)",
                    ((bytes.fromhex(k), cid, i) for i, k in enumerate(keys)))
    con.execute("UPDATE chunks SET rows=?, bytes=? WHERE id=?", [len(keys), path.stat().st_size, cid])
    con.execute("COMMIT")
