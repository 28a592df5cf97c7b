"""Flow `crosssup`: the paper's cross-supervision grid. Each generator model simulates a dataset (one run per
generator; the catalog's shard reuse makes a rerun with the same generator free), each student model is
fine-tuned on each generator's data, and every student is evaluated before and after on one shared
evaluation set (the first generator's held-out characters, or the WikiRoleEval file). The result is a
table: rows students, columns base + generators, one per metric.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow

from flows.evaluate import run_evaluation
from flows.train import run_training
from models.config import RunConfig, load_config
from storage.catalog import Catalog

GRID_METRICS = ("identity", "knowledge", "rejection", "identity_embed", "out_of_role")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(name.rstrip("/")).name).strip("-").lower()[:40] or "model"


def _default_build(config: RunConfig, home: Path, run_id: str) -> None:
    from flows.build import build_dataset  # the data-generation DAG

    build_dataset(config=config.model_dump(mode="json"), home=str(home), run_id=run_id)


def _ensure_run_config(home: Path, run_id: str, config: RunConfig) -> None:
    """Record the generator run's config if the build did not (a reused run keeps its own)."""
    with Catalog(home, wait_seconds=30) as cat:
        if cat.get_run(run_id) is None:
            cat.start_run(run_id, config.dataset, config.model_dump(mode="json"), config.config_hash(), "crosssup")
            cat.finish_run(run_id, "completed")


def cross_supervision(home: str | Path, generators: list[str], students: list[str], *,
                      config: RunConfig | None = None, overrides: list[str] | None = None,
                      run_prefix: str = "xsup", build: Callable[[RunConfig, Path, str], Any] | None = None,
                      metric_language: str = "all") -> dict[str, Any]:
    """Build one dataset per generator, fine-tune every student on each, evaluate all on one set."""
    home = Path(home)
    base = config or load_config(overrides=overrides)
    build = build or _default_build
    runs: dict[str, str] = {}
    for gen in generators:
        run_id = f"{run_prefix}-{_slug(gen)}"
        cfg = base.model_copy(update={"engine": base.engine.model_copy(update={"model": gen}),
                                      "train": base.train.model_copy(update={"enabled": False})})
        build(cfg, home, run_id)
        _ensure_run_config(home, run_id, cfg)
        runs[gen] = run_id
    items_run = runs[generators[0]]
    judge = base.eval.judge or base.engine  # one judge for the whole grid, not each run's generator
    fixed = [f"eval.judge={json.dumps(judge.model_dump(mode='json'))}"]
    grid: dict[str, dict[str, dict[str, float | None]]] = {}
    evals: list[dict[str, Any]] = []
    for student in students:
        row: dict[str, dict[str, float | None]] = {}
        student_set = [f"train.model={student}", *fixed]
        base_eval = run_evaluation(items_run, home, [student], student_set)
        evals.append(base_eval)
        row["base"] = {m: base_eval["metrics"][student].get(f"{metric_language}/{m}") for m in GRID_METRICS}
        for gen, run_id in runs.items():
            result = run_training(run_id, home, student_set)
            ev = run_evaluation(run_id, home, [result.model_id], student_set,
                                items_run_id=None if run_id == items_run else items_run)
            evals.append(ev)
            row[gen] = {m: ev["metrics"][result.model_id].get(f"{metric_language}/{m}") for m in GRID_METRICS}
        grid[student] = row
    table = grid_markdown(grid, ["base", *generators])
    out = home / "crosssup" / run_prefix
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.md").write_text(table, encoding="utf-8")
    (out / "grid.json").write_text(json.dumps({"runs": runs, "grid": grid}, indent=1))
    return {"runs": runs, "grid": grid, "table": table, "path": str(out / "grid.md"),
            "evaluations": [e["eval_id"] for e in evals]}


def grid_markdown(grid: dict[str, dict[str, dict[str, float | None]]], columns: list[str]) -> str:
    lines = ["# Cross-supervision: student (rows) x supervision data generator (columns)", ""]
    for metric in GRID_METRICS:
        lines += [f"## {metric}", "", "| student | " + " | ".join(columns) + " |",
                  "| --- | " + " | ".join("---:" for _ in columns) + " |"]
        for student, row in grid.items():
            cells = []
            for c in columns:
                v = row.get(c, {}).get(metric)
                cells.append("–" if v is None else f"{v:.3f}")
            lines.append(f"| {student} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


@flow(name="crosssup", log_prints=True)
def crosssup_flow(home: str, generators: list[str], students: list[str], config_path: str | None = None,
                  overrides: list[str] | None = None, run_prefix: str = "xsup") -> dict[str, Any]:
    config = load_config(config_path, overrides)
    result = cross_supervision(home, generators, students, config=config, run_prefix=run_prefix)
    print(result["table"])
    return result
