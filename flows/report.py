"""What a run's records say beyond rows and drops: stage metrics, notes, and what changed since the
dataset's previous run. Plain functions over anything with `query(sql, params) -> list[dict]` (the
writer `Catalog` in the flow, the snapshot `CatalogReader` in `ditto show` and the dashboard).

Stage metrics (`stage_metrics`, stored in stage_stats.metrics by the flow):
    wall_s               seconds with at least one of the stage's shard tasks running (the union of their
                         intervals: first start to last end when the stage ran in one go, without the idle
                         time between a run and its rerun)
    first_start/last_end epoch seconds of the stage's first task start and last task end
    shard_seconds        the sum of the tasks' own seconds (> wall_s when shards overlap)
    completion_tokens_per_wall_s   completion tokens of the shards computed here / wall_s
    resampled            requests re-submitted after unparseable output (shard stats)
    cache_hits/misses    generations served by the generation cache / sent to the engine (shard stats)
    engine               the engine's own counters for the stage's requests over this run (busy seconds,
                         mean running requests, re-sampled requests, tokens per busy second)
Only shards computed in this run count: a reused shard's stats are the earlier run's.
"""

from __future__ import annotations

import json
from typing import Any

from models.ids import content_hash

PROFILE_FIELDS = ("label", "description", "aliases", "claims", "category", "summary", "article")
_SUM_KEYS = ("resampled", "cache_hits", "cache_misses", "request_retries")


def _stats(row: dict[str, Any]) -> dict[str, Any]:
    st = row.get("stats")
    if isinstance(st, str):
        try:
            return json.loads(st or "{}")
        except json.JSONDecodeError:
            return {}
    return st or {}


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    m = row.get("metrics")
    if isinstance(m, str):
        try:
            return json.loads(m or "{}")
        except json.JSONDecodeError:
            return {}
    return m or {}


def interval_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, end = 0.0, None
    start = None
    for a, b in sorted((a, b) for a, b in intervals if b >= a):
        if end is None or a > end:
            if end is not None:
                total += end - start  # type: ignore[operator]
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start  # type: ignore[operator]
    return total


def computed_shards(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Done shards this run computed itself (not reused from another run)."""
    return [r for r in rows if r.get("status") == "done" and not r.get("reused_from")]


def timeline(rows: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(shard, started, ended) of each computed shard task with recorded times, by start."""
    out = []
    for r in computed_shards(rows):
        st = _stats(r)
        if isinstance(st.get("started"), int | float) and isinstance(st.get("ended"), int | float):
            out.append((int(r["shard"]), float(st["started"]), float(st["ended"])))
    return sorted(out, key=lambda t: (t[1], t[0]))


def stage_metrics(rows: list[dict[str, Any]], engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage's metrics from its shard rows (this run's) and the engine's counters for it."""
    mine = computed_shards(rows)
    spans = [(a, b) for _, a, b in timeline(rows)]
    wall = interval_union(spans)
    completion = sum(int(_stats(r).get("completion_tokens") or 0) for r in mine)
    out: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "first_start": round(min(a for a, _ in spans), 3) if spans else None,
        "last_end": round(max(b for _, b in spans), 3) if spans else None,
        "shard_seconds": round(sum(b - a for a, b in spans), 3),
        "shards_computed": len(mine),
        "shards_reused": sum(1 for r in rows if r.get("status") == "done" and r.get("reused_from")),
        "completion_tokens": completion,
        "completion_tokens_per_wall_s": round(completion / wall, 2) if wall > 0 else None,
    }
    for key in _SUM_KEYS:
        out[key] = sum(int(_stats(r).get(key) or 0) for r in mine)
    if engine is not None:
        out["engine"] = engine
    return out


# -- what changed since the previous run of the dataset ---------------------------------------------
def previous_run(db: Any, run_id: str) -> dict[str, Any] | None:
    """The dataset's newest run that started before this one (and reached its characters stage)."""
    rows = db.query(
        "SELECT p.* FROM runs p, runs r WHERE r.run_id = ? AND p.dataset = r.dataset AND p.run_id <> r.run_id "
        "AND p.started_at < r.started_at AND EXISTS (SELECT 1 FROM shards s WHERE s.run_id = p.run_id "
        "AND s.stage = 'characters' AND s.status = 'done') ORDER BY p.started_at DESC LIMIT 1", [run_id])
    return rows[0] if rows else None


def profile_hashes(db: Any, run_id: str) -> dict[str, str] | None:
    """character row id (id@language) -> hash of its profile, from the run's characters shards."""
    import pyarrow.parquet as pq

    from storage.shards import shard_is_whole

    rows = db.query("SELECT * FROM shards WHERE run_id = ? AND stage = 'characters' AND status = 'done' "
                    "ORDER BY shard", [run_id])
    if not rows:
        return None
    out: dict[str, str] = {}
    for r in rows:
        if not shard_is_whole(r, check_hash=False):
            continue
        cols = pq.read_schema(r["path"]).names
        t = pq.read_table(r["path"], columns=[c for c in ("id", "language", *PROFILE_FIELDS) if c in cols])
        for row in t.to_pylist():
            out[f"{row['id']}@{row.get('language', '')}"] = content_hash(
                {k: row.get(k) for k in PROFILE_FIELDS}, 16)
    return out


def _stage_counts(db: Any, run_id: str) -> dict[str, dict[str, Any]]:
    rows = db.query("SELECT * FROM shards WHERE run_id = ? ORDER BY stage, shard", [run_id])
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = out.setdefault(r["stage"], {"shards": 0, "reused": 0, "rebuilt": 0, "failed": 0, "requests": 0,
                                        "cached": 0, "new": 0, "prompt_tokens": 0, "completion_tokens": 0})
        s["shards"] += 1
        if r["status"] == "failed":
            s["failed"] += 1
        if r["status"] != "done":
            continue
        if r.get("reused_from"):
            s["reused"] += 1
            continue
        s["rebuilt"] += 1
        st = _stats(r)
        s["requests"] += int(st.get("requests") or 0)
        hits, misses = st.get("cache_hits"), st.get("cache_misses")
        s["cached"] += int(hits or 0)
        s["new"] += int(misses) if misses is not None else int(st.get("requests") or 0) - int(hits or 0)
        s["prompt_tokens"] += int(st.get("prompt_tokens") or 0)
        s["completion_tokens"] += int(st.get("completion_tokens") or 0)
    return out


def what_changed(db: Any, run_id: str) -> dict[str, Any]:
    """Against the dataset's previous run: characters added, changed (profile hash) and removed; per
    stage, shards reused vs rebuilt, generations cached vs new, tokens spent."""
    from flows.stages import STAGE_ORDER

    prev = previous_run(db, run_id)
    stages = _stage_counts(db, run_id)
    order = sorted(stages, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else 99, s))
    out: dict[str, Any] = {"run_id": run_id, "previous_run": prev["run_id"] if prev else None,
                           "stages": {s: stages[s] for s in order}}
    out["tokens"] = sum(s["prompt_tokens"] + s["completion_tokens"] for s in stages.values())
    out["generations"] = {"cached": sum(s["cached"] for s in stages.values()),
                          "new": sum(s["new"] for s in stages.values())}
    cur = profile_hashes(db, run_id)
    old = profile_hashes(db, prev["run_id"]) if prev else None
    if cur is not None and old is not None:
        added = sorted(set(cur) - set(old))
        removed = sorted(set(old) - set(cur))
        changed = sorted(k for k in set(cur) & set(old) if cur[k] != old[k])
        out["characters"] = {"added": len(added), "changed": len(changed), "removed": len(removed),
                             "unchanged": len(cur) - len(added) - len(changed),
                             "examples": {"added": added[:10], "changed": changed[:10], "removed": removed[:10]}}
    elif cur is not None:
        out["characters"] = {"added": len(cur), "changed": 0, "removed": 0, "unchanged": 0,
                             "examples": {"added": sorted(cur)[:10], "changed": [], "removed": []}}
    return out


def changes_lines(ch: dict[str, Any]) -> list[str]:
    """`ditto show`'s "what changed" block, plain text."""
    prev = ch.get("previous_run")
    lines = [f"what changed since {prev}:" if prev else "what changed: no earlier run of this dataset"]
    c = ch.get("characters")
    if c:
        lines.append(f"  characters: {c['added']} added, {c['changed']} changed, {c['removed']} removed, "
                     f"{c['unchanged']} unchanged")
        for kind in ("added", "changed", "removed"):
            ex = c["examples"][kind]
            if ex and prev:
                more = c[kind] - len(ex)
                lines.append(f"    {kind}: {', '.join(ex)}" + (f" (+{more} more)" if more > 0 else ""))
    for name, s in ch["stages"].items():
        gen = f", generations {s['cached']} cached / {s['new']} new" if s["requests"] or s["cached"] else ""
        tok = s["prompt_tokens"] + s["completion_tokens"]
        lines.append(f"  {name}: {s['rebuilt']} shards rebuilt, {s['reused']} reused"
                     + (f", {s['failed']} failed" if s["failed"] else "") + gen + (f", {tok} tokens" if tok else ""))
    lines.append(f"  tokens spent: {ch['tokens']}; generations {ch['generations']['cached']} cached, "
                 f"{ch['generations']['new']} new")
    return lines


# -- notes for `ditto show` ---------------------------------------------------------------------------
def run_notes(db: Any, run_id: str) -> list[str]:
    """Warnings the flow recorded, and stages that produced no rows (a normal outcome, said plainly)."""
    from flows.stages import STAGE_ORDER

    stats = db.query("SELECT * FROM stage_stats WHERE run_id = ?", [run_id])
    stats.sort(key=lambda s: STAGE_ORDER.index(s["stage"]) if s["stage"] in STAGE_ORDER else 99)
    notes: list[str] = []
    for s in stats:
        for w in _metrics(s).get("warnings") or []:
            notes.append(f"{s['stage']}: {w}")
    first_empty = next((s for s in stats if (s.get("shards_done") or 0) and (s.get("shards_done") or 0)
                        == (s.get("shards_total") or 0) and not (s.get("rows_out") or 0)), None)
    if first_empty is not None:
        dropped = first_empty.get("dropped") or {}
        if isinstance(dropped, str):
            dropped = json.loads(dropped or "{}")
        why = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "nothing dropped"
        later = [s["stage"] for s in stats if STAGE_ORDER.index(s["stage"]) > STAGE_ORDER.index(first_empty["stage"])] \
            if first_empty["stage"] in STAGE_ORDER else []
        notes.append(f"{first_empty['stage']} kept no rows ({first_empty.get('rows_in') or 0} in; dropped: {why})"
                     + (f"; {', '.join(later)} ran on empty shards" if later else "")
                     + ": the run's dataset is empty")
    return notes


def metrics_lines(stages: list[dict[str, Any]]) -> list[str]:
    """One line per stage with recorded timing metrics (stage rows with "stage" and "metrics")."""
    from flows.stages import STAGE_ORDER

    lines = []
    for s in sorted(stages, key=lambda s: STAGE_ORDER.index(s["stage"]) if s["stage"] in STAGE_ORDER else 99):
        m = _metrics(s)
        if not m.get("shards_computed"):
            continue
        parts = [f"wall {m['wall_s']:.1f}s", f"shard-seconds {m['shard_seconds']:.1f}"]
        if m.get("completion_tokens_per_wall_s") is not None and m.get("completion_tokens"):
            parts.append(f"{m['completion_tokens_per_wall_s']:.1f} completion tok/s")
        e = m.get("engine") or {}
        if e.get("requests"):
            parts.append(f"engine busy {e.get('busy_seconds', 0):.1f}s, mean running {e.get('mean_running', 0):.1f}")
        if m.get("resampled") or e.get("resampled"):
            parts.append(f"re-sampled {m.get('resampled') or e.get('resampled')}")
        if m.get("cache_hits") or m.get("cache_misses"):
            parts.append(f"cache {m.get('cache_hits', 0)} hits / {m.get('cache_misses', 0)} misses")
        lines.append(f"  {s['stage']}: " + ", ".join(parts))
    return ["timing:", *lines] if lines else []


def show_extras(db: Any, run_id: str) -> dict[str, Any]:
    """What `ditto show` adds to the stage table (also in its --json output)."""
    return {"notes": run_notes(db, run_id), "changes": what_changed(db, run_id)}


def show_lines(details: dict[str, Any]) -> list[str]:
    """Notes, per-stage timing and what changed, as plain text lines (`details`: `ditto show --json`)."""
    lines = [f"note: {n}" for n in details.get("notes") or []]
    lines += metrics_lines(details.get("stages") or [])
    if details.get("changes"):
        lines += changes_lines(details["changes"])
    return lines


__all__ = ["changes_lines", "interval_union", "metrics_lines", "previous_run", "run_notes", "show_extras",
           "show_lines", "stage_metrics", "timeline", "what_changed"]
