"""The nightly `build_dataset` DAG: characters -> queries -> responses -> filter -> dedup -> sft_data.

One Prefect task per shard (never per prompt), run in a bounded ThreadPoolTaskRunner. Tasks write
Parquet atomically and return small metadata; this flow process is the only writer of the catalog and
registers each shard as its task finishes. A shard is skipped when it is already done for the same
input hash (this run or, unless --fresh, any earlier run: recorded as reused), so reruns and nightly
rebuilds recompute only failed, missing or changed shards.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from engines.base import is_transient
from flows.artifacts import create_progress, update_progress
from flows.runners import task_runner_for
from flows.stages import ChainError, check_chain, get_stage, stages_until
from models.base import table_rows, to_table
from models.config import ConfigError, RunConfig, load_config
from models.ids import content_hash, shard_of
from models.records import Rejection
from storage.catalog import Catalog
from storage.shards import clean_temp_files, read_table, shard_path, write_table
from tasks.base import SourceStage, Stage, StageContext, Stats


def package_version() -> str:
    try:
        return metadata.version("ditto-roleplay")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"


VERSION = package_version()
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
ProgressHook = Callable[[str, dict[str, Any]], None]
PROGRESS_HOOKS: list[ProgressHook] = []  # the CLI adds its progress bars here


class RunFailed(RuntimeError):
    """Some shards failed or could not run; the catalog has the errors. `ditto rerun` picks them up."""


def resolve_home(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("DITTO_HOME") or ".ditto").expanduser().resolve()


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _emit(event: str, **data: Any) -> None:
    for hook in list(PROGRESS_HOOKS):
        try:
            hook(event, data)
        except Exception:  # noqa: BLE001 - a broken progress bar must not fail a run
            pass


@lru_cache(maxsize=16)
def _config(config_json: str) -> RunConfig:
    return RunConfig.model_validate_json(config_json)


def _num_shards(rows: int, shard_size: int) -> int:
    """Next power of two of rows/shard_size: a few more characters rarely move the shard count."""
    need = max(1, math.ceil(rows / shard_size))
    return 1 << (need - 1).bit_length()


def input_hash(stage: str, fingerprint: dict[str, Any], shard: int, num_shards: int,
               upstream: dict[str, str], extra_digest: str | None = None, version: str | None = None) -> str:
    """A shard's key: stage config + prompt text + model id/revision (the fingerprint), package version,
    the upstream shards' keys and a global step's digest, as canonical JSON."""
    return content_hash({"stage": stage, "fp": fingerprint, "version": version or VERSION, "shard": shard,
                         "n": num_shards, "upstream": dict(sorted(upstream.items())), "extra": extra_digest})


def _write_rejects(rejects: list[Rejection], home: Path, run_id: str, stage: str, input_hash: str,
                   shard: int) -> tuple[str | None, int]:
    if not rejects:
        return None, 0
    fixed = [r.model_copy(update={"shard": shard, "stage": stage}) for r in rejects]
    path = shard_path(home, run_id, stage, input_hash, shard, kind="rejected")
    write_table(to_table(fixed, Rejection), path)
    return str(path), len(fixed)


# -- the shard work (plain functions; the Prefect tasks below only wrap them) ---------------------
def execute_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Run one stage on one shard: read upstream shard files, run the stage, write output and rejects."""
    cfg = _config(job["config"])
    stage = get_stage(job["stage"])
    home = Path(job["home"])
    inputs = {name: table_rows(read_table(path)) for name, path in job["upstream"].items()}
    ctx = StageContext(run_id=job["run_id"], stage=job["stage"], shard=job["shard"], num_shards=job["num_shards"],
                       config=cfg, home=home, extra=job.get("extra") or {})
    t0 = time.perf_counter()
    out = stage.run(ctx, inputs)
    out.stats.seconds = time.perf_counter() - t0
    path = shard_path(home, job["run_id"], job["stage"], job["input_hash"], job["shard"])
    nbytes = write_table(to_table(out.rows, stage.output), path)
    rejects_path, n_rejects = _write_rejects(out.rejects, home, job["run_id"], job["stage"], job["input_hash"],
                                             job["shard"])
    return {"path": str(path), "rows": len(out.rows), "bytes": nbytes, "rejects_path": rejects_path,
            "rejected_rows": n_rejects, "stats": out.stats.as_dict()}


def collect_source(job: dict[str, Any]) -> dict[str, Any]:
    """The source stage: read the whole input once, partition by a hash of the character id, write
    each shard under its content hash."""
    cfg = _config(job["config"])
    stage: SourceStage = get_stage(job["stage"])  # type: ignore[assignment]
    home = Path(job["home"])
    t0 = time.perf_counter()
    rows, rejects = stage.collect(cfg)
    seconds = time.perf_counter() - t0
    n = job["num_shards"] or cfg.runner.num_shards or _num_shards(len({stage.shard_key(r) for r in rows}),
                                         getattr(cfg.characters, "shard_size", 8))
    parts: dict[int, list] = {k: [] for k in range(n)}
    for r in rows:
        parts[shard_of(stage.shard_key(r), n)].append(r)
    rej_parts: dict[int, list[Rejection]] = {k: [] for k in range(n)}
    for r in rejects:
        key = (r.character_id or r.row_id).split("@")[0]
        rej_parts[shard_of(key, n) if key else 0].append(r)
    metas = []
    for k in range(n):
        part = sorted(parts[k], key=lambda r: (stage.shard_key(r), r.model_dump_json()))
        table = to_table(part, stage.output)
        h = content_hash({"stage": job["stage"], "fp": job["fingerprint"], "version": VERSION, "shard": k, "n": n,
                          "rows": content_hash(table.to_pylist(), 32)})
        path = shard_path(home, job["run_id"], job["stage"], h, k)
        nbytes = path.stat().st_size if path.exists() else write_table(table, path)
        rpath, nrej = _write_rejects(rej_parts[k], home, job["run_id"], job["stage"], h, k)
        st = Stats(rows_in=len(part) + len(rej_parts[k]), rows_out=len(part), seconds=seconds / n)
        for r in rej_parts[k]:
            st.dropped[r.filter] += 1
        metas.append({"shard": k, "input_hash": h, "path": str(path), "rows": len(part), "bytes": nbytes,
                      "rejects_path": rpath, "rejected_rows": nrej, "stats": st.as_dict()})
    return {"num_shards": n, "shards": metas}


def retry_if_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry timeouts, connection errors and 429/5xx only."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001
            exc = e
    return exc is not None and is_transient(exc)


@task(cache_policy=NO_CACHE, persist_result=False)
def shard_task(job: dict[str, Any]) -> dict[str, Any]:
    return execute_shard(job)


@task(cache_policy=NO_CACHE, persist_result=False)
def source_task(job: dict[str, Any]) -> dict[str, Any]:
    return collect_source(job)


@task(cache_policy=NO_CACHE, persist_result=False)
def prepare_task(stage_name: str, config_json: str, home: str, run_id: str,
                 upstream: dict[str, dict[int, str]]) -> dict[int, dict[str, Any]]:
    stage = get_stage(stage_name)
    return stage.prepare(_config(config_json), Path(home), run_id, upstream) or {}


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"[:4000]


# -- the flow -------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, cat: Catalog, cfg: RunConfig, run_id: str, home: Path, fresh: bool):
        self.cat, self.cfg, self.run_id, self.home, self.fresh = cat, cfg, run_id, home, fresh
        self.config_json = cfg.model_dump_json()
        self.tags = [f"dataset:{cfg.dataset}"]
        self.num_shards: int | None = None
        # (stage, shard) done shards whose file was gone and that this invocation recomputes: their rows
        # may differ (sampling), so the shards built from them are recomputed too, never skipped or reused
        self.rebuilt: set[tuple[str, int]] = set()

    def submit(self, task_obj: Any, name: str, stage: str, **params: Any) -> Any:
        """Submit to the configured task runner (thread pool or Dask), with retries for transient errors."""
        r = self.cfg.runner
        t = task_obj.with_options(name=name, task_run_name=name, tags=[*self.tags, f"stage:{stage}"],
                                  retries=r.retries, retry_delay_seconds=r.retry_delay_seconds,
                                  retry_condition_fn=retry_if_transient)
        return self.task_runner.submit(t, params)

    def source(self, name: str) -> None:
        stage = get_stage(name)
        have = self.cat.shards(self.run_id, name)
        if (not self.fresh and self.num_shards and len(have) == self.num_shards
                and all(r["status"] == "done" and r["path"] and Path(r["path"]).exists() for r in have)):
            return  # a rerun of this run: its input was already read and every shard is whole
        job = {"config": self.config_json, "stage": name, "home": str(self.home), "run_id": self.run_id,
               "num_shards": self.num_shards, "fingerprint": stage.fingerprint(self.cfg)}
        _emit("stage_start", stage=name, total=None)
        try:
            res = self.submit(source_task, f"{name}-collect", name, job=job).result()
        except Exception as exc:
            self.cat.mark_failed(self.run_id, name, 0, "", _error_text(exc))
            self.cat.update_stage_stats(self.run_id, name)
            _emit("stage_end", stage=name, stats={"failed": 1})
            raise RunFailed(f"stage {name} failed: {_error_text(exc)}") from exc
        if self.num_shards is None:
            self.num_shards = res["num_shards"]
            self.cat.set_run(self.run_id, num_shards=self.num_shards)
        for m in res["shards"]:
            earlier = None if self.fresh else self.cat.find_done(name, m["input_hash"])
            reused = earlier["run_id"] if earlier and earlier["run_id"] != self.run_id else None
            self.cat.mark_done(self.run_id, name, m["shard"], m["input_hash"], rows=m["rows"], path=m["path"],
                               bytes_=m["bytes"], rejects_path=m["rejects_path"], rejected_rows=m["rejected_rows"],
                               stats=m["stats"], reused_from=reused)
            _emit("shard_done", stage=name, shard=m["shard"], rows=m["rows"], status="done")
        stats = self.cat.update_stage_stats(self.run_id, name)
        self._artifacts(name, stats)
        _emit("stage_end", stage=name, stats=stats)
        if not any(m["rows"] for m in res["shards"]):
            rejected = sum(m["rejected_rows"] for m in res["shards"])
            raise RunFailed(f"run {self.run_id}: stage {name} selected no row from {stage.describe_input(self.cfg)} "
                            f"({rejected} rejected, reasons in `ditto show {self.run_id}` and "
                            f"{self.home}/runs/{self.run_id}/rejected/{name}); check the {name} section of the config")

    def stage(self, name: str) -> None:
        stage: Stage = get_stage(name)
        n = self.num_shards or 0
        fp = stage.fingerprint(self.cfg)
        up = {u: {r["shard"]: r for r in self.cat.shards(self.run_id, u) if r["status"] == "done"}
              for u in stage.inputs}
        extra: dict[int, dict[str, Any]] = {}
        if type(stage).prepare is not Stage.prepare:
            paths = {u: {k: r["path"] for k, r in rows.items()} for u, rows in up.items()}
            extra = self.submit(prepare_task, f"{name}-prepare", name, stage_name=name, config_json=self.config_json,
                                home=str(self.home), run_id=self.run_id, upstream=paths).result()
            extra = {int(k): v for k, v in extra.items()}
        existing = {r["shard"]: r for r in self.cat.shards(self.run_id, name)}
        jobs = []
        _emit("stage_start", stage=name, total=n)
        for k in range(n):
            if any(k not in up[u] for u in stage.inputs):
                continue  # upstream failed or missing: this shard stays missing until a rerun
            x = extra.get(k, {})
            h = input_hash(name, fp, k, n, {u: up[u][k]["input_hash"] for u in stage.inputs}, x.get("digest"))
            cur = existing.get(k)
            stale = any((u, k) in self.rebuilt for u in stage.inputs)
            same = cur is not None and cur["status"] == "done" and cur["input_hash"] == h
            if same and not stale and cur["path"] and Path(cur["path"]).exists():
                _emit("shard_done", stage=name, shard=k, rows=cur["rows"], status="skipped")
                continue
            if same:
                self.rebuilt.add((name, k))
            earlier = None if self.fresh or stale else self.cat.find_done(name, h)
            if earlier:
                self.cat.mark_done(self.run_id, name, k, h, rows=earlier["rows"], path=earlier["path"],
                                   bytes_=earlier["bytes"], rejects_path=earlier["rejects_path"],
                                   rejected_rows=earlier["rejected_rows"] or 0,
                                   stats=json.loads(earlier["stats"] or "{}"), reused_from=earlier["run_id"])
                _emit("shard_done", stage=name, shard=k, rows=earlier["rows"], status="reused")
                continue
            jobs.append({"config": self.config_json, "stage": name, "shard": k, "num_shards": n,
                         "input_hash": h, "home": str(self.home), "run_id": self.run_id,
                         "upstream": {u: up[u][k]["path"] for u in stage.inputs}, "extra": x})
        for job in jobs:
            self.cat.mark_running(self.run_id, name, job["shard"], job["input_hash"])
        futures = {self.submit(shard_task, f"{name}-{j['shard']}", name, job=j): j for j in jobs}
        progress = create_progress(self.run_id, name, len(jobs)) if jobs else None
        for i, fut in enumerate(as_completed(list(futures)), 1):
            job = futures[fut]
            if progress is not None:
                update_progress(progress, i, len(jobs))
            try:
                m = fut.result()
            except Exception as exc:  # noqa: BLE001 - recorded; other shards go on
                self.cat.mark_failed(self.run_id, name, job["shard"], job["input_hash"], _error_text(exc))
                _emit("shard_done", stage=name, shard=job["shard"], rows=0, status="failed")
                continue
            self.cat.mark_done(self.run_id, name, job["shard"], job["input_hash"], rows=m["rows"], path=m["path"],
                               bytes_=m["bytes"], rejects_path=m["rejects_path"], rejected_rows=m["rejected_rows"],
                               stats=m["stats"])
            _emit("shard_done", stage=name, shard=job["shard"], rows=m["rows"], status="done")
        stats = self.cat.update_stage_stats(self.run_id, name)
        self._artifacts(name, stats)
        _emit("stage_end", stage=name, stats=stats)

    def _artifacts(self, name: str, stats: dict[str, Any]) -> None:
        from flows.artifacts import publish_stage_artifacts

        shards = self.cat.shards(self.run_id, name)
        samples, rejects = [], []
        for r in shards:
            if r["status"] == "done" and r["path"] and not samples and Path(r["path"]).exists():
                samples = table_rows(read_table(r["path"]).slice(0, 3))
            if r["rejects_path"] and not rejects and Path(r["rejects_path"]).exists():
                rejects = table_rows(read_table(r["rejects_path"]).slice(0, 5))
        counts = {s: sum(1 for r in shards if r["status"] == s) for s in ("done", "failed", "running", "pending")}
        try:
            publish_stage_artifacts(self.run_id, self.cfg.dataset, name, stats, counts, samples, rejects)
        except Exception:  # noqa: BLE001 - artifacts are a view; never fail a run over them
            pass

    def outstanding(self, names: list[str]) -> dict[str, dict[str, int]]:
        """Per stage: failed shards and shards never produced."""
        out = {}
        n = self.num_shards or 0
        for name in names:
            rows = {r["shard"]: r for r in self.cat.shards(self.run_id, name)}
            failed = sum(1 for r in rows.values() if r["status"] == "failed")
            missing = sum(1 for k in range(n) if k not in rows or rows[k]["status"] in ("pending", "running"))
            if not n:
                missing = 0 if rows else 1
            if failed or missing:
                out[name] = {"failed": failed, "missing": missing}
        return out


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    return params.get("run_id") or new_run_id()


@flow(name="build_dataset", flow_run_name=_flow_run_name, persist_result=False, log_prints=True)
def build_dataset(config_path: str | None = None, overrides: list[str] | None = None, run_id: str | None = None,
                  home: str | None = None, until: str | None = None, fresh: bool = False,
                  config: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """Build the Ditto dataset. `config` (a dict) is used by reruns; `config_path` + `overrides` by users.
    `resume` continues an existing run with its stored config even if defaults changed since."""
    from prefect.runtime import flow_run

    cfg = load_config(config_path, overrides, data=config)
    validate_engines(cfg)
    run_id = run_id or flow_run.name or new_run_id()
    names = stages_until(until)
    check_chain(names)
    summary = build(cfg, run_id, resolve_home(home), names, fresh, flow_run_id=flow_run.id, resume=resume)
    if cfg.train.enabled and names[-1] == "sft_data":
        from engines.base import close_engines
        from flows.evaluate import evaluate_flow
        from flows.train import train_flow

        close_engines()  # free the generator's memory before training
        summary["train"] = train_flow(run_id=run_id, home=str(resolve_home(home)))
        if cfg.eval.enabled:
            summary["evaluate"] = evaluate_flow(run_id=run_id, home=str(resolve_home(home)))
    return summary


def validate_engines(cfg: RunConfig) -> None:
    """Every engine named in the config must be in the registry: checked before anything is written."""
    from engines.base import ENGINES

    named = {"engine.kind": cfg.engine.kind}
    if cfg.filter.judge.engine is not None:
        named["filter.judge.engine.kind"] = cfg.filter.judge.engine.kind
    if cfg.eval.judge is not None:
        named["eval.judge.kind"] = cfg.eval.judge.kind
    if cfg.eval.engine_kind:
        named["eval.engine_kind"] = cfg.eval.engine_kind
    for key, kind in named.items():
        if kind not in ENGINES:
            raise ConfigError(f"{key}: unknown engine {kind!r}; known: {', '.join(sorted(ENGINES))}")


def build(cfg: RunConfig, run_id: str, home: Path, names: list[str], fresh: bool = False,
          flow_run_id: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The DAG body: run each stage in order, register shards, finish the run's catalog record."""
    with Catalog(home) as cat:
        clean_temp_files(home / "runs" / run_id)
        prev = cat.get_run(run_id)
        if prev and prev["config_hash"] != cfg.config_hash() and not resume:
            raise ConfigError(f"run {run_id} exists with another config (hash {prev['config_hash']}); "
                              f"start a new run instead")
        cat.start_run(run_id, cfg.dataset, cfg.model_dump(mode="json"), cfg.config_hash(), VERSION,
                      prev["num_shards"] if prev else None, until=names[-1])
        if flow_run_id:
            cat.set_run(run_id, flow_run_id=str(flow_run_id))
        cat.reset_stale(run_id)
        runner = _Runner(cat, cfg, run_id, home, fresh)
        runner.num_shards = prev["num_shards"] if prev else None
        try:
            with task_runner_for(cfg) as runner.task_runner:
                for name in names:
                    if isinstance(get_stage(name), SourceStage):
                        runner.source(name)
                    else:
                        runner.stage(name)
            left = runner.outstanding(names)
        except BaseException as exc:
            cat.finish_run(run_id, "failed", _error_text(exc))
            raise
        status = "failed" if left else "completed"
        error = "; ".join(f"{s}: {v['failed']} failed, {v['missing']} missing" for s, v in left.items()) or None
        cat.finish_run(run_id, status, error)
        stats = {r["stage"]: r for r in cat.query("SELECT * FROM stage_stats WHERE run_id=?", [run_id])}
    summary = {"run_id": run_id, "status": status, "home": str(home), "num_shards": runner.num_shards,
               "stages": {n: {k: v for k, v in stats.get(n, {}).items() if k not in ("run_id", "updated_at")}
                          for n in names}, "outstanding": left}
    if left:
        raise RunFailed(f"run {run_id}: {error}. Fix the cause, then `ditto rerun {run_id}`.")
    return summary


def run_build(config_path: str | None = None, overrides: list[str] | None = None, run_id: str | None = None,
              home: str | Path | None = None, until: str | None = None, fresh: bool = False,
              config: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """Entry point for the CLI and tests: validate everything first, then run the flow named after the
    run id. (Shard tasks go to the task runner that `runner:` configures, see flows/runners.py.)"""
    if config_path is None and config is None:
        config_path = str(DEMO_CONFIG)  # no CONFIG: the embedded demo
    cfg = load_config(config_path, overrides, data=config)
    validate_engines(cfg)
    check_chain(stages_until(until))
    run_id = run_id or new_run_id()
    return build_dataset.with_options(flow_run_name=run_id)(
        config=cfg.model_dump(mode="json"), run_id=run_id, home=str(resolve_home(home)), until=until, fresh=fresh,
        resume=resume)


def rerun(run_id: str, home: str | Path | None = None) -> dict[str, Any]:
    """Recompute only failed or missing shards of a run, with the run's own config."""
    from storage.reader import CatalogReader

    h = resolve_home(home)
    with CatalogReader(h) as rd:
        run = rd.run(run_id)
    if run is None:
        raise ConfigError(f"no run {run_id!r} in {h}")
    return run_build(config=json.loads(run["config"]), run_id=run_id, home=h, until=run["until"], resume=True)


__all__ = ["ChainError", "RunFailed", "build", "build_dataset", "execute_shard", "rerun", "resolve_home", "run_build"]
