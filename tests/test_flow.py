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
    # 4 shards with >= 2 characters each, so no shard needs a partner from another shard
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
    assert reused[0] is None and all(reused[k] == first for k in (1, 2, 3))
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
