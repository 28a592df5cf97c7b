"""Peak RSS of build_dataset with the zero-cost dry-run engine: by run size and by shard count.

Each configuration runs benchmarks/orchestration.py in a fresh subprocess; its peak RSS comes from
wait4's rusage (ru_maxrss), so runs do not share a high-water mark. The target is a peak that stays
flat as the shard count grows (shards stream: one shard's rows in memory per task in flight) and grows
far less than the turn count. Whole-run structures the flow still keeps (see the note printed at the
end) are what grows with the run.

Characters x pairings set the turns (~6 per pairing); 4 pairings keep every shard populated enough (>= 5
characters) that the turn count does not shrink as the shard count grows, so the shard counts compare
like for like.

    python benchmarks/memory.py                 # ~10k and ~100k turns; 100k at 16, 64 and 256 shards
    python benchmarks/memory.py --quick         # ~1k and ~10k turns; 10k at 4, 8 and 16 shards
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WHOLE_RUN_STRUCTURES = [
    "flows/build.py collect_source: the source stage's rows and rejects for the whole input, as a list "
    "(characters: ~1 row per character, small next to the turns)",
    "tasks/queries.py prepare: the POOL_COLUMNS of every character shard, to draw fallback partners",
    "tasks/filters/dedup.py prepare: run-wide dedup holds every turn id, exact hash and MinHash signature "
    "(num_perm x 4 bytes per turn: ~51 MB at 100k turns, 128 permutations) plus the decisions",
    "flows/build.py _Runner.stage: the catalog rows of a stage's shards and one job dict per shard "
    "(paths and hashes only)",
]


def peak_rss_mb(args: list[str]) -> tuple[float, dict]:
    proc = subprocess.Popen([sys.executable, str(HERE / "orchestration.py"), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"orchestration.py {' '.join(args)} failed ({status})")
    return usage.ru_maxrss / 1024, json.loads(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        small, big, shard_counts = 42, 420, [4, 8, 16]
    else:
        small, big, shard_counts = 420, 4200, [16, 64, 256]
    configs = [(small, shard_counts[1])] + [(big, s) for s in shard_counts]
    rows = []
    for chars, shards in configs:
        rss, res = peak_rss_mb(["--characters", str(chars), "--shards", str(shards), "--pairings", "4"])
        rows.append({"characters": chars, "turns": res["turns"], "shards": res["shards"], "peak_rss_mb": round(rss, 1),
                     "wall_s": res["wall_s"]})
        if not a.json:
            print(f"  {res['turns']:>7} turns, {res['shards']:>4} shards: peak RSS {rss:7.1f} MB "
                  f"(run {res['wall_s']} s)", flush=True)
    base = rows[0]
    by_shards = [r for r in rows[1:]]
    same = next(r for r in by_shards if r["shards"] == base["shards"])  # the big run at the small run's shards
    growth_turns = same["peak_rss_mb"] / base["peak_rss_mb"] if base["peak_rss_mb"] else 0
    turns_x = same["turns"] / max(1, base["turns"])
    spread = max(r["peak_rss_mb"] for r in by_shards) / min(r["peak_rss_mb"] for r in by_shards)
    if a.json:
        print(json.dumps({"runs": rows, "turns_ratio": round(turns_x, 2), "rss_ratio": round(growth_turns, 3),
                          "rss_spread_over_shard_counts": round(spread, 3),
                          "whole_run_structures": WHOLE_RUN_STRUCTURES}, indent=2))
    else:
        print(f"memory: {turns_x:.1f}x the turns at {base['shards']} shards -> {growth_turns:.2f}x peak RSS; across {len(by_shards)} shard counts the peak "
              f"varies by {spread:.2f}x (target: flat)")
        print("  whole-run structures still held in memory:")
        for s in WHOLE_RUN_STRUCTURES:
            print(f"   - {s}")
    return rows


if __name__ == "__main__":
    main()
