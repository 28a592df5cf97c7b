"""Characters from a Wikidata JSON dump (the official entity format: a JSON array, one entity per
line, each line but the last ending with a comma; plain, gzip or bzip2), read in parallel.

Selection: P31 (instance of, non-deprecated) in {Q5 human -> real, Q15632617 fictional human,
Q95074 fictional character -> fictional}; Q5 wins if both appear. One candidate per configured
language that has a label in it (zh falls back to zh-hans, zh-cn, zh-hant, zh-tw, zh-hk, ...).
A selected person with a label in none of the configured languages is a `no_label` rejection naming
the entity and the language codes tried, if its popularity would have put it in a language's pool
(at most `top_n * pool_factor` such rejections: below the cut nothing is recorded).
popularity = number of sitelinks. While streaming, the `top_n * pool_factor` most popular
candidates per language are kept (bounded memory on the full dump); articles are then joined
through the `<lang>wiki` sitelink titles and `select` walks the ranking.

One pass, on every core (tasks/sources/dump.py splits the dump; `parse_chunk` in
tasks/sources/wikidata_parse.py runs in the workers): one search per chunk for the person classes;
an item line that mentions none is read for its labels only; any other line's head is decoded by
msgspec (id, type, wanted labels, P31), and a person of a configured category is decoded into what
its candidate needs. The labels go to an on-disk label table; a broken line goes the line-by-line
way (`parse_lines`: a line that mentions Q5/Q15632617/Q95074 or is a property is parsed in full, so
a broken one is reported; any other only for its labels). After the pass the labels the pools'
claims reference are read back from the table. Then the Wikipedia files.
The format is told by the magic bytes (a gzip file named .bz2 is read as gzip). Memory at full scale
(~110M entities, ~12M people): (workers + 3) x 16.5 MiB chunks in flight in a /dev/shm ring, the
per-language pools (top_n * pool_factor compact candidates each) and the decoder's buffers in the
reading process; each worker one chunk and its result: ~0.4 GB on 2 cores, ~8 GB on 64. The label
table (~165M rows for en+zh, ~3-4 GB of zstd Parquet, written by a background thread) lives under
<home>/sources/tmp during the pass. With a snapshot store (the flow) the pass's result is kept as
the dump's snapshot (tasks/sources/dump_snapshot.py) and an unchanged dump is not read again.

Claims are "property: value; value" lines (property and item labels in the character's language,
else English, else the id); datavalue types rendered: wikibase-entityid, time (by precision,
BCE for negative years), quantity (with its unit), string and monolingualtext. External ids,
media and urls are skipped; at most `max_claims` lines.

Bad inputs: a malformed JSON line or a line that is not UTF-8, among the lines parsed in full ->
rejection (`malformed` / `encoding`) naming the file, line (and byte offset) and the read goes on
(any other unreadable line can only have been a label source: counted as `unreadable_lines`); if no entity at all
could be read and lines were bad -> InputFormatError. A compressed stream that ends early ->
TruncatedInputError naming the file, the last line read and the entities read so far; with
`allow_truncated` those are kept and a `truncated` rejection is recorded. A plain .json without
its closing "]" gets the same `truncated` rejection (its cut last line is a `malformed` one).
"""

from __future__ import annotations

import heapq
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.config.characters import CharactersConfig
from models.records import Character, Rejection
from tasks.sources import InputFormatError, TruncatedInputError, reject, require_file, select
from tasks.sources.dump import (
    CHUNK_BYTES,
    StreamError,
    available_cores,
    decompressor,
    detect_format,
    no_gc,
    read_chunks,
)
from tasks.sources.wikidata_parse import LANGUAGE_FALLBACKS, scan_chunk
from tasks.sources.wikipedia import load_articles

log = logging.getLogger(__name__)

ENTITY_URL = "https://www.wikidata.org/wiki/"
LICENSE = "Wikidata: CC0 1.0; Wikipedia text: CC BY-SA 4.0"


def referenced_ids(claims: list[tuple[str, list]]) -> set[str]:
    ids = set()
    for pid, values in claims:
        ids.add(pid)
        for v in values:
            if v[0] == "item":
                ids.add(v[1])
            elif v[0] == "quantity" and v[2]:
                ids.add(v[2])
    return ids


def render_claims(claims: list[tuple[str, list]], labels: dict[str, dict[str, str]], lang: str,
                  limit: int, names: dict[str, str] | None = None) -> str:
    """labels: {id: {language: label}} as the label table holds them (a configured language, its
    fallbacks already applied, and en). names: a cache of rendered names for `lang` shared across calls
    (the pool's claims reference the same properties and items again and again)."""
    names = {} if names is None else names
    get_name, get_labels = names.get, labels.get

    def name(eid: str) -> str:
        got = get_name(eid)
        if got is None:
            known = get_labels(eid)
            got = names[eid] = (known.get(lang) or known.get("en") or eid) if known else eid
        return got

    lines = []
    for pid, values in claims[:limit]:
        rendered = []
        for v in values:
            kind = v[0]
            if kind == "item":
                rendered.append(get_name(v[1]) or name(v[1]))
            elif kind == "quantity":
                rendered.append(f"{v[1]} {name(v[2])}" if v[2] else v[1])
            else:
                rendered.append(v[1])
        lines.append(f"{get_name(pid) or name(pid)}: {'; '.join(dict.fromkeys(rendered))}")
    return "\n".join(lines)


LABEL_SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("label", pa.string()), ("line", pa.int64())])


KIND_DATA = pa.schema([("kind", pa.string()), ("data", pa.string())])


def _columns(schema: pa.Schema, *columns: list) -> pa.Table:
    # pa.table / from_pydict import pandas to check for DataFrames (seconds at start-up): build from arrays
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)



@dataclass
class DumpScan:
    """What one pass over a dump yields for a configuration: the ranked (language, candidate) pool, the
    labels its claims reference, the rejections, and read statistics."""

    entries: list[tuple[str, dict]]
    labels: dict[str, dict[str, str]]
    rejects: list[Rejection]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_table(self) -> pa.Table:
        """Rows of (kind, JSON): the entries and the labels one document each (one decode call for the
        whole pool: a row per entry cost ~1 s per 60k rows), a row per rejection, the stats."""
        encode = msgspec.json.Encoder().encode  # as json.dumps(ensure_ascii=False)
        rows = [("entries", encode([[lang, c] for lang, c in self.entries]).decode()),
                ("labels", encode(dict(sorted(self.labels.items()))).decode())]
        rows += [("reject", r.model_dump_json()) for r in self.rejects]
        rows.append(("stats", json.dumps(self.stats)))
        return _columns(KIND_DATA, [k for k, _ in rows], [d for _, d in rows])

    @classmethod
    def from_table(cls, table: pa.Table) -> DumpScan:
        scan = cls([], {}, [], {})
        decode = msgspec.json.decode
        for kind, data in zip(table.column("kind").to_pylist(), table.column("data").to_pylist(), strict=True):
            if kind == "entries":
                with no_gc():  # ~1M small objects at once: 4x faster without the collector's passes
                    scan.entries = [(lang, cand) for lang, cand in decode(data)]
            elif kind == "labels":
                with no_gc():
                    scan.labels = decode(data)
            elif kind == "reject":
                scan.rejects.append(Rejection.model_validate_json(data))
            elif kind == "stats":
                scan.stats = json.loads(data)
        return scan


def scan_params(cfg: CharactersConfig) -> dict[str, Any]:
    """The configuration a scan depends on (its snapshot key, with the dump's identity)."""
    return {"languages": list(cfg.languages), "categories": list(cfg.categories),
            "pool": cfg.top_n * cfg.pool_factor, "allow_truncated": cfg.allow_truncated}


class _LabelTable:
    """The pass's on-disk label table, written by one background thread (Parquet encodes and compresses
    without the GIL, beside the reading thread); one chunk's rows in flight at a time, so a failed write
    stops the pass at the next chunk."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(path, LABEL_SCHEMA, compression="zstd")
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="label-table")
        self.last: Future | None = None

    def add(self, rows: pa.Table) -> None:
        if self.last is not None:
            self.last.result()
        self.last = self.thread.submit(self.writer.write_table, rows)

    def close(self) -> None:
        try:
            if self.last is not None:
                self.last.result()
        finally:
            self.thread.shutdown(wait=True)
            self.writer.close()


def _label_rows(packed: tuple, base: int) -> pa.Table:
    """A chunk's label rows (scan_chunk's buffers) as a LABEL_SCHEMA table, lines offset by `base`."""
    n, *buffers, at = packed
    columns = [pa.StringArray.from_buffers(n, pa.py_buffer(buffers[k + 1]), pa.py_buffer(buffers[k]))
               for k in (0, 2, 4)]
    lines = pc.add(pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(at)]), base)
    return pa.Table.from_arrays([*columns, lines], schema=LABEL_SCHEMA)


def _lookup_labels(table_path: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """Labels of the wanted ids from the on-disk label table; the last occurrence in the dump wins."""
    found: dict[str, dict[str, str]] = {}
    if not wanted or not table_path.exists():
        return found
    value_set = pa.array(sorted(wanted), pa.string())
    seen: dict[str, int] = {}
    for batch in pq.ParquetFile(table_path).iter_batches(batch_size=1 << 16, use_threads=False):
        hit = batch.filter(pc.is_in(batch.column("id"), value_set=value_set))
        for eid, lang, label, line in zip(hit.column("id").to_pylist(), hit.column("lang").to_pylist(),
                                          hit.column("label").to_pylist(), hit.column("line").to_pylist(),
                                          strict=True):
            if seen.get(eid) != line:  # a later occurrence of the entity replaces the earlier one whole
                seen[eid] = line
                found[eid] = {}
            found[eid][lang] = label
    return found


def scan_dump(path: Path, cfg: CharactersConfig, *, workers: int | None = None, chunk_bytes: int = CHUNK_BYTES,
              workdir: Path | None = None, progress: Callable[[dict[str, Any]], None] | None = None) -> DumpScan:
    """One pass: persons ranked into bounded per-language pools, every entity's labels (configured
    languages + en) into an on-disk table, then the labels the pools' claims reference read back."""
    t0 = time.perf_counter()
    params = scan_params(cfg)
    pool = params["pool"]
    nl = len(cfg.languages)
    heaps: dict[str, list] = {lang: [] for lang in cfg.languages}
    unlabeled: list = []  # the `pool` most popular persons with no label in any configured language
    rejects: list[Rejection] = []
    fmt = detect_format(path)
    compressed = fmt != "plain"
    workers = workers if workers is not None else (cfg.read_workers or available_cores())
    lineno = parsed = bad = unreadable = 0
    first_problem = ""
    opened = closed = False

    def floors() -> dict[str, Any]:
        """params with the pools' floors now: a worker skips the persons that could no longer enter them."""
        return {**params, "floors": {"langs": {lang: h[0][0] for lang, h in heaps.items() if len(h) >= pool},
                                     "unlabeled": unlabeled[0][0] if len(unlabeled) >= pool else None}}

    tmp = Path(tempfile.mkdtemp(prefix="labels-", dir=workdir))
    table_path = tmp / "labels.parquet"
    writer = _LabelTable(table_path)
    try:
        try:
            # the collector paused for the pass: the pool's result thread unpickles ~10k small objects
            # a chunk, twice as fast without the collector's passes; nothing the pass keeps is cyclic
            loop_cpu = time.thread_time()
            with no_gc():
                for base, offset, res in read_chunks(path, scan_chunk, params, workers=workers,
                                                     chunk_bytes=chunk_bytes, fmt=fmt, progress=progress,
                                                     exact_salvage=cfg.allow_truncated, params_now=floors):
                    for i, kind, at, detail, text in res["bad"]:
                        bad += 1
                        n = base + i
                        if kind == "encoding":
                            problem = f"{path}: line {n}: not UTF-8 at byte offset {offset + at} ({detail})"
                        else:
                            problem = f"{path}: line {n}: malformed entity: {detail}"
                        first_problem = first_problem or problem
                        rejects.append(reject(f"{path.name}:{n}", kind, problem, text=text))
                    for i, cand in res["cands"]:
                        seq = (base + i) * nl
                        for k, lang in enumerate(cfg.languages):
                            if lang not in cand["langs"]:
                                continue
                            item = (cand["popularity"], -(seq + k), cand)
                            heap = heaps[lang]
                            if len(heap) < pool:
                                heapq.heappush(heap, item)
                            else:
                                heapq.heappushpop(heap, item)
                    for i, popularity, qid, other in res["unlabeled"]:
                        item = (popularity, -(base + i) * nl, qid, other)
                        if len(unlabeled) < pool:
                            heapq.heappush(unlabeled, item)
                        else:
                            heapq.heappushpop(unlabeled, item)
                    if res["labels"][0]:
                        # line = the entity's dump line: a later copy of an entity replaces its labels whole
                        writer.add(_label_rows(res["labels"], base))
                    parsed += res["parsed"]
                    unreadable += res["unreadable"]
                    opened = opened or res["opened"]
                    closed = closed or res["closed"]
                    lineno = base + res["lines"] - 1 if res["lines"] else lineno
            loop_cpu = time.thread_time() - loop_cpu
        except StreamError as exc:
            loop_cpu = time.thread_time() - loop_cpu
            lineno = exc.lines
            problem = (f"compressed stream ends early or is corrupt after line {lineno} ({parsed} entities read): "
                       f"{type(exc.cause).__name__}: {exc.cause}")
            if not cfg.allow_truncated:
                raise TruncatedInputError(path, problem) from exc.cause
            rejects.append(reject(f"{path.name}:{lineno}", "truncated", f"{path}: {problem}; kept what was read"))
            closed = True  # reported as truncated already
        finally:
            writer.close()
        if parsed == 0 and bad:
            raise InputFormatError(path, f"no entity could be read; first problem: {first_problem}")
        if opened and not closed:
            kind = "compressed stream" if compressed else "file"
            rejects.append(reject(f"{path.name}:{lineno}", "truncated",
                                  f"{path}: {kind} ends at line {lineno} without the closing ']' of the dump "
                                  f"({parsed} entities read); kept what was read"))

        # an unlabeled person is recorded only if its popularity would have put it in some language's pool:
        # rows below the cut are neither kept nor rejected (as in `select`), which also bounds the memory
        tried = [code for lang in cfg.languages for code in LANGUAGE_FALLBACKS.get(lang, [lang])]
        for popularity, _, qid, other in sorted(unlabeled, key=lambda e: (-e[0], -e[1])):
            if any(len(h) < pool or popularity > h[0][0] for h in heaps.values()):
                rejects.append(reject(qid, "no_label", f"entity {qid} has no label in the configured languages "
                                      f"(tried: {', '.join(tried)})", character_id=qid, text=other))
        # heap order is arbitrary; rank like the dump: popularity, then first seen
        ranked = sorted(((-neg_seq, lang, cand) for lang, heap in heaps.items() for _, neg_seq, cand in heap),
                        key=lambda e: (-e[2]["popularity"], e[0]))
        entries = [(lang, cand) for _, lang, cand in ranked]
        wanted = set().union(*(referenced_ids(c["claims"]) for _, c in entries)) if entries else set()
        labels = _lookup_labels(table_path, wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {"format": fmt, "decompressor": decompressor(fmt, workers), "workers": workers,
             "compressed_bytes": path.stat().st_size, "lines": lineno, "entities_parsed": parsed,
             "unreadable_lines": unreadable, "seconds": round(time.perf_counter() - t0, 3),
             # CPU of this thread while reading (decoder where it runs here, results, pools, label rows):
             # near `seconds`, the reading thread is what limits the pass, not the cores
             "read_thread_cpu_s": round(loop_cpu, 3)}
    log.info("wikidata %s: %d lines, %d entities read, %d candidates in %.1f s (%s, %d workers)",
             path.name, lineno, parsed, len(entries), stats["seconds"], stats["decompressor"], workers)
    return DumpScan(entries, labels, rejects, stats)



def _progress_reporter(info: dict[str, Any]) -> None:
    """Source progress to the flow's progress hooks (the CLI's bars) when the flow runs in this process."""
    import sys

    build = sys.modules.get("flows.build")
    emit = getattr(build, "_emit", None)
    if emit is not None:
        emit("source_progress", stage="characters", **info)


def collect(cfg: CharactersConfig, store: Any = None) -> tuple[list[Character], list[Rejection]]:
    """Characters from the dump (one parallel pass, or the dump's snapshot from `store` when this dump
    and scan configuration were read before) joined with the Wikipedia articles."""
    dump = require_file(cfg.wikidata_dump, "wikidata_dump", "wikidata")
    for f in cfg.wikipedia:
        require_file(f, "wikipedia", "wikidata")

    def build() -> pa.Table:
        return scan_dump(dump, cfg, workdir=store.tmp_dir() if store is not None else None,
                         progress=_progress_reporter).to_table()

    if store is not None:
        scan = DumpScan.from_table(store.load_or_build("wikidata-dump", [dump], {**scan_params(cfg),
                                                                                  "code": code_digest()}, build))
    else:
        scan = DumpScan.from_table(build())
    entries, labels = scan.entries, scan.labels

    wanted = {(lang, c["langs"][lang]["title"]) for lang, c in entries if c["langs"][lang]["title"]}
    articles = load_articles(cfg.wikipedia, cfg.wikipedia_hub, wanted, max_summary=cfg.max_summary_chars,
                             max_article=cfg.max_article_chars) if wanted and (cfg.wikipedia or cfg.wikipedia_hub) else {}

    characters = []
    names: dict[str, dict[str, str]] = {lang: {} for lang in cfg.languages}
    for lang, c in entries:
        info = c["langs"][lang]
        art = articles.get((lang, info["title"])) or {}
        url = art.get("url") or (f"https://{lang}.wikipedia.org/wiki/{info['title'].replace(' ', '_')}"
                                 if info["title"] else ENTITY_URL + c["id"])
        characters.append(Character(
            id=c["id"], label=info["label"], description=info["description"], aliases=info["aliases"],
            claims=render_claims(c["claims"], labels, lang, cfg.max_claims, names.setdefault(lang, {})),
            category=c["category"],
            language=lang, popularity=float(c["popularity"]), summary=art.get("summary", ""),
            article=art.get("article", ""), source="wikidata", license=LICENSE, url=url))
    kept, more = select(characters, cfg)
    return kept, list(scan.rejects) + more


def code_digest() -> str:
    """A hash of the code that decides a scan's output (this module and the reader)."""
    import hashlib

    from tasks.sources import dump, wikidata_parse

    h = hashlib.sha256()
    for mod_file in (__file__, wikidata_parse.__file__, dump.__file__):
        h.update(Path(mod_file).read_bytes())
    return h.hexdigest()[:16]
