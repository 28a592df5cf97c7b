"""The generation cache: request keys, hits and misses, single-flight, chunk durability across a kill,
index self-repair, pruning (`ditto gc`), and the flow: a parser or filter change never regenerates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from engines.base import Engine, Generation, Sampling, get_engine
from engines.cache import CachedEngine, cached_engine, engine_identity, request_key
from models.config.engine import EngineConfig
from storage.gencache import GenStore, cache_root, close_stores, gc, keep_set, open_store

REPO = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "What is an engine?"}]


class GateEngine(Engine):
    """Answers only when `gate` is set, from a thread: requests stay in flight until then."""

    kind = "gate"

    def __init__(self, fail: bool = False):
        super().__init__(EngineConfig(kind="fake", model="gate"))
        self.gate = threading.Event()
        self.submitted: list[str] = []
        self.cancelled = 0
        self.fail = fail
        self._lock = threading.Lock()

    def _submit(self, chat, sampling) -> Future:
        fut: Future = Future()
        with self._lock:
            self.submitted.append(chat[-1]["content"])
            nth = len(self.submitted)

        def answer():
            self.gate.wait(30)
            if fut.cancelled():
                self.cancelled += 1
                return
            if self.fail:
                fut.set_exception(RuntimeError("model crashed"))
            else:
                fut.set_result(Generation(text=f"answer to {chat[-1]['content']} #{nth}",
                                          prompt_tokens=7, completion_tokens=5, model="gate"))

        threading.Thread(target=answer, daemon=True).start()
        return fut


@pytest.fixture
def store(tmp_path):
    s = GenStore(tmp_path / "gencache", chunk_rows=4, flush_seconds=3600)
    yield s
    s.close()


def _fake(options: dict | None = None) -> tuple:
    cfg = EngineConfig(kind="fake", model="m", options=options or {})
    return get_engine(cfg), cfg


def test_a_hit_costs_no_request_and_returns_the_same_generation(store):
    engine, cfg = _fake()
    ce = CachedEngine(engine, store, identity=engine_identity(engine, cfg))
    before = engine.metrics().requests
    first = ce.submit(CHAT, Sampling()).result()
    again = ce.submit(CHAT, Sampling()).result()
    assert engine.metrics().requests - before == 1
    assert not first.cached and again.cached
    assert (again.text, again.prompt_tokens, again.completion_tokens, again.model) == \
        (first.text, first.prompt_tokens, first.completion_tokens, first.model)
    assert (ce.hits, ce.misses) == (1, 1)
    # generate() goes through the same cache: one new chat, one known
    other = [{"role": "user", "content": "Something else?"}]
    gens = ce.generate([CHAT, other], Sampling())
    assert [g.cached for g in gens] == [True, False] and engine.metrics().requests - before == 2


BASE = Sampling(temperature=0.7, top_p=0.8, max_tokens=100)


@pytest.mark.parametrize("change", [
    {"sampling": {"attempt": 2}}, {"sampling": {"seed": 3}}, {"sampling": {"temperature": 0.2}},
    {"sampling": {"max_tokens": 101}}, {"sampling": {"json_schema": {"type": "object"}}},
    {"sampling": {"stop": ("\n",)}}, {"sampling": {"repetition_penalty": 1.1}},
    {"chat": "What is an engine? "}, {"identity": {"model": "m@rev2"}}, {"identity": {"seed": 1}},
    {"identity": {"kind": "vllm"}},
])
def test_the_key_covers_model_messages_full_sampling_and_round(change):
    ident = {"model": "m@main", "kind": "fake", "seed": 0, "dtype": "auto", "options": {}}
    key = request_key(ident, CHAT, BASE)
    chat = [CHAT[0], {"role": "user", "content": change["chat"]}] if "chat" in change else CHAT
    sp = BASE.model_copy(update=change.get("sampling", {}))
    assert request_key({**ident, **change.get("identity", {})}, chat, sp) != key
    assert request_key(dict(ident), [dict(m) for m in CHAT], BASE.model_copy()) == key


def test_fault_injection_is_not_part_of_the_engine_identity():
    engine, cfg = _fake()
    faulty = cfg.model_copy(update={"options": {"faults": {"rate": 0.5}}})
    assert engine_identity(engine, cfg) == engine_identity(engine, faulty)
    assert engine_identity(engine, cfg) != engine_identity(engine, cfg.model_copy(update={"seed": 5}))


def test_an_engine_with_injected_faults_bypasses_the_cache(tmp_path):
    """Injected outputs are not the model's: neither stored under its keys nor replaced by stored ones."""
    from models.config import load_config
    from tasks.base import StageContext

    def ctx(overrides):
        return StageContext(run_id="r", stage="queries", shard=0, num_shards=1, home=tmp_path,
                            config=load_config(overrides=["engine.kind=fake", *overrides]))

    assert isinstance(ctx([]).engine(), CachedEngine)
    faulty = ctx(["engine.options.faults={rate: 1.0, kinds: [malformed], seed: 2}"]).engine()
    assert not isinstance(faulty, CachedEngine)
    assert faulty.submit(CHAT, Sampling()).result(timeout=30).cached is False


def test_identical_requests_in_flight_are_computed_once(store):
    engine = GateEngine()
    ce = CachedEngine(engine, store)
    futs: list[Future] = []
    threads = [threading.Thread(target=lambda: futs.append(ce.submit(CHAT, Sampling()))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other = ce.submit(CHAT, Sampling(attempt=2))  # another round: another request
    engine.gate.set()
    gens = [f.result(timeout=30) for f in futs]
    assert len(engine.submitted) == 2
    assert len({g.text for g in gens}) == 1 and sorted(g.cached for g in gens) == [False] + [True] * 7
    assert other.result(timeout=30).text != gens[0].text
    assert ce.submit(CHAT, Sampling()).result().cached and len(engine.submitted) == 2


def test_a_request_nobody_waits_for_is_cancelled_in_the_engine(store):
    engine = GateEngine()
    ce = CachedEngine(engine, store)
    a, b = ce.submit(CHAT, Sampling()), ce.submit(CHAT, Sampling())
    assert a.cancel()
    assert not b.cancelled()  # b still waits: the engine request lives on
    assert b.cancel()
    engine.gate.set()
    for _ in range(300):
        if engine.cancelled:
            break
        threading.Event().wait(0.05)
    assert engine.cancelled == 1
    assert store.get(ce.key(CHAT, Sampling())) is None  # nothing cached for it


def test_failures_reach_every_waiter_and_are_not_cached(store):
    engine = GateEngine(fail=True)
    ce = CachedEngine(engine, store)
    futs = [ce.submit(CHAT, Sampling()) for _ in range(3)]
    engine.gate.set()
    for f in futs:
        with pytest.raises(RuntimeError, match="model crashed"):
            f.result(timeout=30)
    engine.fail = False
    assert not ce.submit(CHAT, Sampling()).result(timeout=30).cached
    assert len(engine.submitted) == 2


def test_results_are_written_in_chunks_and_survive_reopening(tmp_path):
    engine, cfg = _fake()
    store = GenStore(tmp_path / "gc", chunk_rows=5, flush_seconds=3600)
    ce = CachedEngine(engine, store, identity=engine_identity(engine, cfg), run_id="r1", stage="queries", shard=3)
    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(12)]
    texts = [g.text for g in ce.generate(chats, Sampling())]
    assert store.size()["chunks"] == 2 and store.size()["buffered"] == 2  # 10 durable, 2 still buffered
    assert store.get(ce.key(chats[11], Sampling()))["text"] == texts[11]  # buffered ones are visible
    store.close()
    reopened = GenStore(tmp_path / "gc", chunk_rows=5)
    ce2 = CachedEngine(engine, reopened, identity=engine_identity(engine, cfg))
    assert [g.text for g in ce2.generate(chats, Sampling())] == texts
    assert ce2.hits == 12 and reopened.size()["generations"] == 12
    reopened.close()


CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from engines.base import Sampling, get_engine
from engines.cache import CachedEngine
from models.config.engine import EngineConfig
from storage.gencache import GenStore
store = GenStore({root!r}, chunk_rows=8, flush_seconds=3600)
ce = CachedEngine(get_engine(EngineConfig(kind="dry_run", model="m")), store, run_id="r", stage="responses", shard=0)
for i in range(37):
    ce.submit([{{"role": "user", "content": f"question {{i}}"}}], Sampling()).result()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_keeps_every_full_chunk(tmp_path):
    root = tmp_path / "gencache"
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), root=str(root))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = GenStore(root, chunk_rows=8)
    ce = CachedEngine(get_engine(EngineConfig(kind="dry_run", model="m")), store)
    have = [store.get(ce.key([{"role": "user", "content": f"question {i}"}], Sampling())) is not None
            for i in range(37)]
    # a chunk fills at 8 and the caller waits until it is durable: 4 chunks made it, less than one chunk lost
    assert have == [True] * 32 + [False] * 5
    store.close()


def test_a_half_registered_chunk_is_indexed_and_a_lost_index_is_rebuilt(tmp_path, store):
    engine, cfg = _fake()
    ce = CachedEngine(engine, store, identity=engine_identity(engine, cfg))
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    ce.generate(chats, Sampling())
    store.close()
    # a process killed between writing a chunk and indexing it: the chunk's intent row has rows NULL
    import sqlite3
    con = sqlite3.connect(store.index_path)
    con.execute("DELETE FROM gens WHERE chunk = (SELECT max(id) FROM chunks)")
    con.execute("UPDATE chunks SET rows = NULL WHERE id = (SELECT max(id) FROM chunks)")
    con.commit()
    con.close()
    healed = GenStore(store.root, chunk_rows=4)
    assert healed.size()["generations"] == 8
    healed.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(store.index_path) + suffix).unlink(missing_ok=True)
    store.index_path.write_bytes(b"not a database at all" * 100)
    rebuilt = GenStore(store.root, chunk_rows=4)
    ce = CachedEngine(engine, rebuilt, identity=engine_identity(engine, cfg))
    assert all(g.cached for g in ce.generate(chats, Sampling()))
    rebuilt.close()


def test_a_slow_trickle_is_written_after_flush_seconds(tmp_path):
    store = GenStore(tmp_path / "gc", chunk_rows=1000, flush_seconds=0.2)
    store.put("ab" * 16, {"text": "t", "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop",
                          "model": "m"})
    for _ in range(200):
        if store.size()["chunks"]:
            break
        threading.Event().wait(0.05)
    assert store.size() == {"generations": 1, "chunks": 1, "bytes": store.size()["bytes"], "buffered": 0}
    store.close()


# -- pruning -------------------------------------------------------------------------------------------
def _fill(home: Path, run_id: str, questions: list[str], stage: str = "responses", shard: int = 0) -> list[str]:
    engine, cfg = _fake()
    ce = cached_engine(engine, cfg, home, run_id=run_id, stage=stage, shard=shard)
    chats = [[{"role": "user", "content": q}] for q in questions]
    ce.generate(chats, Sampling())
    return [ce.key(c, Sampling()) for c in chats]


def test_gc_keeps_what_the_last_k_runs_used(tmp_path):
    home = tmp_path / "home"
    k1 = _fill(home, "r1", [f"old {i}" for i in range(20)] + ["shared"])
    k2 = _fill(home, "r2", [f"mid {i}" for i in range(5)])
    k3 = _fill(home, "r3", ["shared", "new"])
    k3b = _fill(home, "r1", ["reused later"], stage="queries", shard=2)  # r3 reuses r1's queries shard 2
    close_stores()
    runs = [{"run_id": r, "dataset": "d", "started_at": f"2026-01-0{i}"} for i, r in enumerate(["r1", "r2", "r3"], 1)]
    runs.append({"run_id": "other", "dataset": "e", "started_at": "2025-01-01"})  # another dataset: its own last K
    shards = [{"run_id": "r2", "stage": "responses", "shard": 0, "reused_from": None},
              {"run_id": "r3", "stage": "responses", "shard": 0, "reused_from": None},
              {"run_id": "r3", "stage": "queries", "shard": 2, "reused_from": "r1"}]
    kept, keep = keep_set(runs, shards, keep_runs=2)
    assert kept == ["other", "r2", "r3"] and ("r1", "queries", 2) in keep and ("r1", "responses", 0) not in keep
    dry = gc(home, keep, dry_run=True)
    assert dry["generations_removed"] == 20 and open_store(home).size()["generations"] == 28
    close_stores()
    res = gc(home, keep)
    assert res["generations_removed"] == 20 and res["after"]["generations"] == 8
    store = open_store(home)
    assert all(store.get(k) is None for k in k1[:20])
    assert all(store.get(k) is not None for k in k1[20:] + k2 + k3 + k3b)
    assert not (cache_root(home) / "used" / "r1").exists() or ("r1", "queries", 2) in keep
    close_stores()
    _, keep = keep_set(runs, shards, keep_runs=1)  # only r3 (and r1's shard it reused)
    gc(home, keep)
    store = open_store(home)
    assert all(store.get(k) is None for k in k2) and all(store.get(k) is not None for k in k3 + k3b)
    close_stores()


def test_ditto_gc_refuses_while_a_run_holds_the_catalog_and_prunes_otherwise(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from storage.catalog import Catalog

    home = tmp_path / "home"
    with Catalog(home) as cat:
        for i, run in enumerate(["n1", "n2"]):
            cat.start_run(run, "d", {}, f"h{i}", "0", num_shards=1)
            cat.mark_done(run, "responses", 0, f"ih{i}", rows=1, path=str(home / "x"), bytes_=1, rejects_path=None,
                          rejected_rows=0, stats={})
            cat.finish_run(run, "completed")
    old = _fill(home, "n1", ["a", "b"])
    new = _fill(home, "n2", ["c"])
    close_stores()
    runner = CliRunner()
    with Catalog(home):
        busy = runner.invoke(app, ["gc", "--home", str(home), "--keep-runs", "1"])
    assert busy.exit_code == 3 and "catalog" in busy.output
    res = runner.invoke(app, ["gc", "--home", str(home), "--keep-runs", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["runs_kept"] == ["n2"] and data["generations_removed"] == 2
    store = open_store(home)
    assert all(store.get(k) is None for k in old) and store.get(new[0]) is not None
    close_stores()
    bad = runner.invoke(app, ["gc", "--home", str(home), "--keep-runs", "0"])
    assert bad.exit_code == 2 and "keep-runs" in bad.output


# -- the flow ----------------------------------------------------------------------------------------------


def _requests(cfg_overrides: list[str]) -> int:
    from models.config import load_config

    return get_engine(load_config(overrides=cfg_overrides).engine).metrics().requests


def _stage_stats(home, run_id):
    from storage.reader import CatalogReader

    with CatalogReader(home) as rd:
        shards = rd.shards(run_id)
    out: dict[str, dict[str, int]] = {}
    for s in shards:
        st = json.loads(s["stats"] or "{}")
        agg = out.setdefault(s["stage"], {"cache_hits": 0, "cache_misses": 0, "requests": 0})
        if not s["reused_from"]:
            for k in agg:
                agg[k] += st.get(k, 0)
    return out


@pytest.mark.usefixtures("list_source")
def test_a_parser_or_filter_change_rebuilds_shards_from_cached_generations(tmp_path, fake_overrides, monkeypatch):
    from flows.build import run_build
    from flows.cli import run_details
    from tasks import queries

    home = tmp_path / "home"
    first = run_build(overrides=fake_overrides, home=home, until="filter")["run_id"]
    st = _stage_stats(home, first)
    assert st["queries"]["cache_misses"] > 0 and st["responses"]["cache_misses"] > 0
    assert st["filter"]["cache_misses"] > 0  # the judge
    real = queries.parse_questions
    monkeypatch.setattr(queries, "parse_questions", lambda text, n, **kw: real(text, n, **kw)[:1])  # a new parser
    before = _requests(fake_overrides)
    second = run_build(overrides=fake_overrides, home=home, until="queries", fresh=True)["run_id"]
    assert _requests(fake_overrides) == before  # no generation asked again
    st2 = _stage_stats(home, second)
    # every request of the first run (the misses, and B's shards asking A's pairs again: hits) is a hit now
    assert st2["queries"]["cache_misses"] == 0
    assert st2["queries"]["cache_hits"] == st["queries"]["cache_hits"] + st["queries"]["cache_misses"]
    from storage.reader import CatalogReader
    with CatalogReader(home) as rd:
        rows1 = sum(s["rows"] for s in rd.shards(first, "queries"))
        rows2 = sum(s["rows"] for s in rd.shards(second, "queries"))
    assert rows2 < rows1  # the new parser's output, from the cached text
    monkeypatch.setattr(queries, "parse_questions", real)
    stricter = [*fake_overrides, "filter.judge.min_score=9"]  # a filter change: judge verdicts are cached
    third = run_build(overrides=stricter, home=home, until="filter")["run_id"]
    assert _requests(fake_overrides) == before
    st3 = _stage_stats(home, third)
    assert st3["filter"]["cache_misses"] == 0 and st3["filter"]["cache_hits"] > 0
    shown = {s["stage"]: s for s in run_details(str(home), third)["stages"]}
    assert shown["filter"]["cache_hits"] == st3["filter"]["cache_hits"] and shown["filter"]["cache_misses"] == 0


@pytest.mark.usefixtures("list_source")
def test_engine_cache_off_asks_the_engine_every_time(tmp_path, fake_overrides):
    from flows.build import run_build

    home = tmp_path / "home"
    ov = [*fake_overrides, "engine.cache=false"]
    run_build(overrides=ov, home=home, until="queries")
    before = _requests(ov)
    run_build(overrides=ov, home=home, until="queries", fresh=True)
    assert _requests(ov) > before
    assert not (cache_root(home) / "chunks").exists()


def test_an_unwritable_cache_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "home" / "gencache"
        blocker.parent.mkdir()
        blocker.write_text("a file where the cache folder should be")
    else:
        (tmp_path / "home").mkdir(mode=0o500)
    from storage.gencache import GenCacheError

    with pytest.raises(GenCacheError, match="cannot create the generation cache"):
        GenStore(cache_root(tmp_path / "home"))
