"""Flow `train`: fine-tune the student on a run's sft_data shards and register the model in the catalog.

Reads the run's config and shard paths from the catalog snapshot (read-only, so it works while another
process holds the catalog), trains in this process or under `accelerate launch` (multi-GPU), then opens
the catalog only to register the result: the flow process is the only catalog writer.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from models.config import RunConfig, load_config
from storage.catalog import Catalog
from storage.reader import CatalogReader
from tasks.train import RESULT, TrainResult, data_hash, train_dir, train_hash, train_model

STAGE = "sft_data"


class TrainFlowError(RuntimeError):
    pass


def run_config(reader: CatalogReader, run_id: str, overrides: list[str] | None = None) -> RunConfig:
    run = reader.run(run_id)
    if run is None:
        raise TrainFlowError(f"no run {run_id!r} in {reader.home} (run `ditto build` first)")
    data = run["config"]
    data = json.loads(data) if isinstance(data, str) else (data or {})
    return load_config(data=data, overrides=overrides)


def plan_training(run_id: str, home: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Config, sft_data paths, data hash and the training folder of a run (reads the snapshot only)."""
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
    return {"config": config, "paths": paths, "base_model": base_model, "data_hash": digest, "key": key,
            "out_dir": train_dir(home, run_id, key)}


def _launch_accelerate(plan: dict[str, Any], run_id: str, home: str | Path, overrides: list[str] | None) -> TrainResult:
    cfg = plan["config"].train
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        conf = Path(cfg.accelerate_config).expanduser()
        repo_conf = Path(__file__).resolve().parents[1] / conf
        cmd += ["--config_file", str(conf if conf.is_absolute() or conf.exists() or not repo_conf.exists()
                                     else repo_conf)]
    if cfg.num_processes:
        cmd += ["--num_processes", str(cfg.num_processes)]
    cmd += ["-m", "tasks.train", "--home", str(home), "--run-id", run_id, "--out-dir", str(plan["out_dir"])]
    for o in overrides or []:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise TrainFlowError(f"training failed (exit {proc.returncode}): {shlex.join(cmd)}")
    result = Path(plan["out_dir"]) / RESULT
    if not result.is_file():
        raise TrainFlowError(f"training ended without {result}")
    return TrainResult.model_validate_json(result.read_text())


def register(home: str | Path, run_id: str, result: TrainResult) -> None:
    with Catalog(home, wait_seconds=30) as cat:
        cat.register_model(result.model_id, run_id, result.model_path, result.base_model, result.data_hash, "done",
                           result.metrics, {"train": result.config, "train_hash": result.train_hash,
                                            "adapter_path": result.adapter_path, "resumed_from": result.resumed_from,
                                            "base_model_path": result.base_model_path})


def run_training(run_id: str, home: str | Path, overrides: list[str] | None = None, *, force: bool = False,
                 callbacks: list | None = None) -> TrainResult:
    """Plain function under the flow: plan, train (resuming from the last checkpoint), register."""
    plan = plan_training(run_id, home, overrides)
    config: RunConfig = plan["config"]
    if config.train.launcher == "accelerate":
        result = _launch_accelerate(plan, run_id, home, overrides)
    else:
        result = train_model(config.train, plan["paths"], plan["out_dir"], base_model=plan["base_model"],
                             seed=config.seed, run_id=run_id, force=force, callbacks=callbacks,
                             data_digest=plan["data_hash"])
    register(home, run_id, result)
    return result


@flow(name="train", log_prints=True)
def train_flow(run_id: str, home: str, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Fine-tune on run `run_id`'s sft_data and register the model (catalog `models` table)."""
    result = run_training(run_id, home, overrides, force=force)
    try:
        get_run_logger().info("trained %s -> %s (%s)", result.model_id, result.model_path,
                              {k: result.metrics.get(k) for k in ("train_loss", "eval_loss", "global_step")})
    except Exception:  # noqa: BLE001 - logging outside a flow run context
        pass
    return result.model_dump()
