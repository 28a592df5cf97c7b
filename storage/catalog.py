"""The DuckDB catalog: runs, shards, stage_stats, models, evaluations.

Only the flow process opens it (DuckDB allows one writer process, and a reader process would block
the writer). After each change the flow refreshes a Parquet snapshot under <home>/snapshot/, which
every reader (CLI, dashboard, export) reads instead: see storage/reader.py.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from storage.shards import _fsync_dir

SNAPSHOT_DIR = "snapshot"
TABLES = ("runs", "shards", "stage_stats", "models", "evaluations")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, status VARCHAR, dataset VARCHAR, config JSON, config_hash VARCHAR,
    package_version VARCHAR, num_shards INTEGER, until VARCHAR, flow_run_id VARCHAR, error VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS shards (
    run_id VARCHAR, stage VARCHAR, shard INTEGER, input_hash VARCHAR, status VARCHAR, rows BIGINT,
    path VARCHAR, bytes BIGINT, rejects_path VARCHAR, rejected_rows BIGINT, attempts INTEGER,
    error VARCHAR, reused_from VARCHAR, stats JSON, started_at TIMESTAMP, finished_at TIMESTAMP,
    PRIMARY KEY (run_id, stage, shard));
CREATE TABLE IF NOT EXISTS stage_stats (
    run_id VARCHAR, stage VARCHAR, shards_total INTEGER, shards_done INTEGER, shards_failed INTEGER,
    shards_reused INTEGER, rows_in BIGINT, rows_out BIGINT, dropped JSON, requests BIGINT,
    prompt_tokens BIGINT, completion_tokens BIGINT, format_failures BIGINT, seconds DOUBLE,
    updated_at TIMESTAMP, PRIMARY KEY (run_id, stage));
CREATE TABLE IF NOT EXISTS models (
    model_id VARCHAR PRIMARY KEY, run_id VARCHAR, path VARCHAR, base_model VARCHAR, data_hash VARCHAR,
    status VARCHAR, metrics JSON, config JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS evaluations (
    eval_id VARCHAR, run_id VARCHAR, model VARCHAR, language VARCHAR, metric VARCHAR, value DOUBLE,
    n BIGINT, details JSON, created_at TIMESTAMP);
"""

SHARD_STATUSES = ("pending", "running", "done", "failed")


class CatalogError(RuntimeError):
    pass


class CatalogBusy(CatalogError):
    """Another process holds the catalog (a run in progress)."""


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Catalog:
    """The writer. Use from one thread (the flow's), as a context manager."""

    def __init__(self, home: str | Path, wait_seconds: float = 0.0):
        self.home = Path(home)
        self.path = self.home / "catalog.duckdb"
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CatalogError(f"cannot create home folder {self.home}: {exc.strerror}") from None
        if not os.access(self.home, os.W_OK):
            raise CatalogError(f"home folder {self.home} is not writable")
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                self.con = duckdb.connect(str(self.path))
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
                    raise CatalogError(self._corrupted(msg)) from None
                raise CatalogError(f"cannot open catalog {self.path}: {msg.splitlines()[0]}") from None
            except (duckdb.SerializationException, duckdb.InvalidInputException, duckdb.Error) as exc:
                raise CatalogError(self._corrupted(str(exc))) from None
        self.con.execute(SCHEMA)
        self._last_snapshot = 0.0

    def _corrupted(self, msg: str) -> str:
        return (f"catalog {self.path} is corrupted or not a DuckDB file ({msg.splitlines()[0]}); "
                f"run `ditto repair --home {self.home}` to move it aside and rebuild it from the snapshot")

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.snapshot(force=True)
        finally:
            self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tx(self, sql: str, params: list | tuple = ()) -> None:
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute(sql, params)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: list | tuple = ()) -> list[dict]:
        cur = self.con.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # -- runs -------------------------------------------------------------------------------
    def start_run(self, run_id: str, dataset: str, config: dict, config_hash: str, version: str,
                  num_shards: int | None = None, until: str | None = None) -> None:
        existing = self.query("SELECT run_id FROM runs WHERE run_id = ?", [run_id])
        if existing:
            self._tx("UPDATE runs SET status='running', error=NULL, finished_at=NULL WHERE run_id=?", [run_id])
        else:
            self._tx("INSERT INTO runs VALUES (?, 'running', ?, ?, ?, ?, ?, ?, NULL, NULL, ?, NULL)",
                     [run_id, dataset, json.dumps(config), config_hash, version, num_shards, until, now()])
        self.snapshot(force=True)

    def set_run(self, run_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._tx(f"UPDATE runs SET {cols} WHERE run_id = ?", [*fields.values(), run_id])
        self.snapshot()

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        self._tx("UPDATE runs SET status=?, error=?, finished_at=? WHERE run_id=?", [status, error, now(), run_id])
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
        """The newest done shard with this input hash, in any run, whose file still exists."""
        rows = self.query(
            "SELECT * FROM shards WHERE stage=? AND input_hash=? AND status='done' AND reused_from IS NULL "
            "ORDER BY finished_at DESC", [stage, input_hash])
        for r in rows:
            if r["path"] and Path(r["path"]).exists() and (not r["rejects_path"] or Path(r["rejects_path"]).exists()):
                return r
        return None

    def mark_running(self, run_id: str, stage: str, shard: int, input_hash: str) -> None:
        self._tx(
            "INSERT INTO shards (run_id, stage, shard, input_hash, status, attempts, started_at) "
            "VALUES (?, ?, ?, ?, 'running', 1, ?) ON CONFLICT (run_id, stage, shard) DO UPDATE SET "
            "input_hash=excluded.input_hash, status='running', attempts=shards.attempts + 1, error=NULL, "
            "started_at=excluded.started_at, finished_at=NULL",
            [run_id, stage, shard, input_hash, now()])
        self.snapshot()

    def mark_done(self, run_id: str, stage: str, shard: int, input_hash: str, *, rows: int, path: str,
                  bytes_: int, rejects_path: str | None, rejected_rows: int, stats: dict,
                  reused_from: str | None = None) -> None:
        self._tx(
            "INSERT INTO shards (run_id, stage, shard, input_hash, status, rows, path, bytes, rejects_path, "
            "rejected_rows, attempts, error, reused_from, stats, started_at, finished_at) "
            "VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, 1, NULL, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, stage, shard) DO UPDATE SET input_hash=excluded.input_hash, status='done', "
            "rows=excluded.rows, path=excluded.path, bytes=excluded.bytes, rejects_path=excluded.rejects_path, "
            "rejected_rows=excluded.rejected_rows, error=NULL, reused_from=excluded.reused_from, "
            "stats=excluded.stats, finished_at=excluded.finished_at",
            [run_id, stage, shard, input_hash, rows, path, bytes_, rejects_path, rejected_rows, reused_from,
             json.dumps(stats), now(), now()])
        self.snapshot()

    def mark_failed(self, run_id: str, stage: str, shard: int, input_hash: str, error: str) -> None:
        self._tx(
            "INSERT INTO shards (run_id, stage, shard, input_hash, status, attempts, error, started_at, finished_at) "
            "VALUES (?, ?, ?, ?, 'failed', 1, ?, ?, ?) ON CONFLICT (run_id, stage, shard) DO UPDATE SET "
            "input_hash=excluded.input_hash, status='failed', error=excluded.error, finished_at=excluded.finished_at",
            [run_id, stage, shard, input_hash, error, now(), now()])
        self.snapshot()

    def reset_stale(self, run_id: str) -> int:
        """Shards left 'running' by a crashed process are failed work: mark them pending."""
        n = self.query("SELECT count(*) AS n FROM shards WHERE run_id=? AND status='running'", [run_id])[0]["n"]
        if n:
            self._tx("UPDATE shards SET status='pending', error='interrupted' WHERE run_id=? AND status='running'",
                     [run_id])
        return n

    # -- stats ------------------------------------------------------------------------------
    def update_stage_stats(self, run_id: str, stage: str) -> dict:
        rows = self.shards(run_id, stage)
        agg: dict[str, Any] = {k: 0 for k in ("rows_in", "rows_out", "requests", "prompt_tokens",
                                               "completion_tokens", "format_failures")}
        agg["seconds"] = 0.0
        dropped: dict[str, int] = {}
        for r in rows:
            if r["status"] != "done" or not r["stats"]:
                continue
            st = json.loads(r["stats"])
            for k in agg:
                agg[k] += st.get(k, 0) or 0
            for reason, n in (st.get("dropped") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + n
        counts = {s: sum(1 for r in rows if r["status"] == s) for s in SHARD_STATUSES}
        reused = sum(1 for r in rows if r["reused_from"])
        self._tx(
            "INSERT OR REPLACE INTO stage_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, stage, len(rows), counts["done"], counts["failed"], reused, agg["rows_in"], agg["rows_out"],
             json.dumps(dropped), agg["requests"], agg["prompt_tokens"], agg["completion_tokens"],
             agg["format_failures"], agg["seconds"], now()])
        self.snapshot()
        return {**agg, "dropped": dropped, **counts, "reused": reused}

    # -- models and evaluations -------------------------------------------------------------
    def register_model(self, model_id: str, run_id: str, path: str, base_model: str, data_hash: str,
                       status: str, metrics: dict, config: dict) -> None:
        self._tx("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [model_id, run_id, path, base_model, data_hash, status, json.dumps(metrics), json.dumps(config),
                  now()])
        self.snapshot(force=True)

    def add_evaluation(self, eval_id: str, run_id: str, model: str, rows: list[dict]) -> None:
        """rows: {language, metric, value, n, details}"""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute("DELETE FROM evaluations WHERE eval_id=? AND model=?", [eval_id, model])
            for r in rows:
                self.con.execute("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [eval_id, run_id, model, r["language"], r["metric"], r["value"], r.get("n", 0),
                                  json.dumps(r.get("details") or {}), now()])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.snapshot(force=True)

    # -- snapshot for readers ---------------------------------------------------------------
    def snapshot(self, force: bool = False, min_interval: float = 0.5) -> None:
        """Export every table to <home>/snapshot/<table>.parquet atomically (throttled)."""
        t = time.monotonic()
        if not force and t - self._last_snapshot < min_interval:
            return
        self._last_snapshot = t
        out = self.home / SNAPSHOT_DIR
        out.mkdir(exist_ok=True)
        for table in TABLES:
            tmp = out / f".tmp-{table}.parquet"
            quoted = str(tmp).replace("'", "''")
            self.con.execute(f"COPY (SELECT * FROM {table}) TO '{quoted}' (FORMAT parquet)")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out / f"{table}.parquet")
        _fsync_dir(out)

    def restore_from_snapshot(self) -> None:
        snap = self.home / SNAPSHOT_DIR
        for table in TABLES:
            f = snap / f"{table}.parquet"
            if f.exists():
                self.con.execute(f"DELETE FROM {table}")
                self.con.execute(f"INSERT INTO {table} SELECT * FROM read_parquet(?)", [str(f)])
        self.snapshot(force=True)
