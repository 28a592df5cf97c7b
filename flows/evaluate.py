"""Flow `evaluate`: base model vs fine-tuned (or any list of models) on the run's held-out characters, or
on the paper's WikiRoleEval file. Results go to the catalog's `evaluations` table, and a Markdown table
and a PNG plot to `<home>/runs/<run_id>/eval/<eval_id>/`. Each model's judged answers are a catalog artifact
(storage/artifacts.py) under a content key (eval set, eval settings, judge, seed, the model and its
weights): a whole registered one is reused, from any run; a missing or damaged one is evaluated again.

A model spec is a model id from the catalog's `models` table (its folder is used), `base` (the run's
student before training), or any model name/path the engines accept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import flow

from models.base import from_table, table_rows, to_table
from models.config import RunConfig
from models.config.engine import EngineConfig
from models.eval_records import EvalItem, EvalResult
from models.ids import content_hash
from storage import artifacts
from storage.catalog import Catalog
from storage.layout import RunLayout
from storage.reader import CatalogReader
from storage.shards import read_table, write_table
from tasks.evaluate import EvalError, build_eval_set, evaluate_model, items_hash, report_markdown, report_plot
from tasks.sft_data import split_of
from tasks.wikiroleeval import import_wikiroleeval

BASE = "base"


def _rows(paths: list[str]) -> list[dict]:
    out: list[dict] = []
    for p in paths:
        out += table_rows(read_table(p))
    return out


def load_eval_items(reader: CatalogReader, run_id: str, config: RunConfig) -> list[EvalItem]:
    ev = config.eval
    if ev.source == "wikiroleeval":
        if not ev.wikiroleeval_path:
            raise EvalError("eval.source is wikiroleeval but eval.wikiroleeval_path is not set")
        items = import_wikiroleeval(ev.wikiroleeval_path)
        if ev.max_characters:
            keep = sorted({it.session_id for it in items})[:ev.max_characters]
            items = [it for it in items if it.session_id in keep]
        if ev.max_turns_per_character:
            items = [it for it in items if it.turn < ev.max_turns_per_character]
        return items
    characters = _rows(reader.done_paths(run_id, "characters"))
    sessions = _rows(reader.done_paths(run_id, "dedup"))
    sft = _rows(reader.done_paths(run_id, "sft_data"))
    if sft:  # the split the training data actually used
        heldout = {r["character_id"] for r in sft if r["split"] == "validation"}
    else:
        heldout = {s["character_id"] for s in sessions
                   if split_of(s["character_id"], config.seed, config.sft.validation_fraction) == "validation"}
    items = build_eval_set(characters, sessions, heldout, ev, config.seed)
    if not items:
        raise EvalError(f"run {run_id!r} has no held-out sessions to evaluate (validation characters: {len(heldout)}); "
                        f"raise sft.validation_fraction or set eval.source=wikiroleeval")
    return items


def resolve_models(reader: CatalogReader, run_id: str, config: RunConfig, models: list[str] | None
                   ) -> list[tuple[str, str]]:
    """(name in the report, model path/name for the engine). Default: base, then the run's newest model."""
    registered = reader.query("SELECT model_id, path FROM models WHERE run_id=? ORDER BY created_at DESC", [run_id])
    if not models:
        models = [BASE] + ([registered[0]["model_id"]] if registered else [])
    by_id = {r["model_id"]: r["path"] for r in reader.query("SELECT model_id, path FROM models")}
    out = []
    for spec in models:
        if spec == BASE:
            out.append((BASE, config.train.model or config.engine.model))
        elif spec in by_id:
            out.append((spec, by_id[spec]))
        else:
            out.append((spec, spec))
    return out


def _answer_engine(config: RunConfig, model_path: str) -> EngineConfig:
    """The engine that answers as the model under test: the run's engine with that model (and eval.engine_kind)."""
    ev = config.eval
    engine = config.engine.model_copy(update={"model": model_path, **({"kind": ev.engine_kind} if ev.engine_kind
                                                                       else {})})
    return EngineConfig.model_validate(engine.model_dump())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:] or "model"


def run_evaluation(run_id: str, home: str | Path, models: list[str] | None = None,
                   overrides: list[str] | None = None, *, items_run_id: str | None = None) -> dict[str, Any]:
    """Plain function under the flow. `items_run_id`: take the held-out items from another run (the
    cross-supervision grid evaluates every generator's students on one set)."""
    from flows.train import run_config

    home = Path(home)
    with CatalogReader(home) as reader:
        config = run_config(reader, run_id, overrides)
        items_config = run_config(reader, items_run_id, overrides) if items_run_id else config
        items = load_eval_items(reader, items_run_id or run_id, items_config)
        specs = resolve_models(reader, run_id, config, models)
        weights = {r["path"]: r["sha256"] for r in reader.query("SELECT path, sha256 FROM artifacts WHERE kind=?",
                                                               [artifacts.MODEL])}
        ev = config.eval
        judge = ev.judge or (config.engine if ev.judge_enabled else None)
        setting = {"items": items_hash(items), "eval": ev.model_dump(mode="json"), "seed": config.seed,
                   "judge": judge.model_dump(mode="json") if judge else None}
        plans = []
        for name, model_path in specs:
            engine = _answer_engine(config, model_path)
            # a model's results: the evaluation settings, the model as the engine loads it, and (a registered
            # model) its weights' content: a model trained again at the same path is evaluated again
            key = content_hash({**setting, "model": name, "engine": engine.model_dump(mode="json"),
                                "weights": weights.get(model_path)})
            plans.append((name, model_path, engine, key, artifacts.find(reader, artifacts.EVALUATION, key)[0]))
    eval_id = content_hash({"run": run_id, "items": setting["items"], "eval": setting["eval"],
                            "judge": setting["judge"]})
    out_dir = RunLayout(home, run_id).eval(eval_id)
    write_table(to_table(items, EvalItem), out_dir / "items.parquet")
    by_model: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, str] = {}
    for name, model_path, answer_engine, key, found in plans:
        built = None
        if found is not None:  # evaluated before with the same key (this run or another): not redone
            from tasks.evaluate import aggregate

            done = Path(found.path)
            rows = aggregate(from_table(read_table(done), EvalResult), items)
        else:
            done = out_dir / f"results-{_slug(name)}.parquet"
            results, rows = evaluate_model(items, name, answer_engine, ev, judge, seed=config.seed)
            write_table(to_table(results, EvalResult), done)
            built = artifacts.Artifact.of(artifacts.EVALUATION, key, run_id, done, meta={"model": name})
        for r in rows:
            r["details"] = {**r["details"], "model_path": model_path, "eval_set": items[0].source if items else ""}
        with Catalog(home, wait_seconds=30) as cat:
            if built is not None:
                cat.register_artifact(built)
            cat.add_evaluation(eval_id, run_id, name, rows)
        by_model[name] = rows
        files[name] = str(done)
    info = {"run": run_id, "eval_id": eval_id, "items": len(items),
            "characters": len({it.session_id for it in items}), "source": items[0].source,
            "judge": f"{judge.kind}:{judge.model}" if judge else "none",
            "judge_samples": ev.judge_samples, "judge_temperature": ev.judge_temperature}
    report = out_dir / "report.md"
    report.write_text(report_markdown(by_model, f"Role-play evaluation of run {run_id}", info), encoding="utf-8")
    plot = report_plot(by_model, out_dir / "report.png") if ev.plot else None
    summary = {"eval_id": eval_id, "run_id": run_id, "dir": str(out_dir), "report": str(report),
               "plot": str(plot) if plot else None, "results": files, "info": info,
               "metrics": {m: {f"{r['language']}/{r['metric']}": r["value"] for r in rows}
                           for m, rows in by_model.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


@flow(name="evaluate", log_prints=True)
def evaluate_flow(run_id: str, home: str, models: list[str] | None = None,
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate `models` (default: base and the run's newest fine-tuned model) side by side."""
    summary = run_evaluation(run_id, home, models, overrides)
    print(Path(summary["report"]).read_text(encoding="utf-8"))
    return summary
