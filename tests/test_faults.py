"""Engine faults (engines/faults.py) and environment faults: a run gets through injected timeouts,
connection errors and malformed outputs by retries and re-sampling; permanent faults, a full disk and
deleted shard files fail or rebuild only what they touch; a second writer and a corrupted catalog give
clear errors and lose nothing."""

from __future__ import annotations

import errno
import json
import time

import pytest
from typer.testing import CliRunner

from engines.base import EngineError, Sampling, TransientEngineError, close_engines, get_engine, is_transient
from engines.faults import FaultConfig, FaultInjector, injector
from flows.build import RunFailed, rerun, run_build
from flows.cli import app
from models.config.engine import EngineConfig
from storage.reader import CatalogReader
from storage.shards import read_table
from tests.plugins.reliability import (
    catalog_rows,
    characters_file,
    ditto_env,
    fast_overrides,
    flat,
    run,
    stage_content,
    start,
)

cli = CliRunner()
CHATS = [[{"role": "user", "content": f"question {i}"}] for i in range(20)]


@pytest.fixture
def overrides(tmp_path):
    return fast_overrides(characters_file(tmp_path / "chars.jsonl", 12), num_shards=4)


@pytest.fixture(autouse=True)
def _fresh_engines():
    close_engines()
    yield
    close_engines()


def _shards(home, run_id, stage):
    with CatalogReader(home) as rd:
        return {r["shard"]: r for r in rd.shards(run_id, stage)}


def _cli_run(home, overrides, *extra):
    args = ["run", "--home", str(home), "--json", *extra]
    for o in overrides:
        args += ["--set", o]
    return cli.invoke(app, args)


# -- the injector -------------------------------------------------------------------------------
def _fake():
    return get_engine(EngineConfig(kind="fake"))


def test_decisions_are_seeded_and_independent_of_call_order():
    def counts(order):
        inj = FaultInjector(_fake(), {"rate": 0.3, "seed": 7})
        for i in order:
            try:
                inj.generate([CHATS[i]], Sampling())
            except TransientEngineError:
                pass
        return inj.counts.copy()

    a = counts(range(20))
    assert a == counts(reversed(range(20)))
    assert a["timeout"] + a["connection"] > 0 and a["malformed"] > 0
    other = FaultInjector(_fake(), {"rate": 0.3, "seed": 8})
    for c in CHATS:
        try:
            other.generate([c], Sampling())
        except TransientEngineError:
            pass
    assert other.counts != a


def test_call_faults_are_transient_and_a_retry_draws_again():
    inj = FaultInjector(_fake(), {"rate": 0.5, "kinds": ["timeout", "connection"], "seed": 1})
    failures = 0
    for chat in CHATS:
        for _attempt in range(10):  # as Prefect retries the shard: the same call again
            try:
                out = inj.generate([chat], Sampling())
                break
            except TransientEngineError as exc:
                assert is_transient(exc)
                failures += 1
        assert out and out[0].text
    assert failures == inj.counts["timeout"] + inj.counts["connection"] > 0


@pytest.mark.parametrize("rate, expect", [(0.0, 0), (1.0, 20)])
def test_malformed_rate_bounds(rate, expect):
    inj = FaultInjector(_fake(), {"rate": rate, "kinds": ["malformed"]})
    gens = inj.generate(CHATS, Sampling())
    assert inj.counts["malformed"] == expect and len(gens) == 20
    if expect:
        assert {g.text for g in gens} <= {"", json.dumps({"answer": 42, "items": "none"}),
                                          "Sure! Here are some questions: (1) what (2) why"} | {
            g.text for g in gens if g.finish_reason == "length"}


def test_permanent_fault_is_not_transient():
    inj = FaultInjector(_fake(), {"rate": 0.0, "permanent_on": "question 3"})
    inj.generate(CHATS[:3], Sampling())
    with pytest.raises(EngineError, match="injected permanent") as ei:
        inj.generate(CHATS[2:5], Sampling())
    assert not is_transient(ei.value)


def test_permanent_fault_only_while_its_switch_file_exists(tmp_path):
    switch = tmp_path / "broken"
    switch.write_text("1")
    inj = FaultInjector(_fake(), {"rate": 0.0, "permanent_on": "question 3", "permanent_while_exists": str(switch)})
    with pytest.raises(EngineError, match="injected permanent"):
        inj.generate(CHATS[2:5], Sampling())
    switch.unlink()  # the cause fixed: the same prompts now go through
    assert len(inj.generate(CHATS[2:5], Sampling())) == 3 and inj.counts["permanent"] == 1


def test_fault_options_are_checked_and_never_reach_the_engine(tmp_path):
    with pytest.raises(EngineError, match="engine.options.faults.*unknown fault kind"):
        injector({"kinds": ["meteor"]})
    with pytest.raises(EngineError, match="engine.options.faults.*rate"):
        get_engine(EngineConfig(kind="fake", options={"faults": {"rate": 2}}))
    assert not isinstance(get_engine(EngineConfig(kind="fake", options={"questions": 2})), FaultInjector)
    report = tmp_path / "faults.json"
    eng = get_engine(EngineConfig(kind="fake", options={"questions": 2, "faults": {"rate": 0, "report": str(report)}}))
    assert isinstance(eng, FaultInjector) and eng.engine.config.options == {"questions": 2}
    # the model id (and so every shard hash) is the one without faults
    assert eng.model_id == get_engine(EngineConfig(kind="fake", options={"questions": 2})).model_id
    eng.generate(CHATS[:2], Sampling())
    close_engines()
    assert json.loads(report.read_text()) == {"calls": 1}
    assert FaultConfig().kinds == ["timeout", "connection", "malformed"]


# -- through the flow -----------------------------------------------------------------------------
def test_run_completes_through_injected_faults_and_counts_them(tmp_path, overrides):
    """10% timeouts/connection errors per call and 10% malformed generations: the run completes through
    Prefect retries (runner.retries=2) and re-sampling; the faults show in the stats."""
    report = tmp_path / "faults.json"
    home = tmp_path / "home"
    faults = f"engine.options.faults={{rate: 0.1, seed: 3, report: '{report}'}}"
    res = _cli_run(home, [*overrides, faults], "--run-id", "faulty")
    assert res.exit_code == 0, res.output
    counts = json.loads(report.read_text())  # the CLI closes the engines: the injector wrote its counts
    assert counts["timeout"] + counts["connection"] > 0 and counts["malformed"] > 0, counts
    show = json.loads(cli.invoke(app, ["show", "faulty", "--home", str(home), "--json"]).stdout)
    st = {s["stage"]: s for s in show["stages"]}
    assert all(s["shards"]["done"] == 4 and not s["errors"] for s in st.values())
    assert st["queries"]["format_failures"] > 0  # malformed question JSON was re-sampled
    retried = catalog_rows(home, "SELECT count(*) AS n FROM shards WHERE run_id='faulty'")[0]["n"]
    assert retried == 24  # one row per stage and shard (6 x 4): retries reuse the row
    # garbage answers that got through the responses stage were caught by the filter
    if counts.get("malformed.empty") or counts.get("malformed.cut_off"):
        assert sum(st["filter"]["dropped"].values()) > 0


def test_permanent_fault_fails_only_its_shards_with_the_error_shown(tmp_path, overrides):
    home = tmp_path / "home"
    res = _cli_run(home, [*overrides, "engine.options.faults={rate: 0, permanent_on: Cleopatra}"],
                   "--run-id", "perm", "--until", "responses")
    assert res.exit_code == 1, res.output
    show = json.loads(cli.invoke(app, ["show", "perm", "--home", str(home), "--json"]).stdout)
    assert show["run"]["status"] == "failed" and "failed" in show["run"]["error"]
    q = next(s for s in show["stages"] if s["stage"] == "queries")
    assert 0 < q["shards"]["failed"] < 4 and q["shards"]["done"] == 4 - q["shards"]["failed"]
    assert all("EngineError" in e["error"] and "Cleopatra" in e["error"] for e in q["errors"])
    assert len(q["errors"]) == q["shards"]["failed"]
    resp = next(s for s in show["stages"] if s["stage"] == "responses")
    assert resp["shards"]["done"] == q["shards"]["done"]  # downstream of the failed shards: missing
    shards = _shards(home, "perm", "queries")
    assert all(r["attempts"] == 1 for r in shards.values())  # a permanent error is not retried


# -- environment faults ---------------------------------------------------------------------------
def test_disk_full_fails_one_shard_clearly_and_rerun_completes(tmp_path, overrides, monkeypatch):
    import flows.build as build

    real = build.write_table

    def full_disk(table, path):
        if "/responses/" in str(path) and path.name == "part-00001.parquet":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(table, path)

    monkeypatch.setattr(build, "write_table", full_disk)
    home = tmp_path / "home"
    with pytest.raises(RunFailed, match="responses: 1 failed"):
        run_build(overrides=overrides, home=home, until="filter", run_id="full")
    resp = _shards(home, "full", "responses")
    assert resp[1]["status"] == "failed" and "No space left on device" in resp[1]["error"]
    assert resp[1]["attempts"] == 1  # not transient: no retry storm on a full disk
    assert all(resp[k]["status"] == "done" for k in (0, 2, 3))
    assert not list((home / "runs" / "full").rglob(".tmp-*"))
    monkeypatch.setattr(build, "write_table", real)  # space freed
    assert rerun("full", home)["status"] == "completed"
    assert _shards(home, "full", "responses")[1]["status"] == "done"


def test_unusable_home_exits_2_naming_it(tmp_path, overrides):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = _cli_run(blocker / "home", overrides, "--until", "characters")
    assert res.exit_code == 2 and flat(f"cannot create home folder {blocker / 'home'}") in flat(res.output)


def test_corrupted_catalog_run_says_repair_then_repair_restores_everything(tmp_path, overrides):
    home = tmp_path / "home"
    assert _cli_run(home, overrides, "--run-id", "c1", "--until", "queries").exit_code == 0
    before = stage_content(home, "c1", ["characters", "queries"])
    (home / "catalog.duckdb").write_bytes(b"\x00garbage" * 4096)
    res = _cli_run(home, overrides, "--run-id", "c2", "--until", "queries")
    assert res.exit_code == 2 and flat("is corrupted or not a DuckDB file") in flat(res.output)
    assert flat(f"run `ditto repair --home {home}`") in flat(res.output)
    fixed = cli.invoke(app, ["repair", "--home", str(home)])
    assert fixed.exit_code == 0 and "rebuilt from the snapshot: 1 runs" in fixed.output
    assert (home / "catalog.duckdb.corrupt").exists()  # kept aside, not deleted
    assert stage_content(home, "c1", ["characters", "queries"]) == before
    assert cli.invoke(app, ["repair", "--home", str(home)]).output.strip().endswith("nothing to repair")
    res = cli.invoke(app, ["rerun", "c1", "--home", str(home), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["run"]["status"] == "completed"


@pytest.mark.parametrize("stage", ["characters", "queries", "responses", "filter", "dedup"])
def test_deleted_shard_file_is_rebuilt_by_rerun(tmp_path, overrides, stage):
    home = tmp_path / "home"
    run_build(overrides=overrides, home=home, until="sft_data", run_id="d1")
    before = stage_content(home, "d1", ["characters", "queries", "responses", "filter", "dedup", "sft_data"])
    victim = _shards(home, "d1", stage)[2]
    stages = ["characters", "queries", "responses", "filter", "dedup", "sft_data"]
    later = stages[stages.index(stage) + 1:]
    untouched = {s: {k: r["finished_at"] for k, r in _shards(home, "d1", s).items() if k != 2}
                 for s in stages[1:] if s != stage}
    before_2 = {s: _shards(home, "d1", s)[2]["finished_at"] for s in later}
    import os

    os.unlink(victim["path"])
    assert rerun("d1", home)["status"] == "completed"
    after = _shards(home, "d1", stage)[2]
    assert after["status"] == "done" and after["path"] == victim["path"] and read_table(after["path"]).num_rows
    assert stage_content(home, "d1", list(before)) == before
    for s, fin in untouched.items():  # the other shards are not recomputed
        assert {k: r["finished_at"] for k, r in _shards(home, "d1", s).items() if k != 2} == fin
    if stage != "characters":  # a regenerated file may hold other rows: what was built from it is rebuilt
        assert all(_shards(home, "d1", s)[2]["finished_at"] > before_2[s] for s in later)


def test_deleted_file_of_a_reused_shard_is_recomputed_in_the_new_run(tmp_path, overrides):
    home = tmp_path / "home"
    run_build(overrides=overrides, home=home, until="queries", run_id="a")
    run_build(overrides=overrides, home=home, until="queries", run_id="b")
    shard = _shards(home, "b", "queries")[0]
    assert shard["reused_from"] == "a"
    import os

    os.unlink(shard["path"])  # the file lives in run a
    assert rerun("b", home)["status"] == "completed"
    now = _shards(home, "b", "queries")[0]
    assert now["reused_from"] is None and "/runs/b/" in now["path"] and read_table(now["path"]).num_rows


@pytest.mark.slow
def test_second_writer_exits_3_and_the_first_run_is_intact(tmp_path, overrides):
    """Two `ditto run` processes on one home: the second gets CatalogBusy (exit 3) and writes nothing;
    readers keep working; the first completes with a consistent catalog."""
    home = tmp_path / "home"
    env = ditto_env(tmp_path / "prefect")
    hold = tmp_path / "hold"
    hold.write_text("1")
    slow = [*overrides, f"engine.options.faults={{rate: 0, hold_while_exists: '{hold}'}}"]
    args = ["run", "--home", str(home), "--run-id", "first", "--json", "--until", "responses"]
    for o in slow:
        args += ["--set", o]
    first = start(args, env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            with CatalogReader(home) as rd:
                if rd.shards("first", "queries"):
                    break
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        second = run(["run", "--home", str(home), "--run-id", "second", "--until", "characters", "--json",
                      *[x for o in overrides for x in ("--set", o)]], env)
        assert second.returncode == 3, second.stderr[-3000:]
        assert flat(f"another ditto process is using {home / 'catalog.duckdb'}") in flat(second.stderr)
        shown = run(["show", "first", "--home", str(home), "--json"], env)  # a reader, during the run
        assert shown.returncode == 0 and json.loads(shown.stdout)["run"]["status"] == "running"
        hold.unlink()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        hold.unlink(missing_ok=True)
        if first.poll() is None:
            from tests.plugins.reliability import kill_group

            kill_group(first)
    runs = catalog_rows(home, "SELECT run_id, status FROM runs")
    assert runs == [{"run_id": "first", "status": "completed"}]
    stage_content(home, "first", ["characters", "queries", "responses"])  # every file reads


def test_shards_built_from_a_rebuilt_file_are_rebuilt_too(tmp_path, overrides, monkeypatch):
    """A deleted queries file is regenerated; with a sampling engine its rows differ, so the responses and
    everything after them in that shard are recomputed from the new rows instead of kept or reused."""
    from tests.plugins.fake import FakeEngine

    calls = {"n": 0}
    real = FakeEngine._one

    def sampling(self, chat, sp):  # a new draw on every call, as a sampling LLM would give
        calls["n"] += 1
        text = real(self, chat, sp)
        items = json.loads(text) if sp.json_schema is not None else None
        if isinstance(items, list) and items and isinstance(items[0], dict) and "question" in items[0]:
            for it in items:
                it["question"] = f"{it['question'][:-1]} (draw {calls['n']})?"
            return json.dumps(items)
        return text

    monkeypatch.setattr(FakeEngine, "_one", sampling)
    home = tmp_path / "home"
    run_build(overrides=overrides, home=home, until="filter", run_id="s1")
    import os

    os.unlink(_shards(home, "s1", "queries")[1]["path"])
    assert rerun("s1", home)["status"] == "completed"
    got = stage_content(home, "s1", ["queries", "responses", "filter"])
    q_ids = set(got["queries"]["ids"])
    turns = []
    for r in _shards(home, "s1", "responses").values():
        turns += read_table(r["path"]).to_pylist()
    assert {t["query_id"] for t in turns} <= q_ids  # no turn answers a question that no longer exists
    assert len(turns) == len(q_ids)
