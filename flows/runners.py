"""The task runner a build uses, from `runner:` in the run config.

thread (default): shard tasks run in the flow process's thread pool; the engine lives once in that
process and is shared by every generation shard.
dask: shard tasks run on a Dask cluster (prefect-dask), for CPU-heavy stages across machines. The
flow process stays the only catalog writer: tasks return small metadata, the flow registers it.
Every Dask worker must see the same <home> (a shared filesystem) and have the project installed.
Generation stages on Dask load one engine per worker process; across GPU machines prefer the
`openai` engine against the vLLM server pool (deploy/vllm/) and keep the thread runner.
"""

from __future__ import annotations

from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from models.config import RunConfig, RunnerConfig


class RunnerUnavailable(RuntimeError):
    pass


def task_runner_for(config: RunConfig | RunnerConfig) -> TaskRunner[Any]:
    """ThreadPoolTaskRunner(max_workers) by default; DaskTaskRunner when `runner.task_runner: dask`
    (connecting to `runner.dask_address`, or starting a local cluster of `runner.dask_workers`)."""
    rc = config.runner if isinstance(config, RunConfig) else config
    if rc.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=rc.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RunnerUnavailable("runner.task_runner=dask needs prefect-dask: pip install prefect-dask") from None
    if rc.dask_address:
        return DaskTaskRunner(address=rc.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": rc.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


__all__ = ["RunnerUnavailable", "task_runner_for"]
