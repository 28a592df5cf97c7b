"""Fault injection at the engine boundary, for reliability tests and chaos runs.

Enabled from config; `get_engine` wraps the loaded engine when `engine.options.faults` is set (this module's
`injector` is listed in engines.base.WRAPPERS):

    engine:
      options:
        faults: {rate: 0.1, kinds: [timeout, connection, malformed], seed: 0}

A "call" is one `submit` (one request) or one `generate` (a list of requests).

- timeout / connection: the call fails with a TransientEngineError (a TimeoutError / ConnectionError as
  its cause), as a remote engine would: the generation loop retries the request, then Prefect the shard.
- malformed: single generations have their text replaced by invalid JSON, JSON of the wrong shape,
  an empty string or a cut-off text (finish_reason "length"): the queries stage re-samples, the
  filter rejects garbage answers.
- permanent_on: a substring; a call whose prompts contain it raises EngineError (no retry); with
  permanent_while_exists, only while that file exists (the cause is then fixed and the run rerun).
- latency: seconds added to every call (a slow engine; a submitted request completes that much
  later without blocking the submitter); hold_while_exists: calls wait while a file exists (keeps a
  run holding the catalog until a test lets it go).

Decisions are seeded and depend only on the prompt text and how often that prompt was seen before,
never on thread timing, so a run replays the same faults. A retried call or a re-sampled prompt gets
a fresh draw. `counts` holds what was injected; `report` (a path) receives it as JSON on close.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.base import (
    EngineClosed,
    EngineError,
    Generation,
    Message,
    Sampling,
    TransientEngineError,
    done_future,
    expand,
)
from models.ids import content_hash

CALL_KINDS = ("timeout", "connection")
GENERATION_KINDS = ("malformed",)
MALFORMED = ("not_json", "wrong_shape", "empty", "cut_off")


class FaultConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: float = Field(0.1, ge=0, le=1, description="probability of a fault per call (timeout/connection) and "
                                                    "per generation (malformed)")
    kinds: list[str] = Field(default_factory=lambda: ["timeout", "connection", "malformed"],
                             description="timeout | connection | malformed")
    seed: int = Field(0, description="seed of the fault decisions")
    permanent_on: str | None = Field(None, description="a call whose prompts contain this text raises EngineError")
    permanent_while_exists: str | None = Field(None, description="permanent_on applies only while this file "
                                                                 "exists (a fault that an operator then fixes)")
    report: str | None = Field(None, description="write the fault counts as JSON here on close")
    latency: float = Field(0.0, ge=0, description="seconds added to every call (a slow engine)")
    hold_while_exists: str | None = Field(None, description="calls wait while this file exists (at most 10 min): "
                                                            "holds a run in place for concurrency tests")

    def model_post_init(self, _: Any) -> None:
        bad = sorted(set(self.kinds) - set(CALL_KINDS) - set(GENERATION_KINDS))
        if bad:
            raise ValueError(f"unknown fault kind(s) {bad}; known: {[*CALL_KINDS, *GENERATION_KINDS]}")


class InjectedTimeout(TimeoutError):
    pass


class InjectedConnectionError(ConnectionError):
    pass


def _draw(*parts: Any) -> float:
    """A uniform number in [0, 1) from a hash of parts."""
    return int(content_hash(list(parts), 16), 16) / float(1 << 64)


class FaultInjector:
    """Wraps an engine; everything but submit(), generate() and close() passes through."""

    cacheable = False  # injected outputs are not the model's: the generation cache neither stores nor serves them

    def __init__(self, engine: Any, config: FaultConfig | dict[str, Any]):
        self.engine = engine
        self.faults = config if isinstance(config, FaultConfig) else FaultConfig.model_validate(config)
        self.counts: Counter = Counter()
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self._delayed: ThreadPoolExecutor | None = None
        self._closed = threading.Event()  # close() ends a held or delayed request at once

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["engine"], name)

    def _occurrence(self, key: str) -> int:
        with self._lock:
            self._seen[key] += 1
            return self._seen[key]

    def _count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] += n

    def _call_fault(self, chats: list[list[Message]], params: list[Sampling]) -> EngineError | None:
        """The fault this call gets, if any (counted)."""
        f = self.faults
        self._count("calls")
        if f.permanent_on and (f.permanent_while_exists is None or os.path.exists(f.permanent_while_exists)) and \
                any(f.permanent_on in m["content"] for chat in chats for m in chat):
            self._count("permanent")
            return EngineError(f"injected permanent fault on a prompt containing {f.permanent_on!r}")
        call_key = content_hash([chats, [sp.key() for sp in params]])
        nth = self._occurrence("call:" + call_key)
        call_kinds = [k for k in f.kinds if k in CALL_KINDS]
        if call_kinds and _draw(f.seed, "call", call_key, nth) < f.rate:
            kind = call_kinds[int(_draw(f.seed, "kind", call_key, nth) * len(call_kinds))]
            self._count(kind)
            if kind == "timeout":
                err = TransientEngineError("injected fault: request timed out")
                err.__cause__ = InjectedTimeout("timed out")
            else:
                err = TransientEngineError("injected fault: connection reset")
                err.__cause__ = InjectedConnectionError("reset")
            return err
        return None

    def _wait(self) -> None:
        f = self.faults
        if f.latency:
            self._closed.wait(f.latency)
        deadline = time.monotonic() + 600
        while (f.hold_while_exists and os.path.exists(f.hold_while_exists) and time.monotonic() < deadline
               and not self._closed.is_set()):
            time.sleep(0.1)
        if self._closed.is_set():
            raise EngineClosed("the engine was closed while the request was held")

    def _maybe_malform(self, chat: list[Message], g: Generation) -> Generation:
        f = self.faults
        if "malformed" not in f.kinds:
            return g
        key = content_hash(chat)
        nth = self._occurrence("gen:" + key)
        if _draw(f.seed, "gen", key, nth) < f.rate:
            variant = MALFORMED[int(_draw(f.seed, "variant", key, nth) * len(MALFORMED))]
            self._count("malformed")
            self._count("malformed." + variant)
            return malform(g, variant)
        return g

    def submit(self, chat: list[Message], sampling: Sampling) -> Future:
        err = self._call_fault([chat], [sampling])
        if err is not None:
            return done_future(exc=err)
        if self.faults.latency or self.faults.hold_while_exists:
            with self._lock:
                if self._delayed is None:
                    self._delayed = ThreadPoolExecutor(max_workers=64, thread_name_prefix="faults-delay")
            return self._delayed.submit(self._delayed_one, chat, sampling)
        out: Future = Future()

        def relay(inner: Future) -> None:
            if inner.cancelled():
                out.cancel()
            elif inner.exception() is not None:
                out.set_exception(inner.exception())
            else:
                out.set_result(self._maybe_malform(chat, inner.result()))

        inner = self.engine.submit(chat, sampling)
        out.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        inner.add_done_callback(relay)
        return out

    def _delayed_one(self, chat: list[Message], sampling: Sampling) -> Generation:
        self._wait()
        return self._maybe_malform(chat, self.engine.submit(chat, sampling).result())

    def generate(self, chats: list[list[Message]], sampling: Sampling | list[Sampling]) -> list[Generation]:
        params = sampling if isinstance(sampling, list) else [sampling] * len(chats)
        err = self._call_fault(chats, params)
        if err is not None:
            raise err
        self._wait()
        out = self.engine.generate(chats, sampling)
        flat, _ = expand(chats, sampling)
        return [self._maybe_malform(chat, g) for chat, g in zip(flat, out, strict=True)]

    def close(self) -> None:
        self._closed.set()
        try:
            self.engine.close()
        finally:
            if self._delayed is not None:
                self._delayed.shutdown(wait=False, cancel_futures=True)
            if self.faults.report:
                path = Path(self.faults.report)
                tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
                tmp.write_text(json.dumps(dict(self.counts), sort_keys=True))
                os.replace(tmp, path)


def malform(g: Generation, variant: str) -> Generation:
    text = {"not_json": "Sure! Here are some questions: (1) what (2) why",
            "wrong_shape": json.dumps({"answer": 42, "items": "none"}),
            "empty": "",
            "cut_off": g.text[: max(1, len(g.text) // 3)]}[variant]
    return Generation(text=text, prompt_tokens=g.prompt_tokens, completion_tokens=max(1, len(text) // 4),
                      finish_reason="length" if variant == "cut_off" else g.finish_reason, model=g.model,
                      cached=g.cached)


def injector(value: Any) -> Callable[[Any], FaultInjector]:
    """The `engine.options.faults` hook (engines.base.WRAPPERS): checks the fault config, raising EngineError
    naming the key, and returns what wraps the loaded engine."""
    try:
        faults = FaultConfig.model_validate(value or {})
    except ValidationError as exc:
        msgs = [f"engine.options.faults.{'.'.join(map(str, e['loc']))}: {e['msg']}".replace("faults.: ", "faults: ")
                for e in exc.errors()]
        raise EngineError("; ".join(msgs)) from None
    return lambda engine: FaultInjector(engine, faults)
