"""Prefect artifacts for a run: per-stage stats tables, sample/reject Markdown, progress bars.

Every function is a no-op outside a Prefect flow or task run (tests of the plain stage logic, the CLI's
`show`) and never raises: artifacts are a view of the catalog, a failure to publish one must not fail a
run. Keys are stable per dataset and stage, so each nightly adds a version to the same key and the
Prefect UI shows the history.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from uuid import UUID

logger = logging.getLogger("ditto.artifacts")

_KEY_BAD = re.compile(r"[^a-z0-9-]+")
_TEXT_LIMIT = 400
_STAT_FIELDS = (
    ("rows_in", "rows in"), ("rows_out", "rows out"), ("requests", "requests"),
    ("prompt_tokens", "prompt tokens"), ("completion_tokens", "completion tokens"),
    ("format_failures", "format failures"), ("seconds", "seconds"),
)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free-form parts."""
    key = "-".join(_KEY_BAD.sub("-", p.lower()).strip("-") for p in parts if p)
    key = re.sub(r"-{2,}", "-", key).strip("-")
    return key or "ditto"


def _in_run_context() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def stats_table(run_id: str, stage: str, stats: dict[str, Any], shards: dict[str, int]) -> list[dict[str, Any]]:
    """Rows of the stats table artifact: one metric per row."""
    rows: list[dict[str, Any]] = [{"metric": "run", "value": run_id}, {"metric": "stage", "value": stage}]
    for field, label in _STAT_FIELDS:
        if field in stats:
            value = stats[field]
            rows.append({"metric": label, "value": round(value, 2) if isinstance(value, float) else value})
    seconds = float(stats.get("seconds") or 0)
    if seconds and stats.get("completion_tokens"):
        rows.append({"metric": "completion tokens/s", "value": round(stats["completion_tokens"] / seconds, 1)})
    dropped = stats.get("dropped") or {}
    if isinstance(dropped, str):
        dropped = json.loads(dropped)
    for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append({"metric": f"dropped: {reason}", "value": n})
    for status in ("done", "failed", "running", "pending"):
        if status in shards:
            rows.append({"metric": f"shards {status}", "value": shards[status]})
    return rows


def _clip(value: Any, limit: int = _TEXT_LIMIT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _sample_md(row: dict[str, Any]) -> list[str]:
    if isinstance(row.get("turns"), list):  # a Session
        head = f"**{_md_escape(str(row.get('label', '')))}** ({row.get('language', '')}, {row.get('character_id', '')})"
        lines = [f"- {head}", f"  - system: {_md_escape(_clip(row.get('system', '')))}"]
        for t in row["turns"][:3]:
            lines.append(f"  - Q ({t.get('kind', '')}): {_md_escape(_clip(t.get('question', ''), 200))}")
            lines.append(f"    A: {_md_escape(_clip(t.get('answer', ''), 300))}")
        if len(row["turns"]) > 3:
            lines.append(f"  - … {len(row['turns']) - 3} more turns")
        return lines
    keep = {k: v for k, v in row.items() if k not in ("gen", "parents", "article", "claims")}
    return [f"- `{_md_escape(str(row.get('id', '')))}` {_md_escape(_clip(keep))}"]


def samples_markdown(run_id: str, dataset: str, stage: str, samples: list[dict], rejects: list[dict]) -> str:
    lines = [f"# {_md_escape(dataset)} / {_md_escape(stage)} — run `{run_id}`", "", "## Samples", ""]
    lines += [ln for row in samples for ln in _sample_md(row)] or ["(none)"]
    lines += ["", "## Rejects", ""]
    if rejects:
        lines += ["| row | filter | reason | score | text |", "|---|---|---|---|---|"]
        for r in rejects:
            score = "" if r.get("score") is None else f"{r['score']:.3g}"
            lines.append(f"| {_md_escape(str(r.get('row_id', '')))} | {_md_escape(str(r.get('filter', '')))} | "
                         f"{_md_escape(_clip(r.get('reason', ''), 120))} | {score} | "
                         f"{_md_escape(_clip(r.get('text', ''), 160))} |")
    else:
        lines.append("(none)")
    return "\n".join(lines) + "\n"


def publish_stage_artifacts(run_id: str, dataset: str, stage: str, stats: dict, shards: dict[str, int],
                            samples: list[dict], rejects: list[dict]) -> None:
    """A stats table artifact and a samples/rejects Markdown artifact for one finished stage."""
    if not _in_run_context():
        return
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(
            table=stats_table(run_id, stage, stats, shards), key=artifact_key(dataset, stage, "stats"),
            description=f"{dataset} {stage}: rows, drops by reason, tokens, seconds (run {run_id})")
        create_markdown_artifact(
            markdown=samples_markdown(run_id, dataset, stage, samples[:5], rejects[:10]),
            key=artifact_key(dataset, stage, "samples"),
            description=f"{dataset} {stage}: sample rows and rejects (run {run_id})")
    except Exception as exc:  # noqa: BLE001 - a view; never fail the run over it
        logger.warning("could not publish artifacts for %s/%s: %s", run_id, stage, exc)


def changes_markdown(changes: dict[str, Any]) -> str:
    """The "what changed" report as Markdown: characters, shards reused vs rebuilt, generations, tokens."""
    from flows.report import changes_lines

    prev = changes.get("previous_run")
    lines = [f"# What changed in run `{changes['run_id']}`", "",
             f"Against the previous run `{prev}`." if prev else "No earlier run of this dataset.", ""]
    c = changes.get("characters")
    if c:
        lines += ["| characters | n |", "|---|---:|"] + [f"| {k} | {c[k]} |" for k in
                                                          ("added", "changed", "removed", "unchanged")] + [""]
    lines += ["| stage | rebuilt | reused | failed | generations cached | generations new | tokens |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in changes["stages"].items():
        lines.append(f"| {_md_escape(name)} | {s['rebuilt']} | {s['reused']} | {s['failed']} | {s['cached']} | "
                     f"{s['new']} | {s['prompt_tokens'] + s['completion_tokens']} |")
    lines += ["", "```", *changes_lines(changes), "```"]
    return "\n".join(lines) + "\n"


def publish_changes(run_id: str, dataset: str, changes: dict[str, Any]) -> None:
    """The run's "what changed" Markdown artifact, keyed per dataset (one version per nightly)."""
    if not _in_run_context():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=changes_markdown(changes), key=artifact_key(dataset, "changes"),
                                 description=f"{dataset}: what changed in run {run_id} since the previous run")
    except Exception as exc:  # noqa: BLE001 - a view; never fail the run over it
        logger.warning("could not publish the changes artifact for %s: %s", run_id, exc)


def _percent(done: int, total: int) -> float:
    if total <= 0:
        return 100.0
    return max(0.0, min(100.0, 100.0 * done / total))


def create_progress(run_id: str, stage: str, total: int) -> UUID | None:
    """A progress artifact at 0 %; returns its handle (None outside a run, or when the API refused)."""
    if not _in_run_context():
        return None
    try:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(progress=_percent(0, total),
                                        description=f"{stage}: 0/{total} shards (run {run_id})")
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not create a progress artifact for %s/%s: %s", run_id, stage, exc)
        return None


def update_progress(handle: UUID | None, done: int, total: int) -> None:
    if handle is None:
        return
    try:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id=handle, progress=_percent(done, total),
                                 description=f"{done}/{total} shards")
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not update progress artifact %s: %s", handle, exc)


__all__ = ["artifact_key", "changes_markdown", "create_progress", "publish_changes", "publish_stage_artifacts",
           "samples_markdown", "stats_table", "update_progress"]
