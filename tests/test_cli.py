"""The `ditto` CLI: --json outputs are machine-readable and stable; config errors exit 2 before writing."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.usefixtures("list_source")
runner = CliRunner()


def _json(result):
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_run_show_runs_json(tmp_path, fake_overrides):
    home = str(tmp_path / "home")
    args = ["run", "--home", home, "--until", "responses", "--json", "--run-id", "r1"]
    for o in fake_overrides:
        args += ["--set", o]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = _json(res)
    assert out["run"]["run_id"] == "r1" and out["run"]["status"] == "completed"
    assert {s["stage"] for s in out["stages"]} == {"characters", "queries", "responses"}

    show = _json(runner.invoke(app, ["show", "r1", "--home", home, "--json"]))
    assert set(show) == {"run", "stages", "models", "evaluations"}
    assert [s["stage"] for s in show["stages"]] == ["characters", "queries", "responses"]
    for s in show["stages"]:
        assert set(s) >= {"stage", "shards", "reused", "rows", "rejected", "rows_in", "rows_out", "dropped",
                          "prompt_tokens", "completion_tokens", "seconds", "errors"}
        assert s["shards"]["done"] == 4 and s["errors"] == []
    assert show["run"]["config"]["engine"]["kind"] == "fake"

    runs = _json(runner.invoke(app, ["runs", "--home", home, "--json"]))
    assert [r["run_id"] for r in runs] == ["r1"] and runs[0]["failed_shards"] == 0

    text = runner.invoke(app, ["show", "r1", "--home", home])
    assert text.exit_code == 0 and "responses" in text.stdout


@pytest.mark.parametrize("bad, msg", [
    (["--set", "engine.kindd=x"], "unknown key 'engine.kindd'"),
    (["--set", "characters.shard_size=-1"], "characters.shard_size"),
    (["--until", "nowhere"], "unknown stage"),
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, bad, msg):
    home = tmp_path / "home"
    res = runner.invoke(app, ["run", "--home", str(home), *bad])
    assert res.exit_code == 2
    assert msg in res.output
    assert not home.exists()


def test_missing_config_file(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.yaml"), "--home", str(tmp_path / "h")])
    assert res.exit_code == 2 and "not found" in res.output


def test_export_parquet_and_jsonl(tmp_path, fake_overrides):
    home = str(tmp_path / "home")
    args = ["run", "--home", home, "--until", "queries", "--json", "--run-id", "r2"]
    for o in fake_overrides:
        args += ["--set", o]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, ["export", "r2", "--to", str(tmp_path / "out"), "--format", "jsonl", "--home", home])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "out" / "queries" / "data.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["question"] for x in lines)
    res = runner.invoke(app, ["export", "r2", "--to", str(tmp_path / "pq"), "--format", "parquet", "--home", home])
    assert res.exit_code == 0 and len(list((tmp_path / "pq" / "queries").glob("*.parquet"))) == 4
    res = runner.invoke(app, ["export", "r2", "--to", str(tmp_path / "x"), "--format", "csv", "--home", home])
    assert res.exit_code == 2 and "--format" in res.output
    res = runner.invoke(app, ["show", "nope", "--home", home])
    assert res.exit_code == 2 and "no run 'nope'" in res.output
