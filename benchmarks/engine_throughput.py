"""Engine throughput: raw `vllm.LLM.chat` vs the pipeline path, and transformers batch 1 vs 16.

The same N role-play prompts (the responses stage's T_R prompt over bundled characters) go
  raw:      one `LLM.chat(all prompts)` call on the engine's own `vllm.LLM`;
  pipeline: `--shards` shard tasks on `--workers` threads, each running ResponsesStage.run on its
            shard through get_engine(...).generate (the Coalescer merges concurrent shards),
alternating raw/pipeline `--repeats` times in one process, so both use the same loaded engine.
Tokens/s counts completion tokens over wall time; the target is pipeline/raw >= 0.95.

    flock /tmp/heavy.lock python benchmarks/engine_throughput.py --n 256 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    "What was the hardest decision you ever had to make?",
    "How do you spend a quiet evening at home?",
    "Who taught you the most important lesson of your life?",
    "What do you think of smartphones?",
    "Which of your achievements are you proudest of?",
    "What would you say to someone who doubts you?",
    "Can you explain how a jet engine works?",
    "What did you eat for breakfast as a child?",
]


def load_characters(limit: int) -> list[dict]:
    try:
        from models.config.characters import CharactersConfig
        from tasks.characters import collect_characters

        chars, _ = collect_characters(CharactersConfig(top_n=limit))
        rows = [c.model_dump(mode="json") for c in chars]
        if rows:
            return rows
    except Exception as exc:  # the bundled corpus is optional here
        print(f"(bundled characters unavailable: {exc}; using synthetic profiles)")
    return [{"id": f"Q{i}", "label": f"Character {i}", "description": "a fictional explorer", "aliases": [],
             "claims": "occupation: explorer", "category": "fictional", "language": "en",
             "summary": f"Character {i} is an explorer who crossed the northern ice in the year {1800 + i}. " * 8,
             "article": "", "source": "synthetic"} for i in range(limit)]


def make_queries(chars: list[dict], n: int) -> list[dict]:
    from models.records import GenerationMeta

    meta = GenerationMeta(prompt="[]", raw_output="").model_dump(mode="json")
    out = []
    for i in range(n):
        ch = chars[i % len(chars)]
        rid = f"{ch['id']}@{ch['language']}"
        out.append({"id": f"q{i}", "character_id": rid, "language": ch["language"], "kind": "role_specific",
                    "question": QUESTIONS[(i // len(chars)) % len(QUESTIONS)], "reason": "", "author_id": rid,
                    "partner_id": rid, "parents": [], "gen": meta})
    return out


def run_raw(llm, chats, sampling) -> tuple[int, float]:
    from engines.vllm_engine import run_chat

    t0 = time.perf_counter()
    gens = run_chat(llm, chats, [sampling] * len(chats), "raw")
    return sum(g.completion_tokens for g in gens), time.perf_counter() - t0


def run_pipeline(config, chars, queries, shards: int, workers: int) -> tuple[int, float]:
    from tasks.base import StageContext
    from tasks.responses import ResponsesStage

    stage = ResponsesStage()
    parts = [queries[i::shards] for i in range(shards)]

    def shard(i: int) -> int:
        ctx = StageContext(run_id="bench", stage="responses", shard=i, num_shards=shards, config=config,
                           home=Path("/tmp"))
        out = stage.run(ctx, {"queries": parts[i], "characters": chars})
        assert len(out.rows) == len(parts[i]), out.rejects[:1]
        return sum(r.gen.completion_tokens for r in out.rows)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        tokens = sum(pool.map(shard, range(shards)))
    return tokens, time.perf_counter() - t0


def bench_vllm(args) -> None:
    from engines.base import Sampling, get_engine
    from models.config import RunConfig
    from models.config.engine import EngineConfig
    from tasks.responses import build_messages

    config = RunConfig(engine=EngineConfig(kind="vllm", seed=0, max_model_len=2048, max_batch=args.n))
    config.responses.sampling.max_tokens = args.max_tokens
    chars = load_characters(args.characters)
    queries = make_queries(chars, args.n)
    by_id = {f"{c['id']}@{c['language']}": c for c in chars}
    chats = [build_messages(by_id[q["character_id"]], q["question"], config.responses.max_profile_tokens)[0]
             for q in queries]
    sp = config.responses.sampling
    sampling = Sampling(temperature=sp.temperature, top_p=sp.top_p, repetition_penalty=sp.repetition_penalty,
                        max_tokens=sp.max_tokens)

    t0 = time.perf_counter()
    engine = get_engine(config.engine)
    print(f"vLLM engine loaded in {time.perf_counter() - t0:.1f}s; {args.n} prompts, "
          f"{len(chars)} characters, max_tokens={args.max_tokens}, {args.shards} shards on {args.workers} threads")
    run_raw(engine.engine.llm, chats[:16], sampling)  # warm-up
    raw, pipe = [], []
    for r in range(args.repeats):
        tok, sec = run_raw(engine.engine.llm, chats, sampling)
        raw.append(tok / sec)
        print(f"  [{r}] raw LLM.chat : {tok:6d} tokens {sec:7.2f}s {tok / sec:8.1f} tok/s")
        tok, sec = run_pipeline(config, chars, queries, args.shards, args.workers)
        pipe.append(tok / sec)
        print(f"  [{r}] pipeline     : {tok:6d} tokens {sec:7.2f}s {tok / sec:8.1f} tok/s")
    r, p = statistics.median(raw), statistics.median(pipe)
    print(f"vLLM raw {r:.1f} tok/s, pipeline {p:.1f} tok/s, ratio {p / r:.3f} (target >= 0.95)")


def bench_transformers(args) -> None:
    from engines.base import Sampling
    from engines.transformers_engine import TransformersEngine
    from models.config.engine import EngineConfig

    chats = [[{"role": "system", "content": "You are Sherlock Holmes, the detective."},
              {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.hf_n)]
    sampling = Sampling(temperature=0.7, top_p=0.8, repetition_penalty=1.1, max_tokens=args.hf_max_tokens)
    rates = {}
    for bs in (1, 16):
        engine = TransformersEngine(EngineConfig(kind="transformers", batch_size=bs))
        engine.load()
        engine.generate(chats[:2], sampling)  # warm-up
        t0 = time.perf_counter()
        gens = engine.generate(chats, sampling)
        sec = time.perf_counter() - t0
        tok = sum(g.completion_tokens for g in gens)
        rates[bs] = tok / sec
        print(f"  transformers batch {bs:2d}: {tok:5d} tokens {sec:7.2f}s {tok / sec:8.1f} tok/s")
        engine.close()
    print(f"transformers batch-16 speedup over batch-1: {rates[16] / rates[1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="prompts (>= 256 for the reported figure)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--characters", type=int, default=32)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-n", type=int, default=32)
    ap.add_argument("--hf-max-tokens", type=int, default=32)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    if not args.skip_vllm:
        bench_vllm(args)
    if not args.skip_transformers:
        bench_transformers(args)


if __name__ == "__main__":
    main()
