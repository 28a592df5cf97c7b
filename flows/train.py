"""Flow `train`: fine-tune the student on a run's sft_data shards and register the model in the catalog.

Reads the run's config and shard paths from the catalog snapshot (read-only, so it works while another
process holds the catalog) and plans the training (`tasks.train.TrainPlan`). The model is a catalog artifact
(storage/artifacts.py) under its content key, `train_hash` (data, student, every setting that changes the
weights): a whole registered model with that key is used as it is (from this run, or reused from another),
a damaged one is trained again from scratch. Otherwise it trains in this process or under `accelerate launch`
(multi-GPU), resuming from the newest checkpoint of an interrupted attempt, then opens the catalog only to
register the result: the flow process is the only catalog writer.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from models.config import RunConfig, load_config, migrate_stored_config
from storage import artifacts
from storage.catalog import Catalog
from storage.reader import CatalogReader
from tasks.train import TrainPlan, TrainResult, data_hash, model_id_for, train_dir, train_hash, train_model

STAGE = "sft_data"


class TrainFlowError(RuntimeError):
    pass


def run_config(reader: CatalogReader, run_id: str, overrides: list[str] | None = None) -> RunConfig:
    """A run's stored config (keys an earlier release wrote moved to their place), with `overrides`."""
    run = reader.run(run_id)
    if run is None:
        raise TrainFlowError(f"no run {run_id!r} in {reader.home} (run `ditto build` first)")
    data = run["config"]
    data = json.loads(data) if isinstance(data, str) else (data or {})
    return load_config(data=migrate_stored_config(data), overrides=overrides)


def plan_training(run_id: str, home: str | Path, overrides: list[str] | None = None) -> TrainPlan:
    """Config, sft_data paths, data hash, key and training folder of a run (reads the snapshot only)."""
    with CatalogReader(home) as reader:
        config = run_config(reader, run_id, overrides)
        paths = reader.done_paths(run_id, STAGE)
        pending = [s for s in reader.shards(run_id, STAGE) if s["status"] != "done"]
    if not paths:
        raise TrainFlowError(f"run {run_id!r} has no finished {STAGE} shards to train on")
    if pending:
        raise TrainFlowError(f"run {run_id!r}: {len(pending)} {STAGE} shard(s) not done; finish the run first")
    base_model = config.train.model or config.engine.model
    digest = data_hash(paths)
    key = train_hash(config.train, base_model, digest)
    return TrainPlan(train=config.train, paths=[str(p) for p in paths], base_model=base_model,
                     seed=config.train.seed if config.train.seed is not None else config.seed, run_id=run_id,
                     data_hash=digest, key=key, out_dir=str(train_dir(home, run_id, key)))


def _launch_accelerate(plan: TrainPlan) -> TrainResult:
    cfg = plan.train
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan_file, result_file = out / ".plan.json", out / ".result.json"
    plan_file.write_text(plan.model_dump_json(indent=1))
    result_file.unlink(missing_ok=True)  # only what this launch hands back is read
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        conf = Path(cfg.accelerate_config).expanduser()
        repo_conf = Path(__file__).resolve().parents[1] / conf
        cmd += ["--config_file", str(conf if conf.is_absolute() or conf.exists() or not repo_conf.exists()
                                     else repo_conf)]
    if cfg.num_processes:
        cmd += ["--num_processes", str(cfg.num_processes)]
    cmd += ["-m", "tasks.train", "--plan", str(plan_file), "--result", str(result_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise TrainFlowError(f"training failed (exit {proc.returncode}): {shlex.join(cmd)}")
    if not result_file.is_file():
        raise TrainFlowError(f"training ended without handing back {result_file}")
    return TrainResult.model_validate_json(result_file.read_text())


def _registered(found: artifacts.Artifact, plan: TrainPlan) -> TrainResult:
    """The registered model under this run's model id: skipped in its own run, reused in another."""
    result = TrainResult.model_validate(found.meta["result"])
    return result.model_copy(update={
        "model_id": model_id_for(plan.train, plan.run_id, plan.key, plan.base_model), "model_path": found.path,
        "reused_from": found.run_id if found.run_id != plan.run_id else result.reused_from})


def register(home: str | Path, run_id: str, result: TrainResult, built: artifacts.Artifact | None = None) -> None:
    with Catalog(home, wait_seconds=30) as cat:
        if built is not None:
            cat.register_artifact(built)
        cat.register_model(result.model_id, run_id, result.model_path, result.base_model, result.data_hash, "done",
                           result.metrics, {"train": result.config, "train_hash": result.train_hash,
                                            "adapter_path": result.adapter_path, "resumed_from": result.resumed_from,
                                            "reused_from": result.reused_from,
                                            "base_model_path": result.base_model_path})


def run_training(run_id: str, home: str | Path, overrides: list[str] | None = None, *, force: bool = False,
                 callbacks: list | None = None) -> TrainResult:
    """Plain function under the flow: plan, find the model in the catalog or train it, register."""
    plan = plan_training(run_id, home, overrides)
    with CatalogReader(home) as reader:
        found, problem = artifacts.find(reader, artifacts.MODEL, plan.key)
    if found is not None and not force:
        result, built = _registered(found, plan), None
    else:
        if force or problem:  # a damaged registered model is not trusted, nor are the checkpoints beside it
            shutil.rmtree(plan.out_dir, ignore_errors=True)
        if plan.train.launcher == "accelerate":
            result = _launch_accelerate(plan)
        else:
            result = train_model(plan, callbacks=callbacks)
        built = artifacts.Artifact.of(artifacts.MODEL, plan.key, run_id, result.model_path,
                                      meta={"result": result.model_dump(mode="json")})
    register(home, run_id, result, built)
    return result


@flow(name="train", log_prints=True)
def train_flow(run_id: str, home: str, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Fine-tune on run `run_id`'s sft_data and register the model (catalog `models` and `artifacts`)."""
    result = run_training(run_id, home, overrides, force=force)
    try:
        get_run_logger().info("trained %s -> %s (%s)", result.model_id, result.model_path,
                              {k: result.metrics.get(k) for k in ("train_loss", "eval_loss", "global_step")})
    except Exception:  # noqa: BLE001 - logging outside a flow run context
        pass
    return result.model_dump()
