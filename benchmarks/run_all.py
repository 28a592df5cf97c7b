"""Run every benchmark and print one table. Each runs in its own process; a missing one is skipped with
a note. The engine benchmark loads a real model, so it runs under `flock /tmp/heavy.lock` when flock
exists (one heavy process at a time on a shared machine).

    python benchmarks/run_all.py            # full sizes (tens of minutes)
    python benchmarks/run_all.py --quick    # scaled down
    python benchmarks/run_all.py --skip engine_throughput
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _json_tail(out: str) -> dict:
    start = out.rfind("\n{")
    start = 0 if start < 0 and out.lstrip().startswith("{") else start
    try:
        return json.loads(out[start:])
    except ValueError:
        return {}


def _orchestration(d: dict) -> list[tuple[str, str, str]]:
    return [("turns/s", f"{d['turns_per_s']}", ""), ("overhead per shard task", f"{d['overhead_ms_per_shard']} ms", ""),
            ("overhead share of a real run", f"{d['overhead_share_of_real_run']:.2%}", "<= 3%"),
            ("turns / shards", f"{d['turns']} / {d['shards']}", "")]


def _rerun(d: dict) -> list[tuple[str, str, str]]:
    return [("rerun / full run", f"{d['rerun_over_full']:.1%}", f"<= {d['target']:.1%} (k/N + 5%)"),
            ("failed shards", f"{len(d['failed_shards'])}/{d['shards']}", ""),
            ("full run / rerun / no-op rerun", f"{d['full_s']} / {d['rerun_s']} / {d['noop_rerun_s']} s", ""),
            ("shards recomputed", json.dumps(d["recomputed_shards"]), "")]


def _memory(d: dict) -> list[tuple[str, str, str]]:
    rows = [(f"peak RSS {r['turns']} turns, {r['shards']} shards", f"{r['peak_rss_mb']} MB", "") for r in d["runs"]]
    return rows + [("RSS spread over shard counts", f"{d['rss_spread_over_shard_counts']:.2f}x", "flat (~1.0x)"),
                   (f"RSS growth for {d['turns_ratio']}x the turns", f"{d['rss_ratio']:.2f}x", "")]


def _filter(d: dict) -> list[tuple[str, str, str]]:
    flat = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, int | float) and any(w in prefix for w in ("per_s", "recall", "precision", "seconds")):
            flat.append((prefix, f"{v:.4g}", ""))
    walk("", d)
    return flat[:12]


def _lines(out: str, keys: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [(line.strip()[:60], line.strip()[60:], "") for line in out.splitlines()
            if any(k in line for k in keys)]


# name: (script, arguments, --quick arguments (None: left out of --quick), parser, heavy)
BENCHMARKS = {
    "orchestration": ("orchestration", ["--json"], ["--quick", "--json"], _orchestration, False),
    "rerun_cost": ("rerun_cost", ["--json"], ["--quick", "--json"], _rerun, False),
    "rerun_cost (bundled)": ("rerun_cost", ["--engine", "bundled", "--json"], None, _rerun, True),
    "memory": ("memory", ["--json"], ["--quick", "--json"], _memory, False),
    "filter_throughput": ("filter_throughput", [], ["--turns", "10000", "--planted", "200", "--identity-turns", "500"],
                          _filter, False),
    "engine_throughput": ("engine_throughput", [], ["--n", "64", "--repeats", "1", "--hf-n", "16"], None, True),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", action="append", default=[])
    a = ap.parse_args(argv)
    table: list[tuple[str, str, str, str]] = []
    for name, (script_name, full, quick, parse, heavy) in BENCHMARKS.items():
        script = HERE / f"{script_name}.py"
        if name in a.skip:
            table.append((name, "skipped (--skip)", "", ""))
            continue
        if a.quick and quick is None:
            table.append((name, "skipped in --quick", "", ""))
            continue
        if not script.exists():
            table.append((name, f"skipped: {script.name} is not there", "", ""))
            continue
        cmd = [sys.executable, str(script), *(quick if a.quick else full)]
        if heavy and shutil.which("flock"):
            cmd = ["flock", "/tmp/heavy.lock", *cmd]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        sec = time.perf_counter() - t0
        if p.returncode != 0:
            table.append((name, f"FAILED (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}", "", ""))
            continue
        rows = parse(_json_tail(p.stdout)) if parse else _lines(p.stdout, ("ratio", "speedup", "tok/s"))
        rows = rows or [("output", p.stdout.strip().splitlines()[-1][:80] if p.stdout.strip() else "-", "")]
        for metric, value, target in rows:
            table.append((name, metric, value, target))
        table.append((name, "benchmark wall time", f"{sec:.0f} s", ""))
    w = [max(len(r[i]) for r in table) for i in range(4)]
    head = ("benchmark", "metric", "value", "target")
    w = [max(w[i], len(head[i])) for i in range(4)]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    print("  ".join("-" * x for x in w))
    for r in table:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


if __name__ == "__main__":
    main()
