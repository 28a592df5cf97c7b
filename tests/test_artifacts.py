"""Prefect artifacts of a run: stats tables and sample Markdown under stable keys (history accumulates),
progress bars; all of it a no-op outside a flow or task run."""

from __future__ import annotations

import re

import pytest

from flows.artifacts import (
    artifact_key,
    create_progress,
    publish_stage_artifacts,
    samples_markdown,
    stats_table,
    update_progress,
)

STATS = {"rows_in": 10, "rows_out": 7, "requests": 10, "prompt_tokens": 900, "completion_tokens": 300,
         "format_failures": 1, "seconds": 2.0, "dropped": {"exact_dup": 2, "judge": 1}}
SHARDS = {"done": 3, "failed": 1, "running": 0, "pending": 0}
SESSION = {"id": "s1", "character_id": "Q1@en", "label": "Ada | Lovelace", "language": "en", "system": "You are Ada.",
           "turns": [{"kind": "role_specific", "question": "Who taught you <maths>?", "answer": "De Morgan. " * 100}] * 4}
REJECT = {"row_id": "t9", "filter": "judge", "reason": "out of character", "score": 0.25, "text": "beep | boop"}


@pytest.mark.parametrize("parts, key", [
    (("ditto", "responses", "stats"), "ditto-responses-stats"),
    (("Ditto_Nightly", "sft_data", "samples"), "ditto-nightly-sft-data-samples"),
    (("zh 数据", "filter", "stats"), "zh-filter-stats"),
    (("--", "", "x"), "x"),
])
def test_artifact_keys_are_valid(parts, key):
    assert artifact_key(*parts) == key
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key)


def test_tables_and_markdown():
    rows = {r["metric"]: r["value"] for r in stats_table("r1", "responses", STATS, SHARDS)}
    assert rows["rows in"] == 10 and rows["rows out"] == 7 and rows["seconds"] == 2.0
    assert rows["dropped: exact_dup"] == 2 and rows["dropped: judge"] == 1
    assert rows["completion tokens/s"] == 150.0 and rows["shards failed"] == 1
    md = samples_markdown("r1", "ditto", "filter", [SESSION], [REJECT])
    assert "Ada \\| Lovelace" in md and "\\<maths\\>" in md and "… 1 more turns" in md
    assert "| t9 | judge | out of character | 0.25 | beep \\| boop |" in md
    assert max(len(line) for line in md.splitlines()) < 700  # long answers are clipped


def test_noop_outside_a_run():
    # no flow/task context: nothing is sent anywhere, nothing raises
    assert publish_stage_artifacts("r1", "ditto", "filter", STATS, SHARDS, [SESSION], [REJECT]) is None
    handle = create_progress("r1", "responses", 4)
    assert handle is None
    update_progress(handle, 2, 4)


def test_artifacts_published_from_flow_and_task(prefect_server):
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    @task
    def in_task(run_id: str) -> None:
        publish_stage_artifacts(run_id, "ditto-art", "sft_data", STATS, SHARDS, [{"id": "x1", "text": "hi"}], [])

    @flow
    def fake_nightly(run_id: str) -> str:
        h = create_progress(run_id, "responses", 4)
        for done in range(1, 5):
            update_progress(h, done, 4)
        publish_stage_artifacts(run_id, "ditto-art", "filter", STATS, SHARDS, [SESSION], [REJECT])
        in_task(run_id)
        return str(h)

    handles = [fake_nightly(f"night-{i}") for i in range(2)]
    with get_client(sync_client=True) as client:
        stats = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["ditto-art-filter-stats"])))
        latest = client.read_latest_artifacts()
        progress = [client.read_artifacts(artifact_filter=ArtifactFilter(id={"any_": [h]}))[0] for h in handles]
        md = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ditto-art-filter-samples"])))
        task_art = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["ditto-art-sft-data-stats"])))
    assert len(stats) == 2 and {a.type for a in stats} == {"table"}  # one version per nightly, same key
    assert {a.flow_run_id for a in stats} and all(a.flow_run_id for a in stats)
    assert any("night-1" in str(a.data) for a in stats) and any("night-0" in str(a.data) for a in stats)
    assert "dropped: exact_dup" in str(stats[0].data)
    assert md and md[0].type == "markdown" and "out of character" in md[0].data
    assert len(task_art) == 2 and all(a.task_run_id for a in task_art)
    assert {a.key for a in latest} >= {"ditto-art-filter-stats", "ditto-art-filter-samples", "ditto-art-sft-data-stats"}
    assert [p.type for p in progress] == ["progress", "progress"] and [p.data for p in progress] == [100.0, 100.0]
