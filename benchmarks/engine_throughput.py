"""The pipeline's generation against raw vLLM, on the prompts the pipeline itself sent.

One process, vLLM on CPU (or GPU), the bundled model unless --model is given:
  pipeline: a whole `--until responses` run (flows.build.run_build, a fresh home, the demo config,
            --characters characters): the queries stage with its per-request re-sampling, then the
            responses stage, on the in-process streaming engine. Every request is recorded (chat,
            Sampling, completion tokens, submit and finish times) at the engine boundary.
  raw:      a separate `vllm.LLM` (loaded in this process, its load timed) runs `LLM.generate` on
            exactly those recorded requests, rendered with the model's chat template, with the same
            SamplingParams, one call per phase (queries requests incl. re-samples, then responses).
Runs alternate pipeline / raw `--repeats` times (the pipeline engine loads once, in the first run).
Reported per phase: completion tokens per second, pipeline over the engine time the phase had (its
share of the requests in flight at each instant: the pipelined phases overlap; the plain first-submit
to last-finish span ratio is printed beside it), raw over its LLM.generate call; and the whole
generation (first submit to last finish vs both raw calls); target pipeline/raw >= 0.98. End to end (first run only):
the run's wall time incl. engine start-up vs raw load + raw generation; target >= 0.9.
`--record-lengths` stores the recorded completion tokens per call (queries, responses) in
benchmarks/data/completion_lengths.json as the "recorded" distribution for generation_sim.py.

    python benchmarks/engine_throughput.py --characters 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parent / "data" / "completion_lengths.json"


class Recorder:
    """Patches VLLMEngine.submit to log every request at the engine boundary."""

    def __init__(self):
        from engines.vllm_engine import VLLMEngine

        self.records: list[dict] = []
        self.lock = threading.Lock()
        original = VLLMEngine.submit

        def submit(engine, chat, sampling):
            rec = {"chat": chat, "sampling": sampling, "t0": time.perf_counter()}
            fut = original(engine, chat, sampling)

            def done(f):
                rec["t1"] = time.perf_counter()
                if not f.cancelled() and f.exception() is None:
                    rec["tokens"] = f.result().completion_tokens
                    with self.lock:
                        self.records.append(rec)

            fut.add_done_callback(done)
            return fut

        VLLMEngine.submit = submit

    def take(self) -> list[dict]:
        with self.lock:
            out, self.records = self.records, []
        return out


def phase_of(rec: dict) -> str:
    return "queries" if rec["sampling"].json_schema is not None else "responses"


def attributed_seconds(recs: list[dict], phase: str) -> float:
    """The engine time a phase had: at each instant the engine's steps serve every request in flight, so a
    phase is given the share of the time its requests are of those running. The shares sum to the time the
    engine was busy; with no overlap a phase's share is its own span. (The pipelined stages overlap, so a
    phase's first-submit-to-last-finish span also holds the other phase's work.)"""
    events = sorted([(r["t0"], 1, phase_of(r) == phase) for r in recs] +
                    [(r["t1"], -1, phase_of(r) == phase) for r in recs], key=lambda e: (e[0], e[1]))
    total = mine = 0
    last, out = None, 0.0
    for t, step, own in events:
        if last is not None and total:
            out += (t - last) * mine / total
        total += step
        mine += step if own else 0
        last = t
    return out


def overrides(args) -> list[str]:
    return [f"characters.top_n={args.characters}", "engine.kind=vllm", f"engine.model={args.model}",
            f"characters.shard_size={args.shard_size}", *args.set]


def run_pipeline(args, home: Path, run_id: str) -> float:
    from flows.build import run_build

    t = time.perf_counter()
    summary = run_build(overrides=overrides(args), home=home, until="responses", run_id=run_id)
    wall = time.perf_counter() - t
    if summary.get("status") != "completed":
        raise SystemExit(f"the pipeline run did not complete: {summary}")
    return wall


def raw_phase(llm, tokenizer, recs: list[dict]) -> tuple[int, float]:
    from engines.vllm_engine import on_cpu, sampling_params

    prompts = [{"prompt_token_ids": tokenizer.encode(
        tokenizer.apply_chat_template(r["chat"], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)} for r in recs]
    params = [sampling_params(r["sampling"], per_request_seed=not on_cpu()) for r in recs]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--characters", type=int, default=3, help="characters.top_n of the run")
    ap.add_argument("--shard-size", type=int, default=2, help="characters.shard_size (more shards overlap more)")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct", help="engine.model (path or HF id)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    ap.add_argument("--record-lengths", action="store_true")
    args = ap.parse_args()

    from engines.base import close_engines
    from engines.bundled import resolve_model
    from engines.vllm_engine import llm_kwargs

    recorder = Recorder()
    rows = []
    llm = tokenizer = None
    raw_load = 0.0
    e2e = None
    tmp = Path(tempfile.mkdtemp(prefix="ditto-engine-throughput-"))
    for rep in range(args.repeats):
        wall = run_pipeline(args, tmp / f"home-{rep}", f"throughput-{rep}")
        recs = recorder.take()
        if llm is None:
            from vllm import LLM

            from flows.build import DEMO_CONFIG
            from models.config import load_config

            cfg = load_config(str(DEMO_CONFIG), overrides(args)).engine  # the run's own engine settings
            t = time.perf_counter()
            llm = LLM(**llm_kwargs(cfg, resolve_model(cfg.model)))
            raw_load = time.perf_counter() - t
            tokenizer = llm.get_tokenizer()
        raw_total_s, raw_total_tok = 0.0, 0
        for phase in ("queries", "responses"):
            prs = [r for r in recs if phase_of(r) == phase]
            if not prs:
                continue
            p_tok = sum(r["tokens"] for r in prs)
            span = max(r["t1"] for r in prs) - min(r["t0"] for r in prs)
            p_s = attributed_seconds(recs, phase)
            r_tok, r_s = raw_phase(llm, tokenizer, prs)
            raw_total_s += r_s
            raw_total_tok += r_tok
            ratio = (p_tok / p_s) / (r_tok / r_s)
            rows.append((rep, phase, len(prs), p_tok, p_s, r_tok, r_s, ratio))
            print(f"run {rep} {phase:<9} requests {len(prs):>4}  pipeline {p_tok:>6} tok {p_s:7.1f} s of engine "
                  f"time ({span:.1f} s span, span ratio {(p_tok / span) / (r_tok / r_s):.3f}) "
                  f"{p_tok / p_s:7.1f} tok/s   raw {r_tok:>6} tok {r_s:7.1f} s {r_tok / r_s:7.1f} tok/s   "
                  f"ratio {ratio:.3f}", flush=True)
        if recs and raw_total_s:
            # the stages are pipelined, so the phases' spans overlap (queries of late shards run beside the
            # responses of early ones): a phase's tok/s undercounts the engine's work; this line does not
            span = max(r["t1"] for r in recs) - min(r["t0"] for r in recs)
            all_tok = sum(r["tokens"] for r in recs)
            ratio = (all_tok / span) / (raw_total_tok / raw_total_s)
            rows.append((rep, "all", len(recs), all_tok, span, raw_total_tok, raw_total_s, ratio))
            print(f"run {rep} all generation: pipeline {all_tok} tok in {span:.1f} s {all_tok / span:.1f} tok/s, "
                  f"raw {raw_total_tok} tok in {raw_total_s:.1f} s {raw_total_tok / raw_total_s:.1f} tok/s: "
                  f"ratio {ratio:.3f}", flush=True)
        if rep == 0:
            p_tok_all = sum(r["tokens"] for r in recs)
            e2e = (p_tok_all / wall) / (raw_total_tok / (raw_load + raw_total_s))
            print(f"end to end: pipeline {p_tok_all} tok in {wall:.1f} s (incl. engine start-up) vs raw load "
                  f"{raw_load:.1f} s + {raw_total_s:.1f} s generation: ratio {e2e:.3f}", flush=True)
        if args.record_lengths and rep == 0:
            data = json.loads(DATA.read_text())
            data["distributions"]["recorded"] = {
                ph: [r["tokens"] for r in recs if phase_of(r) == ph] for ph in ("queries", "responses")}
            data["distributions"]["recorded"]["judge"] = data["distributions"]["bundled"]["judge"]
            data["recorded_with"] = {"model": args.model, "characters": args.characters,
                                     "date": time.strftime("%Y-%m-%d")}
            DATA.write_text(json.dumps(data))
    close_engines()
    gen = [r[-1] for r in rows if r[1] != "all"]
    whole = [r[-1] for r in rows if r[1] == "all"]
    print(f"generation phases: min ratio {min(gen):.3f}, all generation min {min(whole):.3f} (target >= 0.98); "
          f"end to end {e2e:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
