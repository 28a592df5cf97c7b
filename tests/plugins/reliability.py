"""The crash-resume harness for tests: it lives in benchmarks/crash_harness.py (benchmarks/chaos.py runs it
with more kill points) and is imported from here, with the fixture that seeds it."""

from __future__ import annotations

import os

import pytest

from benchmarks.crash_harness import (  # noqa: F401 - what the reliability tests import from here
    STAGES,
    Chaos,
    ChaosResult,
    catalog_rows,
    characters_file,
    check_after_kill,
    check_catalog_consistent,
    compare,
    ditto_argv,
    ditto_env,
    fast_overrides,
    flat,
    group_members,
    kill_group,
    run,
    stage_content,
    start,
    temp_files,
)


@pytest.fixture
def chaos_seed() -> int:
    """DITTO_CHAOS_SEED replays a failure; otherwise a fresh seed, printed."""
    env = os.environ.get("DITTO_CHAOS_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "big")
