from __future__ import annotations

from typing import Literal

from pydantic import Field

from models.base import Strict


class RunnerConfig(Strict):
    num_shards: int | None = Field(None, ge=1, description="fixed shard count; default: next power of two of "
                                   "characters / characters.shard_size")
    max_workers: int = Field(
        32, ge=1, description="shard tasks in flight (ThreadPoolTaskRunner); generation shard tasks mostly wait on "
        "the engine, so enough of them must be in flight to keep its decode slots full")
    retries: int = Field(2, ge=0, description="Prefect retries for transient errors only")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [2.0, 10.0, 30.0])
    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="thread: shard tasks in the flow process; dask: on a Dask cluster (prefect-dask)")
    dask_address: str | None = Field(
        None, description="dask: scheduler address (tcp://host:8786); unset starts a local cluster")
    dask_workers: int = Field(2, ge=1, description="dask: worker processes of the local cluster")
