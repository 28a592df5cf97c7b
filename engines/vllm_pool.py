"""A pool of engine replicas on one machine: one worker process per GPU (or tensor-parallel group).

Each worker sees only its devices (CUDA_VISIBLE_DEVICES is set before vLLM is imported), runs one
streaming vLLM engine (engines.vllm_engine.AsyncVLLM) and answers single requests as they finish.
Work is assigned per request to the live replica with the fewest outstanding requests (`Dispatcher`),
so every replica's own scheduler queue stays full and a replica that draws long answers simply gets
fewer new requests; nothing is split into parts and waited for.

The worker body is a factory `"module:function"` returning an object with
`submit(chat, sampling) -> Future[Generation]` (or only `generate(chats, sampling)`); the default
builds a vLLM replica, tests plug in a lightweight one to check the plumbing without GPUs.
A replica process that dies fails its outstanding requests (EngineError) and gets no more work.
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
from typing import Any, Protocol

from engines.base import EngineClosed, EngineError, Generation, Message, Sampling, done_future
from models.config.engine import EngineConfig

DEFAULT_FACTORY = "engines.vllm_engine:AsyncVLLM"  # (config, model_path, model_id) -> a vLLM replica


class Replica(Protocol):
    alive: bool

    def submit(self, chat: list[Message], sampling: Sampling) -> Future: ...


class Dispatcher:
    """Least-outstanding assignment of single requests over replicas (ties: the lowest index)."""

    def __init__(self, replicas: list[Any]):
        self.replicas = replicas
        self.outstanding = [0] * len(replicas)
        self.assigned = [0] * len(replicas)
        self._lock = threading.Lock()

    def pick(self) -> int:
        live = [i for i, r in enumerate(self.replicas) if getattr(r, "alive", True)]
        if not live:
            raise EngineError("every engine replica has exited")
        return min(live, key=lambda i: (self.outstanding[i], i))

    def submit(self, chat: list[Message], sampling: Sampling) -> Future:
        with self._lock:
            w = self.pick()
            self.outstanding[w] += 1
            self.assigned[w] += 1
        try:
            fut = self.replicas[w].submit(chat, sampling)
        except BaseException as exc:  # noqa: BLE001
            fut = done_future(exc=exc)
        fut.add_done_callback(lambda _f, w=w: self._done(w))
        return fut

    def _done(self, w: int) -> None:
        with self._lock:
            self.outstanding[w] -= 1


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
    running: dict[int, Future] = {}
    lock = threading.Lock()

    def report(req_id: int, fut: Future) -> None:
        with lock:
            running.pop(req_id, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            outbox.put(("ok", req_id, fut.result()))
        else:
            outbox.put(("error", req_id, "".join(traceback.format_exception(exc)).strip()))

    while True:
        msg = inbox.get()
        if msg is None:
            break
        if msg[0] == "cancel":
            with lock:
                fut = running.get(msg[1])
            if fut is not None:
                fut.cancel()
            continue
        _, req_id, chat, sampling = msg
        try:
            if hasattr(replica, "submit"):
                fut = replica.submit(chat, sampling)
            else:
                fut = done_future(replica.generate([chat], [sampling])[0])
        except BaseException as exc:  # noqa: BLE001
            fut = done_future(exc=exc)
        with lock:
            running[req_id] = fut
        fut.add_done_callback(lambda f, r=req_id: report(r, f))
    for fut in list(running.values()):
        fut.cancel()
    if hasattr(replica, "close"):
        replica.close()


class _ProcessReplica:
    """The parent's handle on one worker process."""

    def __init__(self, proc: Any, inbox: Any, outbox: Any, name: str):
        self.proc, self.inbox, self.outbox, self.name = proc, inbox, outbox, name
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.alive = True

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-reader", daemon=True)
        self._reader.start()

    def submit(self, chat: list[Message], sampling: Sampling) -> Future:
        fut: Future = Future()
        with self._lock:
            if not self.alive:
                raise EngineError(f"{self.name} has exited")
            req_id = next(self._ids)
            self._pending[req_id] = fut
        fut.add_done_callback(lambda f, r=req_id: self._cancelled(r) if f.cancelled() else None)
        self.inbox.put(("req", req_id, chat, sampling))
        return fut

    def _cancelled(self, req_id: int) -> None:
        with self._lock:
            self._pending.pop(req_id, None)
        if self.alive:
            self.inbox.put(("cancel", req_id))

    def _read(self) -> None:
        while True:
            try:
                kind, req_id, payload = self.outbox.get(timeout=2)
            except queue.Empty:
                if not self.proc.is_alive():
                    self._died(f"{self.name} exited (code {self.proc.exitcode})")
                    return
                continue
            except (EOFError, OSError):
                self._died(f"{self.name}: lost its result queue")
                return
            if kind == "closed":
                return
            with self._lock:
                fut = self._pending.pop(req_id, None)
            if fut is None or not fut.set_running_or_notify_cancel():
                continue
            if kind == "ok":
                fut.set_result(payload)
            else:
                fut.set_exception(EngineError("vLLM replica failed:\n" + str(payload)))

    def _died(self, why: str) -> None:
        with self._lock:
            self.alive = False
            pending, self._pending = list(self._pending.values()), {}
        for fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineError(why))

    def fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)


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
        # vLLM itself must not see the pool's own option
        config = config.model_copy(update={"options": {k: v for k, v in config.options.items()
                                                       if k != "pool_factory"}})
        if devices is None:
            devices = device_groups(config.replicas, config.tensor_parallel_size)
        ctx = mp.get_context("spawn")
        self._replicas: list[_ProcessReplica] = []
        for dev in devices:
            inbox, outbox = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_worker, daemon=False, name=f"vllm-replica-{dev}",
                               args=(factory, dev, config.model_dump_json(), model_path, model_id, inbox, outbox))
            proc.start()
            self._replicas.append(_ProcessReplica(proc, inbox, outbox, f"vLLM replica {len(self._replicas)}"))
        errors = []
        for r in self._replicas:  # replicas load in parallel; wait for all
            while True:
                try:
                    kind, _, detail = r.outbox.get(timeout=5)
                    break
                except queue.Empty:
                    if not r.proc.is_alive():
                        kind, detail = "error", f"replica process exited with code {r.proc.exitcode}"
                        break
            if kind != "ready":
                errors.append(detail)
        if errors:
            self.close()
            raise EngineError("a vLLM replica failed to start:\n" + errors[0])
        for r in self._replicas:
            r.start_reader()
        self.dispatcher = Dispatcher(self._replicas)
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._replicas)

    def submit(self, chat: list[Message], sampling: Sampling) -> Future:
        if getattr(self, "_closed", True):
            raise EngineClosed("the vLLM pool is closed")
        return self.dispatcher.submit(chat, sampling)

    def generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        from engines.base import wait_all

        return wait_all([self.submit(c, sp) for c, sp in zip(chats, sampling, strict=True)])

    def close(self) -> None:
        self._closed = True
        for r in self._replicas:
            r.fail_all(EngineClosed("the vLLM pool was closed with the request outstanding"))
            if r.proc.is_alive():
                r.inbox.put(None)
        for r in self._replicas:
            r.proc.join(timeout=30)
            if r.proc.is_alive():
                r.proc.terminate()
                r.proc.join(timeout=5)
            r.alive = False
            r.outbox.put(("closed", None, None))
        self._replicas = []
