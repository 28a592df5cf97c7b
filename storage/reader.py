"""Read-only view of the catalog for the CLI, the dashboard and exports, safe while a run holds the
catalog: it reads the Parquet snapshot the flow refreshes after each change, never catalog.duckdb.

Each table is a view over its snapshot partitions (read lazily: a year of history costs a reader only
the partitions its query touches), with the stored relative paths made absolute under this home, and
a run left `running` by a process that died shown as `interrupted`.

It is the one reader API: `run_summaries` (`ditto runs`, the dashboard's run list), `stage_summaries`
(`ditto show`, the dashboard's run page), `models`, `evaluations`; the report over a run (what changed,
notes, metrics) is storage/report.py."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from models.stages import stage_sort_key
from storage.catalog import (
    CATALOG_FILE,
    LEGACY_SHARD_PATH,
    PATH_COLUMNS,
    SCHEMA,
    SHARD_STATUSES,
    SNAPSHOT_DIR,
    TABLES,
    CatalogError,
    catalog_held,
    now,
    read_snapshot_sql,
    snapshot_exists,
    snapshot_files,
    stats_zero,
)
from storage.report import stats_of
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
            for col in (*(c for c, zero in stats_zero().items() if isinstance(zero, dict)), "metrics"):
                r[col] = json.loads(r[col]) if r.get(col) else {}
        return rows

    def run_summaries(self) -> list[dict[str, Any]]:
        """Every run, newest first: its record (without the config), `failed_shards`, `duration_s` (to now
        while running), the last stage that produced shards (`last_stage`) and its `rows` (rows_out), and
        `tokens` (prompt + completion, all stages)."""
        runs = self.query(
            "SELECT r.* EXCLUDE (config), (SELECT count(*) FROM shards s WHERE s.run_id = r.run_id AND "
            "s.status = 'failed') AS failed_shards FROM runs r ORDER BY r.started_at DESC NULLS LAST, r.run_id")
        by_run: dict[str, list[dict]] = {}
        for s in self.query("SELECT run_id, stage, rows_out, prompt_tokens, completion_tokens, shards_done "
                            "FROM stage_stats"):
            by_run.setdefault(s["run_id"], []).append(s)
        for r in runs:
            stages = sorted(by_run.get(r["run_id"], []), key=lambda s: stage_sort_key(s["stage"]))
            produced = [s for s in stages if s["shards_done"]]
            r["duration_s"] = duration_s(r["started_at"], r["finished_at"])
            r["last_stage"] = produced[-1]["stage"] if produced else None
            r["rows"] = (produced[-1]["rows_out"] or 0) if produced else 0
            r["tokens"] = sum((s["prompt_tokens"] or 0) + (s["completion_tokens"] or 0) for s in stages)
        return runs

    def stage_summaries(self, run_id: str, verify: bool = False,
                        shards: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Per stage of the run, in DAG order: shards by status (`shards`, `shards_total`, `reused`), the done
        shards' `rows` and `rejected` rows, the stage_stats totals (rows_in, rows_out, dropped, requests,
        tokens, format_failures, seconds, metrics), timing from the metrics (`wall_s`, `tokens_per_second`
        and `rows_per_second` over the wall time, `engine`, `resampled`), generation-cache hits and misses,
        the failed shards' `errors`, and the done shards whose files are `damaged` (missing or another size;
        `verify=True` hashes them too). `shards`: the run's shard rows, where the caller has them already."""
        shards = self.shards(run_id) if shards is None else shards
        stats = {s["stage"]: s for s in self.stage_stats(run_id)}
        by_stage: dict[str, list[dict]] = {}
        for s in shards:
            by_stage.setdefault(s["stage"], []).append(s)
        return [_stage_summary(name, by_stage.get(name, []), stats.get(name, {}), verify)
                for name in sorted(set(by_stage) | set(stats), key=stage_sort_key)]

    def models(self, run_id: str) -> list[dict[str, Any]]:
        """The run's registered models, oldest first, `metrics` and `config` as dicts."""
        rows = self.query("SELECT * FROM models WHERE run_id = ? ORDER BY created_at", [run_id])
        for r in rows:
            for col in ("metrics", "config"):
                r[col] = json.loads(r[col]) if r[col] else {}
        return rows

    def evaluations(self, run_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT eval_id, model, language, metric, value, n, created_at FROM evaluations "
                          "WHERE run_id = ? ORDER BY model, language, metric", [run_id])

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


def duration_s(start: datetime | None, end: datetime | None) -> float | None:
    """Seconds from start to end (to now when not ended), one decimal; None without a start."""
    if start is None:
        return None
    return round(((end or now()) - start).total_seconds(), 1)


def _stage_summary(name: str, shards: list[dict], st: dict[str, Any], verify: bool) -> dict[str, Any]:
    done = [s for s in shards if s["status"] == "done"]
    metrics = st.get("metrics") or {}
    wall = metrics.get("wall_s") or 0  # per second of the stage's wall time, not of the summed shard seconds
    engine = metrics.get("engine") or {}
    computed = [stats_of(s) for s in done if not s["reused_from"]]  # a reused shard asked no engine
    return {
        "stage": name,
        "shards": {k: sum(1 for s in shards if s["status"] == k) for k in SHARD_STATUSES},
        "shards_total": len(shards),
        "reused": sum(1 for s in shards if s["reused_from"]),
        "rows": sum(s["rows"] or 0 for s in done),
        "rejected": sum(s["rejected_rows"] or 0 for s in done),
        **{c: st.get(c) or zero for c, zero in stats_zero().items()},  # the Stats columns' sums
        "metrics": metrics,
        "wall_s": round(wall, 1) if wall else None,
        "tokens_per_second": metrics.get("completion_tokens_per_wall_s") if wall else None,
        "rows_per_second": round((st.get("rows_out") or 0) / wall, 2) if wall else None,
        "engine": engine, "resampled": metrics.get("resampled") or engine.get("resampled") or 0,
        "cache_hits": sum(x.get("cache_hits") or 0 for x in computed),
        "cache_misses": sum(x.get("cache_misses") or 0 for x in computed),
        "errors": [{"shard": s["shard"], "error": s["error"], "attempts": s["attempts"]}
                   for s in shards if s["status"] == "failed"],
        "damaged": [{"shard": s["shard"], "problem": p} for s in done if (p := shard_problem(s, check_hash=verify))],
    }
