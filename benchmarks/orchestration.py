"""Orchestration overhead of build_dataset with the zero-cost dry-run engine.

The full DAG (characters -> queries -> responses -> filter -> dedup -> sft_data) runs in this process through
`run_build`, Prefect included. Every stage's own work (SourceStage.collect, Stage.prepare, Stage.run)
is timed from the inside; the union of those intervals is "stage time", everything else (Prefect task
submission and state tracking, Parquet reads/writes, catalog registration and snapshots) is
orchestration. Per-shard overhead = (flow wall time - stage time) / shard tasks.

The overhead is then put against a real run's time on the bundled model, estimated from the number
of engine requests at --tok-s tokens/s (default 190: vLLM CPU, batch 32; not measured here) and an
assumed completion length per request (half of each stage's max_tokens; the dry-run engine's own token
counts are also shown as a lower bound).

    python benchmarks/orchestration.py                 # ~100k turns (1400 characters x 12 pairings)
    python benchmarks/orchestration.py --quick         # ~10k turns
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ditto-bench-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("PREFECT_API_URL", None)

ASSUMED_TOKENS = {"queries": 160, "responses": 100, "filter": 80}  # half of each stage's max_tokens


class StageClock:
    """Wraps collect/prepare/run of every registered stage and records (start, end) intervals."""

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._undo: list[tuple[type, str, Any]] = []

    def _wrap(self, cls: type, name: str) -> None:
        fn = cls.__dict__.get(name)
        if fn is None:
            return
        clock = self

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                with clock._lock:
                    clock.intervals.append((t0, time.perf_counter()))
                    clock.calls += 1

        setattr(cls, name, timed)
        self._undo.append((cls, name, fn))

    def __enter__(self) -> StageClock:
        from flows.stages import STAGE_ORDER, get_stage

        for name in STAGE_ORDER:
            cls = type(get_stage(name))
            for meth in ("collect", "prepare", "run"):
                self._wrap(cls, meth)
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, name, fn in reversed(self._undo):
            setattr(cls, name, fn)

    def busy_seconds(self) -> float:
        """Wall time during which at least one stage call ran (union of intervals)."""
        total, end = 0.0, float("-inf")
        for s, e in sorted(self.intervals):
            if e <= end:
                continue
            total += e - max(s, end)
            end = e
        return total


def write_characters(path: Path, n: int) -> Path:
    from tasks.sources.synthetic import write_characters as write

    return write(path, n)


def overrides(chars: Path, shards: int, pairings: int, workers: int, identity: bool = False) -> list[str]:
    n = sum(1 for _ in open(chars))
    return ["engine.kind=dry_run", "characters.source=jsonl", f"characters.path={chars}", f"characters.top_n={n}",
            f"runner.num_shards={shards}", f"runner.max_workers={workers}", f"queries.pairings={pairings}",
            "runner.retry_delay_seconds=[0]", f"filter.identity.enabled={str(identity).lower()}"]


def warm_up(tmp: Path) -> None:
    """One tiny run first: the in-process temporary Prefect server starts here, outside the timings."""
    from flows.build import run_build

    chars = write_characters(tmp / "warm.jsonl", 8)
    run_build(overrides=overrides(chars, 2, 1, 2), home=tmp / "warm-home", until="characters")


def run_once(home: Path, ov: list[str], run_id: str | None = None) -> dict[str, Any]:
    from flows.build import run_build

    with StageClock() as clock:
        t0 = time.perf_counter()
        summary = run_build(overrides=ov, home=home, run_id=run_id)
        wall = time.perf_counter() - t0
    shard_tasks = sum(s.get("shards_total", 0) for s in summary["stages"].values())
    stage_s = clock.busy_seconds()
    return {"summary": summary, "wall": wall, "stage_s": stage_s, "shard_tasks": shard_tasks,
            "stage_calls": clock.calls}


def estimate_real_seconds(summary: dict[str, Any], tok_s: float) -> tuple[float, float]:
    """(typical, lower bound) seconds of generation on the bundled model."""
    typical = low = 0.0
    for name, st in summary["stages"].items():
        req = st.get("requests") or 0
        typical += req * ASSUMED_TOKENS.get(name, 0) / tok_s
        low += (st.get("completion_tokens") or 0) / tok_s
    return typical, low


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--characters", type=int, default=1400)
    ap.add_argument("--pairings", type=int, default=12, help="queries.pairings: turns ~ characters x pairings x 6")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--tok-s", type=float, default=190.0, help="bundled-model tokens/s for the real-run estimate")
    ap.add_argument("--quick", action="store_true", help="140 characters (~10k turns), 16 shards")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.characters, a.shards = 140, 16
    with tempfile.TemporaryDirectory(prefix="ditto-bench-") as tmp:
        tmp = Path(tmp)
        chars = write_characters(tmp / "chars.jsonl", a.characters)
        warm_up(tmp)
        r = run_once(tmp / "home", overrides(chars, a.shards, a.pairings, a.workers))
    s = r["summary"]
    turns = s["stages"]["responses"]["rows_out"]
    overhead = r["wall"] - r["stage_s"]
    typical, low = estimate_real_seconds(s, a.tok_s)
    res = {
        "characters": a.characters, "shards": s["num_shards"], "shard_tasks": r["shard_tasks"], "turns": turns,
        "rows": {k: v["rows_out"] for k, v in s["stages"].items()},
        "wall_s": round(r["wall"], 2), "stage_s": round(r["stage_s"], 2), "overhead_s": round(overhead, 2),
        "turns_per_s": round(turns / r["wall"], 1),
        "overhead_ms_per_shard": round(1000 * overhead / max(1, r["shard_tasks"]), 1),
        "real_run_estimate_s": round(typical, 1), "real_run_lower_bound_s": round(low, 1),
        "overhead_share_of_real_run": round(overhead / (typical + overhead), 4) if typical else None,
        "overhead_share_vs_lower_bound": round(overhead / (low + overhead), 4) if low else None,
        "tok_s_assumed": a.tok_s,
    }
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"orchestration: {turns} turns, {res['shards']} shards ({res['shard_tasks']} shard tasks), "
              f"wall {res['wall_s']} s, inside stages {res['stage_s']} s")
        print(f"  {res['turns_per_s']} turns/s; overhead {res['overhead_s']} s = "
              f"{res['overhead_ms_per_shard']} ms per shard task")
        print(f"  real run on the bundled model ~{res['real_run_estimate_s']} s at {a.tok_s} tok/s (assumed, not "
              f"measured; lower bound {res['real_run_lower_bound_s']} s): overhead share "
              f"{res['overhead_share_of_real_run']:.2%} (target <= 3%)")
    return res


if __name__ == "__main__":
    main()
