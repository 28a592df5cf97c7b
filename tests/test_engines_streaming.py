"""The streaming engine contract without a model: submit() -> Future per request, generate() over it,
the per-request re-sample loop (tasks/generation.py), least-outstanding replica assignment, engine
metrics, fault injection per request, and closing an engine with requests outstanding."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from engines.base import (
    Engine,
    EngineClosed,
    EngineError,
    EngineMetrics,
    Generation,
    Meter,
    Sampling,
    SyncAdapter,
    TransientEngineError,
    close_engines,
    get_engine,
    metrics_label,
)
from engines.faults import FaultInjector
from engines.vllm_pool import Dispatcher
from models.config.engine import EngineConfig
from tasks.generation import generate_parsed


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class HeldEngine(Engine):
    """A streaming engine whose requests finish only when the test says so (any order)."""

    kind = "held"

    def __init__(self, config=None):
        super().__init__(config or EngineConfig(kind="fake"))
        self.requests: list[tuple[str, Sampling, Future]] = []
        self.cv = threading.Condition()
        self.closed = False

    def _submit(self, chat, sampling):
        fut: Future = Future()
        with self.cv:
            if self.closed:
                raise EngineClosed("closed")
            self.requests.append((chat[-1]["content"], sampling, fut))
            self.cv.notify_all()
        return fut

    def wait_for(self, n: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.requests) >= n, timeout=10), len(self.requests)

    def finish(self, i: int, text: str | None = None, exc: BaseException | None = None, tokens: int = 1) -> None:
        prompt, _, fut = self.requests[i]
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(Generation(text=prompt if text is None else text, prompt_tokens=2,
                                      completion_tokens=tokens))

    def close(self):
        with self.cv:
            self.closed = True
        for _, _, fut in self.requests:
            fut.cancel()


def _in_thread(fn, *args, **kwargs) -> Future:
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return fut


# --- submit / generate ----------------------------------------------------------------------------
def test_submit_returns_one_future_per_request_and_generate_waits_for_all():
    eng = HeldEngine()
    futs = [eng.submit(chat(f"q{i}"), Sampling()) for i in range(3)]
    eng.finish(2)
    assert futs[2].result(1).text == "q2" and not futs[0].done()  # each result as soon as it is ready
    eng.finish(0)
    eng.finish(1)
    assert [f.result(1).text for f in futs] == ["q0", "q1", "q2"]
    with pytest.raises(ValueError, match="n must be 1"):
        eng.submit(chat("x"), Sampling(n=2))
    gen = _in_thread(eng.generate, [chat("a"), chat("b")], Sampling(n=2))
    eng.wait_for(7)
    for i in (6, 5, 4, 3):
        eng.finish(i)
    assert [g.text for g in gen.result(5)] == ["a", "a", "b", "b"]


def test_batch_engine_gets_submit_and_objects_with_only_generate_are_adapted(scripted_engine):
    from tests.plugins.fake import FakeEngine

    fake = FakeEngine(EngineConfig(kind="fake"))
    fake.load()
    fut = fake.submit(chat("hello"), Sampling())
    assert fut.done() and fut.result().text == fake.generate([chat("hello")], Sampling())[0].text
    listed = get_engine(EngineConfig(kind="listed", options={"outputs": ["one", "two"]}))
    assert isinstance(listed, SyncAdapter) and listed.loads == 1  # the wrapped object's count
    assert [listed.submit(chat("x"), Sampling()).result().text for _ in range(2)] == ["one", "two"]


# --- the per-request re-sample loop ---------------------------------------------------------------
def _parse_ok(g: Generation):
    if not g.text.startswith("ok"):
        raise ValueError(f"bad output {g.text!r}")
    return g.text


def test_a_failed_parse_is_resubmitted_at_once_without_waiting_for_the_others():
    eng = HeldEngine()
    loop = _in_thread(generate_parsed, eng, [chat("a"), chat("b")], Sampling(), _parse_ok, rounds=3)
    eng.wait_for(2)
    eng.finish(0, "garbage")  # request a fails while b is still running
    eng.wait_for(3)  # a is re-submitted before b finished: no round barrier
    prompt, sp, _ = eng.requests[2]
    assert prompt == "a" and sp.attempt == 2 and not eng.requests[1][2].done()
    eng.finish(2, "still bad")
    eng.wait_for(4)
    assert eng.requests[3][1].attempt == 3
    eng.finish(3, "ok-a")
    eng.finish(1, "ok-b")
    a, b = loop.result(5)
    assert (a.value, a.attempts, a.ok) == ("ok-a", 3, True)
    assert (b.value, b.attempts) == ("ok-b", 1)
    assert eng.metrics().resampled == 2


@pytest.mark.parametrize("rounds", [1, 2])
def test_the_last_error_is_returned_after_rounds_attempts(rounds):
    eng = HeldEngine()
    loop = _in_thread(generate_parsed, eng, [chat("a")], Sampling(), _parse_ok, rounds=rounds)
    for i in range(rounds):
        eng.wait_for(i + 1)
        eng.finish(i, f"bad{i}")
    (res,) = loop.result(5)
    assert not res.ok and res.value is None and res.attempts == rounds
    assert res.error == f"bad output 'bad{rounds - 1}'" and res.last.text == f"bad{rounds - 1}"
    assert len(eng.requests) == rounds


def test_stats_count_generations_resamples_and_retries():
    from tasks.base import Stats

    eng = HeldEngine()
    stats = Stats()
    loop = _in_thread(generate_parsed, eng, [chat("a")], Sampling(), _parse_ok, rounds=2, stats=stats)
    eng.wait_for(1)
    eng.finish(0, exc=TransientEngineError("timed out"))
    eng.wait_for(2)
    assert eng.requests[1][1].attempt == 1  # a transient error retries the same attempt
    eng.finish(1, "bad", tokens=5)
    eng.wait_for(3)
    eng.finish(2, "ok", tokens=7)
    loop.result(5)
    assert stats.requests == 2 and stats.completion_tokens == 12
    assert (stats.extra["request_retries"], stats.extra["resampled"]) == (1, 1)


def test_transient_errors_beyond_the_retries_and_permanent_errors_fail_the_call_and_cancel_the_rest():
    eng = HeldEngine()
    loop = _in_thread(generate_parsed, eng, [chat("a"), chat("b")], Sampling(), _parse_ok, transient_retries=1)
    eng.wait_for(2)
    eng.finish(0, exc=TransientEngineError("timed out"))
    eng.wait_for(3)
    eng.finish(2, exc=TransientEngineError("timed out again"))
    with pytest.raises(TransientEngineError, match="again"):
        loop.result(5)
    assert eng.requests[1][2].cancelled()  # b was outstanding: cancelled, not left running

    eng2 = HeldEngine()
    loop = _in_thread(generate_parsed, eng2, [chat("a"), chat("b")], Sampling(), _parse_ok)
    eng2.wait_for(2)
    eng2.finish(1, exc=EngineError("bad request"))
    with pytest.raises(EngineError, match="bad request"):
        loop.result(5)
    assert eng2.requests[0][2].cancelled() and len(eng2.requests) == 2


def test_a_shard_whose_requests_fail_mid_stream_fails_alone():
    """Two shards share one engine: one shard's request fails permanently after others finished; the
    other shard, whose requests are interleaved with it, completes."""
    eng = HeldEngine()
    shard_a = _in_thread(generate_parsed, eng, [chat("a0"), chat("a1"), chat("a2")], Sampling(), lambda g: g.text)
    eng.wait_for(3)
    shard_b = _in_thread(generate_parsed, eng, [chat("b0"), chat("b1")], Sampling(), lambda g: g.text)
    eng.wait_for(5)
    eng.finish(0)
    eng.finish(3)
    eng.finish(1, exc=EngineError("a1: the engine rejected this prompt"))
    eng.finish(4)
    with pytest.raises(EngineError, match="a1"):
        shard_a.result(5)
    assert [o.value for o in shard_b.result(5)] == ["b0", "b1"]
    assert eng.requests[2][2].cancelled()


def test_closing_the_engine_cancels_outstanding_requests_and_the_loop_does_not_hang():
    eng = HeldEngine()
    loop = _in_thread(generate_parsed, eng, [chat("a"), chat("b")], Sampling(), _parse_ok)
    eng.wait_for(2)
    eng.finish(0, "ok")
    eng.close()
    with pytest.raises(EngineClosed):
        loop.result(5)
    with pytest.raises(EngineClosed):
        eng.submit(chat("late"), Sampling()).result(1)


def test_a_vary_function_sets_the_sampling_of_each_attempt():
    """The judge's attempt r samples with seed base + r - 1 (a fresh draw on seeded engines)."""
    eng = HeldEngine()
    from engines.base import Sampling as S

    def vary(s: S, a: int) -> S:
        return s.model_copy(update={"attempt": a, "seed": 10 + a - 1})

    loop = _in_thread(generate_parsed, eng, [chat("a")], S(), _parse_ok, rounds=2, vary=vary)
    eng.wait_for(1)
    eng.finish(0, "bad")
    eng.wait_for(2)
    eng.finish(1, "ok")
    loop.result(5)
    assert [(sp.attempt, sp.seed) for _, sp, _ in eng.requests] == [(1, 10), (2, 11)]


# --- replicas -------------------------------------------------------------------------------------
class FakeReplica:
    def __init__(self):
        self.alive = True
        self.futures: list[Future] = []

    def submit(self, chat, sampling):
        fut: Future = Future()
        self.futures.append(fut)
        return fut

    def finish_all(self):
        for f in self.futures:
            if not f.done():
                f.set_result(Generation(text="x"))


def test_requests_go_to_the_replica_with_the_fewest_outstanding():
    reps = [FakeReplica(), FakeReplica(), FakeReplica()]
    d = Dispatcher(reps)
    for _ in range(6):
        d.submit(chat("q"), Sampling())
    assert d.outstanding == [2, 2, 2]
    reps[1].finish_all()  # replica 1 drew short answers: it gets the next requests
    assert d.outstanding == [2, 0, 2]
    for _ in range(3):
        d.submit(chat("q"), Sampling())
    assert d.outstanding == [2, 2, 3] or d.outstanding == [3, 2, 2]
    assert d.assigned[1] == 4
    reps[0].alive = False  # an exited replica gets no more work
    before = len(reps[0].futures)
    for _ in range(3):
        d.submit(chat("q"), Sampling())
    assert len(reps[0].futures) == before
    for r in reps:
        r.alive = False
    with pytest.raises(EngineError, match="every engine replica"):
        d.submit(chat("q"), Sampling())


def test_no_split_and_wait_a_finished_request_is_delivered_while_others_run():
    reps = [FakeReplica(), FakeReplica()]
    d = Dispatcher(reps)
    futs = [d.submit(chat(f"q{i}"), Sampling()) for i in range(4)]
    reps[1].futures[0].set_result(Generation(text="fast"))
    assert futs[1].result(1).text == "fast" and not any(f.done() for i, f in enumerate(futs) if i != 1)


# --- metrics ---------------------------------------------------------------------------------------
def test_metrics_busy_seconds_mean_running_and_labels():
    now = [0.0]
    meter = Meter(clock=lambda: now[0])

    def start(label, attempt=1):
        with metrics_label(label):
            return meter.start(Sampling(attempt=attempt))

    a = start("queries")
    now[0] = 1.0
    b = start("responses", attempt=2)
    now[0] = 3.0
    meter.finish(a, _gen(10))
    now[0] = 4.0
    meter.finish(b, _gen(5))
    now[0] = 10.0  # idle: not busy
    total = meter.snapshot()
    assert total.busy_seconds == 4.0 and total.request_seconds == 6.0 and total.mean_running == 1.5
    assert total.completion_tokens == 15 and total.requests == 2 and total.resampled == 1
    q = meter.snapshot("queries")
    assert (q.busy_seconds, q.completion_tokens, q.resampled) == (3.0, 10, 0)
    r = meter.snapshot("responses")
    assert (r.busy_seconds, r.request_seconds, r.resampled) == (3.0, 3.0, 1)
    assert meter.snapshot("nothing") == EngineMetrics() and meter.labels() == ["queries", "responses"]
    now[0] = 11.0
    c = start("")
    now[0] = 13.0
    meter.finish(c, _failed())
    delta = meter.snapshot() - total
    assert (delta.requests, delta.failed, delta.busy_seconds, delta.completion_tokens) == (1, 1, 2.0, 0)
    assert delta.as_dict()["mean_running"] == 1.0


def _gen(tokens: int) -> Future:
    f: Future = Future()
    f.set_result(Generation(text="", completion_tokens=tokens))
    return f


def _failed() -> Future:
    f: Future = Future()
    f.set_exception(EngineError("x"))
    return f


def test_engine_metrics_follow_submitted_requests():
    eng = HeldEngine()
    with metrics_label("judge"):
        fut = eng.submit(chat("a"), Sampling(attempt=2))
    assert eng.metrics().in_flight == 1 and eng.metrics("judge").in_flight == 1
    eng.finish(0, tokens=9)
    fut.result(1)
    m = eng.metrics("judge")
    assert (m.requests, m.completion_tokens, m.resampled, m.in_flight) == (1, 9, 1, 0)
    assert eng.stats["completion_tokens"] == 9


# --- faults per request ----------------------------------------------------------------------------
def test_injected_faults_apply_per_submitted_request():
    close_engines()
    inner = get_engine(EngineConfig(kind="fake"))
    inj = FaultInjector(inner, {"rate": 1.0, "kinds": ["malformed"]})
    g = inj.submit(chat("q"), Sampling()).result(1)
    assert inj.counts["malformed"] == 1 and g.text != inner.submit(chat("q"), Sampling()).result().text
    perm = FaultInjector(inner, {"rate": 0.0, "permanent_on": "Cleopatra"})
    assert perm.submit(chat("Napoleon"), Sampling()).result(1).text
    with pytest.raises(EngineError, match="injected permanent"):
        perm.submit(chat("Cleopatra"), Sampling()).result(1)
    calls = FaultInjector(inner, {"rate": 1.0, "kinds": ["timeout"]})
    with pytest.raises(TransientEngineError):
        calls.submit(chat("q"), Sampling()).result(1)
    slow = FaultInjector(inner, {"rate": 0.0, "latency": 0.05})
    fut = slow.submit(chat("q"), Sampling())  # returns at once; completes later
    assert fut.result(5).text
    slow.close()
    close_engines()
