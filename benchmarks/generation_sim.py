"""Generation under a GPU step-time model: does the streaming path keep the decode slots full?

A timing-faithful simulated engine (`SimEngine`, registered as engine kind "sim" like any engine) has
S decode slots; every step takes t0 + k x (running requests) of simulated time plus p ms per 1,000
prompt tokens admitted in that step (prefill), and adds one token to every running request; a request
finishes when it reaches its completion length, drawn (by a hash of its prompt and attempt, so every
variant sees the same lengths) from a recorded distribution in benchmarks/data/completion_lengths.json.
The engine sleeps `--scale` real seconds per simulated second of each step, and real time that it
spends idle (waiting for client code) after its first request counts as simulated time at the same
scale, so slow client code costs what it would cost next to a real engine.

For each workload (queries: guided JSON, re-sampled per request when it does not parse; responses;
judge: guided JSON verdicts) and shard count, the same requests go through
  pipeline:  one thread per shard running the stages' own loop, tasks.generation.generate_parsed, with
             the stages' parsers (parse_questions, judge.parse), on get_engine(kind="sim");
  old:       the previous path: the Coalescer (batches of up to 256, each waited for to its longest
             request) and, for queries and judge, a barrier per re-sampling round;
  at once:   every request the pipeline made (re-samples included) submitted at t = 0.
It prints pipeline throughput / at-once throughput (target >= 0.95) with the old path's figure beside
it, and ends with the minimum pipeline ratio.

    python benchmarks/generation_sim.py [--lengths bundled|long] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.base import (  # noqa: E402
    Engine,
    EngineClosed,
    Generation,
    Sampling,
    close_engines,
    get_engine,
    register_engine,
)
from engines.dry_run import _stream, instance  # noqa: E402
from models.config.engine import EngineConfig  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "completion_lengths.json"
SHARDS = (4, 16, 64)


def _u(*parts: Any) -> float:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(h[:8], "big") / float(1 << 64)


def workload_of(sp: Sampling) -> str:
    if sp.json_schema is None:
        return "responses"
    return "queries" if sp.json_schema.get("type") == "array" else "judge"


class SimEngine(Engine):
    """S decode slots stepping in simulated time. Options: slots, t0_ms, k_ms, prefill_ms_per_1k, scale,
    lengths (distribution name), invalid_rate (share of guided outputs that do not parse)."""

    kind = "sim"

    def load(self) -> None:
        o = self.config.options
        self.slots = int(o.get("slots", 256))
        self.t0 = float(o.get("t0_ms", 12.0)) / 1000
        self.k = float(o.get("k_ms", 0.03)) / 1000
        self.prefill = float(o.get("prefill_ms_per_1k", 10.0)) / 1000 / 1000
        self.scale = float(o.get("scale", 0.5))
        self.invalid_rate = float(o.get("invalid_rate", 0.1))
        dists = json.loads(DATA.read_text())["distributions"]
        self.lengths = {w: sorted(v) for w, v in dists[o.get("lengths", "bundled")].items()}
        self.clock = 0.0  # simulated seconds
        self.tokens = 0
        self.log: list[tuple[int, int]] = []  # (prompt tokens, completion tokens) of every request admitted
        self._waiting: list[list] = []
        self._running: list[list] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sim-engine", daemon=True)
        self._thread.start()

    def length(self, content: str, sp: Sampling) -> int:
        dist = self.lengths[workload_of(sp)]
        i = int(_u(content, sp.attempt) * len(dist))
        return max(1, min(sp.max_tokens, dist[i]))

    def text(self, content: str, sp: Sampling) -> str:
        if sp.json_schema is None:
            return "I remember it well."
        if _u("invalid", content, sp.attempt) < self.invalid_rate:
            return "Sure! Here it is: (1) what (2) why"
        return json.dumps(instance(sp.json_schema, _stream(content + str(sp.attempt)), False))

    def _submit(self, chat, sampling) -> Future:
        content = "\n".join(m["content"] for m in chat)
        fut: Future = Future()
        req = [len(content) // 4, self.length(content, sampling), 0, fut, self.text(content, sampling)]
        with self._cv:
            if self._closed:
                raise EngineClosed("sim engine closed")
            self._waiting.append(req)
            self._cv.notify()
        return fut

    def _loop(self) -> None:
        while True:
            with self._cv:
                idle_from = time.perf_counter()
                while not self._waiting and not self._running and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                if not self._running and self.log:  # idle time after the first request counts
                    self.clock += (time.perf_counter() - idle_from) / self.scale
                admitted = []
                while self._waiting and len(self._running) < self.slots:
                    r = self._waiting.pop(0)
                    if r[3].set_running_or_notify_cancel():
                        self._running.append(r)
                        admitted.append(r)
                running = len(self._running)
            step = self.t0 + self.k * running + self.prefill * sum(r[0] for r in admitted)
            time.sleep(step * self.scale)
            done = []
            with self._cv:
                self.clock += step
                for r in admitted:
                    self.log.append((r[0], r[1]))
                keep = []
                for r in self._running:
                    r[2] += 1
                    (done if r[2] >= r[1] else keep).append(r)
                self._running = keep
                self.tokens += sum(r[1] for r in done)
            for r in done:
                r[3].set_result(Generation(text=r[4], prompt_tokens=r[0], completion_tokens=r[1], model="sim"))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending = self._waiting + self._running
            self._waiting, self._running = [], []
            self._cv.notify_all()
        for r in pending:
            r[3].cancel()


register_engine("sim", "benchmarks.generation_sim:SimEngine")


# -- the previous path, kept here only as the baseline --------------------------------------------
class Coalescer:
    """The removed engines.base.Coalescer: one dispatcher hands the engine up to max_batch queued
    requests at once and waits for the longest before admitting more."""

    def __init__(self, engine: Any, max_batch: int = 256):
        self.engine, self.max_batch = engine, max_batch
        self._queue: list[tuple[list, list, Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def generate(self, chats, sp):
        fut: Future = Future()
        with self._cv:
            self._queue.append((chats, [sp] * len(chats), fut))
            self._cv.notify()
        return fut.result()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                batch, size = [], 0
                while self._queue and (not batch or size + len(self._queue[0][0]) <= self.max_batch):
                    r = self._queue.pop(0)
                    batch.append(r)
                    size += len(r[0])
            out = self.engine.generate([c for r in batch for c in r[0]], [p for r in batch for p in r[1]])
            i = 0
            for chats, _, fut in batch:
                fut.set_result(out[i:i + len(chats)])
                i += len(chats)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


# -- workloads ------------------------------------------------------------------------------------
def workload(name: str, n: int, max_tokens: int) -> tuple[list[list[dict]], Sampling, Any, int]:
    from tasks.filters.judge import SCHEMA
    from tasks.filters.judge import parse as parse_verdict
    from tasks.queries import parse_questions, question_schema

    prompt_chars = {"queries": 3600, "responses": 5600, "judge": 2800}[name]
    chats = [[{"role": "system", "content": f"{name} request {i} " + "x" * prompt_chars},
              {"role": "user", "content": f"item {i}"}] for i in range(n)]
    if name == "queries":
        return (chats, Sampling(temperature=0.7, max_tokens=max_tokens, json_schema=question_schema(3)),
                lambda g: parse_questions(g.text, 3), 3)
    if name == "judge":
        return chats, Sampling(temperature=0.0, max_tokens=max_tokens, json_schema=SCHEMA), lambda g: parse_verdict(g.text), 2
    return chats, Sampling(temperature=0.7, max_tokens=max_tokens), lambda g: g.text, 1


def split(items: list, k: int) -> list[list]:
    return [items[i::k] for i in range(k)]


WORKERS = 0  # shard tasks in flight (the flow's runner.max_workers); 0: every shard at once


def run_pipeline(engine, chats, sp, parse, rounds, shards) -> None:
    from tasks.generation import generate_parsed

    with ThreadPoolExecutor(WORKERS or shards) as pool:
        list(pool.map(lambda part: generate_parsed(engine, part, sp, parse, rounds=rounds), split(chats, shards)))


def run_old(engine, chats, sp, parse, rounds, shards) -> None:
    co = Coalescer(engine, 256)

    def shard(part):
        pending = list(part)
        for rnd in range(1, rounds + 1):
            if not pending:
                return
            p = sp.model_copy(update={"attempt": rnd})
            gens = co.generate(pending, p)
            still = []
            for c, g in zip(pending, gens, strict=True):
                try:
                    if parse(g) is None:
                        still.append(c)
                except ValueError:
                    still.append(c)
            pending = still

    try:
        with ThreadPoolExecutor(WORKERS or shards) as pool:
            list(pool.map(shard, split(chats, shards)))
    finally:
        co.close()


def measure(fn, options: dict) -> tuple[float, int, list]:
    close_engines()
    engine = get_engine(EngineConfig(kind="sim", options=options))
    start_clock = engine.clock
    fn(engine)
    # the engine is idle now; its clock stopped at the last step that finished a request
    elapsed, tokens, log = engine.clock - start_clock, engine.tokens, list(engine.log)
    close_engines()
    return elapsed, tokens, log


def at_once(options: dict, log: list[tuple[int, int]]) -> tuple[float, int]:
    """Every request of `log` (prompt tokens, completion tokens) submitted at t = 0."""
    lengths = iter([c for _, c in log])

    def fn(engine):
        engine.length = lambda content, sp: next(lengths)  # replay the pipeline's own requests
        futs = [engine.submit([{"role": "user", "content": "p" * (4 * p)}], Sampling(max_tokens=10**6))
                for p, _ in log]
        for f in futs:
            f.result()

    elapsed, tokens, _ = measure(fn, options)
    return elapsed, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="bundled", help="distribution in benchmarks/data/completion_lengths.json")
    ap.add_argument("--scale", type=float, default=0.5, help="real seconds per simulated second while stepping")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--t0-ms", type=float, default=12.0)
    ap.add_argument("--k-ms", type=float, default=0.03)
    ap.add_argument("--prefill-ms", type=float, default=10.0, help="ms per 1,000 prompt tokens")
    ap.add_argument("--requests", type=int, default=768, help="requests per workload")
    ap.add_argument("--workloads", default="queries,responses,judge")
    ap.add_argument("--workers", type=int, default=0,
                    help="shard tasks in flight (runner.max_workers); 0: every shard at once")
    args = ap.parse_args()
    global WORKERS
    WORKERS = args.workers
    options = {"slots": args.slots, "t0_ms": args.t0_ms, "k_ms": args.k_ms, "prefill_ms_per_1k": args.prefill_ms,
               "scale": args.scale, "lengths": args.lengths}
    print(f"S={args.slots} t0={args.t0_ms} ms k={args.k_ms} ms prefill={args.prefill_ms} ms/1k tokens, "
          f"lengths={args.lengths}, {args.requests} requests per workload, scale {args.scale}, "
          f"shard tasks in flight: {args.workers or 'all'}")
    print(f"{'workload':<10} {'shards':>6} {'requests':>8} {'tokens':>8} {'at once s':>9} {'pipe s':>8} "
          f"{'pipeline':>8} {'old':>6}")
    ratios = []
    dists = json.loads(DATA.read_text())["distributions"][args.lengths]
    for name in args.workloads.split(","):
        chats, sp, parse, rounds = workload(name, args.requests, max(dists[name]))
        for shards in SHARDS:
            job = (chats, sp, parse, rounds, shards)
            t_pipe, tok_pipe, log = measure(lambda e, job=job: run_pipeline(e, *job), options)
            t_old, tok_old, _ = measure(lambda e, job=job: run_old(e, *job), options)
            t_all, tok_all = at_once(options, log)
            best = tok_all / t_all
            r_pipe, r_old = (tok_pipe / t_pipe) / best, (tok_old / t_old) / best
            ratios.append(r_pipe)
            print(f"{name:<10} {shards:>6} {len(log):>8} {tok_pipe:>8} {t_all:>9.2f} {t_pipe:>8.2f} "
                  f"{r_pipe:>8.3f} {r_old:>6.3f}", flush=True)
    print(f"minimum pipeline ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
