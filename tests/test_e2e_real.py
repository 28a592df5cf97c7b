"""End to end with the real bundled model (SmolLM2-135M on vLLM-CPU): 5 bundled characters through every
stage. Shares the process-wide engine with the engine tests (same EngineConfig)."""

import pytest

from flows.build import run_build
from models.base import table_rows
from storage.reader import CatalogReader
from storage.shards import read_table

pytestmark = pytest.mark.slow


def _rows(home, run_id, stage, kind="data"):
    with CatalogReader(home) as rd:
        paths = rd.done_paths(run_id, stage, kind)
    return [r for p in paths for r in table_rows(read_table(p))]


def test_five_bundled_characters_through_every_stage(tmp_path, vllm_engine):
    # vllm_engine: the session's shared engine (the same EngineConfig as the run's default), created by
    # its fixture first so the engine tests' reproducibility check sees the engine's very first draws
    home = tmp_path / "home"
    s = run_build(overrides=[
        "characters.per_category=false", "characters.top_n=5", "runner.num_shards=1",
        "queries.pairings=1", "queries.sampling.max_tokens=200", "responses.sampling.max_tokens=64",
        # keep most of what a 135M model writes, so the later stages have rows to check
        "filter.first_person.enabled=false", "filter.refusal.contrastive_must_refuse=false",
        "dedup.near=false", "filter.language.min_confidence=0.0",
    ], home=home, run_id="e2e")
    assert s["status"] == "completed"
    chars = _rows(home, "e2e", "characters")
    assert len(chars) == 5 and all(c["source"] == "bundled" and c["summary"] for c in chars)
    queries = _rows(home, "e2e", "queries")
    assert queries and {q["kind"] for q in queries} == {"role_specific", "contrastive"}
    for q in queries:  # contrastive questions are labelled for the partner, not the author
        assert (q["character_id"] == q["author_id"]) == (q["kind"] == "role_specific")
    turns = _rows(home, "e2e", "responses")
    assert len(turns) == len(queries) and all(t["gen"]["completion_tokens"] > 0 for t in turns)
    assert all(t["gen"]["model"].startswith("bundled:smollm2-135m-instruct") for t in turns)
    sessions = _rows(home, "e2e", "filter")
    rejected = _rows(home, "e2e", "filter", "rejected")
    with CatalogReader(home) as rd:
        st = {x["stage"]: x for x in rd.stage_stats("e2e")}
    f = st["filter"]
    assert f["rows_in"] == len(turns) == f["rows_out"] + sum(f["dropped"].values())
    assert sum(len(x["turns"]) for x in sessions) == f["rows_out"] and len(rejected) >= sum(f["dropped"].values())
    assert sessions, "no session survived the filter"
    d = st["dedup"]  # run-wide duplicates come out of the filtered sessions
    final = _rows(home, "e2e", "dedup")
    assert d["rows_in"] == f["rows_out"] == d["rows_out"] + sum(d["dropped"].values())
    assert sum(len(x["turns"]) for x in final) == d["rows_out"]
    profiles = {f"{c['id']}@{c['language']}": c["summary"] for c in chars}
    examples = _rows(home, "e2e", "sft_data")
    assert len(examples) == len(final)
    for x in sessions:
        assert x["system"].startswith("You are ") and profiles[x["character_id"]][:60] not in x["system"]
    for ex in examples:  # the profile never reaches training data as context (answers may quote it)
        system = ex["messages"][0]
        assert system["role"] == "system" and ex["text"].startswith("<|im_start|>system")
        assert not any(p[:60] in system["content"] for p in profiles.values()) and len(system["content"]) < 300
        assert [m["role"] for m in ex["messages"][1:3]] == ["user", "assistant"]
