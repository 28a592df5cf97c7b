"""What the dashboard shows, read-only: the catalog snapshot (CatalogReader) and the Parquet shards the
catalog registered. Never opens catalog.duckdb, so it works while a run holds it. Every query is
parameterised; file paths come only from the catalog and must lie under <home>."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from models.base import table_rows
from models.records import character_row_id
from models.stages import stage_sort_key
from storage.catalog import SNAPSHOT_DIR
from storage.reader import CatalogReader, duration_s
from storage.report import show_extras, timeline

logger = logging.getLogger("ditto.dashboard")

SESSIONS_STAGE = "dedup"  # its shards hold the final Session rows
STAGE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_ID_CHARS = 2048  # a row id is id@language; the sources reject ids over tasks.sources.MAX_ID_CHARS (512)


class NotFound(LookupError):
    pass


class BadRequest(ValueError):
    pass


def check_run_id(run_id: str) -> str:
    from storage.layout import is_valid_run_id  # the one run id rule (CLI, flow, dashboard)

    if not is_valid_run_id(run_id):
        raise BadRequest("invalid run id")
    return run_id


def check_row_id(value: str, what: str) -> str:
    """Ids are looked up (parameterised), never parsed: any text the pipeline accepted (`enwiki:Peter_O'Toole`,
    commas, parentheses, '/', spaces, emoji) is a valid key; only an empty or absurdly long one is refused."""
    if not value or len(value) > MAX_ID_CHARS:
        raise BadRequest(f"invalid {what}")
    return value


def prefect_ui_base() -> str | None:
    """The Prefect UI root from PREFECT_UI_URL, else PREFECT_API_URL without its /api suffix."""
    ui = os.environ.get("PREFECT_UI_URL", "").strip()
    if not ui:
        api = os.environ.get("PREFECT_API_URL", "").strip().rstrip("/")
        ui = api[: -len("/api")] if api.endswith("/api") else ""
    ui = ui.rstrip("/")
    return ui if re.match(r"^https?://[^\s\"'<>]+$", ui) else None


def prefect_run_url(flow_run_id: str | None) -> str | None:
    base = prefect_ui_base()
    if not base or not flow_run_id:
        return None
    try:
        fid = uuid.UUID(str(flow_run_id))
    except ValueError:
        return None
    return f"{base}/runs/flow-run/{fid}"


def _iso(v: Any) -> Any:
    return v.isoformat(sep=" ", timespec="seconds") if isinstance(v, datetime) else v


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _iso(v) for k, v in row.items()}


CACHE_SECONDS = 60.0  # the longest a per-run file list is reused while the snapshot files look unchanged
MODEL_COLUMNS = ("model_id", "base_model", "status", "metrics", "created_at")  # what the run page shows
INDEX_MAX_ROWS = 500_000  # runs with more characters / sessions are queried per request instead of indexed


class DashboardData:
    def __init__(self, home: str | Path):
        self.home = Path(home).expanduser().resolve()
        self._cache: dict[tuple, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    # -- catalog ----------------------------------------------------------------------------
    def _reader(self) -> CatalogReader:
        return CatalogReader(self.home)

    def _snapshot_state(self) -> tuple:
        """(file, size, mtime) of every snapshot file: changes whenever the flow registers something, and
        costs a directory walk, not a catalog read."""
        out = []
        for f in sorted((self.home / SNAPSHOT_DIR).rglob("*.parquet")):
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((str(f), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        """`make()` memoised while the snapshot is unchanged (and at most CACHE_SECONDS): the sample browser
        asks for the same run's file lists on every request, and opening the snapshot costs more than the
        lookup itself."""
        now_s, state = time.monotonic(), self._snapshot_state()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[2] == state and now_s - hit[0] < CACHE_SECONDS:
                return hit[1]
        value = make()
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = (now_s, value, state)
        return value

    def _check_run(self, run_id: str) -> None:
        def exists() -> bool:
            with self._reader() as rd:
                return rd.run(check_run_id(run_id)) is not None
        if not self._cached(("run", run_id), exists):
            raise NotFound("run not found")

    @staticmethod
    def _signature(paths: list[str]) -> tuple:
        out = []
        for p in paths:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _safe_paths(self, paths: list[str | None]) -> list[str]:
        """Registered Parquet files that exist and lie under <home> (symlinks resolved)."""
        out = []
        for p in paths:
            if not p:
                continue
            rp = Path(p).resolve()
            if rp.suffix != ".parquet" or not rp.is_relative_to(self.home) or not rp.is_file():
                logger.warning("skipping a registered path outside %s or missing: %s", self.home, p)
                continue
            out.append(str(rp))
        return out

    def runs(self) -> list[dict[str, Any]]:
        with self._reader() as rd:
            runs = rd.run_summaries()
        return [{**_jsonable(r), "prefect_url": prefect_run_url(r["flow_run_id"])} for r in runs]

    def _run_row(self, rd: CatalogReader, run_id: str) -> dict[str, Any]:
        check_run_id(run_id)
        run = rd.run(run_id)
        if run is None:
            raise NotFound("run not found")
        return run

    def stages_of(self, run_id: str) -> list[str]:
        with self._reader() as rd:
            self._run_row(rd, run_id)
            rows = rd.query("SELECT DISTINCT stage FROM shards WHERE run_id = ? UNION "
                            "SELECT DISTINCT stage FROM stage_stats WHERE run_id = ?", [run_id, run_id])
        return sorted((r["stage"] for r in rows), key=stage_sort_key)

    def run(self, run_id: str) -> dict[str, Any]:
        with self._reader() as rd:
            run = self._run_row(rd, run_id)
            shards = rd.shards(run_id)
            stages = rd.stage_summaries(run_id, shards=shards)
            models, evals = rd.models(run_id), rd.evaluations(run_id)
            extras = show_extras(rd, run_id)  # the same notes, changes and run metrics as `ditto show`
        by_stage: dict[str, list[dict]] = {}
        for x in shards:
            by_stage.setdefault(x["stage"], []).append(x)
        for st in stages:  # per shard: the timeline and the grid of the run page
            sh = by_stage.get(st["stage"], [])
            st["timeline"] = timeline(sh)
            st["grid"] = [{"shard": x["shard"], "status": x["status"], "rows": x["rows"],
                           "rejected_rows": x["rejected_rows"], "attempts": x["attempts"], "error": x["error"],
                           "reused_from": x["reused_from"],
                           "seconds": duration_s(x["started_at"], x["finished_at"]) if x["finished_at"] else None}
                          for x in sh]
        config = json.loads(run["config"]) if run.get("config") else {}
        info = _jsonable({k: v for k, v in run.items() if k != "config"})
        info["duration_s"] = duration_s(run["started_at"], run["finished_at"])
        info["prefect_url"] = prefect_run_url(run["flow_run_id"])
        info["metrics"] = extras["run_metrics"]
        return {"run": info, "config": config, "stages": stages,
                "models": [_jsonable({k: m[k] for k in MODEL_COLUMNS}) for m in models],
                "evaluations": [_jsonable(e) for e in evals],
                "has_sessions": bool(self._session_paths(run_id)), "changes": extras["changes"],
                "notes": extras["notes"]}

    # -- Parquet ----------------------------------------------------------------------------
    def _session_paths(self, run_id: str) -> list[str]:
        def make() -> list[str]:
            with self._reader() as rd:
                return self._safe_paths(rd.done_paths(run_id, SESSIONS_STAGE, damaged="skip"))
        return self._cached(("sessions", run_id), make)

    def _reject_paths(self, run_id: str, stage: str | None = None) -> list[str]:
        def make() -> list[str]:
            with self._reader() as rd:
                rows = rd.query("SELECT rejects_path AS p FROM shards WHERE run_id = ? AND status = 'done' "
                                "AND rejects_path IS NOT NULL AND (? IS NULL OR stage = ?) ORDER BY stage, shard",
                                [run_id, stage, stage])
            return self._safe_paths([r["p"] for r in rows])
        return self._cached(("rejects", run_id, stage), make)

    def _character_paths(self, run_id: str) -> list[str]:
        def make() -> list[str]:
            with self._reader() as rd:
                paths = self._safe_paths(rd.done_paths(run_id, "characters", damaged="skip"))
            return [p for p in paths if {"id", "language", "label"} <= set(pq.read_schema(p).names)]
        return self._cached(("characters", run_id), make)

    _local = threading.local()

    @classmethod
    def _parquet(cls, sql: str, params: list[Any], con: duckdb.DuckDBPyConnection | None = None) -> list[dict[str, Any]]:
        if con is None:  # one in-memory connection per server thread (opening one costs more than most queries)
            con = getattr(cls._local, "con", None)
            if con is None:
                con = cls._local.con = duckdb.connect(":memory:")
        return table_rows(con.sql(sql, params=params).to_arrow_table())

    def _index(self, kind: str, paths: list[str], sql: str, key: Callable[[dict], list[str]]) -> dict | None:
        """{key: [rows]} over the files, built once per file state (size, mtime); None for a run too large
        to index (the caller queries instead)."""
        sig = self._signature(paths)

        def make() -> dict | None:
            n = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
            if n > INDEX_MAX_ROWS:
                return None
            out: dict[str, list[dict]] = {}
            for row in self._parquet(sql, [paths]):
                for k in key(row):
                    out.setdefault(k, []).append(row)
            return out
        with self._lock:
            hit = self._cache.get(("index", kind, sig))
        if hit:
            return hit[1]
        value = make()
        with self._lock:
            self._cache[("index", kind, sig)] = (0.0, value, None)  # keyed by the file state: never stale
        return value

    def characters(self, run_id: str, q: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """Characters that have sessions in the run, optionally filtered by a search text."""
        with self._reader() as rd:
            self._run_row(rd, run_id)
        paths = self._session_paths(run_id)
        if not paths:
            return {"run_id": run_id, "q": q, "total": 0, "characters": []}
        q = (q or "").strip() or None
        where = "(? IS NULL OR contains(lower(label), lower(?)) OR contains(lower(character_id), lower(?)))"
        base = f"FROM read_parquet(?) WHERE {where}"
        args = [paths, q, q, q]
        total = self._parquet(f"SELECT count(DISTINCT character_id) AS n {base}", args)[0]["n"]
        rows = self._parquet(
            f"SELECT character_id, any_value(label) AS label, any_value(category) AS category, "
            f"string_agg(DISTINCT language, ',' ORDER BY language) AS languages, count(*) AS sessions, "
            f"CAST(sum(len(turns)) AS BIGINT) AS turns {base} GROUP BY character_id ORDER BY label, character_id LIMIT ? OFFSET ?",
            [*args, limit, offset])
        return {"run_id": run_id, "q": q, "total": total, "limit": limit, "offset": offset, "characters": rows}

    def rejects(self, run_id: str, stage: str | None = None, character_id: str | None = None,
                limit: int = 200, offset: int = 0) -> dict[str, Any]:
        stages = self.stages_of(run_id)
        if stage is not None and (not STAGE_RE.fullmatch(stage) or stage not in stages):
            raise NotFound("stage not found")
        if character_id is not None:
            check_row_id(character_id, "character id")
        out = self._rejects_of(run_id, character_id, limit, offset, stage)
        if character_id is not None and not out["total"] and not self._known_character(run_id, character_id):
            raise NotFound("character not found")
        return out

    def _known_character(self, run_id: str, character_id: str) -> bool:
        return self._character_row(run_id, character_id) is not None or bool(self._sessions_of(run_id, character_id))

    def _sessions_of(self, run_id: str, character_id: str) -> list[dict[str, Any]]:
        paths = self._session_paths(run_id)
        if not paths:
            return []
        cols = "SELECT id, character_id, label, language, category, system, len(turns) AS turns FROM read_parquet(?)"
        index = self._index("sessions", paths, f"{cols} ORDER BY language, id", lambda r: [r["character_id"]])
        if index is not None:
            return [dict(r) for r in index.get(character_id) or []]
        return self._parquet(f"{cols} WHERE character_id = ? ORDER BY language, id", [paths, character_id])

    def _rejects_of(self, run_id: str, character_id: str | None, limit: int = 200, offset: int = 0,
                    stage: str | None = None) -> dict[str, Any]:
        paths = self._reject_paths(run_id, stage)
        if not paths:
            return {"run_id": run_id, "stage": stage, "total": 0, "by_reason": [], "rejects": []}
        base = "FROM read_parquet(?) WHERE (? IS NULL OR character_id = ?)"
        args = [paths, character_id, character_id]
        total = self._parquet(f"SELECT count(*) AS n {base}", args)[0]["n"]
        if not total:
            return {"run_id": run_id, "stage": stage, "character_id": character_id, "total": 0, "by_reason": [],
                    "rejects": []}
        by_reason = self._parquet(f"SELECT stage, filter, reason, count(*) AS n {base} GROUP BY ALL "
                                  f"ORDER BY n DESC, stage, filter, reason LIMIT 100", args)
        rows = self._parquet(f"SELECT row_id, stage, shard, filter, reason, score, character_id, text {base} "
                             f"ORDER BY stage, shard, row_id LIMIT ? OFFSET ?", [*args, limit, offset])
        return {"run_id": run_id, "stage": stage, "character_id": character_id, "total": total,
                "by_reason": by_reason, "rejects": rows}

    def _character_row(self, run_id: str, character_id: str) -> dict[str, Any] | None:
        """The run's `characters` row whose row id (id@language) or id is `character_id`."""
        paths = self._character_paths(run_id)
        if not paths:
            return None
        cols = "SELECT id, language, label, description, category, url FROM read_parquet(?, union_by_name=true)"
        index = self._index("characters", paths, f"{cols} ORDER BY language",
                            lambda r: [character_row_id(r), r["id"]])
        if index is not None:
            rows = index.get(character_id) or []
        else:
            rows = self._parquet(f"{cols} WHERE id || '@' || language = ? OR id = ? ORDER BY language LIMIT 1",
                                 [paths, character_id, character_id])
        if not rows:
            return None
        row = dict(rows[0])
        row["url"] = row["url"] if re.match(r"^https?://[^\s\"'<>]+$", row.get("url") or "") else ""
        return row

    def character(self, run_id: str, character_id: str) -> dict[str, Any]:
        check_row_id(character_id, "character id")
        self._check_run(run_id)
        sessions = self._sessions_of(run_id, character_id)
        rejected = self._rejects_of(run_id, character_id, limit=200)
        info = self._character_row(run_id, character_id)
        if not sessions and not rejected["total"] and info is None:
            raise NotFound("character not found")
        label = sessions[0]["label"] if sessions else (info or {}).get("label") or character_id
        return {"run_id": run_id, "character_id": character_id, "label": label, "sessions": sessions,
                "character": info, "rejects": rejected["rejects"], "rejects_total": rejected["total"]}

    def session(self, run_id: str, session_id: str) -> dict[str, Any]:
        check_row_id(session_id, "session id")
        self._check_run(run_id)
        paths = self._session_paths(run_id)
        rows = self._parquet("SELECT * FROM read_parquet(?) WHERE id = ? LIMIT 1", [paths, session_id]) if paths else []
        if not rows:
            raise NotFound("session not found")
        session = rows[0]
        rejected = self._rejects_of(run_id, session["character_id"], limit=200)
        return {"run_id": run_id, "session": session, "rejects": rejected["rejects"],
                "rejects_total": rejected["total"]}

    # -- evaluations ------------------------------------------------------------------------
    def evaluations(self) -> dict[str, Any]:
        with self._reader() as rd:
            rows = rd.query(
                "SELECT e.eval_id, e.run_id, e.model, e.language, e.metric, e.value, e.n, e.created_at, "
                "r.started_at AS run_started FROM evaluations e LEFT JOIN runs r USING (run_id) "
                "ORDER BY coalesce(r.started_at, e.created_at), e.created_at, e.model")
        runs: list[str] = []
        for r in rows:
            if r["run_id"] not in runs:
                runs.append(r["run_id"])
        charts: dict[tuple[str, str], dict[str, list[float | None]]] = {}
        for r in rows:
            series = charts.setdefault((r["metric"], r["language"] or ""), {})
            vals = series.setdefault(r["model"], [None] * len(runs))
            vals[runs.index(r["run_id"])] = r["value"]
        trends = [{"metric": m, "language": lang, "runs": runs, "series": s}
                  for (m, lang), s in sorted(charts.items())]
        return {"runs": runs, "trends": trends, "rows": [_jsonable(r) for r in rows]}
