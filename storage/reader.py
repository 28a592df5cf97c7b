"""Read-only view of the catalog for the CLI, the dashboard and exports, safe while a run holds the
catalog: it reads the Parquet snapshot the flow refreshes after each change, never catalog.duckdb.

Each table is a view over its snapshot partitions (read lazily: a year of history costs a reader only
the partitions its query touches), with the stored relative paths made absolute under this home, and
a run left `running` by a process that died shown as `interrupted`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from storage.catalog import (
    CATALOG_FILE,
    LEGACY_SHARD_PATH,
    PATH_COLUMNS,
    SCHEMA,
    SNAPSHOT_DIR,
    TABLES,
    CatalogError,
    catalog_held,
    read_snapshot_sql,
    snapshot_exists,
    snapshot_files,
)
from storage.shards import shard_problem


class NoCatalog(CatalogError):
    """The home has no catalog (never used, or a mistyped --home)."""


class SnapshotMissing(CatalogError):
    """The catalog exists but the snapshot readers use is gone."""


class ShardDamaged(CatalogError):
    """A registered shard file is missing, truncated or corrupted."""

    def __init__(self, msg: str, problems: list[dict[str, Any]]):
        super().__init__(msg)
        self.problems = problems


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class CatalogReader:
    def __init__(self, home: str | Path, require: bool = False):
        """`require=True`: a home without a catalog (NoCatalog) or a catalog whose snapshot is gone
        (SnapshotMissing) is an error naming the home, instead of an empty catalog."""
        self.home = Path(home).expanduser().absolute()
        self.has_catalog = (self.home / CATALOG_FILE).exists()
        self.has_snapshot = snapshot_exists(self.home)
        if require and not self.has_snapshot:
            if not self.has_catalog:
                raise NoCatalog(f"{self.home} has no catalog (no {CATALOG_FILE} and no {SNAPSHOT_DIR}/): "
                                f"check --home or $DITTO_HOME")
            raise SnapshotMissing(f"the catalog snapshot {self.home / SNAPSHOT_DIR} is missing: "
                                  f"run `ditto repair --home {self.home}` to write it again from {CATALOG_FILE}")
        self.live = catalog_held(self.home)
        self.con = duckdb.connect(":memory:")
        self.con.execute("CREATE SCHEMA empty")
        self.con.execute("USE memory.empty")
        self.con.execute(SCHEMA)  # the empty typed tables each view starts from
        self.con.execute("USE memory.main")
        home = str(self.home)
        for table in TABLES:
            body = f"SELECT * FROM empty.{table}"
            for src in read_snapshot_sql(*snapshot_files(self.home, table)):
                body += f" UNION ALL BY NAME SELECT * FROM {src}"
            replace = [f"{self._abs_sql(c, home, table == 'shards')} AS {c}" for c in PATH_COLUMNS.get(table, ())]
            if table == "runs" and not self.live:
                replace.append("CASE WHEN status = 'running' THEN 'interrupted' ELSE status END AS status")
            star = f"* REPLACE ({', '.join(replace)})" if replace else "*"
            self.con.execute(f"CREATE VIEW {table} AS SELECT {star} FROM ({body})")

    @staticmethod
    def _abs_sql(col: str, home: str, legacy: bool) -> str:
        h = _lit(home)
        legacy_case = (f"WHEN regexp_matches({col}, {_lit(LEGACY_SHARD_PATH)}) "
                       f"THEN {h} || '/' || regexp_extract({col}, {_lit(LEGACY_SHARD_PATH)}, 1) ") if legacy else ""
        return (f"CASE WHEN {col} IS NULL OR {col} = '' THEN {col} "
                f"WHEN NOT starts_with({col}, '/') THEN {h} || '/' || {col} "
                f"WHEN starts_with({col}, {h} || '/') THEN {col} "
                f"{legacy_case}ELSE {col} END")

    def query(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def runs(self) -> list[dict]:
        return self.query("SELECT * FROM runs ORDER BY started_at DESC")

    def run(self, run_id: str) -> dict | None:
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return rows[0] if rows else None

    def shards(self, run_id: str, stage: str | None = None) -> list[dict]:
        if stage:
            return self.query("SELECT * FROM shards WHERE run_id=? AND stage=? ORDER BY shard", [run_id, stage])
        return self.query("SELECT * FROM shards WHERE run_id=? ORDER BY stage, shard", [run_id])

    def stage_stats(self, run_id: str) -> list[dict]:
        rows = self.query("SELECT * FROM stage_stats WHERE run_id=?", [run_id])
        for r in rows:
            r["dropped"] = json.loads(r["dropped"]) if r["dropped"] else {}
            r["metrics"] = json.loads(r["metrics"]) if r.get("metrics") else {}
        return rows

    def damaged(self, run_id: str, stage: str | None = None, check_hash: bool = True) -> list[dict[str, Any]]:
        """The run's done shards whose files are missing, truncated or corrupted: {stage, shard, problem}."""
        out = []
        for s in self.shards(run_id, stage):
            if s["status"] != "done":
                continue
            problem = shard_problem(s, check_hash=check_hash)
            if problem:
                out.append({"stage": s["stage"], "shard": s["shard"], "problem": problem})
        return out

    def done_paths(self, run_id: str, stage: str, kind: str = "data", damaged: str = "raise") -> list[str]:
        """Files of the stage's done shards, each verified (size and sha256). A damaged shard raises
        ShardDamaged naming it (`damaged="raise"`) or is left out (`damaged="skip"`, for views)."""
        col = "path" if kind == "data" else "rejects_path"
        rows = [s for s in self.shards(run_id, stage) if s["status"] == "done" and s[col]]
        out, bad = [], []
        for s in rows:
            problem = shard_problem(s)
            if problem:
                bad.append({"stage": stage, "shard": s["shard"], "problem": problem})
            else:
                out.append(s[col])
        if bad and damaged == "raise":
            raise ShardDamaged(damaged_message(run_id, bad), bad)
        return out

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> CatalogReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def damaged_message(run_id: str, bad: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"{b['stage']}-{b['shard']}: {b['problem']}" for b in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return (f"run {run_id}: {len(bad)} registered shard(s) are damaged: {shown}{more}. "
            f"`ditto rerun {run_id}` rebuilds them")
