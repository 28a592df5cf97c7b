"""The engine contract (one interface, a registry of engines).

    submit(chat, sampling) -> Future[Generation]        one request (sampling.n == 1); the result arrives
                                                        as soon as that request finishes
    generate(chats, sampling) -> list[Generation]       submit all, wait for all; chat-major over n

Streaming engines (in-process vLLM on AsyncLLM, the OpenAI-compatible pool, the transformers engine's
request queue) override `_submit`; plain batch engines implement only `_generate`, and their `submit`
completes synchronously. There is no batch barrier in front of an engine: a freed decode slot is filled
by whatever request any shard task submitted next.

Engines are chosen by name from ENGINES (kind -> "module:Class", imported lazily so torch/vllm load
only when used; `dry_run` is the zero-cost engine of `ditto run --dry-run`, engines/dry_run.py). Options
listed in WRAPPERS wrap the loaded engine instead of reaching it (`engine.options.faults`: engines/faults.py). `get_engine(config)` keeps one loaded engine per process and config: vLLM start-up
is 80-100 s on CPU, so every shard of a run reuses it.

Metrics (for the flow's per-stage records): `engine.metrics(label=None) -> EngineMetrics` is a snapshot
of monotone counters (requests, tokens, busy seconds = wall time with at least one request in the
engine, request-seconds = the time integral of requests in the engine, re-sampled requests =
submissions with `Sampling.attempt > 1`). `after - before` is the delta over an interval. Requests
carry the label that was current (`with metrics_label("queries"):`) in the thread that submitted
them, so stages that overlap in time are still accounted apart: `engine.metrics("queries")`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, fields
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
    attempt: int = Field(1, ge=1, description="re-sampling round of this request (engines ignore it; the "
                                              "generation cache keys on it, so a re-sample is a new draw)")

    def key(self) -> str:
        return content_hash(self.model_dump(mode="json"))


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    model: str = ""
    cached: bool = False


class EngineError(RuntimeError):
    """A permanent engine error: the shard fails, no retry."""


class TransientEngineError(EngineError):
    """Timeouts, connection errors, 429/5xx: retried per request, then Prefect retries the shard."""


class EngineClosed(EngineError):
    """The engine was closed (run killed or finished) while the request was outstanding."""


class Outstanding:
    """The futures of an engine's requests still in flight (thread-safe): closing an engine cancels them."""

    def __init__(self) -> None:
        self._futures: set[Future] = set()
        self._lock = threading.Lock()

    def track(self, fut: Future) -> Future:
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._discard)
        return fut

    def _discard(self, fut: Future) -> None:
        with self._lock:
            self._futures.discard(fut)

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)

    def cancel_all(self) -> None:
        with self._lock:
            pending = list(self._futures)
        for fut in pending:
            fut.cancel()


TRANSIENT_NAMES = {"TimeoutError", "ConnectionError", "APITimeoutError", "APIConnectionError", "RateLimitError",
                   "InternalServerError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError"}


def is_transient(exc: BaseException) -> bool:
    """The retry condition: only transient faults are worth retrying."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EngineClosed):
            return False
        if isinstance(exc, TransientEngineError | TimeoutError | ConnectionError):
            return True
        if type(exc).__name__ in TRANSIENT_NAMES:
            return True
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# -- futures ------------------------------------------------------------------------------------------
def done_future(result: Any = None, exc: BaseException | None = None) -> Future:
    fut: Future = Future()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
    return fut


def wait_all(futures: list[Future]) -> list[Any]:
    """Every result in order; on the first failure the other requests are cancelled and it is raised."""
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


# -- metrics ------------------------------------------------------------------------------------------
_label: contextvars.ContextVar[str] = contextvars.ContextVar("engine_metrics_label", default="")


@contextlib.contextmanager
def metrics_label(label: str) -> Iterator[None]:
    """Requests submitted from this context are also accounted under `label` (e.g. the stage name)."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


@dataclass(frozen=True)
class EngineMetrics:
    """Monotone counters; subtract two snapshots for an interval (in_flight is the later one's)."""

    requests: int = 0            # finished (ok or failed)
    failed: int = 0
    resampled: int = 0           # submitted with Sampling.attempt > 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_seconds: float = 0.0    # wall seconds with at least one request in the engine
    request_seconds: float = 0.0  # integral over time of the requests in the engine (running or queued)
    in_flight: int = 0

    def __sub__(self, other: EngineMetrics) -> EngineMetrics:
        vals = {f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        vals["in_flight"] = self.in_flight
        return EngineMetrics(**vals)

    def __add__(self, other: EngineMetrics) -> EngineMetrics:
        return EngineMetrics(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def mean_running(self) -> float:
        """Mean requests in the engine while it was busy."""
        return self.request_seconds / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def tokens_per_busy_second(self) -> float:
        return self.completion_tokens / self.busy_seconds if self.busy_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "failed": self.failed, "resampled": self.resampled,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "busy_seconds": round(self.busy_seconds, 4), "mean_running": round(self.mean_running, 3),
                "tokens_per_busy_second": round(self.tokens_per_busy_second, 2)}


class _Gauge:
    __slots__ = ("in_flight", "since", "busy", "area", "requests", "failed", "resampled", "prompt", "completion")

    def __init__(self) -> None:
        self.in_flight, self.since, self.busy, self.area = 0, 0.0, 0.0, 0.0
        self.requests = self.failed = self.resampled = self.prompt = self.completion = 0

    def advance(self, now: float) -> None:
        if self.in_flight:
            dt = now - self.since
            self.busy += dt
            self.area += dt * self.in_flight
        self.since = now

    def snapshot(self, now: float) -> EngineMetrics:
        self.advance(now)
        return EngineMetrics(self.requests, self.failed, self.resampled, self.prompt, self.completion,
                             self.busy, self.area, self.in_flight)


class Meter:
    """Counts requests in and out of an engine, in total and per metrics label. Thread-safe."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._total = _Gauge()
        self._labels: dict[str, _Gauge] = {}

    def _gauges(self, label: str) -> tuple[_Gauge, ...]:
        if not label:
            return (self._total,)
        g = self._labels.get(label)
        if g is None:
            g = self._labels[label] = _Gauge()
        return self._total, g

    def start(self, sampling: Sampling) -> str:
        label = _label.get()
        with self._lock:
            now = self.clock()
            for g in self._gauges(label):
                g.advance(now)
                g.in_flight += 1
                if sampling.attempt > 1:
                    g.resampled += 1
        return label

    def finish(self, label: str, fut: Future) -> None:
        gen = None if fut.cancelled() or fut.exception() is not None else fut.result()
        with self._lock:
            now = self.clock()
            for g in self._gauges(label):
                g.advance(now)
                g.in_flight -= 1
                g.requests += 1
                if gen is None:
                    g.failed += 1
                else:
                    g.prompt += gen.prompt_tokens
                    g.completion += gen.completion_tokens

    def snapshot(self, label: str | None = None) -> EngineMetrics:
        with self._lock:
            now = self.clock()
            if label is None:
                return self._total.snapshot(now)
            g = self._labels.get(label)
            return g.snapshot(now) if g is not None else EngineMetrics()

    def labels(self) -> list[str]:
        with self._lock:
            return sorted(self._labels)


# -- engines ------------------------------------------------------------------------------------------
class Engine:
    kind: ClassVar[str] = ""
    in_process: ClassVar[bool] = True  # False for remote clients and test engines
    has_model: ClassVar[bool] = True  # False: no model behind it (the dry run), so no tokenizer or chat template

    def __init__(self, config: EngineConfig):
        self.config = config
        self.loads = 0  # how many times load() ran: tests assert the model is loaded once per run
        self.meter = Meter()

    @property
    def model_id(self) -> str:
        """What goes into shard hashes: the model and its revision."""
        return f"{self.config.model}@{self.config.revision or 'main'}"

    def load(self) -> None:  # noqa: B027 - optional hook
        """Import heavy libraries and load the model. Called once."""

    @property
    def streaming(self) -> bool:
        return type(self)._submit is not Engine._submit

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        """Batch engines: one Generation per chat (sampling[i].n == 1 here)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _submit nor _generate")

    def _submit(self, chat: list[Message], sampling: Sampling) -> Future:
        """Streaming engines: start one request, return its Future. The default runs it synchronously."""
        try:
            return done_future(self._generate([chat], [sampling])[0])
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            return done_future(exc=exc)

    def submit(self, chat: list[Message], sampling: Sampling) -> Future:
        if sampling.n != 1:
            raise ValueError("submit() takes one request: Sampling.n must be 1 (generate() expands n)")
        label = self.meter.start(sampling)
        try:
            fut = self._submit(chat, sampling)
        except BaseException as exc:  # noqa: BLE001
            fut = done_future(exc=exc)
        fut.add_done_callback(lambda f: self.meter.finish(label, f))
        return fut

    def generate(self, chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> list[Generation]:
        flat_chats, flat_params = expand(chats, sampling)
        if not flat_chats:
            return []
        if self.streaming:
            return wait_all([self.submit(c, p) for c, p in zip(flat_chats, flat_params, strict=True)])
        labels = [self.meter.start(p) for p in flat_params]
        try:
            out = self._generate(flat_chats, flat_params)
        except BaseException as exc:
            for label in labels:
                self.meter.finish(label, done_future(exc=exc))
            raise
        for label, g in zip(labels, out, strict=True):
            self.meter.finish(label, done_future(g))
        return out

    def metrics(self, label: str | None = None) -> EngineMetrics:
        """Snapshot of this engine's counters, in total or for one metrics label."""
        return self.meter.snapshot(label)

    @property
    def stats(self) -> dict[str, Any]:
        m = self.metrics()
        return {"requests": m.requests, "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
                "seconds": m.busy_seconds}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def expand(chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> tuple[list, list[Sampling]]:
    """One (chat, Sampling with n=1) per generation, chat-major."""
    params = sampling if isinstance(sampling, list) else [sampling] * len(chats)
    if len(params) != len(chats):
        raise ValueError("one Sampling per chat, or one for all")
    flat_chats, flat_params = [], []
    for chat, sp in zip(chats, params, strict=True):
        one = sp.model_copy(update={"n": 1}) if sp.n != 1 else sp
        for _ in range(sp.n):
            flat_chats.append(chat)
            flat_params.append(one)
    return flat_chats, flat_params


class SyncAdapter(Engine):
    """Gives `submit` to a registered object that only has `generate(chats, sampling)` (test engines)."""

    def __init__(self, inner: Any):
        super().__init__(inner.config)
        self.inner = inner
        del self.loads  # the wrapped object's count is the one that matters

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        return self.inner.generate(chats, sampling)

    def close(self) -> None:
        self.inner.close()


ENGINES: dict[str, str] = {
    "vllm": "engines.vllm_engine:VLLMEngine",
    "openai": "engines.openai_engine:OpenAIEngine",
    "transformers": "engines.transformers_engine:TransformersEngine",
    "dry_run": "engines.dry_run:DryRunEngine",
}
# Engine options that wrap the loaded engine instead of reaching it: option -> "module:function". The function
# takes the option's value, raises EngineError on a bad one (before any model loads) and returns the wrapper
# (engine -> engine). The modules named here import this one, never the other way round.
WRAPPERS: dict[str, str] = {
    "faults": "engines.faults:injector",
}

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def register_engine(kind: str, target: str) -> None:
    """Add an engine: target is 'module:Class' (imported when first used)."""
    ENGINES[kind] = target


def _import(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def engine_class(kind: str) -> type[Engine]:
    if kind not in ENGINES:
        raise EngineError(f"unknown engine kind {kind!r}; known: {', '.join(sorted(ENGINES))}")
    return _import(ENGINES[kind])


def engine_key(config: EngineConfig) -> str:
    """Which loaded engine serves a config: everything but `cache` (the generation cache sits in front of the
    engine, per home, so configs that differ only there share one loaded model)."""
    return content_hash(config.model_dump(mode="json", exclude={"cache"}))


def loaded_engine(config: EngineConfig) -> Any | None:
    """The engine already loaded for this config, or None; never loads one (and never waits for a load in
    progress: no lock, a dict read is atomic)."""
    return _loaded.get(engine_key(config))


def get_engine(config: EngineConfig) -> Any:
    """The process-wide engine for this config, loaded on first use."""
    key = engine_key(config)
    with _lock:
        if key not in _loaded:
            wrappers = [_import(WRAPPERS[k])(v) for k, v in config.options.items() if k in WRAPPERS]
            if wrappers:  # e.g. engines/faults.py: injected faults for reliability tests
                config = config.model_copy(update={"options": {k: v for k, v in config.options.items()
                                                               if k not in WRAPPERS}})
            engine = engine_class(config.kind)(config)
            engine.load()
            engine.loads += 1
            loaded = engine if hasattr(engine, "submit") else SyncAdapter(engine)
            for wrap in wrappers:
                loaded = wrap(loaded)
            _loaded[key] = loaded
        return _loaded[key]


def release_engine(config: EngineConfig) -> None:
    """Close and forget the engine loaded for this config (frees its memory before loading another)."""
    key = engine_key(config)
    with _lock:
        engine = _loaded.pop(key, None)
    if engine is not None:
        engine.close()


def close_engines() -> None:
    """Close every loaded engine: outstanding requests are cancelled (their futures raise)."""
    with _lock:
        engines = list(_loaded.values())
        _loaded.clear()
    for e in engines:
        e.close()
