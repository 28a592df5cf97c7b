"""A pool of engine replicas on one machine: one worker process per GPU (or tensor-parallel group).

Each worker sees only its devices (CUDA_VISIBLE_DEVICES is set before vLLM is imported), loads one
`vllm.LLM`, and answers lists of chats. A call is split into one contiguous part per replica, so
every replica gets a full batch for continuous batching, and the parts are put back in order.

The worker body is a factory `"module:function"` returning an object with
`generate(chats, sampling) -> list[Generation]`; the default builds a vLLM replica, tests plug in a
lightweight one to check the plumbing without GPUs.
"""

from __future__ import annotations

import importlib
import itertools
import multiprocessing as mp
import os
import queue
import threading
import traceback
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from engines.base import EngineError, Generation, Message, Sampling
from models.config.engine import EngineConfig

DEFAULT_FACTORY = "engines.vllm_pool:vllm_replica"


class _Replica:
    def __init__(self, config: EngineConfig, model_path: str, model_id: str):
        from vllm import LLM

        from engines.vllm_engine import llm_kwargs

        self.llm = LLM(**llm_kwargs(config, model_path))
        self.model_id = model_id

    def generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        from engines.vllm_engine import run_chat

        return run_chat(self.llm, chats, sampling, self.model_id)


def vllm_replica(config: EngineConfig, model_path: str, model_id: str) -> _Replica:
    return _Replica(config, model_path, model_id)


def _worker(factory: str, devices: str | None, config_json: str, model_path: str, model_id: str,
            inbox: Any, outbox: Any) -> None:
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        module, name = factory.split(":")
        replica = getattr(importlib.import_module(module), name)(
            EngineConfig.model_validate_json(config_json), model_path, model_id)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.put(("error", None, traceback.format_exc()))
        return
    outbox.put(("ready", None, None))
    while True:
        msg = inbox.get()
        if msg is None:
            return
        req_id, chats, sampling = msg
        try:
            outbox.put(("ok", req_id, replica.generate(chats, sampling)))
        except BaseException:  # noqa: BLE001
            outbox.put(("error", req_id, traceback.format_exc()))


def device_groups(replicas: int, tp: int, visible: str | None = None, count: int | None = None) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each replica: consecutive groups of `tp` devices."""
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        if count is None:
            import torch

            count = torch.cuda.device_count()
        devices = [str(i) for i in range(count)]
    if len(devices) < replicas * tp:
        raise EngineError(f"{replicas} replicas x tensor_parallel_size {tp} need {replicas * tp} GPUs, "
                          f"{len(devices)} visible")
    return [",".join(devices[i * tp:(i + 1) * tp]) for i in range(replicas)]


class VLLMPool:
    def __init__(self, config: EngineConfig, model_path: str, model_id: str, factory: str | None = None,
                 devices: list[str | None] | None = None):
        factory = factory or config.options.get("pool_factory") or DEFAULT_FACTORY
        if factory == DEFAULT_FACTORY:
            # vLLM itself must not see the pool's own option
            config = config.model_copy(update={"options": {k: v for k, v in config.options.items()
                                                           if k != "pool_factory"}})
        if devices is None:
            devices = device_groups(config.replicas, config.tensor_parallel_size)
        ctx = mp.get_context("spawn")
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._workers = []
        for dev in devices:
            inbox, outbox = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_worker, daemon=False, name=f"vllm-replica-{dev}",
                               args=(factory, dev, config.model_dump_json(), model_path, model_id, inbox, outbox))
            proc.start()
            self._workers.append((proc, inbox, outbox))
        errors = []
        for proc, _, outbox in self._workers:  # replicas load in parallel; wait for all
            while True:
                try:
                    kind, _, detail = outbox.get(timeout=5)
                    break
                except queue.Empty:
                    if not proc.is_alive():
                        kind, detail = "error", f"replica process exited with code {proc.exitcode}"
                        break
            if kind != "ready":
                errors.append(detail)
        if errors:
            self.close()
            raise EngineError("a vLLM replica failed to start:\n" + errors[0])
        self._readers = [threading.Thread(target=self._read, args=(outbox,), daemon=True)
                         for _, _, outbox in self._workers]
        for t in self._readers:
            t.start()

    @property
    def size(self) -> int:
        return len(self._workers)

    def _read(self, outbox: Any) -> None:
        while True:
            try:
                kind, req_id, payload = outbox.get()
            except (EOFError, OSError):
                return
            if kind == "closed":
                return
            with self._lock:
                fut = self._pending.pop(req_id, None)
            if fut is None:
                continue
            if kind == "ok":
                fut.set_result(payload)
            else:
                fut.set_exception(EngineError("vLLM replica failed:\n" + str(payload)))

    def generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        n = len(chats)
        k = min(self.size, n)
        bounds = [n * i // k for i in range(k + 1)]
        futures = []
        for w in range(k):
            lo, hi = bounds[w], bounds[w + 1]
            req_id = next(self._ids)
            fut: Future = Future()
            with self._lock:
                self._pending[req_id] = fut
            self._workers[w][1].put((req_id, chats[lo:hi], sampling[lo:hi]))
            futures.append((w, fut))
        out = []
        for w, fut in futures:
            while True:
                try:
                    out.extend(fut.result(timeout=5))
                    break
                except FutureTimeout:
                    if not self._workers[w][0].is_alive():
                        raise EngineError(f"vLLM replica {w} exited (code {self._workers[w][0].exitcode})") from None
        return out

    def close(self) -> None:
        for proc, inbox, _ in self._workers:
            if proc.is_alive():
                inbox.put(None)
        for proc, _, outbox in self._workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            outbox.put(("closed", None, None))
        self._workers = []
