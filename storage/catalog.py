"""The DuckDB catalog: runs, shards, stage_stats, models, evaluations, artifacts (storage/artifacts.py).

Only the flow process opens it (DuckDB allows one writer process, and a reader process would block
the writer); while open it also holds an flock on <home>/catalog.lock, which readers probe (without
blocking anyone) to tell a live run from one whose process died. After each change the writer
refreshes a Parquet snapshot under <home>/snapshot/, partitioned by run (`<table>/run_id=<id>/data.parquet`):
only the partitions a change touched are rewritten, so registering a shard costs the same after a
year of nightlies as on the first night. Every reader (CLI, dashboard, export) reads the snapshot
instead of catalog.duckdb: see storage/reader.py.

Paths are stored relative to the home (a moved home keeps working) and returned absolute. The catalog
file is created atomically (schema written in a temp file, then linked into place): a kill during
creation never leaves a catalog without tables. A new catalog is seeded from an existing snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import duckdb

from models.stats import Stats
from storage.layout import REJECTED_DIR, RUNS_DIR
from storage.shards import _fsync_dir, file_sha256, shard_is_whole, writable_dir_problem, write_table

SNAPSHOT_DIR = "snapshot"
LAYOUT_FILE = "_layout.json"  # written once the snapshot is complete in the partitioned layout
LAYOUT_VERSION = 3  # 3: hive folders run_id=<id>/ (readers prune partitions by path)
LOCK_FILE = "catalog.lock"
CATALOG_FILE = "catalog.duckdb"
TABLES = ("runs", "shards", "stage_stats", "models", "evaluations", "source_snapshots", "source_pins", "artifacts")
PATH_COLUMNS = {"shards": ("path", "rejects_path"), "models": ("path",), "artifacts": ("path",)}
_SQL_TYPES = {int: "BIGINT", float: "DOUBLE", Counter: "JSON"}


def stats_columns(cls: type = Stats) -> dict[str, str]:
    """stage_stats' columns from the `Stats` dataclass: each field that is summed over a stage's shards (not
    marked per-shard), with its SQL type (int BIGINT, float DOUBLE, Counter JSON merged by key)."""
    hints = get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if not f.metadata.get("per_shard"):
            t = hints[f.name]
            out[f.name] = _SQL_TYPES[get_origin(t) or t]
    return out


STATS_COLUMNS = stats_columns()


def stats_zero() -> dict[str, Any]:
    """Each Stats column's value over no shard: 0, 0.0 or {}."""
    return {c: {} if t == "JSON" else 0.0 if t == "DOUBLE" else 0 for c, t in STATS_COLUMNS.items()}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, status VARCHAR, dataset VARCHAR, config JSON, config_hash VARCHAR,
    package_version VARCHAR, num_shards INTEGER, until VARCHAR, flow_run_id VARCHAR, error VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS shards (
    run_id VARCHAR, stage VARCHAR, shard INTEGER, input_hash VARCHAR, status VARCHAR, rows BIGINT,
    path VARCHAR, bytes BIGINT, rejects_path VARCHAR, rejected_rows BIGINT, attempts INTEGER,
    error VARCHAR, reused_from VARCHAR, stats JSON, started_at TIMESTAMP, finished_at TIMESTAMP,
    sha256 VARCHAR, rejects_bytes BIGINT, rejects_sha256 VARCHAR,
    PRIMARY KEY (run_id, stage, shard));
CREATE TABLE IF NOT EXISTS stage_stats (
    run_id VARCHAR, stage VARCHAR, shards_total INTEGER, shards_done INTEGER, shards_failed INTEGER,
    shards_reused INTEGER, """ + ", ".join(f"{c} {t}" for c, t in STATS_COLUMNS.items()) + """,
    updated_at TIMESTAMP, metrics JSON, PRIMARY KEY (run_id, stage));
CREATE TABLE IF NOT EXISTS models (
    model_id VARCHAR PRIMARY KEY, run_id VARCHAR, path VARCHAR, base_model VARCHAR, data_hash VARCHAR,
    status VARCHAR, metrics JSON, config JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS evaluations (
    eval_id VARCHAR, run_id VARCHAR, model VARCHAR, language VARCHAR, metric VARCHAR, value DOUBLE,
    n BIGINT, details JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS source_snapshots (
    snapshot_id VARCHAR PRIMARY KEY, kind VARCHAR, inputs JSON, params JSON, path VARCHAR, rows BIGINT,
    bytes BIGINT, sha256 VARCHAR, stats JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS source_pins (
    run_id VARCHAR, stage VARCHAR, kind VARCHAR, snapshot_id VARCHAR, pinned_at TIMESTAMP,
    PRIMARY KEY (run_id, stage, kind));
CREATE TABLE IF NOT EXISTS artifacts (
    kind VARCHAR, key VARCHAR, run_id VARCHAR, path VARCHAR, bytes BIGINT, sha256 VARCHAR, files JSON, meta JSON,
    created_at TIMESTAMP, PRIMARY KEY (kind, key));
"""

# catalogs written by earlier versions: the columns added since (appended, in SCHEMA's order); a Stats field
# added since is added by _stats_migrations
MIGRATIONS = """
ALTER TABLE shards ADD COLUMN IF NOT EXISTS sha256 VARCHAR;
ALTER TABLE shards ADD COLUMN IF NOT EXISTS rejects_bytes BIGINT;
ALTER TABLE shards ADD COLUMN IF NOT EXISTS rejects_sha256 VARCHAR;
ALTER TABLE stage_stats ADD COLUMN IF NOT EXISTS metrics JSON;
"""

# the lookups the flow makes on every shard: reuse by input hash, the current run's rows
INDEXES = """
CREATE INDEX IF NOT EXISTS shards_by_input_hash ON shards (input_hash);
CREATE INDEX IF NOT EXISTS shards_by_run ON shards (run_id);
CREATE INDEX IF NOT EXISTS stage_stats_by_run ON stage_stats (run_id);
"""

SHARD_STATUSES = ("pending", "running", "done", "failed")


def _stats_migrations() -> str:
    """Every Stats column, for a catalog written before its field existed (a no-op where it exists)."""
    return "".join(f"ALTER TABLE stage_stats ADD COLUMN IF NOT EXISTS {c} {t};\n" for c, t in STATS_COLUMNS.items())
# a registered shard path from an earlier layout (absolute, maybe under a home that has moved since)
LEGACY_SHARD_PATH = rf"^.*/({RUNS_DIR}/[^/]+/(?:{REJECTED_DIR}/)?[^/]+/[^/]+/part-[0-9]+\.parquet)$"
_WRITE_SQL = re.compile(r"^\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM|ALTER\s+TABLE|TRUNCATE"
                        r"(?:\s+TABLE)?)\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
ALL = object()  # the whole table is dirty
_PROCESS_LOCKS: dict[str, tuple[int, int]] = {}  # lock file -> (descriptor, Catalogs open in this process)
_PROCESS_LOCKS_GUARD = threading.Lock()


class CatalogError(RuntimeError):
    pass


class CatalogBusy(CatalogError):
    """Another process holds the catalog (a run in progress)."""


class CatalogCorrupt(CatalogError):
    """catalog.duckdb exists but is not a readable DuckDB database."""


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def catalog_held(home: str | Path) -> bool:
    """True while a process holds <home>'s catalog open for writing. Probes the lock with a shared,
    non-blocking flock that is released at once, so it never makes a writer wait more than a moment."""
    import fcntl

    lock = Path(home) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def partition_path(table_dir: Path, key: str | None) -> Path:
    """A valid run id's partition is a hive folder (readers skip the others by path, unopened); a NULL or
    (from older versions) unusual id gets a flat file."""
    from storage.layout import is_valid_run_id

    if key is not None and is_valid_run_id(key):
        return table_dir / f"run_id={key}" / "data.parquet"
    if key is None:
        return table_dir / "_null.parquet"
    return table_dir / f"id-{hashlib.sha1(key.encode()).hexdigest()}.parquet"


def _layout_version(snap: Path) -> int:
    try:
        return int(json.loads((snap / LAYOUT_FILE).read_text()).get("version", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def snapshot_files(home: str | Path, table: str) -> tuple[list[Path], list[Path]]:
    """(hive partition files, flat files) of a table's snapshot. Without a complete current layout, the
    single file of the first layout (<table>.parquet) is the flat file."""
    snap = Path(home) / SNAPSHOT_DIR
    if (snap / LAYOUT_FILE).exists():
        d = snap / table
        if not d.is_dir():
            return [], []
        if _layout_version(snap) < LAYOUT_VERSION:  # flat run=<id>.parquet files (layout 2)
            return [], sorted(d.glob("*.parquet"))
        return sorted(d.glob("run_id=*/data.parquet")), sorted(d.glob("*.parquet"))
    legacy = snap / f"{table}.parquet"
    return [], ([legacy] if legacy.exists() else [])


def read_snapshot_sql(hive: list[Path], flat: list[Path]) -> list[str]:
    """read_parquet(...) expressions over a table's snapshot files."""
    def lst(files: list[Path]) -> str:
        return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"

    out = []
    if hive:
        # one schema in every partition file (the writer rewrites them all when a column is added): no
        # union_by_name, so a query opens only the files its run_id filter keeps, not every footer
        out.append(f"read_parquet({lst(hive)}, hive_partitioning=true, hive_types={{'run_id': VARCHAR}})")
    if flat:
        out.append(f"read_parquet({lst(flat)}, hive_partitioning=false, union_by_name=true)")
    return out


def snapshot_exists(home: str | Path) -> bool:
    snap = Path(home) / SNAPSHOT_DIR
    return (snap / LAYOUT_FILE).exists() or any((snap / f"{t}.parquet").exists() for t in TABLES)


def _table_columns(con: Any, table: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema='main' AND table_name=? "
        "ORDER BY ordinal_position", [table]).fetchall()]


def _has_table(con: Any, table: str) -> bool:
    return bool(con.execute("SELECT 1 FROM information_schema.tables WHERE table_schema='main' AND table_name=?",
                            [table]).fetchall())


class _TrackedConnection:
    """`Catalog.con` for code outside this module: every statement that writes a table marks that table
    dirty, so the next snapshot exports it (the whole table: the writer cannot tell which runs changed)."""

    def __init__(self, cat: Catalog):
        self._cat = cat

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        res = self._cat._con.execute(sql, *args, **kwargs)
        self._cat._touch_sql(sql)
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cat._con, name)


class Catalog:
    """The writer. Use from one thread (the flow's), as a context manager."""

    def __init__(self, home: str | Path, wait_seconds: float = 0.0, snapshot_interval: float = 0.5):
        self.home = Path(home).expanduser().absolute()
        self._home_resolved = self.home.resolve()
        self.path = self.home / CATALOG_FILE
        self.snapshot_interval = snapshot_interval
        self._lock = threading.RLock()
        self._dirty: dict[str, Any] = {}
        self._timer: threading.Timer | None = None
        self._closed = False
        self._last_snapshot = 0.0
        self._lock_fd: int | None = None
        if why := writable_dir_problem(self.home, "home folder "):
            raise CatalogError(why)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._create()
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                self._con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as exc:
                msg = str(exc)
                if "lock" in msg.lower():
                    if time.monotonic() < deadline:
                        time.sleep(0.5)
                        continue
                    raise CatalogBusy(
                        f"another ditto process is using {self.path} (a run in progress): wait for it to finish, "
                        f"or use another --home. ({msg.splitlines()[0]})") from None
                if "not a valid duckdb database" in msg.lower():
                    raise CatalogCorrupt(self._corrupted(msg)) from None
                raise CatalogError(f"cannot open catalog {self.path}: {msg.splitlines()[0]}") from None
            except (duckdb.SerializationException, duckdb.InvalidInputException, duckdb.Error) as exc:
                raise CatalogCorrupt(self._corrupted(str(exc))) from None
        try:
            self._take_lock()
            schemaless = not _has_table(self._con, "runs")
            self._prepare(self._con)
            if schemaless:  # a catalog file an earlier version created but was killed before its tables
                self._seed(self._con)
            self._partitioned = {t: "run_id" in _table_columns(self._con, t) for t in TABLES}
            if not self._snapshot_current(self._con):
                self._write_full_snapshot(self._con)
        except BaseException:
            self._release()
            raise
        self._flush_con = self._con.cursor()  # the deferred export's own connection (made in this thread)
        self.con = _TrackedConnection(self)

    def _corrupted(self, msg: str) -> str:
        return (f"catalog {self.path} is corrupted or not a DuckDB file ({msg.splitlines()[0]}); "
                f"run `ditto repair --home {self.home}` to move it aside and rebuild it from the snapshot")

    # -- creation, migration, locking ---------------------------------------------------------
    def _prepare(self, con: Any) -> None:
        con.execute(SCHEMA)
        con.execute(MIGRATIONS)
        con.execute(_stats_migrations())
        con.execute(INDEXES)
        self._migrate_paths(con)

    def _create(self) -> None:
        """Build the catalog in a temp file (schema, and the rows of an existing snapshot) and link it into
        place: the name catalog.duckdb never points at a half-made file."""
        for stale in self.home.glob(".tmp-catalog-*.duckdb*"):
            m = re.match(r"^\.tmp-catalog-(\d+)-", stale.name)
            if m and not _pid_alive(int(m.group(1))):
                stale.unlink(missing_ok=True)
        tmp = self.home / f".tmp-catalog-{os.getpid()}-{secrets.token_hex(4)}.duckdb"
        try:
            con = duckdb.connect(str(tmp))
            try:
                self._prepare(con)
                self._seed(con)
                self._partitioned = {t: "run_id" in _table_columns(con, t) for t in TABLES}
                if not self._snapshot_current(con):
                    self._write_full_snapshot(con)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if self.path.exists() and self.path.stat().st_size == 0:
                os.replace(tmp, self.path)  # an empty file an earlier version left when killed at creation
            else:
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass  # another process created it first: use theirs
            _fsync_dir(self.home)
        finally:
            for p in (tmp, Path(str(tmp) + ".wal")):
                p.unlink(missing_ok=True)

    def _seed(self, con: Any) -> int:
        """Load an existing snapshot into a new catalog (a catalog lost or moved aside is rebuilt from it)."""
        n = 0
        for table in TABLES:
            sources = read_snapshot_sql(*snapshot_files(self.home, table))
            if not sources:
                continue
            cols = _table_columns(con, table)
            con.execute(f"DELETE FROM {table}")
            for src in sources:
                have = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()]
                names = ", ".join(f'"{c}"' for c in cols if c in have)
                con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {src}")
            n += con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        self._migrate_paths(con)
        return n

    def _migrate_paths(self, con: Any) -> None:
        """Absolute paths of the earlier layout become relative to the home (under this home, or under the
        place the home was moved from)."""
        homes = sorted({str(self.home), str(self._home_resolved)}, key=len, reverse=True)
        for table, cols in PATH_COLUMNS.items():
            if not _has_table(con, table):
                continue
            for col in cols:
                for h in homes:
                    con.execute(f"UPDATE {table} SET {col} = substr({col}, ?) WHERE starts_with({col}, ?)",
                                [len(h) + 2, h + "/"])
                if table == "shards":
                    con.execute(f"UPDATE shards SET {col} = regexp_extract({col}, ?, 1) "
                                f"WHERE starts_with({col}, '/') AND regexp_matches({col}, ?)",
                                [LEGACY_SHARD_PATH, LEGACY_SHARD_PATH])

    def _take_lock(self) -> None:
        import fcntl

        key = str(self.home / LOCK_FILE)
        with _PROCESS_LOCKS_GUARD:
            held = _PROCESS_LOCKS.get(key)
            if held is not None:  # this process holds it already (DuckDB shares a file within a process)
                _PROCESS_LOCKS[key] = (held[0], held[1] + 1)
                self._lock_fd = held[0]
                return
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + 5.0  # a reader's probe holds a shared lock for microseconds
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise CatalogBusy(f"another ditto process holds {key} (a run in progress): wait for it "
                                          f"to finish, or use another --home") from None
                    time.sleep(0.02)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _PROCESS_LOCKS[key] = (fd, 1)
            self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            key = str(self.home / LOCK_FILE)
            with _PROCESS_LOCKS_GUARD:
                fd, n = _PROCESS_LOCKS.get(key, (self._lock_fd, 1))
                if n <= 1:
                    _PROCESS_LOCKS.pop(key, None)
                    os.close(fd)  # closing the descriptor releases the flock
                else:
                    _PROCESS_LOCKS[key] = (fd, n - 1)
            self._lock_fd = None
        for name in ("_flush_con", "_con"):
            con = getattr(self, name, None)
            if con is not None:
                con.close()

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._timer is not None:
                self._timer.cancel()
            try:
                self._flush(self._con)
            finally:
                self._closed = True
                self._release()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- paths --------------------------------------------------------------------------------
    def _rel(self, p: str | Path | None) -> str | None:
        if p is None:
            return None
        path = Path(p)
        if not path.is_absolute():
            return path.as_posix()
        for h in (self.home, self._home_resolved):
            try:
                return path.relative_to(h).as_posix()
            except ValueError:
                pass
        try:
            return path.resolve().relative_to(self._home_resolved).as_posix()
        except (ValueError, OSError):
            return str(path)

    def _abs(self, p: str | None) -> str | None:
        if p is None or p == "" or p.startswith("/"):
            return p
        return str(self.home / p)

    def _absolute_rows(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            for col in ("path", "rejects_path"):
                if col in r and isinstance(r[col], str):
                    r[col] = self._abs(r[col])
        return rows

    # -- statements ---------------------------------------------------------------------------
    def _touch_sql(self, sql: str) -> None:
        for stmt in sql.split(";"):
            m = _WRITE_SQL.match(stmt)
            if m and m.group(1).lower() in TABLES:
                self.touch(m.group(1).lower())

    def touch(self, table: str, run_id: Any = ALL) -> None:
        """Mark a table (or one run's partition of it) as changed: the next snapshot exports it."""
        with self._lock:
            cur = self._dirty.get(table)
            if cur is ALL:
                return
            if run_id is ALL or not self._partitioned.get(table, False):
                self._dirty[table] = ALL
            else:
                self._dirty.setdefault(table, set()).add(run_id)

    def touch_all(self) -> None:
        """Every partition of every table: the next snapshot writes all of them (`ditto repair`)."""
        for table in TABLES:
            self.touch(table, ALL)

    def _tx(self, sql: str, params: list | tuple = (), touch: dict[str, Any] | None = None) -> None:
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.execute(sql, params)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        if touch is None:
            self._touch_sql(sql)
        else:
            for table, run_id in touch.items():
                self.touch(table, run_id)

    def query(self, sql: str, params: list | tuple = ()) -> list[dict]:
        cur = self._con.execute(sql, params)
        self._touch_sql(sql)
        if cur.description is None:
            return []
        cols = [d[0] for d in cur.description]
        return self._absolute_rows([dict(zip(cols, r, strict=True)) for r in cur.fetchall()])

    # -- runs -------------------------------------------------------------------------------
    def start_run(self, run_id: str, dataset: str, config: dict, config_hash: str, version: str,
                  num_shards: int | None = None, until: str | None = None) -> None:
        from storage.layout import validate_run_id

        validate_run_id(run_id)
        existing = self.query("SELECT run_id FROM runs WHERE run_id = ?", [run_id])
        if existing:
            self._tx("UPDATE runs SET status='running', error=NULL, finished_at=NULL WHERE run_id=?", [run_id],
                     touch={"runs": run_id})
        else:
            self._tx("INSERT INTO runs VALUES (?, 'running', ?, ?, ?, ?, ?, ?, NULL, NULL, ?, NULL)",
                     [run_id, dataset, json.dumps(config), config_hash, version, num_shards, until, now()],
                     touch={"runs": run_id})
        self.snapshot(force=True)

    def set_run(self, run_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._tx(f"UPDATE runs SET {cols} WHERE run_id = ?", [*fields.values(), run_id], touch={"runs": run_id})
        self.snapshot()

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        self._tx("UPDATE runs SET status=?, error=?, finished_at=? WHERE run_id=?", [status, error, now(), run_id],
                 touch={"runs": run_id})
        self.snapshot(force=True)

    def get_run(self, run_id: str) -> dict | None:
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return rows[0] if rows else None

    # -- shards -----------------------------------------------------------------------------
    def shards(self, run_id: str, stage: str | None = None) -> list[dict]:
        if stage is None:
            return self.query("SELECT * FROM shards WHERE run_id=? ORDER BY stage, shard", [run_id])
        return self.query("SELECT * FROM shards WHERE run_id=? AND stage=? ORDER BY shard", [run_id, stage])

    def find_done(self, stage: str, input_hash: str) -> dict | None:
        """The newest done shard with this input hash, in any run, whose files are whole (present, with
        the registered size and sha256)."""
        rows = self.query(
            "SELECT * FROM shards WHERE input_hash=? AND stage=? AND status='done' AND reused_from IS NULL "
            "ORDER BY finished_at DESC", [input_hash, stage])
        for r in rows:
            if shard_is_whole(r):
                return r
        return None

    def mark_running(self, run_id: str, stage: str, shard: int, input_hash: str) -> None:
        self._tx(
            "INSERT INTO shards (run_id, stage, shard, input_hash, status, attempts, started_at) "
            "VALUES (?, ?, ?, ?, 'running', 1, ?) ON CONFLICT (run_id, stage, shard) DO UPDATE SET "
            "input_hash=excluded.input_hash, status='running', attempts=shards.attempts + 1, error=NULL, "
            "started_at=excluded.started_at, finished_at=NULL",
            [run_id, stage, shard, input_hash, now()], touch={"shards": run_id})
        self.snapshot()

    def mark_done(self, run_id: str, stage: str, shard: int, input_hash: str, *, rows: int, path: str,
                  bytes_: int, rejects_path: str | None, rejected_rows: int, stats: dict,
                  reused_from: str | None = None, sha256: str | None = None, rejects_sha256: str | None = None,
                  rejects_bytes: int | None = None) -> None:
        """Register a finished shard. `sha256`/`rejects_sha256` are the files' hashes as written; where a
        caller does not pass them they are computed here from the files (as are the rejects file's size)."""
        if sha256 is None and path and os.path.isfile(path):
            sha256 = file_sha256(path)
        if rejects_path and os.path.isfile(rejects_path):
            if rejects_sha256 is None:
                rejects_sha256 = file_sha256(rejects_path)
            if rejects_bytes is None:
                rejects_bytes = os.stat(rejects_path).st_size
        self._tx(
            "INSERT INTO shards (run_id, stage, shard, input_hash, status, rows, path, bytes, rejects_path, "
            "rejected_rows, attempts, error, reused_from, stats, started_at, finished_at, sha256, rejects_bytes, "
            "rejects_sha256) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, 1, NULL, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, stage, shard) DO UPDATE SET input_hash=excluded.input_hash, status='done', "
            "rows=excluded.rows, path=excluded.path, bytes=excluded.bytes, rejects_path=excluded.rejects_path, "
            "rejected_rows=excluded.rejected_rows, error=NULL, reused_from=excluded.reused_from, "
            "stats=excluded.stats, finished_at=excluded.finished_at, sha256=excluded.sha256, "
            "rejects_bytes=excluded.rejects_bytes, rejects_sha256=excluded.rejects_sha256",
            [run_id, stage, shard, input_hash, rows, self._rel(path), bytes_, self._rel(rejects_path), rejected_rows,
             reused_from, json.dumps(stats), now(), now(), sha256, rejects_bytes, rejects_sha256],
            touch={"shards": run_id})
        self.snapshot()

    def mark_failed(self, run_id: str, stage: str, shard: int, input_hash: str, error: str) -> None:
        self._tx(
            "INSERT INTO shards (run_id, stage, shard, input_hash, status, attempts, error, started_at, finished_at) "
            "VALUES (?, ?, ?, ?, 'failed', 1, ?, ?, ?) ON CONFLICT (run_id, stage, shard) DO UPDATE SET "
            "input_hash=excluded.input_hash, status='failed', error=excluded.error, finished_at=excluded.finished_at",
            [run_id, stage, shard, input_hash, error, now(), now()], touch={"shards": run_id})
        self.snapshot()

    def reset_stale(self, run_id: str) -> int:
        """Shards left 'running' by a crashed process are failed work: mark them pending."""
        n = self._con.execute("SELECT count(*) FROM shards WHERE run_id=? AND status='running'",
                              [run_id]).fetchone()[0]
        if n:
            self._tx("UPDATE shards SET status='pending', error='interrupted' WHERE run_id=? AND status='running'",
                     [run_id], touch={"shards": run_id})
        return n

    # -- stats ------------------------------------------------------------------------------
    def update_stage_stats(self, run_id: str, stage: str, metrics: dict | None = None) -> dict:
        """Aggregate the stage's done shards into stage_stats: each Stats column summed (a JSON one merged by
        key) over the shards' stats. `metrics`: extra stage metrics (JSON), merged into those recorded before
        (a key given again replaces its value)."""
        rows = self.shards(run_id, stage)
        agg = stats_zero()
        for r in rows:
            if r["status"] != "done" or not r["stats"]:
                continue
            st = json.loads(r["stats"])
            for c, total in agg.items():
                if isinstance(total, dict):
                    for key, n in (st.get(c) or {}).items():
                        total[key] = total.get(key, 0) + n
                else:
                    agg[c] = total + (st.get(c, 0) or 0)
        counts = {s: sum(1 for r in rows if r["status"] == s) for s in SHARD_STATUSES}
        reused = sum(1 for r in rows if r["reused_from"])
        prev = self._con.execute("SELECT metrics FROM stage_stats WHERE run_id=? AND stage=?",
                                 [run_id, stage]).fetchall()
        merged = json.loads(prev[0][0]) if prev and prev[0][0] else {}
        if metrics:
            merged.update(json.loads(json.dumps(metrics, default=str)))
        cols = ["run_id", "stage", "shards_total", "shards_done", "shards_failed", "shards_reused", *agg,
                "updated_at", "metrics"]
        values = [run_id, stage, len(rows), counts["done"], counts["failed"], reused,
                  *(json.dumps(v) if isinstance(v, dict) else v for v in agg.values()), now(),
                  json.dumps(merged) if merged else None]
        self._tx(f"INSERT OR REPLACE INTO stage_stats ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                 values, touch={"stage_stats": run_id})
        self.snapshot()
        return {**agg, **counts, "reused": reused, "metrics": merged}

    # -- models and evaluations -------------------------------------------------------------
    def register_model(self, model_id: str, run_id: str, path: str, base_model: str, data_hash: str,
                       status: str, metrics: dict, config: dict) -> None:
        self._tx("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [model_id, run_id, self._rel(path), base_model, data_hash, status, json.dumps(metrics),
                  json.dumps(config), now()], touch={"models": ALL})
        self.snapshot(force=True)

    def add_evaluation(self, eval_id: str, run_id: str, model: str, rows: list[dict]) -> None:
        """rows: {language, metric, value, n, details}"""
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.execute("DELETE FROM evaluations WHERE eval_id=? AND model=?", [eval_id, model])
            for r in rows:
                self._con.execute("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  [eval_id, run_id, model, r["language"], r["metric"], r["value"], r.get("n", 0),
                                   json.dumps(r.get("details") or {}), now()])
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self.touch("evaluations", ALL)  # an eval id may have had rows under another run
        self.snapshot(force=True)

    # -- artifacts (storage/artifacts.py): what is resumed by content key besides shards -----
    def register_artifact(self, art: Any) -> None:
        """Register an `Artifact` (or its dict) under its (kind, key), replacing an earlier registration of the
        same key (one rebuilt after it was found damaged)."""
        a = art if isinstance(art, dict) else art.model_dump()
        old = self._con.execute("SELECT run_id FROM artifacts WHERE kind=? AND key=?",
                                [a["kind"], a["key"]]).fetchall()
        self._tx("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [a["kind"], a["key"], a["run_id"], self._rel(a["path"]), a["bytes"], a["sha256"],
                  json.dumps(a.get("files")) if a.get("files") is not None else None,
                  json.dumps(a.get("meta") or {}, default=str), now()], touch={"artifacts": a["run_id"]})
        for (run_id,) in old:  # the row left that run's partition
            self.touch("artifacts", run_id)
        self.snapshot(force=True)

    # -- snapshot for readers ---------------------------------------------------------------
    def snapshot(self, force: bool = False, min_interval: float | None = None) -> None:
        """Export the changed partitions to <home>/snapshot/<table>/ atomically. Throttled: within
        `min_interval` of the last export the change is exported by a timer instead, so a reader sees
        every change within that interval and a burst of registrations costs one export."""
        interval = self.snapshot_interval if min_interval is None else min_interval
        with self._lock:
            if self._closed:
                return
            wait = self._last_snapshot + interval - time.monotonic()
            if force or wait <= 0:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._flush(self._con)
            elif self._timer is None and self._dirty:
                self._timer = threading.Timer(wait, self._deferred_flush)
                self._timer.daemon = True
                self._timer.start()

    def _deferred_flush(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed or not self._dirty:
                return
            self._flush(self._flush_con)

    def _flush(self, con: Any) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            try:
                for table, keys in dirty.items():
                    self._export(con, table, keys)
            except BaseException:
                for table, keys in dirty.items():  # not exported: keep them dirty for the next try
                    for k in (keys if keys is not ALL else [ALL]):
                        self.touch(table, k)
                raise
            self._last_snapshot = time.monotonic()

    def _export(self, con: Any, table: str, keys: Any) -> None:
        out = self.home / SNAPSHOT_DIR / table
        out.mkdir(parents=True, exist_ok=True)
        if not self._partitioned.get(table, False):
            write_table(con.sql(f"SELECT * FROM {table}").to_arrow_table(), out / "all.parquet")
            return
        if keys is ALL:
            keys = [r[0] for r in con.execute(f"SELECT DISTINCT run_id FROM {table}").fetchall()]
        for key in keys:
            if key is None:
                t = con.sql(f"SELECT * FROM {table} WHERE run_id IS NULL").to_arrow_table()
            else:
                t = con.sql(f"SELECT * FROM {table} WHERE run_id = ?", params=[key]).to_arrow_table()
            write_table(t, partition_path(out, key))

    def _snapshot_current(self, con: Any) -> bool:
        """The snapshot is in the current layout with the tables' current columns: every partition file of a
        table has one schema (readers need not reconcile them), so a new column rewrites it once."""
        snap = self.home / SNAPSHOT_DIR
        if _layout_version(snap) < LAYOUT_VERSION:
            return False
        try:
            recorded = json.loads((snap / LAYOUT_FILE).read_text()).get("columns")
        except (OSError, ValueError):
            return False
        return recorded == {t: _table_columns(con, t) for t in TABLES}

    def _write_full_snapshot(self, con: Any) -> None:
        """Every table in the partitioned layout, then the layout marker, then the old single files go."""
        snap = self.home / SNAPSHOT_DIR
        snap.mkdir(exist_ok=True)
        for table in TABLES:
            self._export(con, table, ALL)
        tmp = snap / f".tmp-{LAYOUT_FILE}"
        tmp.write_text(json.dumps({"version": LAYOUT_VERSION, "partitioned_by": "run_id",
                                   "columns": {t: _table_columns(con, t) for t in TABLES}}))
        os.replace(tmp, snap / LAYOUT_FILE)
        _fsync_dir(snap)
        for table in TABLES:
            (snap / f"{table}.parquet").unlink(missing_ok=True)
            for old in (snap / table).glob("run=*.parquet"):  # layout 2
                old.unlink(missing_ok=True)

    def restore_from_snapshot(self) -> int:
        """Replace the catalog's rows with the snapshot's (`ditto repair`). Returns the rows loaded."""
        if not snapshot_exists(self.home):
            raise CatalogError(f"no snapshot under {self.home / SNAPSHOT_DIR} to rebuild the catalog from")
        n = self._seed(self._con)
        for table in TABLES:
            self.touch(table, ALL)
        self.snapshot(force=True)
        return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
