"""Exact and near-duplicate detection across the whole run (the `dedup` stage's algorithm).

Signatures: tokens (words; CJK characters) -> n-gram shingles hashed to uint32 -> MinHash with datasketch's
"affine32" scheme (its permutations, its murmur3 pre-mix; `minhash_batch` equals datasketch's
`MinHash.update_batch` value for value, vectorised over many documents). The LSH banding parameters are
datasketch's optimum for the threshold (`MinHashLSH(threshold, num_perm).b, .r`).

The global step streams the filter stage's sessions shard by shard (only turns that passed every per-turn
filter, answers as kept), writes one signature table per shard under
`<home>/runs/<run>/dedup_global/signatures/`, then runs one banding pass over all of them in NumPy instead
of datasketch's dict-of-lists index, and writes each shard's decisions (turn id -> exact_dup/near_dup of
which id) under `dedup_global/decisions/<key>/`. Both are catalog artifacts (storage/artifacts.py) under
content keys: a shard's signatures under its file's sha256 and the signature settings, the decisions under
every input shard's sha256 and the dedup settings; a whole registered one is reused, from any run.

Memory at 128 permutations: signatures are 512 bytes per turn (36k turns: 18 MiB; 3.6M turns: 1.8 GiB),
plus per band one uint64 key and a few int64 index arrays per turn (~150 MiB at 3.6M), and the turn ids as
Python strings (~400 MiB at 3.6M). Peak ~3 GiB for 3.6M turns, well within 24 GiB; nothing grows with the
number of bands, which are processed one at a time.
Time is dominated by signing (vectorised, ~tens of thousands of turns/s per core).

The kept copy of a duplicate group is the one with the smallest turn id (content hash: stable from run to
run and independent of sharding). Only turns that passed the per-turn filters take part, so a copy that
failed any of them never suppresses a good one.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from models.base import Record, arrow_schema, to_table
from models.config.dedup import DedupConfig
from models.ids import content_hash
from storage import artifacts
from storage.layout import RunLayout
from storage.shards import file_sha256, write_table
from tasks.base import Prepared
from tasks.filters.text import exact_hash, tokens

_U32 = np.uint32
_FMIX = (_U32(16), _U32(0x85EBCA6B), _U32(13), _U32(0xC2B2AE35), _U32(16))
_MIX = _U32(0x01000193)
EMPTY = np.iinfo(np.uint32).max
ALGO = 2  # the signature algorithm's version: a change re-signs every shard


class DedupDecision(Record):
    """One dropped turn of the global step (the decisions files' rows)."""

    id: str = Field(description="the dropped turn")
    filter: Literal["exact_dup", "near_dup"]
    dup_of: str = Field(description="the kept copy's turn id")
    score: float = Field(description="1.0 for exact duplicates, else the estimated Jaccard")


DECISION_SCHEMA = arrow_schema(DedupDecision)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch's pre-mix for the affine32 scheme)."""
    s1, m1, s2, m2, s3 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return np.asarray(a, dtype=_U32), np.asarray(b, dtype=_U32)


@cache
def lsh_params(threshold: float, num_perm: int, bands: int | None) -> tuple[int, int]:
    """(bands, rows per band)."""
    if bands:
        return bands, num_perm // bands
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def shingles(text: str, n: int) -> np.ndarray:
    """Distinct uint32 hashes of the text's token n-grams (the whole text if shorter than n tokens)."""
    toks = tokens(text)
    if not toks:
        return np.empty(0, dtype=_U32)
    th = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in toks), dtype=_U32, count=len(toks))
    m = max(1, len(th) - n + 1)
    h = th[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, min(n, len(th))):
            h = (h * _MIX) ^ th[j:j + m]
    return np.unique(h)


def _minhash_concat(hv: np.ndarray, lens: np.ndarray, num_perm: int, seed: int, chunk: int) -> np.ndarray:
    """Signatures of documents whose shingle hashes lie back to back in `hv` (doc i has lens[i] of them)."""
    a, b = permutations(num_perm, seed)
    out = np.full((len(lens), num_perm), EMPTY, dtype=_U32)
    ends = np.cumsum(lens)
    doc = 0
    while doc < len(lens):
        # group documents up to about `chunk` shingles: bounds the (shingles x num_perm) temporary
        lo = ends[doc] - lens[doc]
        stop = max(doc + 1, int(np.searchsorted(ends, lo + chunk, side="right")))
        part = lens[doc:stop]
        nonempty = np.flatnonzero(part)
        if len(nonempty):
            h = fmix32(hv[lo:ends[stop - 1]])
            with np.errstate(over="ignore"):
                phv = h[:, None] * a[None, :] + b[None, :]
            offsets = (np.cumsum(part) - part)[nonempty]
            out[doc + nonempty] = np.minimum.reduceat(phv, offsets, axis=0)
        doc = stop
    return out


def minhash_batch(shingle_sets: list[np.ndarray], num_perm: int, seed: int, chunk: int = 1 << 16) -> np.ndarray:
    """Signatures (len(sets) x num_perm, uint32) of many shingle sets at once; an empty set gives all-max."""
    lens = np.fromiter((len(x) for x in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    hv = np.concatenate(shingle_sets).astype(_U32) if len(shingle_sets) else np.empty(0, _U32)
    return _minhash_concat(hv, lens, num_perm, seed, chunk)


def signatures(texts: list[str], cfg: DedupConfig, batch: int = 8192, chunk: int = 8192) -> np.ndarray:
    """MinHash signatures of texts, vectorised: the same values as `minhash_batch([shingles(t, n) ...])`
    (a min over a multiset equals the min over its set, so shingles need no de-duplication)."""
    n = cfg.shingle
    out = np.empty((len(texts), cfg.num_perm), dtype=_U32)
    for start in range(0, len(texts), batch):
        toks = [tokens(t) for t in texts[start:start + batch]]
        lens = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        total = int(lens.sum())
        th = np.fromiter((zlib.crc32(w.encode("utf-8")) for ts in toks for w in ts), dtype=_U32, count=total)
        ends = np.repeat(np.cumsum(lens), lens)
        starts = ends - np.repeat(lens, lens)
        pos = np.arange(total)
        h = th.copy()
        with np.errstate(over="ignore"):
            for j in range(1, n):
                nxt = np.zeros(total, dtype=_U32)
                nxt[:total - j] = th[j:]
                inside = pos + j < ends
                h = np.where(inside, (h * _MIX) ^ nxt, h)
        valid = (pos + n <= ends) | ((pos == starts) & (ends - starts < n))
        out[start:start + len(toks)] = _minhash_concat(
            h[valid], np.minimum(lens, np.maximum(lens - n + 1, 1)), cfg.num_perm, cfg.seed, chunk)
    return out


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index (= the earlier rank) stays the root
            self.parent[max(ri, rj)] = min(ri, rj)


def _band_keys(sig: np.ndarray, lo: int, hi: int) -> np.ndarray:
    cols = sig[:, lo:hi].astype(np.uint64)
    key = np.zeros(len(sig), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(cols.shape[1]):
            key = (key * np.uint64(0x100000001B3)) ^ cols[:, j]
            key ^= key >> np.uint64(29)
    return key


def near_duplicates(sig: np.ndarray, threshold: float, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `sig` are in keep-priority order (row 0 is kept first). Returns (leader, jaccard): leader[i]
    is the row i duplicates (i itself when it is kept) and the estimated Jaccard to it."""
    n = len(sig)
    if n == 0:  # no turn survived the per-turn chain (or min_turns dropped every session): nothing to compare
        return np.empty(0, dtype=np.int64), np.ones(0)
    uf = _UnionFind(n)
    nonempty = sig[:, 0] != EMPTY
    for band in range(bands):
        keys = _band_keys(sig, band * rows, (band + 1) * rows)
        order = np.lexsort((np.arange(n), keys))
        ks = keys[order]
        starts = np.concatenate([[True], ks[1:] != ks[:-1]])
        run_id = np.cumsum(starts) - 1
        first = order[np.flatnonzero(starts)][run_id]  # the smallest row of each bucket
        cand = np.flatnonzero((first != order) & nonempty[order])
        if not len(cand):
            continue
        i, j = order[cand], first[cand]
        step = 1 << 16
        for s in range(0, len(i), step):
            ii, jj = i[s:s + step], j[s:s + step]
            sim = (sig[ii] == sig[jj]).mean(axis=1)
            for x, y in zip(ii[sim >= threshold].tolist(), jj[sim >= threshold].tolist(), strict=True):
                uf.union(x, y)
    leader = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    jac = np.ones(n)
    dup = np.flatnonzero(leader != np.arange(n))
    if len(dup):
        jac[dup] = (sig[dup] == sig[leader[dup]]).mean(axis=1)
    return leader, jac


def decide(ids: list[str], exact: np.ndarray, sig: np.ndarray, cfg: DedupConfig) -> list[dict[str, Any]]:
    """Duplicate decisions over all turns (ids in any order): one row per dropped turn."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids_sorted = [ids[i] for i in order]
    out: list[dict[str, Any]] = []
    alive = np.ones(len(ids), dtype=bool)
    if cfg.exact and len(ids):
        _, first, inverse = np.unique(exact[order], return_index=True, return_inverse=True)
        first_of = first[inverse.reshape(-1)]
        for r in np.flatnonzero(first_of != np.arange(len(ids))).tolist():
            alive[r] = False
            out.append({"id": ids_sorted[r], "filter": "exact_dup", "dup_of": ids_sorted[first_of[r]], "score": 1.0})
    if cfg.near:
        rows = np.flatnonzero(alive)
        b, r = lsh_params(cfg.threshold, cfg.num_perm, cfg.bands)
        leader, jac = near_duplicates(sig[order[rows]], cfg.threshold, b, r)
        for k in np.flatnonzero(leader != np.arange(len(rows))):
            out.append({"id": ids_sorted[rows[k]], "filter": "near_dup", "dup_of": ids_sorted[rows[leader[k]]],
                        "score": round(float(jac[k]), 4)})
    return out


# ---- the global step ---------------------------------------------------------------------------------

def _signature_table(path: str, dcfg: DedupConfig) -> pa.Table:
    """Turn ids, exact hashes and signatures of the turns in one shard of sessions."""
    turns = pc.list_flatten(pq.read_table(path, columns=["turns"]).column("turns"))
    ids = pc.struct_field(turns, "turn_id").to_pylist()
    texts = pc.struct_field(turns, "answer").to_pylist()
    sig = signatures(texts, dcfg)
    flat = pa.array(sig.reshape(-1), type=pa.uint32())
    return pa.table({"id": pa.array(ids, pa.string()),
                     "exact": pa.array([exact_hash(x) for x in texts], pa.int64()),
                     "sig": pa.FixedSizeListArray.from_arrays(flat, dcfg.num_perm)})


def _turn_count(path: str) -> int:
    """Turns in a shard of sessions, from the Parquet footer (values of the turns.turn_id leaf column)."""
    meta = pq.read_metadata(path)
    col = next((i for i in range(meta.num_columns) if meta.schema.column(i).path.startswith("turns.")
                and meta.schema.column(i).path.endswith(".turn_id")), None)
    if col is None:
        return meta.num_rows
    return sum(meta.row_group(g).column(col).num_values for g in range(meta.num_row_groups))


def _sign_shard(job: tuple[str, str, dict]) -> str:
    src, dst, dcfg = job
    write_table(_signature_table(src, DedupConfig.model_validate(dcfg)), Path(dst))
    return dst


def _sign_all(todo: list[tuple[str, Path]], dcfg: DedupConfig) -> None:
    jobs = [(src, str(dst), dcfg.model_dump(mode="json")) for src, dst in todo]
    workers = dcfg.workers
    if workers == 0:
        turns = sum(_turn_count(src) for src, _ in todo)
        workers = min(os.cpu_count() or 1, len(todo)) if turns >= 20_000 else 1
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            _sign_shard(j)
        return
    # spawn, not fork: the flow process runs threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_sign_shard, jobs))


def _signature_key(dcfg: DedupConfig, content: str) -> str:
    """A shard's signatures: its content (file sha256) and the settings that change a signature."""
    return content_hash({"sig": dcfg.model_dump(mode="json", include={"num_perm", "shingle", "seed"}),
                         "algo": ALGO, "input": content})


def prepare(dcfg: DedupConfig, home: Path, run_id: str, shards: dict[int, str]) -> Prepared:
    """The global step over the filter stage's session shards: per shard, the decisions file and a digest of
    its decisions (the digest enters the dedup shard's key). Signatures (per input shard) and decisions (per
    set of input shards) are artifacts under content keys: the inputs' sha256 and the dedup settings. Whole
    ones registered in the catalog are reused (from any run); the rest is built and handed back for the
    flow to register."""
    from storage.reader import CatalogReader

    root = RunLayout(home, run_id).dedup_global
    shard_ids = sorted(int(s) for s in shards)
    content = {s: file_sha256(shards[s]) for s in shard_ids}
    dec_key = content_hash({"dedup": dcfg.model_dump(mode="json", exclude={"workers"}), "algo": ALGO,
                            "inputs": [[s, content[s]] for s in shard_ids]})
    sig_keys = {s: _signature_key(dcfg, content[s]) for s in shard_ids}
    with CatalogReader(home) as reader:
        done, _ = artifacts.find(reader, artifacts.DEDUP_DECISIONS, dec_key)
        if done is not None:  # the same inputs and settings as a finished step: its decisions stand
            return Prepared({s: {"dup_file": str(Path(done.path) / _part(s)), "digest": done.meta["digests"][str(s)]}
                             for s in shard_ids})
        sig_paths = {}
        for s in shard_ids:
            found, _ = artifacts.find(reader, artifacts.DEDUP_SIGNATURES, sig_keys[s])
            sig_paths[s] = Path(found.path) if found else None
    built: list[artifacts.Artifact] = []
    todo = [(str(shards[s]), root / "signatures" / f"{sig_keys[s]}.parquet") for s in shard_ids if not sig_paths[s]]
    _sign_all(todo, dcfg)
    for s in shard_ids:
        if sig_paths[s] is None:
            sig_paths[s] = root / "signatures" / f"{sig_keys[s]}.parquet"
            built.append(artifacts.Artifact.of(artifacts.DEDUP_SIGNATURES, sig_keys[s], run_id, sig_paths[s]))
    id_chunks, exact_chunks, sig_chunks, owner = [], [], [], []
    for s in shard_ids:
        t = pq.read_table(sig_paths[s])
        id_chunks.append(t.column("id").combine_chunks())
        exact_chunks.append(t.column("exact").to_numpy())
        flat = pc.list_flatten(t.column("sig")).to_numpy()
        sig_chunks.append(flat.reshape(-1, dcfg.num_perm).astype(_U32, copy=False))
        owner.append(np.full(t.num_rows, s, dtype=np.int32))
    ids = pa.concat_arrays(id_chunks).to_pylist() if id_chunks else []
    exact = np.concatenate(exact_chunks) if exact_chunks else np.empty(0, np.int64)
    sig = np.concatenate(sig_chunks) if sig_chunks else np.empty((0, dcfg.num_perm), _U32)
    shard_of_id = dict(zip(ids, np.concatenate(owner).tolist(), strict=True)) if owner else {}
    del sig_chunks, exact_chunks
    decisions = decide(ids, exact, sig, dcfg)
    per_shard: dict[int, list[dict]] = {s: [] for s in shard_ids}
    for d in decisions:
        per_shard[shard_of_id[d["id"]]].append(d)
    folder = root / "decisions" / dec_key
    out = {}
    for s in shard_ids:
        rows = sorted(per_shard[s], key=lambda d: d["id"])
        write_table(to_table(rows, DedupDecision), folder / _part(s))
        out[s] = {"dup_file": str(folder / _part(s)), "digest": content_hash(rows)}
    folder.mkdir(parents=True, exist_ok=True)
    built.append(artifacts.Artifact.of(artifacts.DEDUP_DECISIONS, dec_key, run_id, folder,
                                       meta={"digests": {str(s): out[s]["digest"] for s in shard_ids}}))
    return Prepared(out, built)


def _part(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def load_decisions(path: str | Path) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in pq.read_table(path).to_pylist()}


def shard_decisions(ids: list[str], texts: list[str], dcfg: DedupConfig) -> dict[str, dict[str, Any]]:
    """Decisions within one shard: the fallback when the global step did not run."""
    exact = np.array([exact_hash(t) for t in texts], dtype=np.int64)
    return {d["id"]: d for d in decide(ids, exact, signatures(texts, dcfg), dcfg)}
