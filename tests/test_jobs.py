"""The build flow's pure parts, without Prefect: the per-shard decision table, stage code hashes, stage
metrics, the timeline chart."""

import sys
import textwrap

import pytest

from models.jobs import Action, ShardJob, ShardRecord, ShardResult, plan_shard

H = "key-1"


def rec(status="done", input_hash=H, whole=True, run_id="run-a", **kw):
    return ShardRecord(run_id=run_id, stage="responses", shard=3, input_hash=input_hash, status=status,
                       path="/h/x.parquet", rows=5, whole=whole, **kw)


EARLIER = rec(run_id="run-old")


@pytest.mark.parametrize("current, earlier, stale, fresh, action, rebuilt", [
    # done here for this key, file whole: skip (even when an earlier run has it too)
    (rec(), EARLIER, False, False, Action.SKIP, False),
    (rec(), None, False, True, Action.SKIP, False),
    # done here for this key but the file is gone or damaged: a missing shard, rebuilt; downstream follows
    (rec(whole=False), EARLIER, False, False, Action.RUN, True),
    (rec(whole=False), None, False, False, Action.RUN, True),
    # the upstream was rebuilt in this invocation: run, never skip or reuse
    (rec(), EARLIER, True, False, Action.RUN, True),
    (None, EARLIER, True, False, Action.RUN, True),
    (rec(input_hash="old-key"), EARLIER, True, False, Action.RUN, True),
    # not done here for this key: reuse an earlier run's whole shard, unless --fresh
    (None, EARLIER, False, False, Action.REUSE, False),
    (rec(input_hash="old-key"), EARLIER, False, False, Action.REUSE, False),
    (rec(status="failed"), EARLIER, False, False, Action.REUSE, False),
    (None, EARLIER, False, True, Action.RUN, False),
    (None, rec(run_id="run-old", whole=False), False, False, Action.RUN, False),
    # nothing to reuse
    (None, None, False, False, Action.RUN, False),
    (rec(status="failed"), None, False, False, Action.RUN, False),
    (rec(status="running"), None, False, False, Action.RUN, False),
    (rec(status="pending"), None, False, False, Action.RUN, False),
    (rec(input_hash="old-key"), None, False, False, Action.RUN, False),
])
def test_plan_shard_decision_table(current, earlier, stale, fresh, action, rebuilt):
    plan = plan_shard(H, current, earlier, stale=stale, fresh=fresh)
    assert plan.action is action and plan.rebuilt is rebuilt, plan.reason
    assert (plan.reused is not None) == (action is Action.REUSE)
    if plan.reused is not None:
        assert plan.reused.run_id == earlier.run_id == "run-old"


def test_records_parse_catalog_rows_and_jobs_refuse_unknown_fields():
    row = {"run_id": "r", "stage": "queries", "shard": 1, "input_hash": "h", "status": "done", "rows": 2,
           "path": "/p", "stats": '{"rows_out": 2}', "attempts": 1, "error": None, "sha256": "ab"}
    r = ShardRecord.model_validate(row)  # catalog columns it does not use are ignored
    assert r.stats == {"rows_out": 2} and r.done and r.sha256 == "ab"
    res = ShardResult.from_record(r)
    assert (res.path, res.rows, res.sha256) == ("/p", 2, "ab")
    with pytest.raises(ValueError, match="extra"):
        ShardJob(config="{}", stage="q", shard=0, num_shards=1, input_hash="h", home="/h", run_id="r", rows=[1])


# -- code hashes -------------------------------------------------------------------------------------
@pytest.fixture
def stage_pkg(tmp_path, monkeypatch):
    """A stage in its own package: stage.py imports helper.py lazily; other.py is unrelated."""
    pkg = tmp_path / "codehash_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def f():\n    return 1\n")
    (pkg / "other.py").write_text("X = 1\n")
    (pkg / "stage.py").write_text(textwrap.dedent("""
        from tasks.base import Stage
        from models.records import Turn

        class S(Stage):
            name = "probe"
            output = Turn

            def run(self, ctx, inputs):
                from . import helper
                return helper.f()
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m.startswith("codehash_pkg")]:
        monkeypatch.delitem(sys.modules, m)
    import importlib

    stage = importlib.import_module("codehash_pkg.stage").S()
    return pkg, stage


def test_code_hash_follows_the_stage_code_and_nothing_else(stage_pkg):
    from flows.stages import code_hash, stage_code_files

    pkg, stage = stage_pkg
    files = {p.name for p in stage_code_files("probe", stage)}
    assert {"stage.py", "helper.py", "base.py", "records.py"} <= files and "other.py" not in files
    h = code_hash("probe", stage)
    (pkg / "other.py").write_text("X = 2  # an edit elsewhere\n")
    assert code_hash("probe", stage) == h
    (pkg / "helper.py").write_text("def f():\n    return 2\n")  # a module the stage runs (imported lazily)
    h2 = code_hash("probe", stage)
    assert h2 != h
    (pkg / "stage.py").write_text((pkg / "stage.py").read_text() + "\n# changed\n")
    assert code_hash("probe", stage) not in (h, h2)


@pytest.mark.parametrize("stage, has, lacks", [
    ("queries", ["tasks/queries.py", "tasks/prompts/queries.en.txt", "models/records.py"],
     ["tasks/filter.py", "tasks/sft_data.py", "tasks/prompts/responses.en.txt", "engines/base.py"]),
    ("responses", ["tasks/responses.py", "tasks/prompts/responses.zh.txt"],
     ["tasks/queries.py", "tasks/filter.py", "tasks/prompts/judge.en.txt"]),
    ("filter", ["tasks/filter.py", "tasks/filters/judge.py", "tasks/prompts/judge.en.txt"],
     ["tasks/dedup.py", "tasks/filters/dedup.py", "tasks/responses.py"]),
    ("dedup", ["tasks/dedup.py", "tasks/filters/dedup.py"], ["tasks/filter.py", "tasks/filters/judge.py"]),
    ("sft_data", ["tasks/sft_data.py"], ["tasks/dedup.py", "tasks/filter.py", "storage/shards.py"]),
])
def test_each_stage_hashes_its_own_modules_and_prompts(stage, has, lacks):
    from flows.stages import stage_code_files

    files = {"/".join(p.parts[-3:]) if "prompts" in p.parts or "filters" in p.parts else "/".join(p.parts[-2:])
             for p in stage_code_files(stage)}
    assert set(has) <= files, files
    assert not set(lacks) & files, files


def test_stage_keys_differ_by_code_hash():
    from flows.build import input_hash

    base = dict(stage="sft_data", fingerprint={}, shard=0, num_shards=2, upstream={"dedup": "d"})
    assert input_hash(**base) == input_hash(**base)
    assert input_hash(**base, version="code-a") != input_hash(**base, version="code-b")


# -- metrics and the timeline --------------------------------------------------------------------------
@pytest.mark.parametrize("intervals, total", [
    ([], 0.0), ([(0, 1)], 1.0), ([(0, 2), (1, 3)], 3.0), ([(0, 1), (2, 3)], 2.0),
    ([(5, 6), (0, 10)], 10.0), ([(0, 1), (1, 2)], 2.0), ([(3, 2)], 0.0),
])
def test_interval_union(intervals, total):
    from storage.report import interval_union

    assert interval_union(intervals) == pytest.approx(total)


def _row(shard, started, ended, tokens=100, reused=None, **stats):
    import json

    return {"run_id": "r", "stage": "responses", "shard": shard, "status": "done", "reused_from": reused,
            "stats": json.dumps({"started": started, "ended": ended, "completion_tokens": tokens, **stats})}


def test_stage_metrics_divide_tokens_by_the_stage_wall_time_not_the_sum_of_shard_seconds():
    from storage.report import stage_metrics

    rows = [_row(0, 100.0, 110.0, resampled=2, cache_hits=3, cached_completion_tokens=40), _row(1, 102.0, 112.0),
            _row(2, 50.0, 51.0, tokens=999, reused="old-run"),  # a reused shard: the earlier run's work
            {"run_id": "r", "stage": "responses", "shard": 3, "status": "failed", "reused_from": None, "stats": None}]
    m = stage_metrics(rows, {"busy_seconds": 11.0, "mean_running": 1.8, "requests": 4})
    assert m["wall_s"] == pytest.approx(12.0) and m["shard_seconds"] == pytest.approx(20.0)
    # 40 of shard 0's tokens came from the generation cache: not generated in this stage's wall time
    assert m["completion_tokens"] == 160 and m["completion_tokens_per_wall_s"] == pytest.approx(160 / 12, abs=0.01)
    assert (m["shards_computed"], m["shards_reused"], m["resampled"], m["cache_hits"]) == (2, 1, 2, 3)
    assert m["engine"]["busy_seconds"] == 11.0
    assert stage_metrics([])["completion_tokens_per_wall_s"] is None


def test_timeline_svg_draws_one_bar_per_shard_task_on_a_shared_axis():
    from dashboard.svg import timeline

    lanes = {"queries": [(0, 0.0, 4.0), (1, 1.0, 5.0)], "responses<script>": [(0, 4.5, 9.0)]}
    svg = timeline(lanes)
    import re

    assert svg.startswith("<svg") and svg.count('class="task"') == 3
    ys = [float(y) for y in re.findall(r'class="task" x="[\d.]+" y="([\d.]+)"', svg)]
    assert ys[0] != ys[1]  # the two overlapping queries tasks are stacked, not drawn over each other
    assert "<script>" not in svg and "responses&lt;script&gt;" in svg
    assert "queries shard 1: 1.0 s → 5.0 s" in svg
    assert timeline({}) == "" and timeline({"queries": []}) == ""


def test_stats_count_tokens_the_generation_cache_served_apart():
    from engines.base import Generation
    from tasks.base import Stats

    st = Stats()
    st.count_generations([Generation("a", 10, 5), Generation("b", 7, 3, cached=True), Generation("c", 1, 2, cached=True)])
    d = st.as_dict()
    assert (d["requests"], d["prompt_tokens"], d["completion_tokens"]) == (3, 18, 10)
    assert (d["cache_hits"], d["cache_misses"], d["cached_prompt_tokens"], d["cached_completion_tokens"]) == (2, 1, 8, 5)


def test_changes_markdown_and_show_lines_report_characters_shards_generations_and_tokens():
    from flows.artifacts import changes_markdown
    from flows.report import changes_lines

    ch = {"run_id": "r2", "previous_run": "r1", "tokens": 1234, "generations": {"cached": 10, "new": 5},
          "characters": {"added": 1, "changed": 2, "removed": 0, "unchanged": 7,
                         "examples": {"added": ["Q9@en"], "changed": ["Q1@en", "Q2@zh"], "removed": []}},
          "stages": {"queries": {"shards": 4, "reused": 3, "rebuilt": 1, "failed": 0, "requests": 15, "cached": 10,
                                 "new": 5, "prompt_tokens": 1000, "completion_tokens": 234}}}
    md = changes_markdown(ch)
    assert "Against the previous run `r1`" in md and "| changed | 2 |" in md
    assert "| queries | 1 | 3 | 0 | 10 | 5 | 1234 |" in md
    lines = changes_lines(ch)
    assert lines[0] == "what changed since r1:"
    assert "  characters: 1 added, 2 changed, 0 removed, 7 unchanged" in lines
    assert "    changed: Q1@en, Q2@zh" in lines
    assert "  queries shards: 1 rebuilt, 3 reused, generations 10 cached / 5 new, 1234 tokens" in lines
    assert changes_lines({**ch, "previous_run": None, "characters": None})[0].startswith("what changed: no earlier")
