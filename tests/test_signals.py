"""SIGTERM on a running `ditto run` (a scheduler cancelling it): the process unwinds like Ctrl-C, so nothing it
started outlives it (engine processes, Prefect's temporary server), it exits 143 with a one-line note, the catalog
keeps what was finished and `ditto rerun` completes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from storage.reader import CatalogReader
from tests.plugins.reliability import (
    characters_file,
    ditto_env,
    fast_overrides,
    group_members,
    kill_group,
    run,
    start,
)

pytestmark = pytest.mark.slow


def _wait(pred, timeout: float, what: str, log) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s\n{log.read_text()[-3000:]}")


def test_sigterm_unwinds_the_run_leaves_no_process_and_rerun_completes(tmp_path):
    home, log = tmp_path / "home", tmp_path / "run.log"
    env = ditto_env(tmp_path / "prefect")
    hold = tmp_path / "hold"
    hold.write_text("1")
    overrides = fast_overrides(characters_file(tmp_path / "chars.jsonl", 8))
    held = [*overrides, f"engine.options.faults={{rate: 0, hold_while_exists: '{hold}'}}"]
    args = ["run", "--home", str(home), "--run-id", "t", "--until", "responses"]
    proc = start([*args, *[x for o in held for x in ("--set", o)]], env, log)
    try:
        def started() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            with CatalogReader(home) as rd:
                return bool(rd.shards("t", "characters"))
        _wait(started, 240, "the characters stage registered", log)
        time.sleep(1.0)  # the queries stage is waiting on the held engine
        os.kill(proc.pid, signal.SIGTERM)  # the main process only, as a scheduler or `kill` sends it
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within 120 s of SIGTERM\n{log.read_text()[-3000:]}") from None
        assert code == 143, log.read_text()[-3000:]
        assert "terminated (SIGTERM)" in log.read_text()
        _wait(lambda: not group_members(proc.pid), 30, "every process of the run gone", log)
    finally:
        kill_group(proc)
    with CatalogReader(home) as rd:
        assert rd.run("t")["status"] != "completed" and rd.shards("t", "characters")
    hold.unlink()
    res = run(["rerun", "t", "--home", str(home), "--json"], env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with CatalogReader(home) as rd:
        assert rd.run("t")["status"] == "completed"
        assert rd.shards("t", "responses")
