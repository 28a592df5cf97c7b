"""Crash-resume harness: run `ditto` as a subprocess, SIGKILL it (its whole process group, so the
temporary Prefect server dies with it) at seeded random points, resume, and check the run against an
uninterrupted one. Used by tests/test_crash_resume.py (CI, through tests/plugins/reliability.py) and
benchmarks/chaos.py (20+ points). Runs use the product's dry-run engine (engine.kind=dry_run), so the
subprocesses need nothing registered.

Kill points come from the measured timeline of an uninterrupted run: `t_flow`, when Prefect logs
"Beginning flow run" (before it: interpreter and temporary-server start-up, the catalog does not know
the run yet), and `flow_seconds`, how long the flow body ran. A quarter of the kills land uniformly
in the start-up ([0, t_flow] after the process starts), the rest uniformly in the flow
([0, flow_seconds] after that process's own "Beginning flow run"). A resume has less work left, so
some of its kills come too late: they are logged as "finished first" and more episodes run until
the asked number of kills has landed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.stages import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
STAGES = list(STAGE_ORDER)


def characters_file(path: Path, n: int = 12) -> Path:
    from tasks.sources.synthetic import write_characters

    return write_characters(path, n)


def fast_overrides(chars: Path, num_shards: int = 4) -> list[str]:
    """A small real run on the dry-run engine. Langid and the embedding model are switched off (they cost
    seconds of loading per process and add nothing to crash safety); dedup's global step stays on."""
    return ["engine.kind=dry_run", "characters.source=jsonl", f"characters.path={chars}",
            f"runner.num_shards={num_shards}", "runner.retry_delay_seconds=[0]", "filter.language.enabled=false",
            "filter.identity.enabled=false", "dedup.near=false"]


def ditto_env(prefect_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update({"PREFECT_HOME": str(prefect_home), "PREFECT_LOGGING_LEVEL": "INFO",
                # a loaded machine starts the temporary server slowly; the default (20 s) then fails runs
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def ditto_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A ditto process in its own session: its pid is the process group of it and its children."""
    fh = open(log, "ab")  # noqa: SIM115 - closed by the caller through proc.stdout
    return subprocess.Popen(ditto_argv(*args), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(p.name))
    return out


def kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> list[int]:
    """SIGKILL the process group; return survivors (should be none)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while (left := group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(ditto_argv(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"`ditto {' '.join(args)}` ran past {timeout}s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def flat(text: str) -> str:
    """Text without whitespace: rich wraps long messages (paths) at the console width."""
    return "".join(text.split())


# -- state checks ---------------------------------------------------------------------------------
def catalog_rows(home: Path, sql: str, params: list | None = None) -> list[dict]:
    """Read the live catalog file read-only (only when no ditto process holds it). A catalog file without
    tables (an earlier version killed while creating it, or an empty file) counts as absent, and stored
    paths come back absolute, as Catalog returns them."""
    import duckdb

    path = home / "catalog.duckdb"
    if not path.exists() or path.stat().st_size == 0:
        return []
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not {"runs", "shards"} <= tables:
            return []
        cur = con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()
    for r in rows:
        for col in ("path", "rejects_path"):
            if isinstance(r.get(col), str) and r[col] and not r[col].startswith("/"):
                r[col] = str(Path(home).absolute() / r[col])
    return rows


def temp_files(home: Path, run_id: str) -> list[Path]:
    from storage.layout import RunLayout
    from storage.shards import TMP_PREFIX

    root = RunLayout(home, run_id).root
    return sorted(root.rglob(TMP_PREFIX + "*")) if root.exists() else []


def check_after_kill(home: Path, run_id: str) -> dict[str, Any]:
    """What a crash may leave: temp files and 'running' shards; never a registered temp or missing file."""
    from storage.shards import TMP_PREFIX

    shards = catalog_rows(home, "SELECT * FROM shards WHERE run_id=?", [run_id])
    for s in shards:
        for col in ("path", "rejects_path"):
            if s[col]:
                assert not Path(s[col]).name.startswith(TMP_PREFIX), f"a temp file is registered: {s}"
        if s["status"] == "done":
            assert s["path"] and Path(s["path"]).exists(), f"done shard without its file after a kill: {s}"
    return {"temp_files": len(temp_files(home, run_id)),
            "statuses": dict(Counter(s["status"] for s in shards)),
            "in_catalog": bool(catalog_rows(home, "SELECT run_id FROM runs WHERE run_id=?", [run_id]))}


def stage_content(home: Path, run_id: str, stages: list[str] = STAGES) -> dict[str, dict[str, Any]]:
    """Per stage: sorted row ids, sorted rejected row ids, row counts; every file read and checked."""
    from storage.reader import CatalogReader
    from storage.shards import TMP_PREFIX, read_table

    out: dict[str, dict[str, Any]] = {}
    with CatalogReader(home) as rd:
        run_row = rd.run(run_id)
        assert run_row is not None, f"run {run_id} not in the snapshot"
        n = run_row["num_shards"]
        for stage in stages:
            shards = rd.shards(run_id, stage)
            assert sorted(s["shard"] for s in shards) == list(range(n)), f"{stage}: shards {shards}"
            ids, rejected = [], []
            for s in shards:
                assert s["status"] == "done", f"{stage}-{s['shard']} is {s['status']}: {s['error']}"
                assert not Path(s["path"]).name.startswith(TMP_PREFIX)
                t = read_table(s["path"])
                assert t.num_rows == s["rows"], f"{stage}-{s['shard']}: file has {t.num_rows} rows, catalog {s['rows']}"
                ids += t.column("id").to_pylist() if t.num_rows else []
                if s["rejects_path"]:
                    r = read_table(s["rejects_path"])
                    assert r.num_rows == s["rejected_rows"]
                    rejected += [f"{x['row_id']}|{x['filter']}" for x in r.select(["row_id", "filter"]).to_pylist()]
                else:
                    assert not s["rejected_rows"]
            stats = {st["stage"]: st for st in rd.stage_stats(run_id)}.get(stage, {})
            out[stage] = {"ids": sorted(ids), "rejected": sorted(rejected), "rows": len(ids),
                          "rows_out": stats.get("rows_out"), "dropped": stats.get("dropped")}
    return out


def check_catalog_consistent(home: Path, run_id: str) -> None:
    """The live catalog and its snapshot agree; no shard left running/pending; done files exist."""
    from storage.reader import CatalogReader

    live = catalog_rows(home, "SELECT stage, shard, status, path, rows, input_hash FROM shards WHERE run_id=? "
                              "ORDER BY stage, shard", [run_id])
    with CatalogReader(home) as rd:
        snap = [{k: s[k] for k in ("stage", "shard", "status", "path", "rows", "input_hash")}
                for s in rd.query("SELECT * FROM shards WHERE run_id=? ORDER BY stage, shard", [run_id])]
        assert rd.run(run_id)["status"] == "completed"
    assert live == snap, "catalog and snapshot disagree"
    assert all(s["status"] == "done" for s in live), [s for s in live if s["status"] != "done"]
    assert all(Path(s["path"]).exists() for s in live)
    run_row = catalog_rows(home, "SELECT status FROM runs WHERE run_id=?", [run_id])
    assert run_row and run_row[0]["status"] == "completed"


def compare(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for stage, want in expected.items():
        have = got.get(stage)
        if have is None:
            problems.append(f"{stage}: missing")
            continue
        dup = [k for k, c in Counter(have["ids"]).items() if c > 1]
        if dup:
            problems.append(f"{stage}: {len(dup)} duplicated ids, e.g. {dup[:3]}")
        if have["ids"] != want["ids"]:
            missing = sorted(set(want["ids"]) - set(have["ids"]))
            extra = sorted(set(have["ids"]) - set(want["ids"]))
            problems.append(f"{stage}: {len(missing)} missing ids {missing[:3]}, {len(extra)} unexpected {extra[:3]}")
        if have["rejected"] != want["rejected"]:
            problems.append(f"{stage}: rejected rows differ ({len(have['rejected'])} vs {len(want['rejected'])})")
        for k in ("rows_out", "dropped"):
            if have[k] != want[k]:
                problems.append(f"{stage}: stage_stats {k} {have[k]} != {want[k]}")
    return problems


# -- the harness ----------------------------------------------------------------------------------
FLOW_BEGIN = "Beginning flow run"
FLOW_END = "Finished in state"


@dataclass
class Baseline:
    seconds: float  # the whole process
    t_flow: float  # when the flow began (start-up before it)
    flow_seconds: float  # from the flow's beginning to its end
    content: dict[str, dict[str, Any]]


def _log_since(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


@dataclass
class ChaosResult:
    seed: int
    kills: list[dict[str, Any]] = field(default_factory=list)
    episodes: int = 0
    processes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def landed(self) -> int:
        return sum(1 for k in self.kills if k["killed"])


class Chaos:
    def __init__(self, workdir: Path, overrides: list[str], seed: int | None = None, until: str | None = None,
                 echo: Any = print):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overrides = overrides
        self.until = until
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
        self.rng = random.Random(self.seed)
        self.env = ditto_env(self.workdir / "prefect")
        self.echo = echo
        self.result = ChaosResult(self.seed)
        self.baseline: Baseline | None = None

    def run_args(self, home: Path, run_id: str) -> list[str]:
        args = ["run", "--home", str(home), "--run-id", run_id, "--json"]
        for o in self.overrides:
            args += ["--set", o]
        if self.until:
            args += ["--until", self.until]
        return args

    def stages(self) -> list[str]:
        return STAGES[: STAGES.index(self.until) + 1] if self.until else STAGES

    def measure_baseline(self) -> Baseline:
        home, run_id = self.workdir / "baseline", "baseline"
        log = self.workdir / "baseline.log"
        t0 = time.monotonic()
        proc = start(self.run_args(home, run_id), self.env, log)
        t_flow = t_end = None
        while proc.poll() is None:
            text = _log_since(log, 0)
            now = time.monotonic() - t0
            if t_flow is None and FLOW_BEGIN in text:
                t_flow = now
            if t_end is None and f"Flow run '{run_id}' - {FLOW_END}" in text:
                t_end = now
            time.sleep(0.02)
        seconds = time.monotonic() - t0
        assert proc.returncode == 0, f"uninterrupted run failed: {log.read_text()[-3000:]}"
        assert t_flow is not None, f"no {FLOW_BEGIN!r} in the log (PREFECT_LOGGING_LEVEL=INFO?)"
        t_end = t_end or seconds
        self.baseline = Baseline(seconds, t_flow, t_end - t_flow, stage_content(home, run_id, self.stages()))
        rows = {s: v["rows"] for s, v in self.baseline.content.items()}
        self.echo(f"chaos seed={self.seed} baseline: {seconds:.1f}s in all, flow began at {t_flow:.1f}s and ran "
                  f"{t_end - t_flow:.1f}s; rows {rows}")
        return self.baseline

    def draw_point(self) -> tuple[str, float]:
        """(anchor, delay): 'start' counts from the process start, 'flow' from its flow's beginning."""
        b = self.baseline
        assert b is not None
        if self.rng.random() < 0.25:
            return "start", round(self.rng.uniform(0.0, b.t_flow), 2)
        return "flow", round(self.rng.uniform(0.0, b.flow_seconds), 2)

    def _kill_at(self, proc: subprocess.Popen, log: Path, offset: int, anchor: str, delay: float) -> bool:
        """Wait for the point; SIGKILL the group if the process still runs. True if it was killed."""
        t0 = time.monotonic()
        since = t0 if anchor == "start" else None
        while proc.poll() is None:
            now = time.monotonic()
            if since is None and FLOW_BEGIN in _log_since(log, offset):
                since = now
            if since is not None and now - since >= delay:
                survivors = kill_group(proc)
                assert not survivors, f"processes survived the kill of group {proc.pid}: {survivors}"
                return True
            time.sleep(0.02)
        return False

    def _resume_args(self, home: Path, run_id: str) -> list[str]:
        """`ditto rerun RUN` when the catalog knows the run. When the kill came before that, `ditto rerun`
        must say so (exit 2, naming the run and the home) and the run starts again under the same id
        with `ditto run --run-id`."""
        from storage.reader import CatalogReader

        with CatalogReader(home) as rd:
            known = rd.run(run_id) is not None
        if known:
            return ["rerun", run_id, "--home", str(home), "--json"]
        r = run(["rerun", run_id, "--home", str(home), "--json"], self.env, timeout=120)
        self.result.processes += 1
        assert r.returncode == 2, f"rerun of an unknown run: exit {r.returncode}\n{r.stderr[-2000:]}"
        assert flat(f"error: no run '{run_id}' in {home}") in flat(r.stderr), r.stderr
        return self.run_args(home, run_id)

    def episode(self, index: int, kills: int) -> None:
        """One run id in a fresh home: start, kill, resume, kill, ... then resume to the end and check."""
        assert self.baseline is not None
        home, run_id = self.workdir / f"ep{index}", f"chaos-{index}"
        log = self.workdir / f"ep{index}.log"
        args = self.run_args(home, run_id)
        self.result.episodes += 1
        for j in range(kills):
            anchor, delay = self.draw_point()
            offset = log.stat().st_size if log.exists() else 0
            proc = start(args, self.env, log)
            self.result.processes += 1
            killed = self._kill_at(proc, log, offset, anchor, delay)
            if not killed:
                assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}: {_log_since(log, offset)[-3000:]}"
            state = check_after_kill(home, run_id)
            entry = {"episode": index, "kill": j, "process": args[0], "anchor": anchor, "delay": delay,
                     "killed": killed, **state}
            self.result.kills.append(entry)
            self.echo(f"  ep{index} kill{j} ({args[0]}): {delay:.2f}s after {anchor} "
                      f"{'KILLED' if killed else 'finished first'}: in_catalog={state['in_catalog']} "
                      f"shards={state['statuses']} temp_files={state['temp_files']}")
            if not killed:
                break
            args = self._resume_args(home, run_id)
        else:
            r = run(args, self.env)
            self.result.processes += 1
            assert r.returncode == 0, f"final resume exited {r.returncode}\n{r.stderr[-3000:]}"
            summary = json.loads(r.stdout)
            assert summary["run"]["status"] == "completed", summary["run"]
        left = temp_files(home, run_id)
        if left:
            self.result.problems.append(f"ep{index}: temp files left after the resume: {left[:3]}")
        check_catalog_consistent(home, run_id)
        got = stage_content(home, run_id, self.stages())
        self.result.problems += [f"ep{index}: {p}" for p in compare(self.baseline.content, got)]

    # -- kills during the operator commands: export and repair ---------------------------------
    def _timed(self, args: list[str], log: Path) -> tuple[float, int]:
        t0 = time.monotonic()
        proc = start(args, self.env, log)
        proc.wait(timeout=300)
        return time.monotonic() - t0, proc.returncode

    def _kill_after(self, args: list[str], log: Path, delay: float) -> bool:
        proc = start(args, self.env, log)
        t0 = time.monotonic()
        while proc.poll() is None:
            if time.monotonic() - t0 >= delay:
                survivors = kill_group(proc)
                assert not survivors, f"processes survived the kill of group {proc.pid}: {survivors}"
                return True
            time.sleep(0.01)
        return False

    @staticmethod
    def _tree(folder: Path) -> dict[str, bytes] | None:
        if not folder.exists():
            return None
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def ops_episode(self, index: int, kills: int = 2) -> None:
        """After a completed (resumed) run: `ditto export` killed at random points must leave the target
        absent or whole (never a mix), and an export with --overwrite then equals an uninterrupted one;
        `ditto repair` killed at random points (on a healthy catalog and on a corrupted one) must leave a
        home that the next repair restores to the same content."""
        home, run_id = self.workdir / f"ep{index}", f"chaos-{index}"
        log = self.workdir / f"ops{index}.log"
        want = stage_content(home, run_id, self.stages())
        ref = self.workdir / f"ops{index}-ref"
        export = ["export", run_id, "--home", str(home), "--format", "jsonl", "--to"]
        seconds, rc = self._timed([*export, str(ref)], log)
        assert rc == 0, _log_since(log, 0)[-3000:]
        expected = self._tree(ref)
        target = self.workdir / f"ops{index}-out"
        for j in range(kills):
            delay = round(self.rng.uniform(0.0, seconds), 2)
            killed = self._kill_after([*export, str(target), "--overwrite"], log, delay)
            got = self._tree(target)
            self.result.kills.append({"episode": index, "kill": j, "process": "export", "anchor": "start",
                                      "delay": delay, "killed": killed, "in_catalog": True})
            self.echo(f"  ops{index} export kill{j}: {delay:.2f}s {'KILLED' if killed else 'finished first'}: "
                      f"target {'absent' if got is None else 'whole' if got == expected else 'MIXED'}")
            if got is not None and got != expected:
                self.result.problems.append(f"ops{index}: export killed at {delay}s left a partial target")
        seconds_r, rc = self._timed(["repair", "--home", str(home)], log)
        assert rc == 0, _log_since(log, 0)[-3000:]
        for j in range(kills):
            corrupt = j % 2 == 1
            if corrupt:
                (home / "catalog.duckdb").write_bytes(b"\x00garbage" * 4096)
            delay = round(self.rng.uniform(0.0, seconds_r), 2)
            killed = self._kill_after(["repair", "--home", str(home)], log, delay)
            self.result.kills.append({"episode": index, "kill": j, "process": "repair", "anchor": "start",
                                      "delay": delay, "killed": killed, "in_catalog": True})
            self.echo(f"  ops{index} repair kill{j} ({'corrupted' if corrupt else 'healthy'} catalog): "
                      f"{delay:.2f}s {'KILLED' if killed else 'finished first'}")
            r = run(["repair", "--home", str(home)], self.env, timeout=120)
            self.result.processes += 1
            if r.returncode != 0:
                self.result.problems.append(f"ops{index}: repair after a killed repair exited {r.returncode}: "
                                            f"{r.stderr[-500:]}")
                continue
            check_catalog_consistent(home, run_id)
            self.result.problems += [f"ops{index}: after repair: {p}"
                                     for p in compare(want, stage_content(home, run_id, self.stages()))]
        r = run([*export, str(target), "--overwrite"], self.env, timeout=120)
        if r.returncode != 0 or self._tree(target) != expected:
            self.result.problems.append(f"ops{index}: export --overwrite after the kills differs: {r.stderr[-500:]}")

    def run_points(self, points: int, kills_per_episode: int, max_episodes: int = 50) -> ChaosResult:
        """Episodes until `points` kills have landed."""
        if self.baseline is None:
            self.measure_baseline()
        i = 0
        while self.result.landed < points and i < max_episodes:
            self.episode(i, min(kills_per_episode, points - self.result.landed))
            i += 1
        self.echo(f"chaos seed={self.seed}: {self.result.landed} kills landed in {self.result.episodes} episodes, "
                  f"{self.result.processes} processes; points {[(k['anchor'], k['delay']) for k in self.result.kills]}")
        return self.result
