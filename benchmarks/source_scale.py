"""Sourcing at dump scale: the characters stage over a synthetic Wikidata dump in the official layout
(a JSON array, one entity a line, ~13 KB per entity, ~11% people, claims referencing other items),
as .json.bz2, .json.gz and plain .json, against the plain decompressor on the same file and cores
(`bzcat` / `zcat` / `cat`) and the parallel library alone (indexed_bzip2 / rapidgzip).

    python benchmarks/source_scale.py --mb 300 [--dir DIR] [--workers N] [--formats bz2,gz,json]

Reported per format: MB/s of JSON and entities/s of the stage (first run: one parallel pass that
reads the dump; second run: a new run over the unchanged dump, served by the source snapshot), the
ratio to the parallel decompressor alone (indexed_bzip2 / rapidgzip on all cores; target >= 0.8) and,
where the stage picks another decoder (gzip on few cores: one isal thread), to that decoder alone,
second/first (target < 5%), peak memory of the reading process and of its largest worker, and the
projected hours for the full dump (1.4 TB of JSON, 110M entities) on 2, 16 and 64 cores. Projection:
CPU seconds per byte of the decompressor the stage picks on that many cores, alone (its threads
included), plus CPU seconds per byte of the workers' parse measured alone in one process (no
start-up, robust to other load on the machine; every person decoded, so an upper bound: in the stage
a person below the pools' floors is skipped), plus the reading thread's own CPU per byte in the pass,
spread over the cores, and never faster than the reading thread alone (its own work, plus the decoder
where that runs in it: isal on few cores). It assumes the parallel libraries and the parse scale
with cores (the parse is independent per chunk; indexed_bzip2 and rapidgzip report scaling to tens
of cores).
Every measurement runs in its own process (peak memory per measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL_JSON_BYTES = 1.4e12
FULL_ENTITIES = 110e6
WORDS = ("the of and in to was is for on as by with he at from his an were are which this be has or had first one "
         "their its new after who they have her she two been other when there all during into school time may years "
         "more most only over city some world would where later up such used many can state about national out "
         "known university united then made").split()
LANGS = ["en", "de", "fr", "es", "it", "zh", "ja", "ru", "nl", "pl", "pt", "sv", "uk", "ar", "fa", "ko"]


def _text(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def _ref(rnd: random.Random, n: int) -> dict:
    q = rnd.randint(1, n)
    return {"hash": f"{rnd.getrandbits(160):040x}", "snaks": {"P248": [{
        "snaktype": "value", "property": "P248", "datavalue": {
            "value": {"entity-type": "item", "numeric-id": q, "id": f"Q{q}"}, "type": "wikibase-entityid"},
        "datatype": "wikibase-item"}]}, "snaks-order": ["P248"]}


def make_entity(i: int, rnd: random.Random, n: int, person_share: float) -> dict:
    qid = f"Q{i}"
    k = rnd.randint(2, len(LANGS))
    labels = {lang: {"language": lang, "value": f"{_text(rnd, 2).title()} {i}"} for lang in LANGS[:k]}
    descs = {lang: {"language": lang, "value": _text(rnd, rnd.randint(2, 6))} for lang in LANGS[:rnd.randint(1, k)]}
    claims: dict[str, list] = {}
    for _ in range(rnd.randint(14, 26)):
        pid = f"P{rnd.randint(1, 3000)}"
        tgt = rnd.randint(1, n)
        claims.setdefault(pid, []).append({
            "mainsnak": {"snaktype": "value", "property": pid, "hash": f"{rnd.getrandbits(160):040x}",
                         "datatype": "wikibase-item", "datavalue": {
                             "value": {"entity-type": "item", "numeric-id": tgt, "id": f"Q{tgt}"},
                             "type": "wikibase-entityid"}},
            "type": "statement", "id": f"{qid}${str(uuid.UUID(int=rnd.getrandbits(128))).upper()}", "rank": "normal",
            "references": [_ref(rnd, n)]})
    if rnd.random() < person_share:
        cls = 5 if rnd.random() < 0.85 else 95074
        claims["P31"] = [{"mainsnak": {"snaktype": "value", "property": "P31", "datatype": "wikibase-item",
                                       "datavalue": {"value": {"entity-type": "item", "numeric-id": cls,
                                                               "id": f"Q{cls}"}, "type": "wikibase-entityid"}},
                          "type": "statement", "rank": "normal"}]
        born = rnd.randint(1500, 2000)
        claims["P569"] = [{"mainsnak": {"snaktype": "value", "property": "P569", "datatype": "time", "datavalue": {
            "value": {"time": f"+{born}-01-01T00:00:00Z", "timezone": 0, "before": 0, "after": 0, "precision": 9,
                      "calendarmodel": "http://www.wikidata.org/entity/Q1985727"}, "type": "time"}},
                           "type": "statement", "rank": "normal"}]
    sitelinks = {f"{lang}wiki": {"site": f"{lang}wiki", "title": labels[lang]["value"], "badges": []}
                 for lang in LANGS[:rnd.randint(0, k)]}
    return {"type": "item", "id": qid, "labels": labels, "descriptions": descs, "aliases": {}, "claims": claims,
            "sitelinks": sitelinks, "lastrevid": rnd.randint(1, 2_000_000_000)}


def write_dump(path: Path, mb: float, person_share: float = 0.11, seed: int = 1) -> dict:
    """Write ~mb MB of dump; return {entities, bytes}. Items referenced by claims are in the dump."""
    rnd = random.Random(seed)
    target = int(mb * 1e6)
    n_est = max(10, target // 13_000)
    tmp = path.with_suffix(".tmp")
    n = size = 0
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        pending = None
        while size < target:
            n += 1
            line = json.dumps(make_entity(n, rnd, n_est, person_share), separators=(",", ":"), ensure_ascii=False)
            if pending is not None:
                fh.write(pending + ",\n")
            pending = line
            size += len(line) + 2
        fh.write(pending + "\n]\n")
    os.replace(tmp, path)
    return {"entities": n, "bytes": path.stat().st_size}


def prepare(dirpath: Path, mb: float, formats: list[str]) -> dict:
    dirpath.mkdir(parents=True, exist_ok=True)
    plain = dirpath / "latest-all.json"
    meta_file = dirpath / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("mb") != mb or not plain.exists():
        t0 = time.perf_counter()
        meta = {"mb": mb, **write_dump(plain, mb)}
        meta["generate_s"] = round(time.perf_counter() - t0, 1)
        for f in ("latest-all.json.bz2", "latest-all.json.gz"):
            (dirpath / f).unlink(missing_ok=True)
    for fmt, tool in (("bz2", ["bzip2", "-9", "-c"]), ("gz", ["gzip", "-6", "-c"])):
        out = dirpath / f"latest-all.json.{fmt}"
        if fmt in formats and not out.exists():
            with open(str(out) + ".tmp", "wb") as fh:
                subprocess.run([*tool, str(plain)], stdout=fh, check=True)
            os.replace(str(out) + ".tmp", out)
    meta["files"] = {f.name: f.stat().st_size for f in sorted(dirpath.glob("latest-all.json*"))}
    meta_file.write_text(json.dumps(meta))
    return meta


def _peak() -> dict:
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def child_decompress(path: str, threads: int, parallel: bool = True) -> dict:
    """The decompressor alone: the block-parallel library (parallel) or the one the stage picks."""
    from tasks.sources.dump import decompressor, detect_format, open_stream

    fmt = detect_format(path)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    with open_stream(path, fmt, threads, parallel=parallel) as (stream, _):
        while block := stream.read(4 << 20):
            n += len(block)
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "json_bytes": n,
            "library": decompressor(fmt, threads, parallel), **_peak()}


def child_parse(path: str) -> dict:
    """CPU seconds of the workers' job alone (prefilter + parse of 16 MiB chunks), in one process: what
    the parse costs per byte independent of start-up and of other load on the machine."""
    from tasks.sources.dump import CHUNK_BYTES, read_range
    from tasks.sources.wikidata_parse import parse_chunk

    params = {"languages": ["en", "zh"], "categories": ["real", "fictional"]}
    size = Path(path).stat().st_size
    cpu = 0.0
    people = 0
    for start in range(0, size, CHUNK_BYTES):
        _, data = read_range(path, start, start + CHUNK_BYTES)
        c0 = time.process_time()
        out = parse_chunk(data, params)
        cpu += time.process_time() - c0
        people += len(out["cands"]) + len(out["unlabeled"])
    return {"cpu_s": cpu, "json_bytes": size, "people": people}


def child_stage(path: str, workers: int, home: str, known_file: str | None) -> dict:
    import pandas  # noqa: F401 - loaded in the flow process already (pyarrow imports it on first use)

    from models.config import load_config
    from tasks.characters import CharactersStage

    run = load_config(data={"characters": {"source": "wikidata", "wikidata_dump": path, "languages": ["en", "zh"],
                                           "top_n": 1000, "read_workers": workers}})
    from tasks.sources import wikidata

    known = json.loads(Path(known_file).read_text()) if known_file else []
    scan_dump, passes = wikidata.scan_dump, []

    def timed_scan(*args, **kw):  # the pass over the dump, apart from the per-run work around it
        t = time.perf_counter()
        out = scan_dump(*args, **kw)
        passes.append((time.perf_counter() - t, out.stats["read_thread_cpu_s"]))
        return out

    wikidata.scan_dump = timed_scan
    t0, c0 = time.perf_counter(), time.thread_time()
    p0 = time.process_time()
    rows, rejects, used = CharactersStage().collect_pinned(run, home, {"known": known}, "bench")
    seconds = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"seconds": seconds, "pass_seconds": sum(w for w, _ in passes),
           "pass_reading_thread_cpu_s": sum(c for _, c in passes), "reading_thread_cpu_s": time.thread_time() - c0,
           "process_cpu_s": time.process_time() - p0, "workers_cpu_s": children.ru_utime + children.ru_stime,
           "rows": len(rows), "rejects": len(rejects), "new_snapshots": sum(1 for m in used if m["new"]),
           **_peak()}
    Path(home, "used.json").write_text(json.dumps(used))
    return out


def _child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _time_cli(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(cmd, stdout=null, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=300.0, help="MB of JSON in the synthetic dump")
    ap.add_argument("--dir", default="/tmp/ditto-source-scale")
    ap.add_argument("--workers", type=int, default=0, help="cores used (0 = all available)")
    ap.add_argument("--formats", default="bz2,gz,json")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "decompress":
            res = child_decompress(rest[0], int(rest[1]), rest[2] == "parallel")
        elif kind == "parse":
            res = child_parse(rest[0])
        else:
            res = child_stage(rest[0], int(rest[1]), rest[2], rest[3] if len(rest) > 3 and rest[3] != "-" else None)
        print(json.dumps(res))
        return

    from tasks.sources.dump import available_cores, decompressor

    cores = a.workers or available_cores()
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    d = Path(a.dir)
    meta = prepare(d, a.mb, formats)
    json_bytes, entities = meta["bytes"], meta["entities"]
    load = os.getloadavg()[0]
    print(f"synthetic dump: {json_bytes / 1e6:.0f} MB of JSON, {entities} entities "
          f"({json_bytes / entities / 1e3:.1f} KB each), files {meta['files']}; {cores} cores, load {load:.1f}")
    results = {"meta": meta, "cores": cores, "load_before": load, "formats": {}}
    parse = _child(["parse", str(d / "latest-all.json")])
    parse_cpu_per_byte = parse["cpu_s"] / parse["json_bytes"]
    results["parse"] = parse
    print(f"parse alone (prefilter + JSON of the people + labels of all): {parse['cpu_s']:.2f} CPU s = "
          f"{parse['json_bytes'] / parse['cpu_s'] / 1e6:.0f} MB/s per core, {parse['people']} people")
    cli = {"bz2": ["bzcat"], "gz": ["zcat"], "json": ["cat"]}
    for fmt in formats:
        path = d / ("latest-all.json" if fmt == "json" else f"latest-all.json.{fmt}")
        r: dict = {"file_bytes": path.stat().st_size}
        r["cli_s"] = _time_cli([*cli[fmt], str(path)])
        if fmt != "json":
            r["library"] = _child(["decompress", str(path), str(cores), "parallel"])
            r["stage_library"] = _child(["decompress", str(path), str(cores), "stage"])
        home = d / f"home-{fmt}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        r["first"] = _child(["stage", str(path), str(cores), str(home), "-"])
        shutil.copy(home / "used.json", d / f"known-{fmt}.json")
        r["second"] = _child(["stage", str(path), str(cores), str(home), str(d / f"known-{fmt}.json")])
        first = r["first"]["seconds"]
        r["stage_mb_s"] = json_bytes / first / 1e6
        r["stage_entities_s"] = entities / first
        r["cli_mb_s"] = json_bytes / r["cli_s"] / 1e6
        base = r["library"]["seconds"] if fmt != "json" else r["cli_s"]
        r["vs_parallel_decompressor"] = base / first
        r["pass_vs_parallel_decompressor"] = base / r["first"]["pass_seconds"]
        r["vs_cli"] = r["cli_s"] / first
        if fmt != "json":
            r["vs_stage_decompressor"] = r["stage_library"]["seconds"] / first
        r["second_over_first"] = r["second"]["seconds"] / first
        cpu = r["first"]["process_cpu_s"] + r["first"]["workers_cpu_s"]
        serial = r["first"]["reading_thread_cpu_s"]
        decomp_per_byte = r["stage_library"]["cpu_s"] / json_bytes if fmt != "json" else 0.0
        parallel_per_byte = r["library"]["cpu_s"] / json_bytes if fmt != "json" else 0.0
        r["cpu_per_mb"] = {"decompress": decomp_per_byte * 1e6, "parse": parse_cpu_per_byte * 1e6}
        # the reading thread's own work per byte in the pass (piece copies, results, pools, label rows),
        # apart from a decoder that runs in it (isal on few cores): serial whatever the cores
        in_thread = decomp_per_byte if fmt == "gz" and r["stage_library"]["library"].startswith("isal") else 0.0
        reader_per_byte = max(0.0, r["first"]["pass_reading_thread_cpu_s"] / json_bytes - in_thread)
        r["cpu_per_mb"]["reading_thread"] = reader_per_byte * 1e6
        r["projected_hours"] = {}
        for c in (2, 16, 64):
            # the decompressor the stage picks on c cores; a one-thread one runs in the reading thread
            one_thread = fmt == "gz" and not decompressor("gzip", c).startswith("rapidgzip")
            per_byte = decomp_per_byte if one_thread or fmt != "gz" else parallel_per_byte
            floor = reader_per_byte + (per_byte if one_thread else 0.0)
            seconds = FULL_JSON_BYTES * max((per_byte + parse_cpu_per_byte + reader_per_byte) / c, floor)
            r["projected_hours"][str(c)] = round(seconds / 3600, 2)
        results["formats"][fmt] = r
        lib = f"{r['library']['library']} alone {json_bytes / r['library']['seconds'] / 1e6:.1f} MB/s" \
            if fmt != "json" else "no decompressor"
        print(f"\n[{fmt}] {path.name} ({r['file_bytes'] / 1e6:.1f} MB)")
        print(f"  {cli[fmt][0]}: {r['cli_mb_s']:.1f} MB/s of JSON ({r['cli_s']:.1f} s); {lib}")
        print(f"  characters stage, first run: {first:.1f} s = {r['stage_mb_s']:.1f} MB/s of JSON, "
              f"{r['stage_entities_s']:.0f} entities/s; peak RSS {r['first']['peak_rss_mb']:.0f} MB "
              f"(largest worker {r['first']['peak_worker_rss_mb']:.0f} MB)")
        own = ""
        if fmt != "json" and r["stage_library"]["library"] != r["library"]["library"]:
            own = (f"; the stage decompresses with {r['stage_library']['library']}, alone "
                   f"{json_bytes / r['stage_library']['seconds'] / 1e6:.1f} MB/s: ratio {r['vs_stage_decompressor']:.2f}")
        print(f"  ratio to the parallel decompressor alone: {r['vs_parallel_decompressor']:.2f} (target >= 0.8); "
              f"to {cli[fmt][0]}: {r['vs_cli']:.2f}{own}")
        pass_s = r["first"]["pass_seconds"]
        print(f"  of which the pass over the dump (decompress, parse, pools, label table): {pass_s:.1f} s = "
              f"{json_bytes / pass_s / 1e6:.1f} MB/s: ratio {r['pass_vs_parallel_decompressor']:.2f}; the rest "
              f"({first - pass_s:.1f} s: pool rendering, snapshots, selection) grows with top_n, not with the dump")
        print(f"  second run (unchanged dump): {r['second']['seconds']:.2f} s = "
              f"{100 * r['second_over_first']:.1f}% of the first (target < 5%), "
              f"new snapshots {r['second']['new_snapshots']}")
        print(f"  CPU of the stage: {cpu:.1f} s (workers' start-up included), reading thread {serial:.1f} s; "
              f"per MB of JSON: decompress {r['cpu_per_mb']['decompress'] * 1e3:.1f} ms + parse "
              f"{r['cpu_per_mb']['parse'] * 1e3:.1f} ms + reading thread {reader_per_byte * 1e9:.2f} ms (serial); "
              f"projected full dump (1.4 TB JSON): " +
              ", ".join(f"{c} cores {h} h" for c, h in r["projected_hours"].items()))
    results["load_after"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
