"""Throughput of the filter chain without the LLM judge, and near-duplicate recall/precision.

    python benchmarks/filter_throughput.py [--turns 100000] [--identity-turns 5000] [--planted 2000]

Synthetic turns (80% en, 20% zh, first-person answers drawn from a word list, a share of them assistant-
speak, third-person, wrong-language or refused) are written as Parquet shards; every shard's non-LLM
per-turn chain (the filter stage), the global dedup step over its sessions (signatures + one LSH pass)
and the dedup stage's shards are timed. The embedding identity check is
timed apart on a sample, batched. Planted duplicates: `--planted` source answers each copied into another
character's turn with 1-3 word edits (<= 5% of the words; near duplicates) and `--planted // 4` copies
that differ only in case and punctuation (exact duplicates after normalisation)."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.base import to_table  # noqa: E402
from models.config import load_config  # noqa: E402
from models.ids import row_id, shard_of  # noqa: E402
from models.records import Session, Turn, character_row_id  # noqa: E402
from storage.shards import write_table  # noqa: E402
from tasks.base import StageContext  # noqa: E402
from tasks.dedup import DedupStage  # noqa: E402
from tasks.embeddings import embedder  # noqa: E402
from tasks.filter import FilterStage  # noqa: E402
from tasks.filters import Item  # noqa: E402
from tasks.filters.dedup import load_decisions  # noqa: E402
from tasks.filters.identity import IdentityFilter  # noqa: E402

EN_WORDS = ("time year people way day man thing woman life child world school state family student group "
            "country problem hand part place case week company system program question work government number "
            "night point home water room mother area money story fact month lot right study book eye job word "
            "business issue side kind head house service friend father power hour game line end member law car "
            "city community name president team minute idea kid body information back parent face others level "
            "office door health person art war history party result change morning reason research girl guy "
            "moment air teacher force education river battle ship horse king queen letter poem music journey "
            "army sea mountain garden winter summer voyage empire science theory painting castle village").split()
EN_GLUE = "the a of and to in my I we was remember always loved never thought saw with for at".split()
ZH = ("我们时候一生喜欢记得当年那天山水月光诗酒朋友家乡战争国王故事学问天下风雨春秋花草书信城市江河道理老师父母孩子"
      "心中世界知道回忆远方旅途皇帝军队将军百姓田野宫殿音乐画作科学理论")
BAD_EN = ["As an AI language model, I do not have memories of {w}.",
          "{label} was a famous person who loved the {w} and the {w2}.",
          "J'ai toujours aimé la {w} et le {w2}, c'était ma vie entière."]


def en_answer(rng: random.Random, n: int) -> str:
    words = []
    for i in range(n):
        words.append(rng.choice(EN_GLUE) if i % 2 else rng.choice(EN_WORDS))
    words[0] = "I"
    return " ".join(words) + "."


def zh_answer(rng: random.Random, n: int) -> str:
    return "我" + "".join(rng.choice(ZH) for _ in range(n)) + "。"


def edit(rng: random.Random, text: str, zh: bool) -> str:
    if zh:
        chars = list(text[1:-1])
        for _ in range(rng.randint(1, max(1, min(3, len(chars) // 20)))):
            chars[rng.randrange(len(chars))] = rng.choice(ZH)
        return "我" + "".join(chars) + "。"
    words = text[:-1].split()
    for _ in range(rng.randint(1, max(1, min(3, len(words) // 20)))):
        op, i = rng.random(), rng.randrange(1, len(words))
        if op < 0.5:
            words[i] = rng.choice(EN_WORDS)
        elif op < 0.75:
            del words[i]
        else:
            words.insert(i, rng.choice(EN_WORDS))
    return " ".join(words) + "."


def synth(n_turns: int, planted: int, seed: int = 0):
    rng = random.Random(seed)
    n_chars = max(8, n_turns // 10)
    chars = []
    for i in range(n_chars):
        zh = i % 5 == 0
        chars.append({"id": f"Q{i}", "label": (f"角色{i}" if zh else f"Person {i}"),
                      "description": ("一位历史人物" if zh else f"a {rng.choice(EN_WORDS)} {rng.choice(EN_WORDS)}"),
                      "aliases": [], "category": rng.choice(["real", "fictional"]), "language": "zh" if zh else "en",
                      "source": "jsonl", "summary": ""})
    turns = []
    for i in range(n_turns):
        c = chars[i % n_chars]
        zh = c["language"] == "zh"
        kind = "contrastive" if i % 4 == 3 else "role_specific"
        if kind == "contrastive":
            ans = ("我从未听说过这个，" if zh else "I have never heard of that; ") + \
                (zh_answer(rng, 30) if zh else en_answer(rng, 30))
        elif not zh and rng.random() < 0.03:
            # a unique tail keeps the bad answers from being accidental duplicates of each other
            ans = rng.choice(BAD_EN).format(w=rng.choice(EN_WORDS), w2=rng.choice(EN_WORDS), label=c["label"]) + \
                " " + en_answer(rng, 30)[2:]
        else:
            ans = zh_answer(rng, rng.randint(40, 120)) if zh else en_answer(rng, rng.randint(40, 110))
        cid = character_row_id(c)
        qid = row_id("q", cid, i)
        turns.append({"id": row_id("t", qid), "query_id": qid, "character_id": cid, "language": c["language"],
                      "kind": kind, "question": "Tell me about your life?", "answer": ans, "parents": [qid],
                      "gen": {"prompt": "[]", "raw_output": ans, "finish_reason": "length" if i % 50 == 0 else "stop"}})
    # plant duplicates among role-specific turns with regular answers, source and copy in different turns
    pool = [i for i, t in enumerate(turns) if t["kind"] == "role_specific" and i % 50 and
            not t["answer"].startswith(("As an", "Person", "J'"))]
    rng.shuffle(pool)
    pairs = []
    for k in range(planted + planted // 4):
        src, dst = pool[2 * k], pool[2 * k + 1]
        if turns[src]["language"] != turns[dst]["language"]:
            continue
        zh = turns[src]["language"] == "zh"
        if k < planted:
            turns[dst]["answer"] = edit(rng, turns[src]["answer"], zh)
        else:
            turns[dst]["answer"] = turns[src]["answer"].upper().replace(".", "!").replace("。", "！")
        pairs.append((turns[src]["id"], turns[dst]["id"], "near" if k < planted else "exact"))
    return chars, turns, pairs


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the signing and shard worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run_shard(job) -> dict:
    """The filter stage on one shard, its sessions written for the dedup stage."""
    cfg, home, num_shards, s, turns, chars = job
    c0 = time.process_time()
    ctx = StageContext(run_id="bench", stage="filter", shard=s, num_shards=num_shards, config=cfg, home=home)
    out = FilterStage().run(ctx, {"responses": turns, "characters": chars})
    path = home / "filter" / f"part-{s:05d}.parquet"
    write_table(to_table(out.rows, Session), path)
    return {"kept": out.stats.rows_out, "dropped": dict(out.stats.dropped), "path": str(path),
            "filter_seconds": out.stats.extra["filter_seconds"], "cpu": time.process_time() - c0}


def _dedup_shard(job) -> dict:
    from models.base import table_rows
    from storage.shards import read_table

    cfg, home, num_shards, s, path, extra = job
    c0 = time.process_time()
    ctx = StageContext(run_id="bench", stage="dedup", shard=s, num_shards=num_shards, config=cfg, home=home,
                       extra=extra)
    out = DedupStage().run(ctx, {"filter": table_rows(read_table(path))})
    return {"kept": out.stats.rows_out, "dropped": dict(out.stats.dropped), "cpu": time.process_time() - c0}


def _map(fn, jobs: list, workers: int) -> list:
    if workers > 1:  # shards are independent: one process per core
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(fn, jobs))
    return [fn(j) for j in jobs]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=100_000)
    ap.add_argument("--planted", type=int, default=2000)
    ap.add_argument("--identity-turns", type=int, default=5000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="processes running shards (the machine has 2 cores)")
    ap.add_argument("--home", default=None)
    args = ap.parse_args(argv)

    chars, turns, pairs = synth(args.turns, args.planted)
    home = Path(args.home or tempfile.mkdtemp(prefix="filter-bench-"))
    cfg = load_config(data={"engine": {"kind": "dry_run", "model": "dry_run"},
                            "filter": {"judge": {"enabled": False}, "identity": {"enabled": False}}})
    by_shard: dict[int, list[dict]] = {}
    for t in turns:
        by_shard.setdefault(shard_of(t["character_id"], args.shards), []).append(t)
    chars_by_shard: dict[int, list[dict]] = {}
    for c in chars:
        chars_by_shard.setdefault(shard_of(character_row_id(c), args.shards), []).append(c)
    for s, rows in by_shard.items():  # the responses shards as the flow would have them on disk
        write_table(to_table(rows, Turn), home / "responses" / f"part-{s:05d}.parquet")
    turns_by_shard = by_shard

    jobs = [(cfg, home, args.shards, s, turns_by_shard[s], chars_by_shard.get(s, [])) for s in sorted(turns_by_shard)]
    t0 = time.perf_counter()
    results = _map(_run_shard, jobs, args.workers)
    t_run = time.perf_counter() - t0
    c_run = sum(r["cpu"] for r in results)

    t0, c0 = time.perf_counter(), _cpu()
    plan = DedupStage().prepare(cfg, home, "bench", {"filter": {s: r["path"] for s, r in zip(sorted(turns_by_shard),
                                                                                           results, strict=True)}})
    t_prepare, c_prepare = time.perf_counter() - t0, _cpu() - c0
    djobs = [(cfg, home, args.shards, s, r["path"], plan[s]) for s, r in zip(sorted(turns_by_shard), results,
                                                                             strict=True)]
    t0 = time.perf_counter()
    dresults = _map(_dedup_shard, djobs, args.workers)
    t_dedup = time.perf_counter() - t0
    c_dedup = sum(r["cpu"] for r in dresults)
    per_filter: dict[str, float] = {}
    dropped: dict[str, int] = {}
    kept = sum(r["kept"] for r in dresults)
    for r in results + dresults:
        for k, v in r.get("filter_seconds", {}).items():
            per_filter[k] = per_filter.get(k, 0.0) + v
        for k, v in r["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v

    # near-dup quality against the planted pairs
    decisions = {}
    for p in plan.values():
        decisions.update(load_decisions(p["dup_file"]))
    planted_ids = {x for a, b, _ in pairs for x in (a, b)}

    def found(a: str, b: str) -> bool:
        da, db = decisions.get(a), decisions.get(b)
        return bool((da and da["dup_of"] == b) or (db and db["dup_of"] == a) or
                    (da and db and da["dup_of"] == db["dup_of"]))

    # dedup sees the turns the per-turn chain kept: a planted pair with a member dropped before it (an
    # all-caps copy langid calls another language, say) is no pair for dedup to find
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    seen = {i for r in results for i in pc.struct_field(pc.list_flatten(
        pq.read_table(r["path"], columns=["turns"]).column("turns")), "turn_id").to_pylist()}
    near = [(a, b) for a, b, k in pairs if k == "near" and a in seen and b in seen]
    exact = [(a, b) for a, b, k in pairs if k == "exact" and a in seen and b in seen]
    lost_before = sum(1 for a, b, _ in pairs if a not in seen or b not in seen)
    recall_near = sum(found(a, b) for a, b in near) / max(1, len(near))
    recall_exact = sum(found(a, b) for a, b in exact) / max(1, len(exact))
    flagged = list(decisions)
    precision = sum(i in planted_ids for i in flagged) / max(1, len(flagged))

    # identity (embeddings), batched, on a sample
    t0 = time.perf_counter()
    embedder(cfg.filter.identity.model, cfg.filter.identity.max_seq_length)
    t_load = time.perf_counter() - t0
    # a shard-like sample: whole characters with all their turns, so each character is embedded once for
    # several turns as in a real shard (the candidate pool is those characters)
    en = [c for c in chars if c["language"] == "en"]
    per_char = sum(1 for t in turns if t["character_id"] == f"{en[0]['id']}@en" and t["kind"] == "role_specific")
    cmap = {character_row_id(c): c for c in en[:max(4, args.identity_turns // max(1, per_char))]}
    sample = [t for t in turns if t["character_id"] in cmap and t["kind"] == "role_specific"][:args.identity_turns]
    idf = IdentityFilter(cfg.filter.identity.model_copy(update={"enabled": True}), cmap)
    items = [Item(row=t, character=cmap[t["character_id"]], answer=t["answer"]) for t in sample]
    t0, c0 = time.perf_counter(), time.process_time()
    idf.apply(items)
    t_identity, c_identity = time.perf_counter() - t0, time.process_time() - c0

    n = len(turns)
    report = {
        "turns": n, "shards": args.shards, "cpu_cores": os.cpu_count(), "workers": args.workers,
        "load_average_1m": round(os.getloadavg()[0], 2), "kept": kept, "dropped": dropped,
        "shard_chain_seconds": round(t_run, 2), "shard_chain_turns_per_s": round(n / t_run),
        "shard_chain_turns_per_cpu_s": round(n / c_run),
        "global_dedup_seconds": round(t_prepare, 2), "global_dedup_turns_per_s": round(n / t_prepare),
        "global_dedup_turns_per_cpu_s": round(n / c_prepare),
        "dedup_shards_seconds": round(t_dedup, 2),
        "non_llm_chain_turns_per_s": round(n / (t_prepare + t_run + t_dedup)),
        "non_llm_chain_turns_per_cpu_s": round(n / (c_prepare + c_run + c_dedup)),
        "per_filter_turns_per_s": {k: round(n / v) if v else None for k, v in per_filter.items()},
        "identity": {"turns": len(items), "characters": len(cmap), "seconds": round(t_identity, 2),
                     "turns_per_s": round(len(items) / t_identity),
                     "cpu_seconds": round(c_identity, 2), "model_load_seconds": round(t_load, 2),
                     "meets_5000_per_s": len(items) / t_identity >= 5000},
        "near_dup": {"planted_pairs_with_a_member_dropped_by_the_per_turn_chain": lost_before,
                     "planted_near_pairs": len(near), "recall_near": round(recall_near, 4),
                     "planted_exact_pairs": len(exact), "recall_exact": round(recall_exact, 4),
                     "flagged": len(flagged), "precision": round(precision, 4)},
        "targets_met": {"chain_5000_per_s": n / (t_prepare + t_run + t_dedup) >= 5000,
                        "near_dup_recall_0.95": recall_near >= 0.95, "precision_0.95": precision >= 0.95},
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
