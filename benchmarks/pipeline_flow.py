"""Pipelined stages vs a stage-by-stage run of the real flow, on the GPU step-time engine.

The same characters, config and simulated engine (benchmarks/generation_sim.py: S decode slots, each step
t0 + k x running requests; completion lengths from a recorded run) go through
  pipelined: one `ditto run --until responses`: responses shard k starts when queries shard k is done;
  staged:    one invocation per stage on the same run (`--until characters`, then `--until queries`, ...),
             so every stage waits for the slowest shard of the previous one (the old flow's barrier).
It reports the generation phase's wall seconds (first queries task start to last responses task end, from
the shard timestamps the flow records) and the engine's busy seconds and mean running requests, then the
ratio staged / pipelined (> 1: pipelining saves that much wall time).

    python benchmarks/pipeline_flow.py [--top-n 8] [--shards 8] [--scale 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.generation_sim  # noqa: E402, F401 - registers engine kind "sim"
from engines.base import close_engines  # noqa: E402
from flows.build import run_build  # noqa: E402
from flows.stages import stages_until  # noqa: E402
from storage.reader import CatalogReader  # noqa: E402

GEN = ("queries", "responses")


def phase(home: Path, run_id: str) -> dict:
    with CatalogReader(home) as rd:
        m = {r["stage"]: r["metrics"] for r in rd.stage_stats(run_id)}
    starts = [m[s]["first_start"] for s in GEN if m[s].get("first_start")]
    ends = [m[s]["last_end"] for s in GEN if m[s].get("last_end")]
    busy = sum((m[s].get("engine") or {}).get("busy_seconds", 0) for s in GEN)
    area = sum((m[s].get("engine") or {}).get("busy_seconds", 0) * (m[s].get("engine") or {}).get("mean_running", 0)
               for s in GEN)
    return {"wall_s": max(ends) - min(starts), "stage_wall_s": sum(m[s]["wall_s"] for s in GEN),
            "tokens": sum(m[s]["completion_tokens"] for s in GEN), "engine_busy_s": busy,
            "mean_running": area / busy if busy else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top-n", type=int, default=8, help="bundled characters per language and category")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.2, help="real seconds per simulated second")
    ap.add_argument("--slots", type=int, default=64)
    a = ap.parse_args()
    ov = ["engine.kind=sim", f"engine.options.scale={a.scale}", f"engine.options.slots={a.slots}",
          "characters.source=bundled", f"characters.top_n={a.top_n}", f"runner.num_shards={a.shards}",
          f"runner.max_workers={a.shards}", "filter.identity.enabled=false"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("pipelined", "staged"):
            home = Path(tmp) / mode
            t0 = time.perf_counter()
            if mode == "pipelined":
                run_build(overrides=ov, home=home, run_id="bench", until="responses")
            else:
                for stage in stages_until("responses"):
                    run_build(overrides=ov, home=home, run_id="bench", until=stage)
            out[mode] = {**phase(home, "bench"), "total_s": time.perf_counter() - t0}
            close_engines()
    for mode, r in out.items():
        print(f"{mode:9s}: generation {r['wall_s']:.1f} s wall (stages' own {r['stage_wall_s']:.1f} s), "
              f"{r['tokens']} tokens, {r['tokens'] / r['wall_s']:.0f} tok/s; engine busy {r['engine_busy_s']:.1f} s, "
              f"mean running {r['mean_running']:.1f}; whole run {r['total_s']:.1f} s")
    print(json.dumps({m: {k: round(v, 3) for k, v in r.items()} for m, r in out.items()}))
    print(f"staged / pipelined generation wall: {out['staged']['wall_s'] / out['pipelined']['wall_s']:.2f}")


if __name__ == "__main__":
    main()
