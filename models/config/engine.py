from __future__ import annotations

from typing import Any

from pydantic import Field

from models.base import Strict

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"


class EngineConfig(Strict):
    kind: str = Field("vllm", description="engine name in the registry: vllm | openai | transformers | dry_run "
                                           "(placeholder text, no model: what `ditto run --dry-run` uses)")
    model: str = Field(BUNDLED_MODEL, description="local path, HF model id, or the bundled offline model")
    revision: str | None = Field(None, description="model revision (HF) recorded in every generated row's hash")
    dtype: str = Field("auto", description="torch dtype for vllm/transformers")
    max_model_len: int = Field(2048, gt=0, description="context length the engine is started with")
    seed: int = Field(0, description="engine seed (vLLM on CPU cannot seed per request)")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per replica")
    replicas: int = Field(1, ge=1, description="vllm: engine replicas on this machine (one per GPU/TP group)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_batch: int | None = Field(None, ge=1, description="vllm: most requests running at once (decode slots, "
                                                           "vLLM max_num_seqs); default: vLLM's")
    batch_size: int = Field(16, ge=1, description="transformers: sequences per generate() call")
    device: str = Field("auto", description="transformers: cpu | cuda | auto")
    base_urls: list[str] = Field(default_factory=list, description="openai: endpoints (…/v1) to spread load over")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the key")
    served_model: str | None = Field(None, description="openai: model name the server expects (default: model)")
    max_concurrency: int = Field(256, ge=1, description="openai: requests in flight per endpoint (a vLLM "
                                 "server schedules hundreds at once)")
    request_timeout: float = Field(120.0, gt=0, description="openai: seconds per request")
    max_retries: int = Field(4, ge=0, description="openai: retries per request on timeouts/429/5xx")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the engine")
    cache: bool = Field(True, description="generation cache: every generation is stored under its request key "
                                          "(model, revision, messages, sampling, round) in <home>/gencache, so "
                                          "rebuilt or killed shards ask the engine only for what it lacks")
