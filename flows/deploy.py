"""Apply the deployments of deploy/prefect.yaml to a Prefect server (`ditto deploy`).

deploy_all validates the file first (entrypoints exist, crons and timezones parse: a bad schedule is an
error naming the deployment, before anything is sent), creates the work pools it names when missing
(type `process`), then runs Prefect's own `prefect --no-prompt deploy` from the repository root, so the
YAML stays the single source of truth and behaves exactly as `prefect deploy --all` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"
POOL_TYPE = "process"


class DeployError(ValueError):
    pass


def load_prefect_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DeployError(f"prefect.yaml not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DeployError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list) or not data["deployments"]:
        raise DeployError(f"{p}: expected a top-level `deployments:` list")
    return data


def check_schedule(deployment: str, schedule: dict[str, Any]) -> None:
    """Raise DeployError naming the deployment when a cron or timezone is invalid."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    if not isinstance(schedule, dict) or "cron" not in schedule:
        return  # interval/rrule schedules: Prefect validates them
    kwargs = {"cron": str(schedule["cron"])}
    if schedule.get("timezone"):
        kwargs["timezone"] = str(schedule["timezone"])
    try:
        CronSchedule(**kwargs)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise DeployError(f"deployment {deployment!r}: invalid schedule {kwargs}: {msgs}") from None


def validate(path: str | Path, names: list[str] | None = None, root: Path | None = None) -> list[dict[str, Any]]:
    """The deployments to apply (all, or those named), checked: names, entrypoints, schedules."""
    data = load_prefect_yaml(path)
    root = Path(root or ROOT)
    deps = data["deployments"]
    known = [d.get("name") for d in deps]
    if names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise DeployError(f"no deployment named {', '.join(unknown)} in {path} (has: {', '.join(map(str, known))})")
        deps = [d for d in deps if d.get("name") in names]
    for d in deps:
        name = d.get("name")
        if not name:
            raise DeployError(f"{path}: a deployment has no name")
        entry = d.get("entrypoint") or ""
        file, _, func = entry.partition(":")
        if not file or not func:
            raise DeployError(f"deployment {name!r}: entrypoint must be path/to/file.py:flow_function, got {entry!r}")
        if not (root / file).is_file():
            raise DeployError(f"deployment {name!r}: entrypoint file {file} not found under {root}")
        if not (d.get("work_pool") or {}).get("name"):
            raise DeployError(f"deployment {name!r}: work_pool.name is required")
        schedules = list(d.get("schedules") or []) + ([d["schedule"]] if d.get("schedule") else [])
        for s in schedules:
            check_schedule(name, s)
    return deps


def next_fire_times(cron: str, timezone: str | None = None, n: int = 3,
                    after: datetime | None = None) -> list[datetime]:
    """The next `n` times a cron schedule fires (timezone-aware, DST handled as Prefect's scheduler does)."""
    from prefect.server.schemas.schedules import CronSchedule
    from prefect.utilities.asyncutils import run_coro_as_sync

    check_schedule("<cron>", {"cron": cron, "timezone": timezone})
    sched = CronSchedule(cron=cron, timezone=timezone) if timezone else CronSchedule(cron=cron)
    try:
        return list(run_coro_as_sync(sched.get_dates(n=n, start=after)))
    except Exception as exc:  # croniter's CroniterBadDateError: a valid expression with no date (Feb 31)
        raise DeployError(f"cron {cron!r} has no next fire time: {exc}") from None


def _api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    url = PREFECT_API_URL.value()
    if url:
        env["PREFECT_API_URL"] = url
    key = PREFECT_API_KEY.value()
    if key:
        env["PREFECT_API_KEY"] = key.get_secret_value() if hasattr(key, "get_secret_value") else str(key)
    return env


def ensure_work_pools(pools: list[str]) -> list[str]:
    """Create the named work pools (process type) that do not exist yet; return the created ones."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for pool in dict.fromkeys(pools):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type=POOL_TYPE))
                created.append(pool)
    return created


def _limit(d: Any) -> int | None:
    gcl = getattr(d, "global_concurrency_limit", None)
    return gcl.limit if gcl is not None else d.concurrency_limit


def read_deployments(names: list[str]) -> list[dict[str, Any]]:
    """Deployments with these names as the server has them (schedules, limits, pool, tags, parameters)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        deps = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
        flows = {d.flow_id: client.read_flow(d.flow_id).name for d in deps}
    out = []
    for d in deps:
        out.append({
            "id": str(d.id), "name": d.name, "flow_name": flows[d.flow_id], "full_name": f"{flows[d.flow_id]}/{d.name}",
            "entrypoint": d.entrypoint, "work_pool": d.work_pool_name, "tags": list(d.tags),
            "parameters": dict(d.parameters), "concurrency_limit": _limit(d),
            "schedules": [{"cron": getattr(s.schedule, "cron", None), "timezone": getattr(s.schedule, "timezone", None),
                           "active": s.active} for s in d.schedules],
        })
    return sorted(out, key=lambda r: names.index(r["name"]) if r["name"] in names else len(names))


def deploy_all(prefect_yaml_path: str | Path = DEFAULT_PREFECT_YAML, names: list[str] | None = None,
               root: str | Path | None = None, timeout: float = 300) -> list[dict[str, Any]]:
    """Validate, create missing work pools, apply the deployments (all, or `names`), read them back."""
    root = Path(root or ROOT).resolve()
    path = Path(prefect_yaml_path).resolve()
    deps = validate(path, names, root)
    ensure_work_pools([d["work_pool"]["name"] for d in deps])
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(path)]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    proc = subprocess.run(cmd, cwd=root, env=_api_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DeployError(f"prefect deploy failed (exit {proc.returncode}):\n{tail}")
    return read_deployments([d["name"] for d in deps])


__all__ = ["DEFAULT_PREFECT_YAML", "DeployError", "deploy_all", "ensure_work_pools", "next_fire_times",
           "read_deployments", "validate"]
