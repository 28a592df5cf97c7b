"""Fixtures for flow tests: a small list-backed character source and a fake-engine config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.config import RunConfig
from models.records import Character, Rejection
from tasks.base import SourceStage
from tasks.sources.synthetic import synthetic_characters as make_characters  # noqa: F401 - for the tests
from tasks.sources.synthetic import write_characters
from tests.plugins.fake import register_fake_engine

register_fake_engine()  # engine.kind=fake in this process (a `ditto` subprocess knows only engine.kind=dry_run)


class ListSource(SourceStage):
    """Reads Character rows from the JSONL file at characters.path (tests only)."""

    name = "characters"
    output = Character

    def fingerprint(self, config: RunConfig) -> dict:
        return {"path": config.characters.path}

    def collect(self, config: RunConfig) -> tuple[list[Character], list[Rejection]]:
        rows = [json.loads(line) for line in Path(config.characters.path).read_text().splitlines() if line.strip()]
        return [Character.model_validate(r) for r in rows], []

    @staticmethod
    def shard_key(row: Character) -> str:
        return row.id


@pytest.fixture
def list_source(monkeypatch):
    from flows import stages

    monkeypatch.setitem(stages.STAGES, "characters", "tests.plugins.core:ListSource")
    stages.get_stage.cache_clear()
    yield
    stages.get_stage.cache_clear()


@pytest.fixture
def chars_file(tmp_path) -> Path:
    return write_characters(tmp_path / "chars.jsonl", 8)


@pytest.fixture
def fake_overrides(chars_file) -> list[str]:
    return ["engine.kind=fake", f"characters.path={chars_file}", "characters.source=jsonl",
            "characters.shard_size=2", "runner.retry_delay_seconds=[0]"]


class ScriptedEngine:
    """Returns the texts listed in options['outputs'] in order (cycling), for parser/re-sampling tests."""

    in_process = False

    def __init__(self, config):
        self.config = config
        self.i = 0
        self.loads = 0

    @property
    def model_id(self) -> str:
        return "scripted"

    def load(self) -> None:
        pass

    def generate(self, chats, sampling):
        from engines.base import Generation

        outs = self.config.options["outputs"]
        res = []
        for _ in chats:
            text = outs[self.i % len(outs)]
            self.i += 1
            res.append(Generation(text=text, prompt_tokens=10, completion_tokens=5,
                                  finish_reason="length" if text.endswith("…") else "stop", model="scripted"))
        return res

    def close(self) -> None:
        pass


@pytest.fixture
def scripted_engine(monkeypatch):
    """engine.kind=listed: replies with engine.options['outputs'] in order."""
    from engines import base

    monkeypatch.setitem(base.ENGINES, "listed", "tests.plugins.core:ScriptedEngine")
    yield
    base.close_engines()
