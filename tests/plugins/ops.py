"""Fixtures for operations tests: a Prefect test server (session-scoped), and a small fake catalog with a
completed run and a failed one (done/failed shards, sessions, rejects, models, evaluations), built
directly with Catalog + write_table, as a real run would leave it."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from models.base import Record, to_table
from models.ids import row_id
from models.records import Rejection, Session, SessionTurn
from storage.catalog import Catalog
from storage.layout import RunLayout
from storage.shards import write_table

RUN_OK = "20260101-020000-aaaaaa"
RUN_FAILED = "20260102-020000-bbbbbb"
FLOW_RUN_ID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
CHARACTERS = [
    ("Q1", "Ada Lovelace", "en", "real"),
    ("Q2", "Sherlock Holmes", "en", "fictional"),
    ("Q3", "Napoleon", "en", "real"),
    ("Q4", "孙悟空", "zh", "fictional"),
]
STAGES = ["characters", "queries", "responses", "filter", "dedup", "sft_data"]


class _IdRow(Record):
    """Stand-in rows for the stages the dashboard only counts."""

    id: str


def _session(qid: str, label: str, lang: str, cat: str, n_turns: int = 3) -> Session:
    cid = f"{qid}@{lang}"
    turns = []
    for i in range(n_turns):
        kind = "contrastive" if i == n_turns - 1 else "role_specific"
        turns.append(SessionTurn(turn_id=row_id("turn", cid, i), query_id=row_id("q", cid, i), kind=kind,
                                 question=f"{label}, question {i}: what do you remember of <b>day {i}</b>?",
                                 answer=f"As {label}, I remember day {i} well.", scores={"consistency": 0.8 + i / 100}))
    return Session(id=row_id("session", cid), character_id=cid, label=label, language=lang, category=cat,
                   system=f"You are {label}.", turns=turns, parents=[t.turn_id for t in turns])


def _stats(rows_in: int, rows_out: int, dropped: dict | None = None, tokens: int = 0) -> dict:
    return {"rows_in": rows_in, "rows_out": rows_out, "requests": rows_in if tokens else 0,
            "prompt_tokens": tokens * 3, "completion_tokens": tokens, "format_failures": 0, "seconds": 2.5,
            "dropped": dropped or {}}


def build_fake_home(home: Path) -> dict:
    """Two runs in `home`: RUN_OK (completed, 2 shards per stage, sessions and rejects) and RUN_FAILED
    (responses shard 1 failed). Returns ids for the tests."""
    home = Path(home)
    by_shard = {0: CHARACTERS[:2], 1: CHARACTERS[2:]}
    with Catalog(home) as cat:
        for run_id, failed in ((RUN_OK, False), (RUN_FAILED, True)):
            cat.start_run(run_id, "ditto-test", {"dataset": "ditto-test"}, "cfg" + run_id[-6:], "0.1.0", 2)
            cat.set_run(run_id, flow_run_id=FLOW_RUN_ID if not failed else str(uuid.uuid4()))
            for stage in STAGES:
                for shard, chars in by_shard.items():
                    ih = f"{stage[:4]}{shard:04d}{run_id[-6:]}"
                    if failed and stage == "responses" and shard == 1:
                        cat.mark_failed(run_id, stage, shard, ih, "ValueError: engine said no <script>x</script>")
                        continue
                    if failed and stage in ("filter", "dedup", "sft_data"):
                        continue
                    rejects_path, n_rej = None, 0
                    if stage == "filter":
                        sessions = [_session(q, label, lang, c) for q, label, lang, c in chars]
                        table = to_table(sessions, Session)
                        rejects = [Rejection(row_id=row_id("turn", f"{q}@{lang}", 9), stage="filter", shard=shard,
                                             filter="judge", reason="out of character", score=0.2,
                                             character_id=f"{q}@{lang}", text=f"{label} speaks like a robot")
                                   for q, label, lang, _ in chars]
                        rp = RunLayout(home, run_id).shard(stage, ih, shard, kind="rejected")
                        write_table(to_table(rejects, Rejection), rp)
                        rejects_path, n_rej = str(rp), len(rejects)
                        stats = _stats(len(chars) * 4, len(chars) * 3, {"judge": len(chars)})
                    elif stage == "dedup":  # no duplicates: the filter's sessions pass through
                        table = to_table([_session(q, label, lang, c) for q, label, lang, c in chars], Session)
                        stats = _stats(len(chars) * 3, len(chars) * 3)
                    else:
                        table = to_table([{"id": q} for q, *_ in chars], _IdRow)
                        tokens = 1000 * (shard + 1) if stage in ("queries", "responses") else 0
                        stats = _stats(len(chars), len(chars), tokens=tokens)
                    path = RunLayout(home, run_id).shard(stage, ih, shard)
                    size = write_table(table, path)
                    cat.mark_done(run_id, stage, shard, ih, rows=table.num_rows, path=str(path), bytes_=size,
                                  rejects_path=rejects_path, rejected_rows=n_rej, stats=stats)
                agg = cat.update_stage_stats(run_id, stage)
                # what the flow records per stage (flows/report.py): a wall time of 2.5 s for every stage
                cat.update_stage_stats(run_id, stage, metrics={
                    "wall_s": 2.5, "completion_tokens_per_wall_s": round(agg["completion_tokens"] / 2.5, 2)})
            cat.finish_run(run_id, "failed" if failed else "completed",
                           "responses: 1 failed, 0 missing" if failed else None)
        cat.register_model("ditto-" + RUN_OK, RUN_OK, str(home / "models" / RUN_OK), "smollm2-135m", "h",
                           "done", {"train_loss": 1.5}, {})
        for i, run_id in enumerate((RUN_OK, RUN_FAILED)):
            for model in ("base", "ditto"):
                cat.add_evaluation(f"eval-{i}", run_id, model, [
                    {"language": "en", "metric": "consistency", "value": 0.5 + 0.1 * i + (0.2 if model == "ditto" else 0),
                     "n": 20},
                    {"language": "en", "metric": "knowledge", "value": 3.0 + i, "n": 20}])
    session = _session(*CHARACTERS[0])
    return {"runs": [RUN_OK, RUN_FAILED], "run_ok": RUN_OK, "run_failed": RUN_FAILED,
            "character_id": session.character_id, "session_id": session.id, "label": session.label,
            "flow_run_id": FLOW_RUN_ID}


@pytest.fixture
def fake_home(tmp_path) -> tuple[Path, dict]:
    home = tmp_path / "home"
    return home, build_fake_home(home)


@pytest.fixture(scope="module")
def shared_fake_home(tmp_path_factory) -> tuple[Path, dict]:
    """The same catalog, built once per module, for tests that only read it."""
    home = tmp_path_factory.mktemp("ops") / "home"
    return home, build_fake_home(home)


@pytest.fixture(scope="session")
def prefect_server():
    """A Prefect API server (temporary SQLite database) for the whole test session; no scheduler runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an ASGI app in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("dashboard server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def dashboard_server(fake_home):
    from dashboard.app import create_app

    home, ids = fake_home
    with ServerThread(create_app(home)) as srv:
        yield srv, ids


class NoisyEngine:
    """The fake engine, noisy as vLLM is: on load it writes to stdout by print(), by file descriptor 1, and
    from a worker subprocess (which inherits descriptor 1). For the --json stdout test."""

    def __new__(cls, config):
        import os
        import subprocess
        import sys

        from tests.plugins.fake import FakeEngine

        class _Noisy(FakeEngine):
            kind = "noisy"

            def load(self) -> None:
                print("noisy print: INFO worker started", flush=True)
                os.write(1, b"noisy fd: WARNING raw write\n")
                subprocess.run([sys.executable, "-c", "print('noisy worker: WARNING from a child process')"],
                               check=True)
                super().load()

        return _Noisy(config)
