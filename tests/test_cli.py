"""The `ditto` CLI: --json outputs are machine-readable and stable; config errors exit 2 before writing."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.catalog import Catalog
from tests.plugins.ops import RUN_FAILED, RUN_OK

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
    assert set(show) >= {"run", "stages", "models", "evaluations"}
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


# -- operating on a home: repair, export, listings, messages (fake catalog, no Prefect) -----------------


REPO = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import sys, time
    from storage.catalog import Catalog
    cat = Catalog(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
""")


def _hold(home):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(home)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _one_line_error(res, code, *needles):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    flat = "".join(res.output.split())
    for n in needles:
        assert "".join(n.split()) in flat, res.output


def test_repair_while_a_run_holds_the_catalog_exits_3_and_touches_nothing(fake_home):
    home, _ = fake_home
    before = (home / "catalog.duckdb").read_bytes()
    proc = _hold(home)
    try:
        res = runner.invoke(app, ["repair", "--home", str(home)])
        _one_line_error(res, 3, "another ditto process", "nothing was changed")
    finally:
        proc.kill()
        proc.wait()
    assert (home / "catalog.duckdb").read_bytes() == before
    assert not list(home.glob("*.corrupt*"))


def test_repair_without_a_snapshot_says_so_instead_of_claiming_success(tmp_path, fake_home):
    res = runner.invoke(app, ["repair", "--home", str(tmp_path / "empty")])
    _one_line_error(res, 2, "has no catalog and no snapshot", "nothing to repair")
    home, _ = fake_home
    import shutil

    shutil.rmtree(home / "snapshot")
    (home / "catalog.duckdb").write_bytes(b"garbage" * 100)
    res = runner.invoke(app, ["repair", "--home", str(home)])
    _one_line_error(res, 2, "no snapshot", "left in place")
    assert (home / "catalog.duckdb").read_bytes() == b"garbage" * 100


def test_a_deleted_snapshot_is_named_and_repair_writes_it_again(fake_home):
    home, ids = fake_home
    import shutil

    shutil.rmtree(home / "snapshot")
    for cmd in (["runs"], ["show", RUN_OK]):
        _one_line_error(runner.invoke(app, [*cmd, "--home", str(home)]), 2, "snapshot", "is missing", "ditto repair")
    res = runner.invoke(app, ["repair", "--home", str(home)])
    assert res.exit_code == 0 and "snapshot written again: 2 runs" in res.output
    assert {r["run_id"] for r in _json(runner.invoke(app, ["runs", "--home", str(home), "--json"]))} == set(ids["runs"])


def test_a_mistyped_home_says_it_has_no_catalog(tmp_path):
    typo = tmp_path / "hoem"
    for cmd in (["runs"], ["show", "r1"], ["export", "r1", "--to", str(tmp_path / "out")]):
        _one_line_error(runner.invoke(app, [*cmd, "--home", str(typo)]), 2, f"{typo} has no catalog")
    _one_line_error(runner.invoke(app, ["rerun", "r1", "--home", str(typo)]), 2, f"no run 'r1' in {typo}",
                    "has no catalog")
    assert not typo.exists()


def test_export_refuses_a_non_empty_target_and_overwrite_replaces_it_whole(fake_home, tmp_path):
    home, _ = fake_home
    to = tmp_path / "out"
    to.mkdir()
    (to / "queries").mkdir()
    (to / "queries" / "part-00099.parquet").write_text("another run's file")
    res = runner.invoke(app, ["export", RUN_OK, "--to", str(to), "--home", str(home)])
    _one_line_error(res, 2, "is not empty", "--overwrite")
    assert (to / "queries" / "part-00099.parquet").exists()
    res = runner.invoke(app, ["export", RUN_OK, "--to", str(to), "--home", str(home), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (to / "queries").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(tmp_path.glob(".tmp-export-*"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(runner.invoke(app, ["export", RUN_OK, "--to", str(afile), "--home", str(home)]), 2,
                    "is not a folder")


def test_export_of_an_unfinished_run_needs_partial_and_warns(fake_home, tmp_path):
    home, _ = fake_home
    res = runner.invoke(app, ["export", RUN_FAILED, "--to", str(tmp_path / "a"), "--home", str(home)])
    _one_line_error(res, 2, f"run {RUN_FAILED} is failed", "responses 1/2", "--partial")
    assert not (tmp_path / "a").exists()
    res = runner.invoke(app, ["export", RUN_FAILED, "--to", str(tmp_path / "b"), "--home", str(home), "--partial"])
    assert res.exit_code == 0 and "warning:" in res.stderr and "incomplete" in res.stderr
    assert len(list((tmp_path / "b" / "responses").glob("*.parquet"))) == 1


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_stops_at_a_damaged_shard_and_show_lists_it(fake_home, tmp_path, fmt):
    home, _ = fake_home
    with Catalog(home) as cat:
        victim = cat.shards(RUN_OK, "queries")[1]["path"]
    Path(victim).write_bytes(Path(victim).read_bytes()[:-7])  # truncated in place
    res = runner.invoke(app, ["export", RUN_OK, "--to", str(tmp_path / "o"), "--format", fmt, "--home", str(home)])
    _one_line_error(res, 2, "queries-1", "truncated", f"ditto rerun {RUN_OK}", "nothing was exported")
    assert not (tmp_path / "o").exists()
    show = _json(runner.invoke(app, ["show", RUN_OK, "--home", str(home), "--json"]))
    q = next(s for s in show["stages"] if s["stage"] == "queries")
    assert [d["shard"] for d in q["damaged"]] == [1]
    text = runner.invoke(app, ["show", RUN_OK, "--home", str(home)])
    assert "queries-1" in text.stdout and "damaged" in text.stdout


def test_runs_shows_a_dead_run_as_interrupted(fake_home):
    home, _ = fake_home
    with Catalog(home) as cat:
        cat.start_run("dead", "ditto-test", {}, "c", "0.1.0", 2)  # its process "dies": never finished
    rows = {r["run_id"]: r["status"] for r in _json(runner.invoke(app, ["runs", "--home", str(home), "--json"]))}
    assert rows["dead"] == "interrupted" and rows[RUN_OK] == "completed"
    assert "the process of this run ended" in runner.invoke(app, ["show", "dead", "--home", str(home)]).stdout


@pytest.mark.parametrize("text", ["disk [/] full [x] here", "[bold]not bold[/bold]"])
def test_messages_are_plain_text_never_markup(fake_home, tmp_path, text):
    home, _ = fake_home
    with Catalog(home) as cat:
        cat.finish_run(RUN_FAILED, "failed", f"responses: {text}")
    res = runner.invoke(app, ["show", RUN_FAILED, "--home", str(home)])
    assert res.exit_code == 0 and f"responses: {text}" in res.stdout
    odd = tmp_path / f"h{text}"
    _one_line_error(runner.invoke(app, ["runs", "--home", str(odd)]), 2, f"{odd} has no catalog")


@pytest.mark.parametrize("bad", ["../../victim", "/tmp/abs", "a/b", ".."])
def test_run_with_an_invalid_run_id_exits_2_and_writes_nothing(tmp_path, bad):
    home = tmp_path / "home"
    res = runner.invoke(app, ["run", "--home", str(home), "--run-id", bad])
    _one_line_error(res, 2, "invalid run id")
    assert not home.exists() and not (tmp_path / "victim").exists()
    for cmd in (["show", bad], ["rerun", bad], ["export", bad, "--to", str(tmp_path / "o")]):
        _one_line_error(runner.invoke(app, [*cmd, "--home", str(home)]), 2, "invalid run id")


def test_a_second_writer_learns_busy_before_prefect_starts(fake_home, monkeypatch):
    home, _ = fake_home
    import flows.build

    def never(**kwargs):
        raise AssertionError("the flow must not start")

    monkeypatch.setattr(flows.build, "run_build", never)
    proc = _hold(home)
    try:
        _one_line_error(runner.invoke(app, ["run", "--home", str(home), "--run-id", "second"]), 3,
                        "another ditto process")
    finally:
        proc.kill()
        proc.wait()


def test_dashboard_on_a_port_in_use_exits_4_not_busy(fake_home):
    import socket

    home, _ = fake_home
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = runner.invoke(app, ["dashboard", "--home", str(home), "--port", str(port)])
    _one_line_error(res, 4, f"cannot listen on 127.0.0.1:{port}", "--port")
    assert "busy" not in res.output and "another ditto process" not in res.output


def test_progress_counts_the_rows_the_table_counts():
    from flows.cli import _Progress

    p = _Progress()
    p("stage_start", {"stage": "filter", "total": 2})
    for _ in range(2):  # one session of 3 kept turns per shard
        p("shard_done", {"stage": "filter", "rows": 1, "rows_out": 3})
    task = p.p.tasks[p.tasks["filter"]]
    assert task.fields["rows"] == 6
    p("stage_end", {"stage": "filter", "stats": {"rows_out": 7}})  # the table's number wins at the end
    assert p.p.tasks[p.tasks["filter"]].fields["rows"] == 7


NOISY = textwrap.dedent("""
    import os, subprocess, sys
    from engines import base
    base.ENGINES["noisy"] = "tests.plugins.ops:NoisyEngine"
    from flows.cli import main
    sys.argv = ["ditto", *sys.argv[1:]]
    main()
""")


@pytest.mark.slow
def test_json_commands_print_only_json_on_stdout_even_when_engine_processes_write_there(tmp_path, chars_file):
    """The engine writes to stdout three ways (print, the fd, a worker subprocess): all of it goes to
    stderr and stdout parses as JSON."""
    from tests.plugins.reliability import ditto_env

    home = tmp_path / "home"
    args = ["run", "--home", str(home), "--json", "--run-id", "j1", "--until", "queries", "--set", "engine.kind=noisy",
            "--set", f"characters.path={chars_file}", "--set", "characters.source=jsonl"]
    r = subprocess.run([sys.executable, "-c", NOISY, *args], cwd=REPO, env=ditto_env(tmp_path / "prefect"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["run"]["status"] == "completed"
    assert "noisy worker" in r.stderr and "noisy print" in r.stderr and "noisy fd" in r.stderr
    assert os.path.exists(home / "catalog.duckdb")


@pytest.mark.parametrize("cmd, target", [(["eval", RUN_OK], "flows.evaluate.evaluate_flow"),
                                         (["train", RUN_OK], "flows.train.train_flow")])
def test_eval_and_train_json_keep_stdout_for_the_json(fake_home, monkeypatch, cmd, target):
    home, _ = fake_home
    module, name = target.rsplit(".", 1)

    def noisy(**kwargs):
        print("INFO 12-01 vllm worker: loading weights")  # as vLLM's in-process logger does
        return {"run_id": RUN_OK, "report": None}

    monkeypatch.setattr(__import__(module, fromlist=[name]), name, noisy)
    res = runner.invoke(app, [*cmd, "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run_id"] == RUN_OK
    assert "loading weights" in res.stderr
