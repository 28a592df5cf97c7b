"""Crash-resume: `ditto run` killed with SIGKILL (its whole process group) at >= 10 seeded random points,
resumed with `ditto rerun` (or `ditto run --run-id` when the kill came before the catalog knew the run);
the result must equal an uninterrupted run's. Replay a failure with DITTO_CHAOS_SEED=<seed>."""

import pytest

from tests.plugins.reliability import Chaos, characters_file, fast_overrides

POINTS = 10


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ten kills, each resumed: minutes on a loaded 2-core machine
def test_kill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, chaos_seed):
    chars = characters_file(tmp_path / "chars.jsonl", 12)
    chaos = Chaos(tmp_path / "chaos", fast_overrides(chars, num_shards=4), seed=chaos_seed)
    print(f"DITTO_CHAOS_SEED={chaos.seed}")
    base = chaos.measure_baseline()
    assert all(v["rows"] > 0 for v in base.content.values()), base.content
    res = chaos.run_points(POINTS, kills_per_episode=3)
    print("kills:", res.kills)
    assert res.landed >= POINTS, f"seed {res.seed}: only {res.landed} kills landed: {res.kills}"
    assert not res.problems, f"seed {res.seed}: {res.problems}\nkills: {res.kills}"
    # the kills covered both sides of run registration, and left debris that the resumes cleaned
    assert any(k["killed"] and k["in_catalog"] for k in res.kills), res.kills
