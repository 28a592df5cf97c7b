"""The engine contract.

    generate(chats, sampling) -> list[Generation]     one Generation per chat and sample, chat-major

Engines are chosen by name from ENGINES (kind -> "module:Class", imported lazily so torch/vllm load
only when used). `get_engine(config)` keeps one loaded engine per process and config: vLLM start-up
is 80-100 s on CPU, so every shard of a run reuses it. In-process engines are wrapped in a
`Coalescer` so concurrent shard tasks share full batches instead of queueing behind a lock.
"""

from __future__ import annotations

import importlib
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from models.config.engine import EngineConfig
from models.ids import content_hash

Message = dict[str, str]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = 0.7
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    seed: int | None = Field(None, description="per-request seed where the engine supports it")
    n: int = 1
    json_schema: dict[str, Any] | None = Field(None, description="guided decoding: output must match this schema")
    stop: tuple[str, ...] | None = None

    def key(self) -> str:
        return content_hash(self.model_dump(mode="json"))


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    model: str = ""


class EngineError(RuntimeError):
    """A permanent engine error: the shard fails, no retry."""


class TransientEngineError(EngineError):
    """Timeouts, connection errors, 429/5xx: Prefect retries the shard."""


TRANSIENT_NAMES = {"TimeoutError", "ConnectionError", "APITimeoutError", "APIConnectionError", "RateLimitError",
                   "InternalServerError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError"}


def is_transient(exc: BaseException) -> bool:
    """The retry condition: only transient faults are worth retrying."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TransientEngineError | TimeoutError | ConnectionError):
            return True
        if type(exc).__name__ in TRANSIENT_NAMES:
            return True
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Engine(ABC):
    kind: ClassVar[str] = ""
    in_process: ClassVar[bool] = True  # False for remote clients: no coalescing needed

    def __init__(self, config: EngineConfig):
        self.config = config
        self.loads = 0  # how many times load() ran: tests assert the model is loaded once per run
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0}
        self._stats_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """What goes into shard hashes: the model and its revision."""
        return f"{self.config.model}@{self.config.revision or 'main'}"

    @abstractmethod
    def load(self) -> None:
        """Import heavy libraries and load the model. Called once."""

    @abstractmethod
    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        """One Generation per chat (sampling[i].n == 1 here; the wrapper expands n)."""

    def generate(self, chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> list[Generation]:
        params = sampling if isinstance(sampling, list) else [sampling] * len(chats)
        if len(params) != len(chats):
            raise ValueError("one Sampling per chat, or one for all")
        flat_chats, flat_params = [], []
        for chat, sp in zip(chats, params, strict=True):
            for _ in range(sp.n):
                flat_chats.append(chat)
                flat_params.append(sp.model_copy(update={"n": 1}) if sp.n != 1 else sp)
        if not flat_chats:
            return []
        t0 = time.perf_counter()
        out = self._generate(flat_chats, flat_params)
        with self._stats_lock:
            self.stats["requests"] += len(out)
            self.stats["prompt_tokens"] += sum(g.prompt_tokens for g in out)
            self.stats["completion_tokens"] += sum(g.completion_tokens for g in out)
            self.stats["seconds"] += time.perf_counter() - t0
        return out

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


@dataclass
class _Request:
    chats: list[list[Message]]
    params: list[Sampling]
    future: Future = field(default_factory=Future)


class Coalescer:
    """Many threads call generate(); one dispatcher thread hands the engine everything queued at once
    (up to max_batch), so batches stay full across shard boundaries."""

    def __init__(self, engine: Engine, max_batch: int = 256):
        self.engine = engine
        self.max_batch = max_batch
        self._queue: list[_Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{engine.kind}", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> list[Generation]:
        params = sampling if isinstance(sampling, list) else [sampling] * len(chats)
        if not chats:
            return []
        req = _Request(chats, params)
        with self._cv:
            if self._closed:
                raise EngineError("engine is closed")
            self._queue.append(req)
            self._cv.notify()
        return req.future.result()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                batch, size = [], 0
                while self._queue and (not batch or size + len(self._queue[0].chats) <= self.max_batch):
                    r = self._queue.pop(0)
                    batch.append(r)
                    size += len(r.chats)
            chats = [c for r in batch for c in r.chats]
            params = [p for r in batch for p in r.params]
            try:
                out = self.engine.generate(chats, params)
            except BaseException as exc:  # noqa: BLE001 - delivered to every waiting caller
                for r in batch:
                    r.future.set_exception(exc)
                continue
            i = 0
            for r in batch:
                n = sum(p.n for p in r.params)
                r.future.set_result(out[i:i + n])
                i += n

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        self.engine.close()


ENGINES: dict[str, str] = {
    "vllm": "engines.vllm_engine:VLLMEngine",
    "openai": "engines.openai_engine:OpenAIEngine",
    "transformers": "engines.transformers_engine:TransformersEngine",
    "fake": "engines.fake:FakeEngine",
}

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def register_engine(kind: str, target: str) -> None:
    """Add an engine: target is 'module:Class'."""
    ENGINES[kind] = target


def engine_class(kind: str) -> type[Engine]:
    if kind not in ENGINES:
        raise EngineError(f"unknown engine kind {kind!r}; known: {', '.join(sorted(ENGINES))}")
    module, cls = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def get_engine(config: EngineConfig) -> Any:
    """The process-wide engine for this config, loaded on first use."""
    key = content_hash(config.model_dump(mode="json"))
    with _lock:
        if key not in _loaded:
            faults = None
            if "faults" in config.options:  # engines/faults.py: injected faults for reliability tests
                from engines.faults import split_options

                options, faults = split_options(config.options)
                config = config.model_copy(update={"options": options})
            engine = engine_class(config.kind)(config)
            engine.load()
            engine.loads += 1
            loaded = Coalescer(engine, config.max_batch) if engine.in_process else engine
            if faults is not None:
                from engines.faults import FaultInjector

                loaded = FaultInjector(loaded, faults)
            _loaded[key] = loaded
        return _loaded[key]


def release_engine(config: EngineConfig) -> None:
    """Close and forget the engine loaded for this config (frees its memory before loading another)."""
    key = content_hash(config.model_dump(mode="json"))
    with _lock:
        engine = _loaded.pop(key, None)
    if engine is not None:
        engine.close()


def close_engines() -> None:
    with _lock:
        for e in _loaded.values():
            e.close()
        _loaded.clear()
