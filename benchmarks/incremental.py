"""Incremental nightly cost with the generation cache, on the zero-cost dry-run engine (what is counted is
engine requests, not seconds).

    edit:  a full run over N characters (default 200), then 2 profiles edited and the next run in the same
           home. Target: its engine requests <= 1.1 x the requests the 2 edited characters' pairs cost in the
           first run (their query-synthesis calls, the answers to those pairs' questions, the judge's verdicts
           on those turns), against a full rebuild without the cache (the first run's requests).
    kill:  a responses run killed by SIGKILL when one responses shard has received half its requests (one
           shard task at a time, so no other shard is half done), then `rerun`. Target: the rerun's engine
           requests <= the unfinished half + one cache chunk (DITTO_GENCACHE_CHUNK_ROWS, default here 16),
           against the whole shard (what the rerun asked before the cache).

Every run is a child process with a fresh Prefect home (a real SIGKILL, a real restart); the engine
is the product's `dry_run` engine, so cache keys are those of a real run.

    python benchmarks/incremental.py                    # 200 characters, 16 shards, 2 pairings
    python benchmarks/incremental.py --characters 60 --shards 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = [("real", "mathematician and writer"), ("fictional", "detective of a long series of novels"),
         ("real", "emperor and general"), ("fictional", "monkey king of an old epic"),
         ("real", "physicist and chemist"), ("fictional", "spy of a film series")]


def characters(n: int, edited: set[str] = frozenset()) -> list[dict]:
    from models.records import Character

    out = []
    for i in range(n):
        cat, desc = KINDS[i % len(KINDS)]
        cid = f"Q{1000 + i}"
        label = f"Person {i:04d}"
        summary = f"{label} is a {desc}, born in year {1500 + 3 * i}. " * 3
        if cid in edited:
            summary = f"{label} is a {desc}; this profile was corrected tonight with new facts. " * 3
        out.append(Character(id=cid, label=label, description=desc, category=cat, language="en",
                             popularity=10_000 - i, summary=summary, article=summary * 3,
                             source="jsonl").model_dump(mode="json"))
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def overrides(chars: Path, n: int, shards: int, pairings: int, workers: int) -> list[str]:
    return ["engine.kind=dry_run", "characters.source=jsonl", f"characters.path={chars}", f"characters.top_n={n}",
            f"runner.num_shards={shards}", f"runner.max_workers={workers}", f"queries.pairings={pairings}",
            "runner.retry_delay_seconds=[0]", "filter.identity.enabled=false"]


# -- the child process ----------------------------------------------------------------------------------
def child(a: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    from engines.base import get_engine
    from flows.build import RunFailed, rerun, run_build
    from models.config import load_config
    from storage.reader import CatalogReader

    ov = json.loads(a.overrides)
    if a.kill_label:
        _arm_kill(a.kill_label, a.kill_after)
    try:
        if a.child == "rerun":
            s = rerun(a.run_id, a.home)
        else:
            s = run_build(overrides=ov, home=a.home, run_id=a.run_id, until=a.until)
        status = s["status"]
    except RunFailed as exc:
        status = f"failed: {exc}"
    requests = get_engine(load_config(overrides=ov).engine).metrics().requests
    per: dict[str, Counter] = {}
    shards: dict[str, dict[int, dict[str, int]]] = {}
    with CatalogReader(a.home) as rd:
        for sh in rd.shards(a.run_id):
            if sh["status"] != "done" or sh["reused_from"]:
                continue
            st = json.loads(sh["stats"] or "{}")
            c = per.setdefault(sh["stage"], Counter())
            c["shards_computed"] += 1
            for k in ("cache_hits", "cache_misses", "requests"):
                c[k] += st.get(k, 0)
            shards.setdefault(sh["stage"], {})[sh["shard"]] = {**{k: st.get(k, 0) for k in ("cache_hits", "cache_misses")},
                                                             "rows": sh["rows"] or 0}
    Path(a.out).write_text(json.dumps({"status": status, "engine_requests": requests,
                                       "stages": {k: dict(v) for k, v in per.items()}, "shards": shards}))


def _arm_kill(label: str, after: int) -> None:
    """SIGKILL this process when the responses stage has sent `after` requests for the character(s) of
    one shard (recognised by their labels in the system prompt)."""
    import threading

    from engines import dry_run

    labels = set(json.loads(label))
    seen = {"n": 0}
    lock = threading.Lock()
    real = dry_run.DryRunEngine._generate

    def generate(self, chats, sampling):
        for chat, sp in zip(chats, sampling, strict=True):
            if sp.json_schema is None and any(lb in chat[0]["content"] for lb in labels):  # a responses request
                with lock:
                    if seen["n"] >= after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    seen["n"] += 1
        return real(self, chats, sampling)

    dry_run.DryRunEngine._generate = generate


CODE: list[Path] = [REPO]  # where the children import the project from (a frozen copy, see main)


def freeze_code(tmp: Path) -> Path:
    """A copy of the source tree for the children: stage keys follow the code (code_hash), so an edit to the
    working tree between two runs of the benchmark would rebuild everything and measure nothing."""
    import shutil

    dest = tmp / "code"
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", ".ditto", "__pycache__", "*.pyc",
                                                             ".pytest_cache", "*.egg-info", "node_modules"))
    return dest


def spawn(tmp: Path, mode: str, home: Path, run_id: str, ov: list[str], until: str | None = None,
          kill: tuple[list[str], int] | None = None, chunk_rows: int = 16) -> dict[str, Any]:
    out = tmp / f"{run_id}-{mode}-{len(list(tmp.iterdir()))}.json"
    code = CODE[0]
    cmd = [sys.executable, str(code / "benchmarks" / "incremental.py"), "--child", mode, "--home", str(home), "--run-id", run_id,
           "--overrides", json.dumps(ov), "--out", str(out)]
    if until:
        cmd += ["--until", until]
    if kill:
        cmd += ["--kill-label", json.dumps(kill[0]), "--kill-after", str(kill[1])]
    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="ditto-incr-prefect-", dir=tmp),
           "PREFECT_LOGGING_LEVEL": "ERROR", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240", "DITTO_GENCACHE_CHUNK_ROWS": str(chunk_rows),
           "DITTO_GENCACHE_FLUSH_SECONDS": "3600"}
    env.pop("PREFECT_API_URL", None)
    log = out.with_suffix(".log")
    # its own session: the child's temporary Prefect server goes with it when it is killed
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=code, env={**env, "PYTHONPATH": str(code)}, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=1800)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what the child left running (its Prefect server)
            except ProcessLookupError:
                pass
    tail = log.read_text()[-3000:]
    if kill:
        if rc != -signal.SIGKILL:
            raise SystemExit(f"the run was to be killed, it ended with {rc}:\n{tail}")
        return {"killed": True}
    if rc != 0 or not out.exists():
        raise SystemExit(f"child {mode} {run_id} failed ({rc}):\n{tail}")
    return json.loads(out.read_text())


# -- what the edited characters cost in the first run ----------------------------------------------------
def edited_cost(home: Path, run_id: str, edited_rids: set[str], rounds: int, judge_rounds: int) -> dict[str, int]:
    """Engine requests of run_id that belong to pairs with an edited character: query synthesis (every
    attempt), the answers to those pairs' questions, and the judge's verdicts on those turns."""
    from models.base import table_rows
    from storage.reader import CatalogReader
    from storage.shards import read_table

    def rows(stage: str, kind: str = "data") -> list[dict]:
        col = "path" if kind == "data" else "rejects_path"
        with CatalogReader(home) as rd:
            paths = [s[col] for s in rd.shards(run_id, stage) if s["status"] == "done" and s[col]]
        return [r for p in paths for r in table_rows(read_table(p))]

    queries = rows("queries")
    pair_attempts: dict[tuple[str, str], int] = {}
    for q in queries:
        if q["author_id"] in edited_rids or q["partner_id"] in edited_rids:
            pair_attempts[(q["author_id"], q["partner_id"])] = q["gen"]["rounds"] or 1
    failed_pairs = sum(1 for r in rows("queries", "rejected") if r["filter"] == "format"
                       and r["character_id"] in edited_rids)
    qids = {q["id"] for q in queries if (q["author_id"], q["partner_id"]) in pair_attempts}
    turns = {t["id"]: t for t in rows("responses") if t["query_id"] in qids}
    # the judge is the chain's last filter: it saw the kept turns (in sessions), the turns it dropped, and
    # those dropped after it with their session (min_turns); a judge_error used every round
    judged = 0
    for session in rows("filter"):
        judged += sum(1 for t in session["turns"] if t["turn_id"] in turns)
    for r in rows("filter", "rejected"):
        if r["row_id"] in turns and r["filter"] in ("judge", "min_turns"):
            judged += 1
        elif r["row_id"] in turns and r["filter"] == "judge_error":
            judged += judge_rounds
    return {"pairs": len(pair_attempts), "queries": sum(pair_attempts.values()) + failed_pairs * rounds,
            "responses": len(turns), "judge": judged,
            "total": sum(pair_attempts.values()) + failed_pairs * rounds + len(turns) + judged}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--characters", type=int, default=200)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--pairings", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--chunk-rows", type=int, default=16, help="generation cache chunk size in the runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["run", "rerun"], help=argparse.SUPPRESS)
    for name in ("--home", "--run-id", "--overrides", "--out", "--until", "--kill-label"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--kill-after", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return {}
    from models.config import load_config
    from models.ids import shard_of
    from tasks.queries import plan_pairs

    n, shards = a.characters, a.shards
    with tempfile.TemporaryDirectory(prefix="ditto-incremental-") as tmp:
        tmp = Path(tmp)
        CODE[0] = freeze_code(tmp)
        # -- edit 2 profiles -------------------------------------------------------------------------
        v1 = characters(n)
        edited = {v1[n // 3]["id"], v1[2 * n // 3]["id"]}
        f1 = write(tmp / "characters.jsonl", v1)  # the nightly's input file, edited in place between runs
        ov1 = overrides(f1, n, shards, a.pairings, a.workers)
        home = tmp / "nightly"
        first = spawn(tmp, "run", home, "night-1", ov1, chunk_rows=a.chunk_rows)
        rids = {f"{e}@en" for e in edited}
        cfg1 = load_config(overrides=ov1)
        cost = edited_cost(home, "night-1", rids, cfg1.queries.rounds, cfg1.filter.judge.rounds)
        write(f1, characters(n, edited))
        second = spawn(tmp, "run", home, "night-2", ov1, chunk_rows=a.chunk_rows)
        for night in (first, second):
            if night["status"] != "completed":
                raise SystemExit(f"a nightly run did not complete: {night['status']}")
        pairs = plan_pairs(v1, a.pairings, 0)
        touched = {shard_of(r.split("@")[0], shards) for p in pairs if rids & set(p) for r in p}
        edit = {"characters": n, "edited": sorted(edited), "full_run_requests": first["engine_requests"],
                "edited_pairs": cost["pairs"], "edited_pairs_requests": cost,
                "next_run_requests": second["engine_requests"],
                "ratio_to_edited_pairs": round(second["engine_requests"] / max(1, cost["total"]), 4),
                "ratio_to_full_run": round(second["engine_requests"] / max(1, first["engine_requests"]), 4),
                "target": 1.1, "shards_holding_edited_pairs": len(touched),
                "queries_shards_rebuilt": second["stages"].get("queries", {}).get("shards_computed", 0),
                "next_run_stages": second["stages"]}
        edit["within_target"] = second["engine_requests"] <= 1.1 * cost["total"]
        # -- kill a responses shard at half ------------------------------------------------------------
        f1 = write(tmp / "kill.jsonl", v1)
        ov1 = overrides(f1, n, shards, a.pairings, a.workers)
        probe = spawn(tmp, "run", tmp / "probe", "probe", ov1, until="queries", chunk_rows=a.chunk_rows)
        per_shard = {int(k): v["rows"] for k, v in probe["shards"].get("queries", {}).items()}
        if probe["status"] != "completed" or len(per_shard) != shards:
            raise SystemExit(f"the probe run did not complete: {probe['status']}")
        target = max(per_shard)  # one task at a time, in shard order: the last one leaves nothing else undone
        n_s = per_shard[target]
        half = n_s // 2
        labels = [c["label"] for c in v1 if shard_of(c["id"], shards) == target]
        ov_kill = overrides(f1, n, shards, a.pairings, 1)  # one shard task at a time: only the target is half done
        kill_home = tmp / "killed"
        spawn(tmp, "run", kill_home, "killed", ov_kill, until="responses", kill=(labels, half),
              chunk_rows=a.chunk_rows)
        again = spawn(tmp, "rerun", kill_home, "killed", ov_kill, chunk_rows=a.chunk_rows)
        resp = again["stages"].get("responses", {})
        mine = again["shards"].get("responses", {}).get(str(target), {})
        resp["cache_hits"] = mine.get("cache_hits", 0)
        bound = (n_s - half) + a.chunk_rows
        kill = {"shard": target, "shard_requests": n_s, "answered_before_kill": half,
                "served_from_cache_on_rerun": resp.get("cache_hits", 0),
                "lost_in_kill": half - resp.get("cache_hits", 0), "chunk_rows": a.chunk_rows,
                "rerun_requests": again["engine_requests"], "rerun_requests_of_the_shard": mine.get("cache_misses"),
                "responses_shards_rerun": resp.get("shards_computed", 0),
                "target": bound, "ratio_to_target": round(again["engine_requests"] / bound, 4),
                "ratio_to_whole_shard": round(again["engine_requests"] / max(1, n_s), 4),
                "within_target": again["engine_requests"] <= bound, "rerun_status": again["status"]}
    res = {"edit": edit, "kill": kill}
    if a.json:
        print(json.dumps(res, indent=2))
        return res
    c = edit["edited_pairs_requests"]
    print(f"incremental nightly, dry-run engine, {n} characters, {shards} shards, {a.pairings} pairings, "
          f"cache chunks of {a.chunk_rows}")
    print(f"  full first run: {edit['full_run_requests']} engine requests")
    print(f"  2 profiles edited: their {c['pairs']} pairs cost {c['total']} requests in the first run "
          f"(queries {c['queries']}, responses {c['responses']}, judge {c['judge']}); they sit in "
          f"{edit['shards_holding_edited_pairs']} of {shards} shards")
    print(f"  next run: {edit['next_run_requests']} engine requests = {edit['ratio_to_edited_pairs']:.3f} x the "
          f"edited pairs' (target <= 1.1: {'met' if edit['within_target'] else 'NOT met'}), "
          f"{edit['ratio_to_full_run']:.1%} of a full rebuild; queries shards rebuilt: "
          f"{edit['queries_shards_rebuilt']}")
    print(f"  kill: responses shard {kill['shard']} ({kill['shard_requests']} requests) killed by SIGKILL after "
          f"{kill['answered_before_kill']}; the rerun found {kill['served_from_cache_on_rerun']} in the cache "
          f"(lost {kill['lost_in_kill']}) and asked the engine {kill['rerun_requests']} times")
    print(f"  rerun requests / (unfinished half + one chunk = {kill['target']}) = {kill['ratio_to_target']:.3f} "
          f"({'met' if kill['within_target'] else 'NOT met'}); / whole shard = {kill['ratio_to_whole_shard']:.3f}")
    return res


if __name__ == "__main__":
    main()
