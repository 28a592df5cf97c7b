"""Catalog cost against history: registering a shard (mark_done, snapshot export included) and looking one
up for reuse (find_done) in a catalog that already holds 10k, 1M and 3M shard rows of earlier runs
(~a year of nightlies at 1,500 shards per stage). Target: flat within 2x from 10k to 3M rows.

Prints per history size the median milliseconds of each operation for this tree's catalog and, with
--baseline-ref, for the catalog of that commit (which rewrote every table's whole snapshot after each
change), and the ratios: each size against 10k, and the baseline against this tree.

    python benchmarks/catalog_cost.py                            # 10k, 1M, 3M; baseline 1a263ef
    python benchmarks/catalog_cost.py --sizes 10000 1000000 --ops 100 --baseline-ref none
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
STAGES = ["characters", "queries", "responses", "filter", "dedup", "sft_data"]
PER_STAGE = 1500
PER_RUN = PER_STAGE * len(STAGES)


def load_catalog_module(ref: str | None):
    """storage.catalog of this tree (ref None) or of a git commit, as a module."""
    if ref is None:
        import storage.catalog as mod

        return mod
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:storage/catalog.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"catalog_{ref}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, f"{ref}:storage/catalog.py", "exec"), mod.__dict__)  # noqa: S102 - our own source
    return mod


def fill_history(mod, home: Path, rows: int) -> None:
    """`rows` done shards over rows/9000 earlier runs, bulk-inserted, then one full snapshot (setup)."""
    cat = mod.Catalog(home)
    con = getattr(cat, "_con", cat.con)
    runs = max(1, -(-rows // PER_RUN))
    prefix = "" if hasattr(cat, "_rel") else str(home) + "/"  # this tree stores paths relative to the home
    con.execute(
        "INSERT INTO runs (run_id, status, dataset, config, config_hash, package_version, num_shards, until, "
        "started_at, finished_at) SELECT 'hist-' || lpad(i::VARCHAR, 6, '0'), 'completed', 'bench', '{}', 'c', "
        "'0.1.0', ?, 'sft_data', TIMESTAMP '2025-01-01' + to_days(i::INTEGER), "
        "TIMESTAMP '2025-01-01' + to_days(i::INTEGER) FROM range(?) t(i)", [PER_STAGE, runs])
    stages = "[" + ", ".join(f"'{s}'" for s in STAGES) + "]"
    con.execute(
        "INSERT INTO shards (run_id, stage, shard, input_hash, status, rows, path, bytes, rejects_path, "
        "rejected_rows, attempts, error, reused_from, stats, started_at, finished_at) "
        f"SELECT 'hist-' || lpad((i // {PER_RUN})::VARCHAR, 6, '0') AS run_id, "
        f"{stages}[((i // {PER_STAGE}) % {len(STAGES)}) + 1] AS stage, (i % {PER_STAGE})::INTEGER AS shard, "
        "md5(i::VARCHAR) AS h, 'done', 100, ? || 'runs/hist/' || md5(i::VARCHAR) || '/part-00000.parquet', 4096, "
        "NULL, 0, 1, NULL, NULL, '{\"rows_in\": 100, \"rows_out\": 100}', "
        f"TIMESTAMP '2025-01-01' + to_days((i // {PER_RUN})::INTEGER), "
        f"TIMESTAMP '2025-01-01' + to_days((i // {PER_RUN})::INTEGER) FROM range(?) t(i)", [prefix, rows])
    if hasattr(cat, "touch_all"):
        cat.touch_all()
    cat.snapshot(force=True)
    cat.close()


def measure(mod, homes: dict[int, Path], ops: int, sample_file: Path) -> dict[int, dict[str, float]]:
    """Median ms of mark_done (snapshot export forced each time: the worst case) and find_done, per history
    size. The catalogs of every size are open at once and the operations alternate between them, so the
    load of a shared machine falls on every size alike."""
    from storage.reader import CatalogReader
    from storage.shards import file_sha256

    cats = {n: mod.Catalog(h) for n, h in homes.items()}
    for cat in cats.values():
        cat.start_run("bench", "bench", {}, "c", "0.1.0", PER_STAGE)
    size, sha = sample_file.stat().st_size, file_sha256(sample_file)
    kw = {"sha256": sha} if "sha256" in mod.Catalog.mark_done.__code__.co_varnames else {}
    mark: dict[int, list[float]] = {n: [] for n in cats}
    find: dict[int, list[float]] = {n: [] for n in cats}
    for k in range(ops):
        for n, cat in cats.items():
            t = time.perf_counter()
            cat.mark_done("bench", "queries", k, f"bench-{k}", rows=100, path=str(sample_file), bytes_=size,
                          rejects_path=None, rejected_rows=0, stats={"rows_out": 100}, **kw)
            cat.snapshot(force=True)
            mark[n].append(time.perf_counter() - t)
            t = time.perf_counter()
            cat.find_done("responses", f"miss-{k}")  # the common case of a new shard: no earlier one
            find[n].append(time.perf_counter() - t)
    for cat in cats.values():
        cat.close()
    out = {}
    for n, h in homes.items():
        t = time.perf_counter()
        with CatalogReader(h) as rd:
            rd.shards("bench")
        read = time.perf_counter() - t
        out[n] = {"mark_done_ms": statistics.median(mark[n]) * 1e3, "find_done_ms": statistics.median(find[n]) * 1e3,
                  "register_ms": statistics.median(m + f for m, f in zip(mark[n], find[n], strict=True)) * 1e3,
                  "reader_open_and_query_ms": read * 1e3}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 3_000_000])
    ap.add_argument("--ops", type=int, default=50, help="registrations measured per size")
    ap.add_argument("--baseline-ref", default="1a263ef", help="commit of the catalog to compare; 'none' to skip")
    ap.add_argument("--baseline-ops", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ditto-catalog-cost-"))
    import pyarrow as pa

    from storage.shards import write_table

    sample = work / "sample.parquet"
    write_table(pa.table({"id": [str(i) for i in range(100)]}), sample)
    impls = {"this tree": (load_catalog_module(None), a.ops)}
    if a.baseline_ref.lower() != "none":
        impls[f"baseline {a.baseline_ref}"] = (load_catalog_module(a.baseline_ref), a.baseline_ops)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, (mod, ops) in impls.items():
        homes = {}
        for n in a.sizes:
            homes[n] = work / f"{name.replace(' ', '_')}-{n}"
            t = time.perf_counter()
            fill_history(mod, homes[n], n)
            print(f"{name:>18} history {n:>9,} rows: set up in {time.perf_counter() - t:.0f} s", flush=True)
        results[name] = measure(mod, homes, ops, sample)
        for n, r in results[name].items():
            print(f"{name:>18} history {n:>9,} rows: mark_done {r['mark_done_ms']:8.2f} ms  find_done "
                  f"{r['find_done_ms']:7.2f} ms  register {r['register_ms']:8.2f} ms  reader "
                  f"{r['reader_open_and_query_ms']:7.1f} ms  ({ops} ops)", flush=True)
        for h in homes.values():
            shutil.rmtree(h, ignore_errors=True)
    base = a.sizes[0]
    print(f"\nratios against {base:,} rows of history (target: register <= 2.0x at every size)")
    ok = True
    for name, by_size in results.items():
        for n, r in by_size.items():
            ratios = {k: r[k] / by_size[base][k] for k in ("mark_done_ms", "find_done_ms", "register_ms")}
            print(f"{name:>18} {n:>9,}: " + "  ".join(f"{k[:-3]} {v:5.2f}x" for k, v in ratios.items()))
            if name == "this tree" and ratios["register_ms"] > 2.0:
                ok = False
    if len(results) > 1:
        (bname, bres), = [(k, v) for k, v in results.items() if k != "this tree"]
        print(f"\n{bname} / this tree, per registration (mark_done + find_done)")
        for n in a.sizes:
            print(f"{n:>28,}: {bres[n]['register_ms'] / results['this tree'][n]['register_ms']:7.1f}x")
    (work / "catalog_cost.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {work / 'catalog_cost.json'}; flat within 2x: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
