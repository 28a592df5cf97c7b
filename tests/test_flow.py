"""build_dataset with real Prefect, DuckDB and Parquet; a list-backed source and the fake engine."""

import json

import pytest

from flows.build import RunFailed, rerun, run_build
from models.base import table_rows
from models.ids import shard_of
from storage.reader import CatalogReader
from storage.shards import read_table
from tests.plugins.core import make_characters

pytestmark = pytest.mark.usefixtures("list_source")


def _shards(home, run_id, stage):
    with CatalogReader(home) as rd:
        return {r["shard"]: r for r in rd.shards(run_id, stage)}


def _rows(home, run_id, stage):
    out = []
    for r in _shards(home, run_id, stage).values():
        out += table_rows(read_table(r["path"]))
    return out


def test_run_writes_every_stage_and_rerun_skips_done_shards(tmp_path, fake_overrides):
    home = tmp_path / "home"
    s = run_build(overrides=fake_overrides, home=home, until="responses")
    run_id = s["run_id"]
    assert s["status"] == "completed" and s["num_shards"] == 4
    for stage in ("characters", "queries", "responses"):
        shards = _shards(home, run_id, stage)
        assert len(shards) == 4 and all(r["status"] == "done" for r in shards.values())
    queries = _rows(home, run_id, "queries")
    assert {q["kind"] for q in queries} == {"role_specific", "contrastive"}
    turns = _rows(home, run_id, "responses")
    assert len(turns) == len(queries) and {t["query_id"] for t in turns} == {q["id"] for q in queries}
    assert all(t["parents"] and t["gen"]["prompt"] and t["gen"]["model"] for t in turns)
    # every row lives in the shard of its character
    for k, r in _shards(home, run_id, "responses").items():
        assert all(shard_of(t["character_id"].split("@")[0], 4) == k for t in table_rows(read_table(r["path"])))
    before = {k: r["finished_at"] for k, r in _shards(home, run_id, "responses").items()}
    again = rerun(run_id, home)
    assert again["status"] == "completed"
    assert {k: r["finished_at"] for k, r in _shards(home, run_id, "responses").items()} == before
    with CatalogReader(home) as rd:
        st = {s["stage"]: s for s in rd.stage_stats(run_id)}
    assert st["responses"]["rows_out"] == len(turns) and st["responses"]["completion_tokens"] > 0


def test_new_run_reuses_identical_shards_and_recomputes_only_the_changed_one(tmp_path):
    # 4 shards with 3 characters each
    pool = [c for c in make_characters(40)]
    chosen, per = [], {k: 0 for k in range(4)}
    for c in pool:
        k = shard_of(c["id"], 4)
        if per[k] < 3:
            per[k] += 1
            chosen.append(c)
    extra = next(c for c in pool if c not in chosen and shard_of(c["id"], 4) == 0)
    f = tmp_path / "chars.jsonl"
    f.write_text("\n".join(json.dumps(c) for c in chosen))
    ov = ["engine.kind=fake", f"characters.path={f}", "characters.source=jsonl", "runner.num_shards=4"]
    home = tmp_path / "home"
    first = run_build(overrides=ov, home=home, until="responses")["run_id"]
    second = run_build(overrides=ov, home=home, until="responses")["run_id"]
    assert all(r["reused_from"] == first for r in _shards(home, second, "responses").values())
    f.write_text("\n".join(json.dumps(c) for c in [*chosen, extra]))
    third = run_build(overrides=ov, home=home, until="responses")["run_id"]
    reused = {k: r["reused_from"] for k, r in _shards(home, third, "queries").items()}
    # partners come from the whole run: the new character's shard and the shards whose pairs it joins
    # (its partners', and any character whose draw it took) are rebuilt; the others are reused
    from tasks.queries import plan_pairs

    def plan(rows):
        return {k: {p for p in plan_pairs(rows, 2, 0) if k in {shard_of(r.split("@")[0], 4) for r in p}}
                for k in range(4)}

    old, new = plan(chosen), plan([*chosen, extra])
    changed = {0} | {k for k in range(4) if old[k] != new[k]}
    assert {k for k, v in reused.items() if v is None} == changed and len(changed) < 4
    assert all(reused[k] == first for k in set(range(4)) - changed)
    assert sum(1 for r in _rows(home, third, "queries") if r["character_id"] == f"{extra['id']}@en") > 0
    fresh = run_build(overrides=ov, home=home, until="queries", fresh=True)["run_id"]
    assert all(r["reused_from"] is None for r in _shards(home, fresh, "queries").values())


def test_failed_shard_is_recorded_others_finish_and_rerun_recomputes_only_it(tmp_path, fake_overrides):
    switch = tmp_path / "fault-on"
    switch.write_text("1")
    home = tmp_path / "home"
    ov = [*fake_overrides, "engine.options.fail_on=Cleopatra", f"engine.options.fail_while_exists={switch}"]
    with pytest.raises(RunFailed, match="ditto rerun"):
        run_build(overrides=ov, home=home, until="responses", run_id="r-fail")
    shards = _shards(home, "r-fail", "queries")
    failed = {k for k, r in shards.items() if r["status"] == "failed"}
    assert failed and len(failed) < 4
    assert all("Cleopatra" in shards[k]["error"] and "EngineError" in shards[k]["error"] for k in failed)
    assert all(shards[k]["status"] == "done" for k in set(shards) - failed)
    resp = _shards(home, "r-fail", "responses")
    assert set(resp) == set(range(4)) - failed  # downstream of a failed shard stays missing
    with CatalogReader(home) as rd:
        assert rd.run("r-fail")["status"] == "failed"
    done_before = {k: r["finished_at"] for k, r in resp.items()}
    switch.unlink()  # the cause is fixed
    s = rerun("r-fail", home)
    assert s["status"] == "completed"
    after = _shards(home, "r-fail", "responses")
    assert all(r["status"] == "done" for r in after.values()) and len(after) == 4
    assert {k: after[k]["finished_at"] for k in done_before} == done_before  # untouched
    assert all(_shards(home, "r-fail", "queries")[k]["attempts"] == 2 for k in failed)


def test_transient_errors_are_retried_by_prefect(tmp_path, fake_overrides):
    home = tmp_path / "home"
    s = run_build(overrides=[*fake_overrides, "engine.options.transient_failures=2", "runner.max_workers=1"],
                  home=home, until="queries")
    assert s["status"] == "completed"
    assert all(r["status"] == "done" for r in _shards(home, s["run_id"], "queries").values())


def test_a_run_id_cannot_be_reused_with_another_config(tmp_path, fake_overrides):
    from models.config import ConfigError

    home = tmp_path / "home"
    run_build(overrides=fake_overrides, home=home, until="characters", run_id="same")
    with pytest.raises(ConfigError, match="another config"):
        run_build(overrides=[*fake_overrides, "seed=5"], home=home, until="characters", run_id="same")


def test_resume_continues_a_run_whose_config_gained_new_defaults(tmp_path, fake_overrides):
    home = tmp_path / "home"
    run_build(overrides=fake_overrides, home=home, until="characters", run_id="old")
    # what `ditto rerun` does after an upgrade changed a default: the stored config, resumed
    s = run_build(overrides=[*fake_overrides, "runner.max_workers=3"], home=home, until="characters",
                  run_id="old", resume=True)
    assert s["status"] == "completed"


# -- pipelined stages ------------------------------------------------------------------------------
FAST = ["filter.identity.enabled=false"]


def _all_rows(home, run_id, stages):
    out = {}
    for stage in stages:
        rows = _rows(home, run_id, stage)
        out[stage] = sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
        rej = []
        for r in _shards(home, run_id, stage).values():
            if r["rejects_path"]:
                rej += table_rows(read_table(r["rejects_path"]))
        out[f"{stage}-rejects"] = sorted(json.dumps(r, sort_keys=True, default=str) for r in rej)
    return out


def test_pipelined_run_writes_the_same_rows_as_a_stage_by_stage_run(tmp_path, fake_overrides):
    from flows.stages import STAGE_ORDER

    ov = [*fake_overrides, *FAST]
    piped = run_build(overrides=ov, home=tmp_path / "a", run_id="same")
    assert piped["status"] == "completed"
    for stage in STAGE_ORDER:  # one stage per invocation: every stage waits for all of the previous one
        staged = run_build(overrides=ov, home=tmp_path / "b", run_id="same", until=stage)
        assert staged["status"] == "completed"
        assert all(r["status"] == "done" for r in _shards(tmp_path / "b", "same", stage).values())
    a, b = _all_rows(tmp_path / "a", "same", STAGE_ORDER), _all_rows(tmp_path / "b", "same", STAGE_ORDER)
    assert a["sft_data"] and a == b


def test_stages_overlap_shard_k_does_not_wait_for_the_whole_previous_stage(tmp_path, fake_overrides, monkeypatch):
    """Queries shard 0 finishes only once some responses shard has started: a flow that waits for every
    queries shard before starting responses never lets it finish (it gives up after 60 s and says so)."""
    import threading

    from tasks.queries import QueriesStage
    from tasks.responses import ResponsesStage

    responses_started = threading.Event()
    waited = {}
    q_run, r_run = QueriesStage.run, ResponsesStage.run

    def queries_run(self, ctx, inputs):
        if ctx.shard == 0:
            waited["ok"] = responses_started.wait(60)
        return q_run(self, ctx, inputs)

    def responses_run(self, ctx, inputs):
        responses_started.set()
        return r_run(self, ctx, inputs)

    monkeypatch.setattr(QueriesStage, "run", queries_run)
    monkeypatch.setattr(ResponsesStage, "run", responses_run)
    s = run_build(overrides=[*fake_overrides, "runner.max_workers=2"], home=tmp_path / "h", until="responses")
    assert s["status"] == "completed" and waited == {"ok": True}
    q = _shards(tmp_path / "h", s["run_id"], "queries")
    r = _shards(tmp_path / "h", s["run_id"], "responses")
    started = {k: json.loads(v["stats"])["started"] for k, v in r.items()}
    ended0 = json.loads(q[0]["stats"])["ended"]
    assert min(started.values()) < ended0  # a responses shard ran while queries shard 0 was still running


def test_engine_loads_once_per_run_in_the_background_while_the_source_is_read(tmp_path, fake_overrides, monkeypatch):
    import threading

    from engines import base
    from tests.plugins.fake import FakeEngine

    threads = []

    class Recording(FakeEngine):
        def load(self):
            threads.append(threading.current_thread().name)
            super().load()

    monkeypatch.setattr("tests.plugins.fake.FakeEngine", Recording)
    base.close_engines()
    try:
        s = run_build(overrides=fake_overrides, home=tmp_path / "h", until="responses")
        assert s["status"] == "completed"
        assert threads == ["engine-preload"]
        again = rerun(s["run_id"], tmp_path / "h")  # nothing to generate: the engine is not loaded again
        assert again["status"] == "completed" and threads == ["engine-preload"]
    finally:
        base.close_engines()


def test_stage_metrics_are_recorded_per_stage(tmp_path, fake_overrides):
    s = run_build(overrides=fake_overrides, home=tmp_path / "h", until="responses")
    with CatalogReader(tmp_path / "h") as rd:
        rows = {r["stage"]: json.loads(r["metrics"]) for r in rd.query(
            "SELECT stage, metrics FROM stage_stats WHERE run_id=?", [s["run_id"]])}
    m = rows["responses"]
    assert m["shards_computed"] == 4 and m["wall_s"] > 0 and m["shard_seconds"] >= m["wall_s"] * 0.999
    assert m["completion_tokens"] > 0 and m["completion_tokens_per_wall_s"] == pytest.approx(
        m["completion_tokens"] / m["wall_s"], rel=0.01)
    assert m["engine"]["requests"] == s["stages"]["responses"]["requests"] - m["cache_hits"]
    assert m["engine"]["busy_seconds"] >= 0
    run = rows["characters"]["run"]  # run-level: all stages together, the engine over the invocation
    assert 0 < run["wall_s"] <= run["stage_wall_s"] + 1e-6
    assert run["completion_tokens"] == sum(rows[st]["completion_tokens"] for st in ("queries", "responses"))
    # what reached the engine: every request the shards counted, less those the generation cache answered
    assert run["engine"]["requests"] == sum(s["stages"][st]["requests"] - rows[st]["cache_hits"]
                                            for st in ("queries", "responses"))
    from flows.report import metrics_lines

    with CatalogReader(tmp_path / "h") as rd:
        lines = metrics_lines(rd.stage_stats(s["run_id"]))
    assert lines[0] == "timing:" and lines[1].startswith("  run: wall ") and any("responses: wall" in x for x in lines)


def test_a_code_change_recomputes_that_stage_and_what_follows_only(tmp_path, fake_overrides, monkeypatch):
    import flows.build as build
    from flows import stages

    home = tmp_path / "h"
    first = run_build(overrides=[*fake_overrides, *FAST], home=home, until="filter")["run_id"]
    real = stages.code_hash
    monkeypatch.setattr(build, "code_hash", lambda name, stage=None: real(name, stage) + ("x" if name == "responses"
                                                                                         else ""))
    second = run_build(overrides=[*fake_overrides, *FAST], home=home, until="filter")["run_id"]
    reused = {st: {r["reused_from"] for r in _shards(home, second, st).values()}
              for st in ("characters", "queries", "responses", "filter")}
    assert reused["characters"] == reused["queries"] == {first}
    assert reused["responses"] == reused["filter"] == {None}


def test_a_damaged_shard_is_rebuilt_by_rerun_and_the_shards_built_from_it_too(tmp_path, fake_overrides):
    home = tmp_path / "h"
    s = run_build(overrides=fake_overrides, home=home, until="responses")
    q = _shards(home, s["run_id"], "queries")
    before = {k: r["finished_at"] for k, r in _shards(home, s["run_id"], "responses").items()}
    damaged = next(k for k, r in q.items() if r["rows"])
    path = q[damaged]["path"]
    data = open(path, "rb").read()
    with open(path, "wb") as fh:  # same size, other bytes: only the sha256 tells
        fh.write(data[:-20] + bytes(20))
    assert rerun(s["run_id"], home)["status"] == "completed"
    after_q = _shards(home, s["run_id"], "queries")
    after_r = _shards(home, s["run_id"], "responses")
    assert after_q[damaged]["finished_at"] > q[damaged]["finished_at"]
    assert after_r[damaged]["finished_at"] > before[damaged]
    assert all(after_r[k]["finished_at"] == before[k] for k in before if k != damaged)
    assert len(table_rows(read_table(after_q[damaged]["path"]))) == q[damaged]["rows"]


def test_rerun_finishes_what_the_last_invocation_asked_for(tmp_path, fake_overrides):
    home = tmp_path / "h"
    ov = [*fake_overrides, *FAST]
    run_build(overrides=ov, home=home, until="characters", run_id="r")
    run_build(overrides=ov, home=home, run_id="r")  # the whole chain, same run
    with CatalogReader(home) as rd:
        assert rd.run("r")["until"] == "sft_data"
    sft = _shards(home, "r", "sft_data")
    victim = next(iter(sft.values()))
    import os

    os.unlink(victim["path"])
    assert rerun("r", home)["status"] == "completed"
    assert os.path.exists(_shards(home, "r", "sft_data")[victim["shard"]]["path"])


def test_more_shards_than_characters_warns_and_show_says_so(tmp_path, fake_overrides):
    from storage.report import run_notes

    home = tmp_path / "h"
    s = run_build(overrides=[*fake_overrides, "runner.num_shards=32"], home=home, until="characters")
    with CatalogReader(home) as rd:
        notes = run_notes(rd, s["run_id"])
    with CatalogReader(home) as rd:
        empty = sum(1 for r in rd.shards(s["run_id"], "characters") if r["rows"] == 0)
    assert empty >= 24
    assert any(f"32 shards for 8 characters: {empty} shards are empty" in n and "runner.num_shards to at most 8" in n
               for n in notes), notes


def test_what_changed_against_the_previous_run_of_the_dataset(tmp_path, fake_overrides, chars_file):
    from storage.report import what_changed

    home = tmp_path / "h"
    first = run_build(overrides=fake_overrides, home=home, until="queries")["run_id"]
    chars = [json.loads(x) for x in chars_file.read_text().splitlines() if x.strip()]
    removed, edited = chars.pop(), chars[0]
    edited["summary"] += " An edited profile."
    added = make_characters(9)[-1] | {"id": "Q999", "label": "New Person"}
    chars_file.write_text("\n".join(json.dumps(c) for c in [*chars, added]) + "\n")
    second = run_build(overrides=fake_overrides, home=home, until="queries")["run_id"]
    with CatalogReader(home) as rd:
        ch = what_changed(rd, second)
        assert what_changed(rd, first)["previous_run"] is None
    assert ch["previous_run"] == first
    c = ch["characters"]
    assert (c["added"], c["changed"], c["removed"]) == (1, 1, 1) and c["unchanged"] == 6
    assert c["examples"] == {"added": ["Q999@en"], "changed": [f"{edited['id']}@en"],
                             "removed": [f"{removed['id']}@en"]}
    q = ch["stages"]["queries"]
    assert q["rebuilt"] + q["reused"] == 4 and q["rebuilt"] >= 1
    assert ch["tokens"] == sum(s["prompt_tokens"] + s["completion_tokens"] for s in ch["stages"].values()) > 0


def test_dashboard_run_page_shows_wall_time_tok_s_the_timeline_and_what_changed(tmp_path, fake_overrides):
    from fastapi.testclient import TestClient

    from dashboard.app import create_app
    from dashboard.data import DashboardData

    home = tmp_path / "h"
    first = run_build(overrides=fake_overrides, home=home, until="responses")["run_id"]
    s = run_build(overrides=[*fake_overrides, "responses.sampling.max_tokens=150"], home=home, until="responses")
    d = DashboardData(home).run(s["run_id"])
    resp = next(x for x in d["stages"] if x["stage"] == "responses")
    with CatalogReader(home) as rd:
        m = json.loads(rd.query("SELECT metrics FROM stage_stats WHERE run_id=? AND stage='responses'",
                                [s["run_id"]])[0]["metrics"])
    # tokens per second of the stage's wall time, not of the sum of shard seconds
    assert resp["tokens_per_second"] == m["completion_tokens_per_wall_s"] and resp["wall_s"] > 0
    assert len(resp["timeline"]) == 4 and all(a <= b for _, a, b in resp["timeline"])
    assert d["changes"]["previous_run"] == first
    assert d["changes"]["stages"]["responses"] == {**d["changes"]["stages"]["responses"], "rebuilt": 4, "reused": 0}
    assert d["changes"]["stages"]["queries"]["reused"] == 4
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        page = c.get(f"/runs/{s['run_id']}")
    assert page.status_code == 200
    html = page.text
    # only the tasks this run ran: the characters and queries shards were reused from the first run
    assert 'id="timeline"' in html and html.count('class="task"') == 4
    assert 'id="changes"' in html and first in html
    assert 'id="run-metrics"' in html and "completion tok/s" in html


def test_the_engines_a_run_loads_are_those_its_stages_declare():
    from flows.build import run_engine_configs
    from flows.stages import get_stage
    from models.config import load_config

    cfg = load_config(overrides=["engine.kind=fake", "filter.judge.enabled=false"])
    assert [get_stage(n).engine_configs(cfg) for n in ("characters", "filter", "dedup", "sft_data")] == [[]] * 4
    assert run_engine_configs(cfg, ["characters", "queries", "responses", "filter"]) == [cfg.engine]
    assert run_engine_configs(cfg, ["characters"]) == []
    judged = load_config(overrides=["engine.kind=fake", "filter.judge.enabled=true",
                                    "filter.judge.engine={kind: fake, model: judge}"])
    assert get_stage("filter").engine_configs(judged) == [judged.filter.judge.engine]
    assert run_engine_configs(judged, ["characters", "queries", "filter"]) == [judged.engine, judged.filter.judge.engine]
    own = load_config(overrides=["engine.kind=fake", "filter.judge.enabled=true"])  # the judge is the run's engine
    assert run_engine_configs(own, ["characters", "queries", "responses", "filter"]) == [own.engine]


def test_dry_run_config_puts_the_dry_run_engine_everywhere_and_loads_no_model():
    from flows.dry_run import dry_run_config

    cfg = dry_run_config(None, ["engine.kind=vllm", "filter.judge.engine={kind: openai, model: big}",
                                "eval.judge={kind: openai, model: big}", "train.enabled=true"])
    assert cfg["engine"]["kind"] == cfg["filter"]["judge"]["engine"]["kind"] == cfg["eval"]["judge"]["kind"] == "dry_run"
    assert not (cfg["filter"]["identity"]["enabled"] or cfg["filter"]["relevance"]["enabled"] or cfg["train"]["enabled"])
    assert cfg["sft"]["chat_template_model"] == "chatml" and cfg["eval"]["engine_kind"] is None


def test_dry_run_runs_the_whole_dag_in_a_throwaway_home_and_shows_the_plan(tmp_path, chars_file, monkeypatch):
    """`ditto run --dry-run` on a config naming a real engine: only the product's registry, no model, nothing
    written to --home; per stage the shards, rows and the columns of the stage's record."""
    from typer.testing import CliRunner

    from engines import base
    from flows.cli import app
    from flows.stages import STAGE_ORDER, get_stage
    from models.base import arrow_schema

    monkeypatch.setattr(base, "ENGINES", {k: v for k, v in base.ENGINES.items() if not v.startswith("tests.")})
    home = tmp_path / "home"
    args = ["run", "--dry-run", "--json", "--home", str(home)]
    for o in ["engine.kind=vllm", "characters.source=jsonl", f"characters.path={chars_file}", "runner.num_shards=4"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["status"] == "completed" and plan["num_shards"] == 4 and plan["engine"] == "dry_run"
    assert [s["stage"] for s in plan["stages"]] == STAGE_ORDER
    by = {s["stage"]: s for s in plan["stages"]}
    assert all(s["shards"] == 4 and s["failed"] == 0 for s in plan["stages"])
    assert by["characters"]["rows"] == 8 and by["queries"]["rows"] > 0 and by["sft_data"]["rows"] > 0
    assert [c.split(":")[0] for c in by["sft_data"]["columns"]] == arrow_schema(get_stage("sft_data").output).names
    assert not home.exists() and not base._loaded  # nothing kept, every engine closed
    refused = CliRunner().invoke(app, ["run", "--dry-run", "--set", "nosuch.key=1"])
    assert refused.exit_code == 2 and "nosuch" in refused.output
