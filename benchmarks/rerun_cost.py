"""Cost of `ditto rerun` after k of N shards failed, against a full run, measured in one process (so
Prefect's temporary server starts once, and the models load once, in a warm-up run over the whole chain,
counted in neither time).

    full:   a clean run in its own home, then a rerun of it with nothing to do (the fixed cost)
    failed: the same input in another home where the characters of k shards carry a marker on which
            the engine fails permanently while a switch file exists: those shards fail at queries, their
            downstream shards stay missing
    rerun:  the switch removed, `rerun(run_id)` recomputes the failed and missing shards only

Target: rerun / full <= k/N + 5%.

Engines: `dry_run` (zero cost: what is left is orchestration, Parquet, filters and the global dedup step, the
worst case for this ratio) or `bundled` (the embedded demo config: SmolLM2-135M on vLLM, the LLM judge and
the embedding identity check on, characters from the bundled corpus; the fault comes from
engine.options.faults.permanent_on / permanent_while_exists).

    python benchmarks/rerun_cost.py                  # dry_run: 1400 characters, 32 shards, k = 4
    python benchmarks/rerun_cost.py --quick          # dry_run: 140 characters, 16 shards, k = 2
    python benchmarks/rerun_cost.py --engine bundled # 16 bundled characters, 8 shards, k = 1 (~10 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchestration import overrides  # noqa: E402

MARKER = "RERUNFAULT"


def characters(path: Path, rows: list[dict], shards: int, k: int) -> Path:
    """Write the characters as JSONL; those of shards 0..k-1 carry the marker in their description."""
    from models.ids import shard_of

    with open(path, "w") as fh:
        for c in rows:
            if shard_of(c["id"], shards) < k:
                c = {**c, "description": f"{c.get('description') or ''} {MARKER}".strip()}
            fh.write(json.dumps(c, ensure_ascii=False) + "\n")
    return path


def bundled_rows(per_category: int) -> list[dict]:
    """The demo's own selection from the bundled corpus (real and fictional, by popularity)."""
    from flows.stages import get_stage
    from models.config import load_config

    cfg = load_config(data={"characters": {"top_n": per_category}})
    rows, _ = get_stage("characters").collect(cfg)
    return [r.model_dump(mode="json") for r in rows]


def dry_run_setup(a, tmp: Path, switch: Path) -> tuple[dict, dict]:
    """(config for the clean run, config for the failing run): the dry-run engine, overrides as data."""
    from models.config import load_config
    from tasks.sources.synthetic import synthetic_characters

    chars = characters(tmp / "chars.jsonl", synthetic_characters(a.characters), a.shards, a.failed)
    ov = overrides(chars, a.shards, a.pairings, a.workers)
    if a.no_dedup:
        ov += ["dedup.exact=false", "dedup.near=false"]
    ok = load_config(overrides=ov).model_dump(mode="json")
    bad = load_config(overrides=[*ov, f"engine.options.faults={{rate: 0.0, kinds: [], permanent_on: {MARKER}, "
                                      f"permanent_while_exists: '{switch}'}}"])
    return ok, bad.model_dump(mode="json")


def bundled_setup(a, tmp: Path, switch: Path) -> tuple[dict, dict]:
    """The embedded demo config on jsonl characters; the same engine config (faults included, idle while the
    switch file is absent) for both runs, so one engine serves them all."""
    import yaml

    from flows.build import DEMO_CONFIG
    from models.config import load_config

    chars = characters(tmp / "chars.jsonl", bundled_rows(a.characters // 2), a.shards, a.failed)
    data = yaml.safe_load(DEMO_CONFIG.read_text()) or {}
    data["characters"] = {"source": "jsonl", "path": str(chars), "top_n": 10 ** 6}
    data["runner"] = {"num_shards": a.shards, "max_workers": a.workers}
    data["train"] = {"enabled": False}
    data["engine"] = {"options": {"faults": {"rate": 0.0, "kinds": [], "permanent_on": MARKER,
                                             "permanent_while_exists": str(switch)}}}
    if a.no_dedup:
        data.setdefault("filter", {})["dedup"] = {"exact": False, "near": False}
    cfg = load_config(data=data).model_dump(mode="json")
    return cfg, cfg


def warm_up(tmp: Path, cfg: dict) -> None:
    """The whole chain once on two characters of the benchmark's own kind: Prefect's temporary server,
    the engine, langid, the embedding model and the tokenizer load here, outside the timings."""
    from flows.build import RunFailed, run_build

    src = Path(cfg["characters"]["path"])
    few = tmp / "warm.jsonl"
    few.write_text("".join(src.read_text().splitlines(keepends=True)[:2]))
    warm = json.loads(json.dumps(cfg))
    warm["characters"]["path"] = str(few)
    warm["runner"]["num_shards"] = 1
    try:
        run_build(config=warm, home=tmp / "warm-home", run_id="warm")
    except RunFailed:
        pass  # two characters may leave too little for some stage: everything is loaded all the same


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["dry_run", "bundled"], default="dry_run")
    ap.add_argument("--characters", type=int, default=None, help="dry_run: 1400; bundled: 16")
    ap.add_argument("--pairings", type=int, default=12, help="dry_run only (bundled: the demo config's)")
    ap.add_argument("--shards", type=int, default=None, help="dry_run: 32; bundled: 8")
    ap.add_argument("--failed", type=int, default=None, help="k: shards that fail (dry_run: 4; bundled: 1)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--no-dedup", action="store_true", help="switch off run-wide dedup: its global step makes every "
                    "dedup shard depend on every filter shard")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    bundled = a.engine == "bundled"
    dflt = (16, 8, 1) if bundled else (140, 16, 2) if a.quick else (1400, 32, 4)
    a.characters = a.characters or dflt[0]
    a.shards = a.shards or dflt[1]
    a.failed = a.failed if a.failed is not None else dflt[2]
    from flows.build import RunFailed, rerun, run_build
    from storage.catalog import now
    from storage.reader import CatalogReader

    with tempfile.TemporaryDirectory(prefix="ditto-rerun-") as tmp:
        tmp = Path(tmp)
        switch = tmp / "fail-switch"
        ok, bad = (bundled_setup if bundled else dry_run_setup)(a, tmp, switch)
        warm_up(tmp, ok)
        t0 = time.perf_counter()
        run_build(config=ok, home=tmp / "full", run_id="full")
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        rerun("full", tmp / "full")  # nothing to do: the fixed cost of any rerun
        noop = time.perf_counter() - t0
        switch.write_text("1")
        t0 = time.perf_counter()
        try:
            run_build(config=bad, home=tmp / "failed", run_id="failing")
            raise SystemExit("the run was expected to fail")
        except RunFailed:
            pass
        failed_run = time.perf_counter() - t0
        with CatalogReader(tmp / "failed") as rd:
            failed = sorted(s["shard"] for s in rd.shards("failing", "queries") if s["status"] == "failed")
        switch.unlink()
        since = now()
        t0 = time.perf_counter()
        s = rerun("failing", tmp / "failed")
        rr = time.perf_counter() - t0
        assert s["status"] == "completed", s
        recomputed: dict[str, Any] = {}
        with CatalogReader(tmp / "failed") as rd:
            for sh in rd.shards("failing"):
                if sh["finished_at"] and sh["finished_at"] >= since:
                    recomputed[sh["stage"]] = recomputed.get(sh["stage"], 0) + 1
            rows = {st: sum(x["rows"] or 0 for x in rd.shards("failing", st)) for st in ("responses", "dedup")}
    frac = len(failed) / a.shards
    res = {"engine": a.engine, "shards": a.shards, "failed_shards": failed, "k_over_n": round(frac, 4),
           "turns": rows["responses"], "kept_turns": rows["dedup"], "full_s": round(full, 2),
           "failed_run_s": round(failed_run, 2), "rerun_s": round(rr, 2), "rerun_over_full": round(rr / full, 4),
           "target": round(frac + 0.05, 4), "within_target": rr / full <= frac + 0.05,
           "recomputed_shards": recomputed,
           "noop_rerun_s": round(noop, 2), "rerun_minus_noop_over_full": round((rr - noop) / full, 4)}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"rerun cost ({a.engine} engine, {rows['responses']} turns): {len(failed)}/{a.shards} shards failed "
              f"(k/N {frac:.1%}); full run {full:.2f} s, failed run {failed_run:.2f} s, rerun {rr:.2f} s")
        print(f"  shards recomputed by the rerun, per stage: {recomputed}")
        print(f"  a rerun with nothing to do takes {noop:.2f} s (flow start, source check, global prepare steps, "
              f"catalog); without it the rerun is {(rr - noop) / full:.1%} of the full run")
        print(f"  rerun / full = {rr / full:.1%} (target <= {frac + 0.05:.1%}: "
              f"{'met' if res['within_target'] else 'NOT met'})")
    return res


if __name__ == "__main__":
    main()
