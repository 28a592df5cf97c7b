"""Deployments: deploy/prefect.yaml validates and applies, the server has the cron and timezone, next fire
times are computed, a bad cron is refused with a clear error, and a deployment run executes to Completed
(a tiny flow, and the real build_dataset with the dry-run engine)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from flows.deploy import DEFAULT_PREFECT_YAML, ROOT, DeployError, deploy_all, next_fire_times, validate
from models.config import load_config


def _execute(flow_run_id) -> subprocess.CompletedProcess:
    """What a worker does with a scheduled run: `prefect flow-run execute <id>` in a fresh process."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "prefect", "flow-run", "execute", str(flow_run_id)], env=env,
                          capture_output=True, text=True, timeout=600)


def _state(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _bad_copy(tmp_path: Path, **schedule) -> Path:
    data = yaml.safe_load(DEFAULT_PREFECT_YAML.read_text())
    data["deployments"][0]["schedules"] = [schedule]
    p = tmp_path / "prefect.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_prefect_yaml_declares_the_deployments():
    deps = {d["name"]: d for d in validate(DEFAULT_PREFECT_YAML)}
    assert set(deps) == {"nightly", "generate", "train", "evaluate", "crosssup"}
    nightly = deps["nightly"]
    assert nightly["entrypoint"] == "flows/build.py:build_dataset"
    assert nightly["concurrency_limit"] == 1 and nightly["work_pool"]["name"] == "ditto-cpu"
    (sched,) = nightly["schedules"]
    assert sched["cron"] and sched["timezone"] == "Europe/Paris"
    assert deps["train"]["entrypoint"] == "flows/train.py:train_flow"
    assert deps["evaluate"]["entrypoint"] == "flows/evaluate.py:evaluate_flow"
    assert {deps[n]["work_pool"]["name"] for n in ("generate", "train", "evaluate")} == {"ditto-gpu"}
    cfg = load_config(ROOT / nightly["parameters"]["config_path"])  # the sample nightly config is valid
    assert cfg.engine.kind == "openai" and cfg.engine.base_urls


@pytest.mark.parametrize("schedule, message", [
    ({"cron": "61 1 * * *", "timezone": "UTC"}, "Invalid cron string"),
    ({"cron": "every night", "timezone": "UTC"}, "Invalid cron string"),
    ({"cron": "0 1 * * *", "timezone": "Mars/Olympus_Mons"}, "Mars/Olympus_Mons"),
])
def test_invalid_schedule_is_refused_before_anything_is_sent(tmp_path, schedule, message):
    with pytest.raises(DeployError, match=f"deployment 'nightly': invalid schedule.*{message}"):
        deploy_all(_bad_copy(tmp_path, **schedule))  # no server is running: it fails in validation


def test_missing_entrypoint_and_unknown_name(tmp_path):
    data = yaml.safe_load(DEFAULT_PREFECT_YAML.read_text())
    data["deployments"][0]["entrypoint"] = "flows/nope.py:build_dataset"
    p = tmp_path / "prefect.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(DeployError, match="entrypoint file flows/nope.py not found"):
        validate(p)
    with pytest.raises(DeployError, match="no deployment named weekly"):
        validate(DEFAULT_PREFECT_YAML, names=["weekly"])


def test_next_fire_times_across_dst():
    # Europe/Paris moves to summer time on 2026-03-29 at 02:00: the 01:30 run stays at 01:30 local
    times = next_fire_times("30 1 * * *", "Europe/Paris", n=3, after=datetime(2026, 3, 27, 12, tzinfo=UTC))
    assert [(t.day, t.hour, t.minute) for t in times] == [(28, 1, 30), (29, 1, 30), (30, 1, 30)]
    assert [t.utcoffset().total_seconds() / 3600 for t in times] == [1, 1, 2]
    with pytest.raises(DeployError, match="Invalid cron"):
        next_fire_times("not a cron", "UTC")
    with pytest.raises(DeployError, match="no next fire time"):
        next_fire_times("0 0 31 2 *", "UTC")  # February 31st


def test_nightly_applies_and_reads_back(prefect_server):
    deps = {d["name"]: d for d in deploy_all(DEFAULT_PREFECT_YAML)}
    assert set(deps) == {"nightly", "generate", "train", "evaluate", "crosssup"}
    n = deps["nightly"]
    assert n["full_name"] == "build_dataset/nightly" and n["work_pool"] == "ditto-cpu"
    assert n["schedules"] == [{"cron": "30 1 * * *", "timezone": "Europe/Paris", "active": True}]
    assert n["concurrency_limit"] == 1
    assert set(n["tags"]) >= {"ditto", "nightly"} and n["parameters"]["config_path"] == "deploy/configs/nightly.yaml"
    assert deps["train"]["entrypoint"] == "flows/train.py:train_flow" and deps["evaluate"]["work_pool"] == "ditto-gpu"
    sched = n["schedules"][0]
    fires = next_fire_times(sched["cron"], sched["timezone"], n=2)
    assert fires[0] > datetime.now(UTC) and (fires[1] - fires[0]).total_seconds() in (82800, 86400, 90000)
    again = {d["name"]: d for d in deploy_all(DEFAULT_PREFECT_YAML, names=["nightly"])}  # idempotent
    assert again["nightly"]["id"] == n["id"]


TINY_FLOW = textwrap.dedent("""
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="tiny")
    def tiny(n: int = 3) -> int:
        return sum(double.map(range(n)).result())
""")


def test_run_deployment_executes_tiny_flow(prefect_server, tmp_path):
    from prefect.deployments import run_deployment

    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "tiny.py").write_text(TINY_FLOW)
    spec = {"deployments": [{"name": "tiny-nightly", "entrypoint": "flows/tiny.py:tiny", "parameters": {"n": 4},
                             "schedules": [{"cron": "0 3 * * *", "timezone": "America/New_York"}],
                             "concurrency_limit": 1, "work_pool": {"name": "ditto-test-pool"}}]}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    (dep,) = deploy_all(tmp_path / "prefect.yaml", root=tmp_path)
    assert dep["schedules"][0]["timezone"] == "America/New_York"
    fr = run_deployment("tiny/tiny-nightly", parameters={"n": 5}, timeout=0)
    assert fr.state.is_scheduled()
    proc = _execute(fr.id)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _state(fr.id).state.is_completed()


def test_run_deployment_executes_build_dataset(prefect_server, tmp_path, chars_file):
    """The real nightly deployment on the dry-run engine, run the way a worker runs it (a fresh process: it knows
    only the product's engines)."""
    from prefect.deployments import run_deployment

    from storage.reader import CatalogReader

    deploy_all(DEFAULT_PREFECT_YAML, names=["nightly"])
    home = tmp_path / "home"
    overrides = ["engine.kind=dry_run", "characters.source=jsonl", f"characters.path={chars_file}",
                 "characters.shard_size=2", "runner.retry_delay_seconds=[0]", "dataset=ditto-deploy-test"]
    fr = run_deployment("build_dataset/nightly", timeout=0, parameters={
        "config_path": None, "overrides": overrides, "home": str(home), "run_id": "nightly-test-1"})
    proc = _execute(fr.id)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _state(fr.id)
    assert run.state.is_completed() and run.name == "nightly-test-1"
    with CatalogReader(home) as rd:
        cat_run = rd.run("nightly-test-1")
        assert cat_run["status"] == "completed" and cat_run["flow_run_id"] == str(fr.id)
        assert {s["stage"] for s in rd.stage_stats("nightly-test-1")} == {
            "characters", "queries", "responses", "filter", "dedup", "sft_data"}
    # the flow published its per-stage artifacts under stable keys
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    keys = {a.key for a in arts if a.key}
    assert {"ditto-deploy-test-responses-stats", "ditto-deploy-test-sft-data-samples"} <= keys


def test_prefect_retry_of_a_failed_flow_run_recomputes_only_the_failed_shards(prefect_server, tmp_path, chars_file):
    """What the UI's "Retry" does: the same flow run, same parameters, back to AwaitingRetry and executed
    again. Done shards are skipped through the catalog; only the failed ones (and what depends on them) run."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import AwaitingRetry

    from storage.reader import CatalogReader

    deploy_all(DEFAULT_PREFECT_YAML, names=["nightly"])
    home, switch = tmp_path / "home", tmp_path / "fault-on"
    switch.write_text("1")
    overrides = ["engine.kind=dry_run", "characters.source=jsonl", f"characters.path={chars_file}",
                 "characters.shard_size=2", "runner.retry_delay_seconds=[0]",
                 f"engine.options.faults={{rate: 0, kinds: [], permanent_on: Cleopatra, permanent_while_exists: '{switch}'}}"]
    fr = run_deployment("build_dataset/nightly", timeout=0, parameters={
        "config_path": None, "overrides": overrides, "home": str(home), "run_id": "retry-1", "until": "responses"})
    _execute(fr.id)
    assert _state(fr.id).state.is_failed()
    with CatalogReader(home) as rd:
        before = {(s["stage"], s["shard"]): s for s in rd.shards("retry-1")}
    failed = {k for k, s in before.items() if s["status"] == "failed"}
    assert failed and all(k[0] == "queries" for k in failed)

    switch.unlink()  # the cause is fixed; retry the same flow run
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(fr.id, state=AwaitingRetry(), force=True)
    proc = _execute(fr.id)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _state(fr.id).state.is_completed()
    with CatalogReader(home) as rd:
        after = {(s["stage"], s["shard"]): s for s in rd.shards("retry-1")}
        assert rd.run("retry-1")["status"] == "completed"
    assert all(s["status"] == "done" for s in after.values())
    untouched = [k for k, s in before.items() if s["status"] == "done" and k[0] != "characters"]
    assert untouched and all(after[k]["finished_at"] == before[k]["finished_at"] for k in untouched)
    assert all(after[k]["attempts"] == 2 for k in failed)


# -- task runner: thread pool by default, Dask when configured -------------------------------------

def test_task_runner_default_is_thread_pool():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.runners import task_runner_for

    runner = task_runner_for(load_config(overrides=["runner.max_workers=3"]))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def _square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_dask_task_runner_runs_a_tiny_flow(prefect_server):
    pytest.importorskip("prefect_dask")
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from flows.runners import task_runner_for

    cfg = load_config(overrides=["runner.task_runner=dask", "runner.dask_workers=2"])
    runner = task_runner_for(cfg)
    assert isinstance(runner, DaskTaskRunner)
    square = task(_square, name="square")

    @flow(task_runner=runner)
    def tiny_dask(n: int) -> list[tuple[int, int]]:
        return square.map(range(n)).result()

    out = tiny_dask(6)
    assert [v for v, _ in out] == [0, 1, 4, 9, 16, 25]
    assert os.getpid() not in {pid for _, pid in out}  # ran in Dask worker processes
    remote = task_runner_for(load_config(overrides=["runner.task_runner=dask", "runner.dask_address=tcp://h:8786"]))
    assert remote.address == "tcp://h:8786"
