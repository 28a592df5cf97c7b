"""The per-request generation loop shared by the generation stages (queries, responses, the judge).

Every request is submitted at once; each result is handled as soon as it arrives. A result that does
not parse is re-submitted at once as attempt + 1 (`Sampling.attempt`, so the generation cache and seeded
engines draw anew), up to `rounds` attempts; there is no round barrier, so one slow or unlucky request
never holds the others back. A transient engine error (timeout, connection, 429/5xx) re-submits the
same attempt up to `transient_retries` times; after that, or on a permanent error, the outstanding
requests of this call are cancelled and the error is raised, failing this shard only.

    outcomes = generate_parsed(engine, chats, sampling, parse, rounds=3, stats=out.stats)
    outcomes[i].value        the parsed value, or None when every attempt failed to parse
    outcomes[i].generations  every Generation of request i, in attempt order
    outcomes[i].error        the last parse error when value is None

`parse(generation)` returns the value, or raises ValueError (or returns None) when the text is unusable;
a list gives each request its own parser (the queries stage validates against each call's own prompt).
Stats: every generation is counted; `extra["resampled"]` counts re-submissions after a parse failure,
`extra["request_retries"]` re-submissions after a transient error.

`sampling_from(config.sampling, ...)` is the one way a stage turns a `SamplingConfig` into a `Sampling`, and
`generation_meta(chat, outcome, engine, seed)` the one way a generated row records what produced it.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from engines.base import EngineClosed, Generation, Message, Sampling, is_transient
from models.config.generation import SamplingConfig
from models.records import GenerationMeta

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    value: T | None = None
    generations: list[Generation] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.generations)

    @property
    def attempts(self) -> int:
        return len(self.generations)

    @property
    def last(self) -> Generation:
        return self.generations[-1]


def sampling_from(config: SamplingConfig, **overrides: Any) -> Sampling:
    """The request sampling of a config section (temperature, top_p, repetition_penalty, max_tokens), with
    the request-level fields (json_schema, seed, n, ...) given here."""
    return Sampling(**{**config.model_dump(), **overrides})


def generation_meta(chat: list[Message], outcome: Outcome, engine: Any, seed: int | None) -> GenerationMeta:
    """What produced a generated row: the chat sent, the last generation (the one kept), the attempts used."""
    g = outcome.last
    return GenerationMeta(prompt=json.dumps(chat, ensure_ascii=False), raw_output=g.text,
                          prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                          finish_reason=g.finish_reason, model=g.model or engine.model_id, seed=seed,
                          rounds=outcome.attempts)


def next_attempt(sampling: Sampling, attempt: int) -> Sampling:
    return sampling.model_copy(update={"attempt": attempt})


def _submit(engine: Any, chat: list[Message], sp: Sampling) -> Future:
    submit = getattr(engine, "submit", None)
    if submit is not None:
        return submit(chat, sp)
    from engines.base import done_future  # an object with generate() only (a test engine)

    try:
        return done_future(engine.generate([chat], sp)[0])
    except BaseException as exc:  # noqa: BLE001
        return done_future(exc=exc)


def _bump(stats: Any, key: str) -> None:
    if stats is not None:
        stats.extra[key] = stats.extra.get(key, 0) + 1


def generate_parsed(engine: Any, chats: list[list[Message]], sampling: Sampling | list[Sampling],
                    parse: Callable[[Generation], T | None] | list[Callable[[Generation], T | None]], *,
                    rounds: int = 1,
                    vary: Callable[[Sampling, int], Sampling] = next_attempt, transient_retries: int = 2,
                    stats: Any = None) -> list[Outcome[T]]:
    params = sampling if isinstance(sampling, list) else [sampling] * len(chats)
    if len(params) != len(chats):
        raise ValueError("one Sampling per chat, or one for all")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    parsers = parse if isinstance(parse, list) else [parse] * len(chats)  # a list: one parser per chat
    if len(parsers) != len(chats):
        raise ValueError("one parser per chat, or one for all")
    outcomes: list[Outcome[T]] = [Outcome() for _ in chats]
    if not chats:
        return outcomes
    done: queue.SimpleQueue = queue.SimpleQueue()
    live: dict[int, Future] = {}
    retries = [0] * len(chats)

    def start(i: int, sp: Sampling) -> None:
        fut = _submit(engine, chats[i], sp)
        live[i] = fut
        fut.add_done_callback(lambda f, i=i, sp=sp: done.put((i, sp, f)))

    for i, sp in enumerate(params):
        start(i, vary(sp, 1))
    try:
        while live:
            i, sp, fut = done.get()
            if live.get(i) is not fut:
                continue
            del live[i]
            try:
                gen = fut.result()
            except CancelledError:
                raise EngineClosed("a request was cancelled: the engine was closed") from None
            except BaseException as exc:
                if is_transient(exc) and retries[i] < transient_retries:
                    retries[i] += 1
                    _bump(stats, "request_retries")
                    start(i, sp)
                    continue
                raise
            out = outcomes[i]
            out.generations.append(gen)
            if stats is not None:
                stats.count_generations([gen])
            try:
                value = parsers[i](gen)
                error = None if value is not None else "no usable output"
            except ValueError as exc:
                value, error = None, str(exc) or type(exc).__name__
            out.value, out.error = value, error
            if error is not None and sp.attempt < rounds:
                _bump(stats, "resampled")
                start(i, vary(params[i], sp.attempt + 1))
    finally:
        for fut in live.values():
            fut.cancel()
    return outcomes
