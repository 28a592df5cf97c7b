"""Plain-text views of a run's report (storage/report.py computes it): the lines `ditto show` prints
after its stage table and the "what changed" block of the Prefect artifacts."""

from __future__ import annotations

from typing import Any

from models.stages import stage_sort_key
from storage.report import metrics_of


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
        lines.append(f"  {name} shards: {s['rebuilt']} rebuilt, {s['reused']} reused"
                     + (f", {s['failed']} failed" if s["failed"] else "") + gen + (f", {tok} tokens" if tok else ""))
    lines.append(f"  tokens spent: {ch['tokens']}; generations {ch['generations']['cached']} cached, "
                 f"{ch['generations']['new']} new")
    return lines


def metrics_lines(stages: list[dict[str, Any]]) -> list[str]:
    """One line per stage with recorded timing metrics (stage rows with "stage" and "metrics")."""
    lines = []
    for s in sorted(stages, key=lambda s: stage_sort_key(s["stage"])):
        m = metrics_of(s)
        run = m.get("run")
        if run and run.get("wall_s"):
            e = run.get("engine") or {}
            lines.insert(0, f"  run: wall {run['wall_s']:.1f}s (stages' own {run['stage_wall_s']:.1f}s), "
                            f"{run.get('completion_tokens_per_wall_s') or 0:.1f} completion tok/s"
                            + (f", engine busy {e.get('busy_seconds', 0):.1f}s, mean running "
                               f"{e.get('mean_running', 0):.1f}" if e.get("requests") else ""))
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


def show_lines(details: dict[str, Any]) -> list[str]:
    """Notes, per-stage timing and what changed, as plain text lines (`details`: `ditto show --json`)."""
    lines = [f"note: {n}" for n in details.get("notes") or []]
    lines += metrics_lines(details.get("stages") or [])
    if details.get("changes"):
        lines += changes_lines(details["changes"])
    return lines
