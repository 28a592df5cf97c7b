"""Read-only view of the catalog for the CLI, the dashboard and exports, safe while a run holds the
catalog: it reads the Parquet snapshot the flow refreshes after each change, never catalog.duckdb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from storage.catalog import SCHEMA, SNAPSHOT_DIR, TABLES


class CatalogReader:
    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.con = duckdb.connect(":memory:")
        self.con.execute(SCHEMA)  # empty tables where no snapshot exists yet
        snap = self.home / SNAPSHOT_DIR
        for table in TABLES:
            f = snap / f"{table}.parquet"
            if f.exists():
                self.con.execute(f"INSERT INTO {table} SELECT * FROM read_parquet(?)", [str(f)])

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
        return rows

    def done_paths(self, run_id: str, stage: str, kind: str = "data") -> list[str]:
        col = "path" if kind == "data" else "rejects_path"
        rows = self.query(f"SELECT {col} AS p FROM shards WHERE run_id=? AND stage=? AND status='done' "
                          f"AND {col} IS NOT NULL ORDER BY shard", [run_id, stage])
        return [r["p"] for r in rows]

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> CatalogReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
