"""The nightly `build_dataset` DAG: characters -> queries -> responses -> filter -> dedup -> sft_data.

One Prefect task per shard (never per prompt), run in a bounded ThreadPoolTaskRunner. Stages are
pipelined: shard k of a stage starts as soon as its own upstream shards are done, so queries, responses
and filter of different shards overlap and the engine never idles through a stage's tail; the only
barriers are the source (it reads the whole input) and a global step (the dedup stage's `prepare`),
which holds back only the stage that reads it. The engine starts loading when the run starts, in
parallel with sourcing.

Tasks write Parquet atomically and return a small `ShardResult`; this flow thread is the only writer of
the catalog and registers each result as its task finishes. Each shard is decided by `plan_shard`
(models/jobs.py, a pure function): skipped when already done for the same key in this run and whole
(size and sha256 as registered), reused from an earlier run with the same key unless --fresh, else run.
A shard's key covers the stage's config, prompts, model, its code (`flows.stages.code_hash`) and its
upstream keys, so reruns and nightly rebuilds recompute only failed, missing, damaged or changed shards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import threading
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

from engines.base import is_transient, metrics_label
from flows.artifacts import create_progress, update_progress
from flows.runners import task_runner_for
from flows.stages import ChainError, check_chain, code_hash, get_stage, stages_until
from models.base import table_rows, to_table
from models.config import ConfigError, RunConfig, load_config
from models.config.engine import EngineConfig
from models.ids import content_hash, shard_of
from models.jobs import Action, ShardJob, ShardRecord, ShardResult, SourceJob, SourceResult, plan_shard
from models.records import Rejection
from storage.catalog import Catalog
from storage.layout import RunLayout
from storage.shards import clean_run_temp_files, file_sha256, read_table, shard_is_whole, write_table
from tasks.base import SourceStage, Stage, StageContext, Stats
from tasks.sources.dump_snapshot import register_snapshots, snapshot_job


def package_version() -> str:
    try:
        return metadata.version("ditto-roleplay")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"


VERSION = package_version()  # recorded with each run; shard keys use each stage's code hash instead
logger = logging.getLogger("ditto.build")
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
ProgressHook = Callable[[str, dict[str, Any]], None]
PROGRESS_HOOKS: list[ProgressHook] = []  # the CLI adds its progress bars here


class RunFailed(RuntimeError):
    """Some shards failed or could not run; the catalog has the errors. `ditto rerun` picks them up."""


def resolve_home(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("DITTO_HOME") or ".ditto").expanduser().resolve()


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _log() -> Any:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return logger


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
    """A shard's key: stage config + prompt text + model id/revision (the fingerprint), the stage's code
    hash (`version`; default `code_hash(stage)`), the upstream shards' keys and a global step's digest,
    as canonical JSON."""
    return content_hash({"stage": stage, "fp": fingerprint, "version": version or code_hash(stage), "shard": shard,
                         "n": num_shards, "upstream": dict(sorted(upstream.items())), "extra": extra_digest})


def _write_rejects(rejects: list[Rejection], home: Path, run_id: str, stage: str, input_hash: str,
                   shard: int) -> tuple[str | None, int]:
    if not rejects:
        return None, 0
    fixed = [r.model_copy(update={"shard": shard, "stage": stage}) for r in rejects]
    path = RunLayout(home, run_id).shard(stage, input_hash, shard, kind="rejected")
    write_table(to_table(fixed, Rejection), path)
    return str(path), len(fixed)


# -- the shard work (plain functions; the Prefect tasks below only wrap them) ---------------------
def _sha(path: str | Path | None) -> str | None:
    return file_sha256(path) if path else None


def _size(path: str | Path | None) -> int | None:
    return Path(path).stat().st_size if path else None


def execute_shard(job: ShardJob | dict[str, Any]) -> ShardResult:
    """Run one stage on one shard: read upstream shard files, run the stage, write output and rejects.
    Engine requests are accounted under the stage's name (engine metrics per stage, even when stages
    overlap in time); `started`/`ended` (epoch seconds) in the stats place the task on the timeline."""
    job = job if isinstance(job, ShardJob) else ShardJob.model_validate(job)
    started = time.time()
    cfg = _config(job.config)
    stage = get_stage(job.stage)
    home = Path(job.home)
    inputs = {name: table_rows(read_table(path)) for name, path in job.upstream.items()}
    ctx = StageContext(run_id=job.run_id, stage=job.stage, shard=job.shard, num_shards=job.num_shards,
                       config=cfg, home=home, extra=job.extra)
    t0 = time.perf_counter()
    with metrics_label(job.stage):
        out = stage.run(ctx, inputs)
    out.stats.seconds = time.perf_counter() - t0
    path = RunLayout(home, job.run_id).shard(job.stage, job.input_hash, job.shard)
    nbytes = write_table(to_table(out.rows, stage.output), path)
    rejects_path, n_rejects = _write_rejects(out.rejects, home, job.run_id, job.stage, job.input_hash, job.shard)
    stats = {**out.stats.as_dict(), "started": round(started, 3), "ended": round(time.time(), 3)}
    return ShardResult(stage=job.stage, shard=job.shard, input_hash=job.input_hash, path=str(path),
                       rows=len(out.rows), bytes=nbytes, rejects_path=rejects_path, rejected_rows=n_rejects,
                       rejects_bytes=_size(rejects_path), sha256=_sha(path), rejects_sha256=_sha(rejects_path),
                       stats=stats)


def collect_source(job: SourceJob | dict[str, Any]) -> SourceResult:
    """The source stage: read the whole input once, partition by a hash of the character id, write
    each shard under its content hash."""
    job = job if isinstance(job, SourceJob) else SourceJob.model_validate(job)
    cfg = _config(job.config)
    stage: SourceStage = get_stage(job.stage)  # type: ignore[assignment]
    home = Path(job.home)
    started = time.time()
    t0 = time.perf_counter()
    used: list[dict[str, Any]] = []
    if hasattr(stage, "collect_pinned"):  # through the source snapshots (tasks/sources/dump_snapshot.py)
        rows, rejects, used = stage.collect_pinned(cfg, home, job.snapshots, job.run_id)
    else:
        rows, rejects = stage.collect(cfg)
    seconds = time.perf_counter() - t0
    keys = len({stage.shard_key(r) for r in rows})
    n = job.num_shards or cfg.runner.num_shards or _num_shards(keys, getattr(cfg.characters, "shard_size", 8))
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
        h = content_hash({"stage": job.stage, "fp": job.fingerprint, "version": job.code, "shard": k, "n": n,
                          "rows": content_hash(table.to_pylist(), 32)})
        path = RunLayout(home, job.run_id).shard(job.stage, h, k)
        nbytes = path.stat().st_size if path.exists() else write_table(table, path)
        rpath, nrej = _write_rejects(rej_parts[k], home, job.run_id, job.stage, h, k)
        st = Stats(rows_in=len(part) + len(rej_parts[k]), rows_out=len(part), seconds=seconds / n)
        for r in rej_parts[k]:
            st.dropped[r.filter] += 1
        metas.append(ShardResult(stage=job.stage, shard=k, input_hash=h, path=str(path), rows=len(part),
                                 bytes=nbytes, rejects_path=rpath, rejected_rows=nrej, rejects_bytes=_size(rpath),
                                 sha256=_sha(path), rejects_sha256=_sha(rpath),
                                 stats={**st.as_dict(), "started": round(started, 3), "ended": round(time.time(), 3)}))
    warnings = []
    empty = sum(1 for k in range(n) if not parts[k])
    if rows and n > keys:
        warnings.append(f"{n} shards for {keys} {job.stage}: {empty} shards are empty and every stage writes "
                        f"an empty file for each (set runner.num_shards to at most {keys}, or leave it unset and "
                        f"let characters.shard_size decide)")
    return SourceResult(num_shards=n, shards=metas, warnings=warnings, snapshots=used)


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
def shard_task(job: ShardJob) -> ShardResult:
    return execute_shard(job)


@task(cache_policy=NO_CACHE, persist_result=False)
def source_task(job: SourceJob) -> SourceResult:
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


def _is_whole(row: dict[str, Any] | None) -> bool:
    return row is not None and shard_is_whole(row)


def _record(row: dict[str, Any] | None) -> ShardRecord | None:
    if row is None:
        return None
    return ShardRecord.model_validate({**row, "whole": row["status"] != "done" or _is_whole(row)})


# -- the engine, loaded once per run while the source is read ------------------------------------
def run_engine_configs(cfg: RunConfig, names: list[str]) -> list[EngineConfig]:
    """The engines the run's stages declare (`Stage.engine_configs`), each once, in stage order."""
    out: list[EngineConfig] = []
    for name in names:
        out += [c for c in get_stage(name).engine_configs(cfg) if c not in out]
    return out


def _loaded_engine(config: EngineConfig) -> Any:
    """The engine already loaded in this process for this config, without loading it."""
    from engines.base import loaded_engine

    return loaded_engine(config)


class EngineWatch:
    """Loads the run's engines in a background thread at run start (in parallel with sourcing; a shard
    task that needs one first waits on the registry's lock instead of loading its own) and reads their
    per-stage metrics as deltas over this run."""

    def __init__(self, configs: list[EngineConfig]):
        self.configs = configs
        self.base: dict[tuple[int, str | None], Any] = {}
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def baseline(self, labels: list[str]) -> None:
        for i, c in enumerate(self.configs):
            eng = _loaded_engine(c)
            if eng is not None and hasattr(eng, "metrics"):
                for label in [None, *labels]:
                    self.base[(i, label)] = eng.metrics(label)

    def start(self) -> None:
        from engines.base import get_engine

        def load() -> None:
            for c in self.configs:
                try:
                    get_engine(c)
                except Exception as exc:  # noqa: BLE001 - the first shard that needs it reports the error
                    self.error = _error_text(exc)
                    logger.warning("engine %s did not load in the background: %s", c.kind, self.error)

        self.thread = threading.Thread(target=load, name="engine-preload", daemon=True)
        self.thread.start()

    def delta(self, label: str | None) -> Any:
        total = None
        for i, c in enumerate(self.configs):
            eng = _loaded_engine(c)
            if eng is None or not hasattr(eng, "metrics"):
                continue
            m = eng.metrics(label)
            base = self.base.get((i, label))
            m = m - base if base is not None else m
            total = m if total is None else total + m
        return total


# -- the flow -------------------------------------------------------------------------------------
WAITING, RUNNING, DONE, FAILED, BLOCKED = "waiting", "running", "done", "failed", "blocked"


class _Runner:
    """The flow body. Stages are pipelined: shard k of a stage is decided (and, when it must run,
    submitted) as soon as its own upstream shards are done; a global step (`Stage.prepare`) waits for
    every shard of the stages it reads and is the only barrier. Task futures report to a queue; only
    this thread touches the catalog, registering each result as it arrives."""

    def __init__(self, cat: Catalog, cfg: RunConfig, run_id: str, home: Path, fresh: bool):
        self.cat, self.cfg, self.run_id, self.home, self.fresh = cat, cfg, run_id, home, fresh
        self.config_json = cfg.model_dump_json()
        self.tags = [f"dataset:{cfg.dataset}"]
        self.num_shards: int | None = None
        self.task_runner: Any = None
        self.engines: EngineWatch | None = None
        # (stage, shard) shards this invocation recomputes whose output may differ from a shard with the same
        # key (file lost, upstream rebuilt): the shards built from them are recomputed too, never skipped/reused
        self.rebuilt: set[tuple[str, int]] = set()
        self.results: dict[str, dict[int, ShardResult]] = {}
        self.state: dict[tuple[str, int], str] = {}
        self.futures: dict[tuple[str, int], Any] = {}  # submitted shard tasks (wait_for lineage in Prefect)
        self.warnings: dict[str, list[str]] = {}
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.inflight = 0
        self.codes: dict[str, str] = {}

    def submit(self, task_obj: Any, name: str, stage: str, wait_for: list[Any] | None = None, **params: Any) -> Any:
        """Submit to the configured task runner (thread pool or Dask), with retries for transient errors."""
        r = self.cfg.runner
        t = task_obj.with_options(name=name, task_run_name=name, tags=[*self.tags, f"stage:{stage}"],
                                  retries=r.retries, retry_delay_seconds=r.retry_delay_seconds,
                                  retry_condition_fn=retry_if_transient)
        return self.task_runner.submit(t, params, wait_for=wait_for or None)

    def _watch(self, fut: Any, *event: Any) -> None:
        self.inflight += 1
        fut.add_done_callback(lambda f: self.events.put((*event, f)))

    # -- registration (flow thread only) ------------------------------------------------------
    def _mark_done(self, res: ShardResult, reused_from: str | None = None) -> None:
        self.cat.mark_done(self.run_id, res.stage, res.shard, res.input_hash, rows=res.rows, path=res.path,
                           bytes_=res.bytes, rejects_path=res.rejects_path, rejected_rows=res.rejected_rows,
                           stats=res.stats, reused_from=reused_from, sha256=res.sha256,
                           rejects_sha256=res.rejects_sha256, rejects_bytes=res.rejects_bytes)

    # -- the source stage: reads the whole input, so it is a barrier by nature --------------------
    def source(self, name: str) -> None:
        stage = get_stage(name)
        have = self.cat.shards(self.run_id, name)
        if (not self.fresh and self.num_shards and len(have) == self.num_shards
                and all(r["status"] == "done" and _is_whole(r) for r in have)):
            # a rerun of this run: its input was already read and every shard is whole
            self.results[name] = {r["shard"]: ShardResult.from_record(_record(r)) for r in have}
            for r in have:
                self.state[(name, r["shard"])] = DONE
            return
        job = SourceJob(config=self.config_json, stage=name, home=str(self.home), run_id=self.run_id,
                        num_shards=self.num_shards, fingerprint=stage.fingerprint(self.cfg), code=self.code(name),
                        snapshots=snapshot_job(self.cat, self.run_id, name, self.fresh))
        _emit("stage_start", stage=name, total=None)
        try:
            res: SourceResult = self.submit(source_task, f"{name}-collect", name, job=job).result()
        except Exception as exc:
            self.cat.mark_failed(self.run_id, name, 0, "", _error_text(exc))
            self.cat.update_stage_stats(self.run_id, name)
            _emit("stage_end", stage=name, stats={"failed": 1})
            raise RunFailed(f"stage {name} failed: {_error_text(exc)}") from exc
        register_snapshots(self.cat, self.run_id, name, res.snapshots)
        if self.num_shards is None:
            self.num_shards = res.num_shards
            self.cat.set_run(self.run_id, num_shards=self.num_shards)
        for w in res.warnings:
            _log().warning("run %s: %s", self.run_id, w)
            _emit("warning", stage=name, message=w)
        self.warnings[name] = list(res.warnings)
        self.results[name] = {}
        for m in res.shards:
            earlier = None if self.fresh else self.cat.find_done(name, m.input_hash)
            reused = earlier["run_id"] if earlier and earlier["run_id"] != self.run_id else None
            self._mark_done(m, reused_from=reused)
            self.results[name][m.shard] = m
            self.state[(name, m.shard)] = DONE
            _emit("shard_done", stage=name, shard=m.shard, rows=m.rows, status="done",
                  rows_out=(m.stats or {}).get("rows_out"))
        self.finish_stage(name)
        if not any(m.rows for m in res.shards):
            rejected = sum(m.rejected_rows for m in res.shards)
            raise RunFailed(f"run {self.run_id}: stage {name} selected no row from {stage.describe_input(self.cfg)} "
                            f"({rejected} rejected, reasons in `ditto show {self.run_id}` and "
                            f"{RunLayout(self.home, self.run_id).rejects(name)}); check the {name} section of the config")

    def code(self, name: str) -> str:
        if name not in self.codes:
            self.codes[name] = code_hash(name)
        return self.codes[name]

    # -- the pipelined stages -------------------------------------------------------------------
    def pipeline(self, names: list[str]) -> None:
        n = self.num_shards or 0
        self.names = names
        self.down = {u: [d for d in names if u in get_stage(d).inputs] for u in self.results.keys() | set(names)}
        self.prep: dict[str, str] = {}  # stage -> waiting | running | done | failed
        self.extra: dict[str, dict[int, dict[str, Any]]] = {}
        self.unsettled = {name: n for name in names}
        self.fp = {name: get_stage(name).fingerprint(self.cfg) for name in names}
        self.existing = {name: {r["shard"]: r for r in self.cat.shards(self.run_id, name)} for name in names}
        self.progress = {}
        for name in names:
            self.results[name] = {}
            stage = get_stage(name)
            if type(stage).prepare is not Stage.prepare:
                self.prep[name] = WAITING
            _emit("stage_start", stage=name, total=n)
            self.progress[name] = create_progress(self.run_id, name, n) if n else None
            for k in range(n):
                self.state[(name, k)] = WAITING
        if not n:
            return
        for name in names:
            self.maybe_prepare(name)
            for k in range(n):
                self.consider(name, k)
        while self.inflight:
            event = self.events.get()
            self.inflight -= 1
            if event[0] == "prepare":
                self.prepared(event[1], event[2])
            else:
                self.finished(event[1], event[2], event[3], event[4])

    def _upstream_settled(self, name: str) -> bool:
        return all(self.unsettled.get(u, 0) == 0 for u in get_stage(name).inputs)

    def maybe_prepare(self, name: str) -> None:
        if self.prep.get(name) != WAITING or not self._upstream_settled(name):
            return
        stage = get_stage(name)
        paths = {u: {k: r.path for k, r in self.results[u].items()} for u in stage.inputs}
        self.prep[name] = RUNNING
        fut = self.submit(prepare_task, f"{name}-prepare", name, stage_name=name, config_json=self.config_json, home=str(self.home), run_id=self.run_id,
                          upstream=paths)
        self._watch(fut, "prepare", name)

    def prepared(self, name: str, fut: Any) -> None:
        try:
            extra = fut.result()
        except Exception as exc:  # noqa: BLE001 - every shard of the stage waits for it: they fail with it
            self.prep[name] = FAILED
            error = f"global step {name}-prepare failed: {_error_text(exc)}"
            for k in range(self.num_shards or 0):
                if self.state[(name, k)] == WAITING:
                    self.cat.mark_failed(self.run_id, name, k, "", error)
                    self.settle(name, k, FAILED, status="failed")
            return
        for art in getattr(extra, "artifacts", ()):  # what the step built (a Prepared): the flow registers it
            self.cat.register_artifact(art)
        self.extra[name] = {int(k): v for k, v in (extra or {}).items()}
        self.prep[name] = DONE
        for k in range(self.num_shards or 0):
            self.consider(name, k)

    def consider(self, name: str, k: int) -> None:
        """Decide shard k of a stage once its upstream shards are settled: skip, reuse or run."""
        if self.state[(name, k)] != WAITING:
            return
        stage = get_stage(name)
        ups = [self.state.get((u, k), WAITING) for u in stage.inputs]
        if any(s in (FAILED, BLOCKED) for s in ups):
            self.settle(name, k, BLOCKED)  # upstream failed or missing: stays missing until a rerun
            return
        if any(s != DONE for s in ups) or self.prep.get(name, DONE) != DONE:
            return
        x = self.extra.get(name, {}).get(k, {})
        h = input_hash(name, self.fp[name], k, self.num_shards or 0,
                       {u: self.results[u][k].input_hash for u in stage.inputs}, x.get("digest"), self.code(name))
        stale = any((u, k) in self.rebuilt for u in stage.inputs)
        current = _record(self.existing[name].get(k))
        earlier = None
        if not (self.fresh or stale or (current and current.done and current.input_hash == h and current.whole)):
            earlier = _record(self.cat.find_done(name, h))
        plan = plan_shard(h, current, earlier, stale=stale, fresh=self.fresh)
        if plan.rebuilt:
            self.rebuilt.add((name, k))
        if plan.action is Action.SKIP:
            self.results[name][k] = ShardResult.from_record(current)
            self.settle(name, k, DONE, rows=current.rows, status="skipped")
        elif plan.action is Action.REUSE:
            res = ShardResult.from_record(plan.reused).model_copy(update={"reused_from": plan.reused.run_id})
            self._mark_done(res, reused_from=plan.reused.run_id)
            self.results[name][k] = res
            self.settle(name, k, DONE, rows=res.rows, status="reused")
        else:
            job = ShardJob(config=self.config_json, stage=name, shard=k, num_shards=self.num_shards or 0,
                           input_hash=h, home=str(self.home), run_id=self.run_id,
                           upstream={u: self.results[u][k].path for u in stage.inputs}, extra=x)
            self.cat.mark_running(self.run_id, name, k, h)
            self.state[(name, k)] = RUNNING
            fut = self.submit(shard_task, f"{name}-{k}", name,
                              wait_for=[self.futures[(u, k)] for u in stage.inputs if (u, k) in self.futures],
                              job=job)
            self.futures[(name, k)] = fut
            self._watch(fut, "shard", name, k, h)

    def finished(self, name: str, k: int, h: str, fut: Any) -> None:
        try:
            res: ShardResult = fut.result()
        except Exception as exc:  # noqa: BLE001 - recorded; other shards go on
            self.cat.mark_failed(self.run_id, name, k, h, _error_text(exc))
            self.settle(name, k, FAILED, status="failed")
            return
        self._mark_done(res)
        self.results[name][k] = res
        self.settle(name, k, DONE, rows=res.rows, status="done")

    def settle(self, name: str, k: int, state: str, rows: int | None = None, status: str | None = None) -> None:
        self.state[(name, k)] = state
        self.unsettled[name] -= 1
        if status is not None:  # rows_out: the unit of the summary table (turns for session stages)
            res = self.results.get(name, {}).get(k) if state == DONE else None
            _emit("shard_done", stage=name, shard=k, rows=rows or 0, status=status,
                  rows_out=(res.stats or {}).get("rows_out") if res is not None else None)
        n = self.num_shards or 0
        if self.progress.get(name) is not None:
            update_progress(self.progress[name], n - self.unsettled[name], n)
        for d in self.down.get(name, []):
            self.consider(d, k)
        if self.unsettled[name] == 0:
            self.finish_stage(name)
            for d in self.down.get(name, []):
                self.maybe_prepare(d)

    def finish_stage(self, name: str) -> None:
        from storage.report import stage_metrics

        rows = self.cat.shards(self.run_id, name)
        asks_engine = self.engines is not None and get_stage(name).engine_configs(self.cfg)
        eng = self.engines.delta(name) if asks_engine else None
        metrics = stage_metrics(rows, eng.as_dict() if eng is not None else None)
        if self.warnings.get(name):
            metrics["warnings"] = self.warnings[name]
        stats = self.cat.update_stage_stats(self.run_id, name, metrics=metrics)
        self._artifacts(name, stats)
        _emit("stage_end", stage=name, stats=stats)

    def record_run_metrics(self, names: list[str]) -> None:
        """Run-level metrics (all stages together, the engines over this invocation), kept under `run` in
        the source stage's metrics."""
        from storage.report import run_metrics

        eng = self.engines.delta(None) if self.engines is not None else None
        m = run_metrics({n: self.cat.shards(self.run_id, n) for n in names}, eng.as_dict() if eng else None)
        self.cat.update_stage_stats(self.run_id, names[0], metrics={"run": m})

    def _artifacts(self, name: str, stats: dict[str, Any]) -> None:
        from flows.artifacts import publish_stage_artifacts

        shards = self.cat.shards(self.run_id, name)
        samples, rejects = [], []
        for r in shards:
            if r["status"] == "done" and r["path"] and not samples and _is_whole(r):
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


def _needs_engine(cat: Catalog, cfg: RunConfig, run_id: str, names: list[str], num_shards: int | None) -> bool:
    """False for a rerun whose engine stages are all done: loading vLLM for nothing costs minutes."""
    if not num_shards:
        return True
    for name in names:
        if get_stage(name).engine_configs(cfg):
            rows = cat.shards(run_id, name)
            if len(rows) < num_shards or any(r["status"] != "done" for r in rows):
                return True
    return False


def build(cfg: RunConfig, run_id: str, home: Path, names: list[str], fresh: bool = False,
          flow_run_id: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The DAG body: the source, then the pipelined stages; register shards, finish the run's record."""
    with Catalog(home) as cat:
        clean_run_temp_files(home, run_id)
        prev = cat.get_run(run_id)
        if prev and prev["config_hash"] != cfg.config_hash() and not resume:
            raise ConfigError(f"run {run_id} exists with another config (hash {prev['config_hash']}); "
                              f"start a new run instead")
        cat.start_run(run_id, cfg.dataset, cfg.model_dump(mode="json"), cfg.config_hash(), VERSION,
                      prev["num_shards"] if prev else None, until=names[-1])
        if prev:  # the run records what was asked last: `ditto rerun` finishes that
            cat.set_run(run_id, until=names[-1])
        if flow_run_id:
            cat.set_run(run_id, flow_run_id=str(flow_run_id))
        cat.reset_stale(run_id)
        runner = _Runner(cat, cfg, run_id, home, fresh)
        runner.num_shards = prev["num_shards"] if prev else None
        configs = run_engine_configs(cfg, names) if cfg.runner.task_runner == "thread" else []
        runner.engines = EngineWatch(configs)
        runner.engines.baseline(names)
        if configs and _needs_engine(cat, cfg, run_id, names, runner.num_shards):
            runner.engines.start()
        try:
            with task_runner_for(cfg) as runner.task_runner:
                try:
                    first, rest = names[0], names[1:]
                    if isinstance(get_stage(first), SourceStage):
                        runner.source(first)
                    runner.pipeline(rest)
                except BaseException:  # an interrupt: fail the in-flight requests so the task threads end
                    from engines.base import close_engines

                    close_engines()
                    raise
            left = runner.outstanding(names)
            runner.record_run_metrics(names)
        except BaseException as exc:
            cat.finish_run(run_id, "failed", _error_text(exc))
            raise
        status = "failed" if left else "completed"
        error = "; ".join(f"{s}: {v['failed']} failed, {v['missing']} missing" for s, v in left.items()) or None
        cat.finish_run(run_id, status, error)
        stats = {r["stage"]: r for r in cat.query("SELECT * FROM stage_stats WHERE run_id=?", [run_id])}
        _publish_changes(cat, run_id, cfg.dataset)
    summary = {"run_id": run_id, "status": status, "home": str(home), "num_shards": runner.num_shards,
               "stages": {n: {k: v for k, v in stats.get(n, {}).items() if k not in ("run_id", "updated_at")}
                          for n in names}, "outstanding": left}
    if left:
        raise RunFailed(f"run {run_id}: {error}. Fix the cause, then `ditto rerun {run_id}`.")
    return summary


def _publish_changes(cat: Catalog, run_id: str, dataset: str) -> None:
    """The "what changed" report against the dataset's previous run, as a Prefect artifact."""
    from flows.artifacts import publish_changes
    from storage.report import what_changed

    try:
        publish_changes(run_id, dataset, what_changed(cat, run_id))
    except Exception as exc:  # noqa: BLE001 - a view; never fail a run over it
        logger.warning("could not report what changed in %s: %s", run_id, exc)


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
    from models.config import migrate_stored_config

    config = migrate_stored_config(json.loads(run["config"]))  # a run made before a key moved still reruns
    return run_build(config=config, run_id=run_id, home=h, until=run["until"], resume=True)


__all__ = ["ChainError", "RunFailed", "build", "build_dataset", "execute_shard", "rerun", "resolve_home", "run_build"]
