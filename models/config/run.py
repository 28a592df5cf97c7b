from __future__ import annotations

from pydantic import Field

from models.base import Strict


class RunnerConfig(Strict):
    max_workers: int = Field(4, ge=1, description="shard tasks in flight (ThreadPoolTaskRunner)")
    retries: int = Field(2, ge=0, description="Prefect retries for transient errors only")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [2.0, 10.0, 30.0])
