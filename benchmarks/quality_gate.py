"""The quality gate measured against labeled turns (tests/data/quality/*.jsonl).

Every dev-set turn goes through what a real turn meets: the queries stage's question validation, then the
filter stage's chain (product defaults; the LLM judge off unless --judge). A turn is kept when it passes
both. Reported per split, with the rows split deterministically (hash of the row id) into a calibration
half and a held-out half:

    precision = good among kept        recall = kept among good

and a confusion table per labeled defect (how many rows of each defect the gate kept, and which check
dropped the rest), plus the good rows each check dropped wrongly.

`--calibrate` sweeps the score thresholds (relevance cosine, repeated n-gram share) on the calibration half
only and prints the value that maximises precision while recall stays >= --min-recall; the defaults in
models/config/filter.py come from that run, and the held-out half is reported with them, never tuned on.

    python benchmarks/quality_gate.py [--calibrate] [--judge] [--set key=value ...] [--json]

With --judge the chain's LLM judge scores every turn with the configured judge engine
(filter.judge.engine, else engine.*): e.g. --set filter.judge.engine.kind=openai
--set filter.judge.engine.model=Qwen/Qwen2.5-7B-Instruct --set 'filter.judge.engine.base_urls=["http://gpu1:8000/v1"]'.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.config import load_config  # noqa: E402
from tasks.base import StageContext  # noqa: E402
from tasks.filter import FilterStage  # noqa: E402
from tasks.filters.questions import reason_code, validate_question  # noqa: E402

DEVSET = REPO / "tests" / "data" / "quality"


def load_rows(folder: Path = DEVSET) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{n}: not JSON: {exc}") from exc
    return rows


def split_of(row: dict) -> str:
    """'calibration' or 'heldout', by a hash of the row id: stable whatever rows are added."""
    return "calibration" if hashlib.sha256(row["id"].encode()).digest()[0] % 2 == 0 else "heldout"


def characters_of(rows: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in rows:
        cid = r["character_id"]
        if cid not in seen:
            base, _, lang = cid.rpartition("@")
            seen[cid] = {"id": base, "label": r["label"], "description": r.get("description") or "",
                         "aliases": [], "category": "real", "language": lang or r["language"], "source": "jsonl",
                         "summary": r.get("description") or ""}
    return list(seen.values())


def as_turn(r: dict) -> dict:
    return {"id": r["id"], "query_id": "q-" + r["id"], "character_id": r["character_id"], "language": r["language"],
            "kind": r["kind"], "question": r["question"], "answer": r["answer"], "profile_truncated": False,
            "parents": [], "gen": {"prompt": "[]", "raw_output": r["answer"], "prompt_tokens": 0,
                                   "completion_tokens": 0, "finish_reason": r.get("finish_reason") or "stop",
                                   "model": "devset", "seed": 0, "rounds": 1}}


def gate(rows: list[dict], cfg) -> dict[str, tuple[str | None, dict]]:
    """row id -> (the check that dropped it or None, the scores it got)."""
    verdict: dict[str, tuple[str | None, dict]] = {}
    alive = []
    for r in rows:
        why = (validate_question(r["question"], r["language"], a_label=r["label"], cfg=cfg.filter.questions)
               if cfg.filter.questions.enabled else None)
        if why:
            verdict[r["id"]] = (f"question.{reason_code(why)}", {})
        else:
            alive.append(r)
    chars = characters_of(rows)
    with tempfile.TemporaryDirectory() as home:
        ctx = StageContext(run_id="quality-gate", stage="filter", shard=0, num_shards=1, config=cfg, home=Path(home))
        out = FilterStage().run(ctx, {"responses": [as_turn(r) for r in alive], "characters": chars})
    for rj in out.rejects:
        verdict[rj.row_id] = (rj.filter, {"score": rj.score})
    for s in out.rows:
        for t in s.turns:
            verdict[t.turn_id] = (None, dict(t.scores))
    missing = [r["id"] for r in alive if r["id"] not in verdict]
    if missing:
        raise RuntimeError(f"no verdict for {missing[:3]}")
    return verdict


def metrics(rows: list[dict], verdict: dict[str, tuple[str | None, dict]]) -> dict[str, Any]:
    good = [r for r in rows if r["label_quality"] == "good"]
    kept = [r for r in rows if verdict[r["id"]][0] is None]
    kept_good = [r for r in kept if r["label_quality"] == "good"]
    by_defect: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_defect[r["defect"]][verdict[r["id"]][0] or "kept"] += 1
    return {"rows": len(rows), "good": len(good), "bad": len(rows) - len(good), "kept": len(kept),
            "precision": len(kept_good) / len(kept) if kept else None,
            "recall": len(kept_good) / len(good) if good else None,
            "by_defect": {d: dict(c) for d, c in sorted(by_defect.items())},
            "by_language": {lang: _pr([r for r in rows if r["language"] == lang], verdict)
                            for lang in sorted({r["language"] for r in rows})}}


def _pr(rows: list[dict], verdict) -> dict[str, Any]:
    kept = [r for r in rows if verdict[r["id"]][0] is None]
    good = [r for r in rows if r["label_quality"] == "good"]
    kg = sum(r["label_quality"] == "good" for r in kept)
    return {"rows": len(rows), "precision": kg / len(kept) if kept else None, "recall": kg / len(good) if good else None}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(name: str, m: dict[str, Any]) -> str:
    lines = [f"## {name}: {m['rows']} turns ({m['good']} good, {m['bad']} bad), kept {m['kept']}",
             f"precision (good among kept) {_fmt(m['precision'])}   recall (kept among good) {_fmt(m['recall'])}",
             "  " + "   ".join(f"{k}: P {_fmt(v['precision'])} R {_fmt(v['recall'])} (n={v['rows']})"
                              for k, v in m["by_language"].items()),
             "", "| defect | n | kept | dropped by |", "| --- | ---: | ---: | --- |"]
    for d, c in m["by_defect"].items():
        n = sum(c.values())
        drops = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]) if k != "kept")
        lines.append(f"| {d} | {n} | {c.get('kept', 0)} | {drops or '-'} |")
    return "\n".join(lines)


def sweep(rows: list[dict], cfg, verdict, min_recall: float) -> list[str]:
    """Threshold sweeps on stored scores (no re-run): relevance (en) and repeated n-gram share."""
    out = []
    good_total = sum(r["label_quality"] == "good" for r in rows)

    def evaluate(drop) -> tuple[float | None, float | None]:
        kept = [r for r in rows if verdict[r["id"]][0] is None and not drop(r)]
        kg = sum(r["label_quality"] == "good" for r in kept)
        return (kg / len(kept) if kept else None), (kg / good_total if good_total else None)

    for lang in sorted({r["language"] for r in rows}):
        best = None
        out.append(f"relevance.min_similarity[{lang}] sweep (calibration half, other checks as configured):")
        for k in range(0, 41):
            thr = k / 100

            def drop(r, thr=thr, lang=lang):
                s = verdict[r["id"]][1].get("relevance")
                return r["language"] == lang and s is not None and s < thr
            p, rc = evaluate(drop)
            if k % 5 == 0:
                out.append(f"  {thr:.2f}: precision {_fmt(p)} recall {_fmt(rc)}")
            if p is not None and rc is not None and rc >= min_recall and (best is None or p > best[1] + 1e-9):
                best = (thr, p, rc)
        out.append(f"  best with recall >= {min_recall}: {best}")
    best = None
    out.append("degeneration.max_repeated_share sweep:")
    for k in range(5, 61, 5):
        thr = k / 100

        def drop(r, thr=thr):
            return verdict[r["id"]][1].get("repeat", 0.0) > thr
        p, rc = evaluate(drop)
        out.append(f"  {thr:.2f}: precision {_fmt(p)} recall {_fmt(rc)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devset", type=Path, default=DEVSET)
    ap.add_argument("--judge", action="store_true", help="score with the LLM judge (the configured judge engine)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--calibrate", action="store_true", help="sweep thresholds on the calibration half")
    ap.add_argument("--min-recall", type=float, default=0.75, help="recall floor for --calibrate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = load_rows(args.devset)
    if not rows:
        raise SystemExit(f"no dev-set rows under {args.devset}")
    overrides = [f"filter.judge.enabled={'true' if args.judge else 'false'}", *args.overrides]
    if args.calibrate:  # score every turn; thresholds are swept on the stored scores
        overrides += ["filter.relevance.min_similarity={\"en\": -1.0, \"zh\": -1.0}"]
    cfg = load_config(overrides=overrides)
    t0 = time.perf_counter()
    verdict = gate(rows, cfg)
    seconds = time.perf_counter() - t0
    splits = {s: [r for r in rows if split_of(r) == s] for s in ("calibration", "heldout")}
    result = {"config": {"judge": args.judge, "overrides": args.overrides}, "seconds": round(seconds, 2),
              "all": metrics(rows, verdict), **{s: metrics(v, verdict) for s, v in splits.items()}}
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(f"# quality gate on {args.devset} ({len(rows)} turns; judge {'on' if args.judge else 'off'}; "
              f"{seconds:.1f} s)\n")
        for s in ("calibration", "heldout", "all"):
            print(report(s, result[s]) + "\n")
        wrong = Counter(verdict[r["id"]][0] for r in rows if r["label_quality"] == "good" and verdict[r["id"]][0])
        print("good turns dropped, by check: " + (", ".join(f"{k} {v}" for k, v in wrong.most_common()) or "none"))
    if args.calibrate:
        print("\n" + "\n".join(sweep(splits["calibration"], cfg, verdict, args.min_recall)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
