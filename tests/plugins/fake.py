"""The tests' fake engine, `engine.kind=fake`: the product's dry-run engine (deterministic placeholder text,
engines/dry_run.py) plus scripted failures. Registered from here (`register_fake_engine()`, called by
tests/plugins/core.py), so the production registry refuses `engine.kind=fake` as unknown; a test that runs
`ditto` or a Prefect worker in a fresh process uses the product's `engine.kind=dry_run` and, for failures,
`engine.options.faults` (engines/faults.py).

Options (engine.options): fail_on (a substring: prompts containing it raise a permanent EngineError),
fail_while_exists (fail_on applies only while this file exists), transient_failures (the first N calls
raise TransientEngineError; a call is one submitted request or one generate() list)."""

from __future__ import annotations

import os

from engines.base import EngineError, Generation, Message, Sampling, TransientEngineError, register_engine
from engines.dry_run import DryRunEngine

TARGET = "tests.plugins.fake:FakeEngine"


class FakeEngine(DryRunEngine):
    kind = "fake"

    def load(self) -> None:
        self.calls = 0

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        self.calls += 1
        opts = self.config.options
        fail_on, switch = opts.get("fail_on"), opts.get("fail_while_exists")
        if fail_on and (switch is None or os.path.exists(switch)) and any(
                fail_on in m["content"] for chat in chats for m in chat):
            raise EngineError(f"fake engine: permanent failure on a prompt containing {fail_on!r}")
        if self.calls <= int(opts.get("transient_failures", 0)):
            raise TransientEngineError(f"fake engine: transient failure {self.calls}")
        return super()._generate(chats, sampling)


def register_fake_engine() -> None:
    register_engine("fake", TARGET)
