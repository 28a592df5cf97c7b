"""The generation cache in front of an engine: `CachedEngine(engine, store)`.

A request's key is a hash (canonical JSON, sha256, 128 bits) of

    the engine identity   model id and revision (`engine.model_id`), engine kind, engine seed, dtype and the
                          engine's own options (fault injection excluded: it does not change the model)
    the rendered chat     the messages exactly as sent
    the full Sampling     temperature, top_p, repetition penalty, max_tokens, per-request seed, stop, the JSON
                          schema, and `attempt` (the re-sampling round: a re-sample is a new draw)

A hit returns a completed Future with `Generation.cached = True` and costs no engine request. Identical
requests in flight at once in this process are computed once (single-flight): the later callers wait for
the first and get `cached = True` too. Results go to the store (storage/gencache.py) as they arrive;
failures are never cached. What a parser or a filter does with a generation is not in the key, so
changing them rebuilds shards from cached generations without asking the model again.

`StageContext.engine()` wraps the process engine with the home's store when `engine.cache` is on, and
binds the view to the run, stage and shard, so the store records which keys each run used (`ditto gc`).
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any

from engines.base import Generation, Message, Sampling, done_future, expand, wait_all
from models.config.engine import EngineConfig
from models.ids import content_hash
from storage.gencache import FIELDS, GenStore, open_store

KEY_LENGTH = 32  # hex characters: 128 bits


def engine_identity(engine: Any, config: EngineConfig | None = None) -> dict[str, Any]:
    """What, besides the request, decides a generation: the model and revision and the engine's settings."""
    ident: dict[str, Any] = {"model": engine.model_id}
    if config is not None:
        ident.update(kind=config.kind, seed=config.seed, dtype=config.dtype,
                     options={k: v for k, v in sorted(config.options.items()) if k != "faults"})
    return ident


def request_key(identity: dict[str, Any], chat: list[Message], sampling: Sampling) -> str:
    return content_hash({"engine": identity, "chat": chat, "sampling": sampling.model_dump(mode="json")},
                        KEY_LENGTH)


class _Flight:
    """One request in flight and the callers waiting on it."""

    __slots__ = ("inner", "waiters", "live")

    def __init__(self) -> None:
        self.inner: Future | None = None
        self.waiters: list[tuple[Future, bool]] = []  # (caller's future, cached flag)
        self.live = 0


class _Flights:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[str, _Flight] = {}


_flights: dict[int, _Flights] = {}
_flights_lock = threading.Lock()


def _flights_for(store: GenStore) -> _Flights:
    with _flights_lock:
        f = _flights.get(id(store))
        if f is None:
            f = _flights[id(store)] = _Flights()
        return f


class CachedEngine:
    """`submit`/`generate` like the wrapped engine; everything else passes through to it."""

    def __init__(self, engine: Any, store: GenStore, *, identity: dict[str, Any] | None = None,
                 run_id: str | None = None, stage: str | None = None, shard: int | None = None):
        self.engine = engine
        self.store = store
        self.identity = identity or engine_identity(engine)
        self.run_id, self.stage, self.shard = run_id, stage, shard
        self.hits = 0
        self.misses = 0
        self._flights = _flights_for(store)
        self._count_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["engine"], name)

    def key(self, chat: list[Message], sampling: Sampling) -> str:
        return request_key(self.identity, chat, sampling)

    def _count(self, hit: bool) -> None:
        with self._count_lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    @staticmethod
    def _generation(rec: dict[str, Any], cached: bool) -> Generation:
        return Generation(text=rec["text"] or "", prompt_tokens=int(rec["prompt_tokens"] or 0),
                          completion_tokens=int(rec["completion_tokens"] or 0),
                          finish_reason=rec["finish_reason"] or "stop", model=rec["model"] or "", cached=cached)

    def submit(self, chat: list[Message], sampling: Sampling) -> Future:
        if sampling.n != 1:
            raise ValueError("submit() takes one request: Sampling.n must be 1 (generate() expands n)")
        key = self.key(chat, sampling)
        self.store.note_use(self.run_id, self.stage, self.shard, key)
        rec = self.store.get(key)
        if rec is not None:
            self._count(True)
            return done_future(self._generation(rec, True))
        fl = self._flights
        with fl.lock:
            flight = fl.by_key.get(key)
            if flight is None:
                rec = self.store.get(key)  # finished between the first look and the lock
                if rec is not None:
                    self._count(True)
                    return done_future(self._generation(rec, True))
                flight = fl.by_key[key] = _Flight()
                leader = True
            else:
                leader = False
            mine: Future = Future()
            flight.waiters.append((mine, not leader))
            flight.live += 1
        self._count(not leader)
        mine.add_done_callback(lambda f: self._on_caller_done(key, flight, f))
        if leader:
            try:
                inner = self.engine.submit(chat, sampling)
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                inner = done_future(exc=exc)
            with fl.lock:
                flight.inner = inner
                cancel_now = flight.live == 0
            if cancel_now:
                inner.cancel()
            inner.add_done_callback(lambda f: self._on_inner_done(key, flight, f))
        return mine

    def _on_caller_done(self, key: str, flight: _Flight, fut: Future) -> None:
        if not fut.cancelled():
            return
        with self._flights.lock:
            flight.live -= 1
            inner = flight.inner if flight.live == 0 else None
        if inner is not None:
            inner.cancel()  # nobody waits for it any more: let the engine drop it

    def _on_inner_done(self, key: str, flight: _Flight, inner: Future) -> None:
        gen: Generation | None = None
        exc: BaseException | None = None
        if inner.cancelled():
            exc = None
        elif inner.exception() is not None:
            exc = inner.exception()
        else:
            gen = inner.result()
        full = None
        if gen is not None:
            rec = {f: getattr(gen, f) for f in FIELDS}
            full = self.store.put(key, rec, run_id=self.run_id, stage=self.stage, shard=self.shard, wait=False)
        with self._flights.lock:  # after put: a caller that misses the flight finds the result in the store
            self._flights.by_key.pop(key, None)
            waiters = list(flight.waiters)
        for fut, cached in waiters:
            try:
                if gen is not None:
                    fut.set_result(dataclasses.replace(gen, cached=cached))
                elif exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.cancel()
            except InvalidStateError:
                pass  # that caller cancelled
        if full is not None:
            # backpressure: the thread delivering results waits until a full chunk is durable, so a
            # killed process loses less than one chunk
            self.store.wait_durable(full)

    def generate(self, chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> list[Generation]:
        flat_chats, flat_params = expand(chats, sampling)
        return wait_all([self.submit(c, p) for c, p in zip(flat_chats, flat_params, strict=True)])

    def close(self) -> None:
        """The process engine and the store belong to their registries; a view owns neither."""


def cached_engine(engine: Any, config: EngineConfig, home: Any, *, run_id: str | None = None,
                  stage: str | None = None, shard: int | None = None) -> CachedEngine:
    """The engine behind the generation cache of `home`, bound to a run, stage and shard."""
    return CachedEngine(engine, open_store(home), identity=engine_identity(engine, config), run_id=run_id,
                        stage=stage, shard=shard)
