"""Cost of `ditto rerun` after k of N shards failed, against a full run, measured in one process (so
Prefect's temporary server starts once, in a warm-up, and is not counted in either time).

    full:   a clean run in its own home, then a rerun of it with nothing to do (the fixed cost)
    failed: the same input in another home where the characters of k shards carry a marker on which
            the fake engine fails permanently (engine.options.fail_on, only while a switch file exists):
            those shards fail at queries, their downstream shards stay missing
    rerun:  the switch removed, `rerun(run_id)` recomputes the failed and missing shards only

Target: rerun / full <= k/N + 5%.

    python benchmarks/rerun_cost.py                  # 1400 characters, 32 shards, k = 4
    python benchmarks/rerun_cost.py --quick          # 140 characters, 16 shards, k = 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchestration import overrides, warm_up  # noqa: E402

MARKER = "RERUNFAULT"


def characters(path: Path, n: int, shards: int, k: int) -> tuple[Path, list[int]]:
    from models.ids import shard_of
    from tests.plugins.core import make_characters

    bad = list(range(k))
    with open(path, "w") as fh:
        for c in make_characters(n):
            if shard_of(c["id"], shards) in bad:
                c["description"] += f" {MARKER}"
            fh.write(json.dumps(c) + "\n")
    return path, bad


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--characters", type=int, default=1400)
    ap.add_argument("--pairings", type=int, default=12)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--failed", type=int, default=4, help="k: shards that fail")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--no-dedup", action="store_true", help="switch off the filter's run-wide dedup: its global "
                    "step makes every filter shard depend on every responses shard")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.characters, a.shards, a.failed = 140, 16, 2
    from flows.build import RunFailed, rerun, run_build
    from storage.reader import CatalogReader

    with tempfile.TemporaryDirectory(prefix="ditto-rerun-") as tmp:
        tmp = Path(tmp)
        warm_up(tmp)
        chars, bad = characters(tmp / "chars.jsonl", a.characters, a.shards, a.failed)
        ov = overrides(chars, a.shards, a.pairings, a.workers)
        if a.no_dedup:
            ov += ["filter.dedup.exact=false", "filter.dedup.near=false"]
        t0 = time.perf_counter()
        run_build(overrides=ov, home=tmp / "full", run_id="full")
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        rerun("full", tmp / "full")  # nothing to do: the fixed cost of any rerun
        noop = time.perf_counter() - t0
        switch = tmp / "fail-switch"
        switch.write_text("1")
        ov_fail = [*ov, f"engine.options.fail_on={MARKER}", f"engine.options.fail_while_exists={switch}"]
        t0 = time.perf_counter()
        try:
            run_build(overrides=ov_fail, home=tmp / "failed", run_id="failing")
            raise SystemExit("the run was expected to fail")
        except RunFailed:
            pass
        failed_run = time.perf_counter() - t0
        with CatalogReader(tmp / "failed") as rd:
            failed = sorted(s["shard"] for s in rd.shards("failing", "queries") if s["status"] == "failed")
        switch.unlink()
        from storage.catalog import now

        since = now()
        t0 = time.perf_counter()
        s = rerun("failing", tmp / "failed")
        rr = time.perf_counter() - t0
        assert s["status"] == "completed", s
        with CatalogReader(tmp / "failed") as rd:
            recomputed = {}
            for sh in rd.shards("failing"):
                if sh["finished_at"] and sh["finished_at"] >= since:
                    recomputed[sh["stage"]] = recomputed.get(sh["stage"], 0) + 1
    frac = len(failed) / a.shards
    res = {"shards": a.shards, "failed_shards": failed, "k_over_n": round(frac, 4), "full_s": round(full, 2),
           "failed_run_s": round(failed_run, 2), "rerun_s": round(rr, 2), "rerun_over_full": round(rr / full, 4),
           "target": round(frac + 0.05, 4), "within_target": rr / full <= frac + 0.05,
           "recomputed_shards": recomputed,
           "noop_rerun_s": round(noop, 2), "rerun_minus_noop_over_full": round((rr - noop) / full, 4)}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"rerun cost: {len(failed)}/{a.shards} shards failed (k/N {frac:.1%}); full run {full:.2f} s, "
              f"failed run {failed_run:.2f} s, rerun {rr:.2f} s")
        print(f"  shards recomputed by the rerun, per stage: {recomputed}")
        print(f"  a rerun with nothing to do takes {noop:.2f} s (source collect, global prepare steps, catalog); "
              f"without it the rerun is {(rr - noop) / full:.1%} of the full run")
        print(f"  rerun / full = {rr / full:.1%} (target <= {frac + 0.05:.1%}: "
              f"{'met' if res['within_target'] else 'NOT met'})")
    return res


if __name__ == "__main__":
    main()
