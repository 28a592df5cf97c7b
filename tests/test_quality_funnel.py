"""What the run kept and why: the per-reason funnel of the queries, filter and dedup stages, in `ditto show`
(text and --json) and on the dashboard's run page."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tasks.filters.funnel import funnel, funnel_lines

STAGES = [
    {"stage": "characters", "rows_in": 20, "rows_out": 20, "dropped": {}},
    {"stage": "queries", "rows_in": 20, "rows_out": 102, "dropped": {"question.not_a_question": 6, "format": 2,
                                                                     "question.label_echo": 2}},
    {"stage": "filter", "rows_in": 102, "rows_out": 34, "dropped": {"refusal.missed": 40, "meta_talk": 20,
                                                                    "relevance": 8}},
    {"stage": "dedup", "rows_in": 34, "rows_out": 34, "dropped": {}},
    {"stage": "sft_data", "rows_in": 19, "rows_out": 19, "dropped": {}},
]


def test_funnel_per_reason_most_frequent_first():
    f = {x["stage"]: x for x in funnel(STAGES)}
    assert list(f) == ["queries", "filter", "dedup"]
    q = f["queries"]
    assert q["unit"] == "questions" and q["dropped"] == 10 and q["kept_share"] is None
    assert [(r["reason"], r["n"], r["share"]) for r in q["reasons"]] == [
        ("question.not_a_question", 6, 0.6), ("format", 2, 0.2), ("question.label_echo", 2, 0.2)]
    t = f["filter"]
    assert t["kept_share"] == 34 / 102 and [r["reason"] for r in t["reasons"]] == ["refusal.missed", "meta_talk",
                                                                                    "relevance"]
    assert t["reasons"][0]["share"] == 40 / 102 and f["dedup"]["reasons"] == []
    lines = funnel_lines(STAGES)
    assert lines[0].startswith("queries: 20 characters -> 102 query rows; 10 dropped")
    assert any(line.startswith("filter: 102 turns -> 34 kept (33%)") for line in lines)
    assert any("refusal.missed" in line and "39.2% of turns" in line for line in lines)


def test_show_prints_and_returns_the_funnel(shared_fake_home):
    from flows.cli import app

    home, ids = shared_fake_home
    runner = CliRunner()
    res = runner.invoke(app, ["show", ids["run_ok"], "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    filt = next(f for f in d["funnel"] if f["stage"] == "filter")
    assert filt["rows_in"] == 16 and filt["rows_out"] == 12 and filt["reasons"] == [
        {"reason": "judge", "n": 4, "share": 0.25}]
    text = runner.invoke(app, ["show", ids["run_ok"], "--home", str(home)]).output
    assert "what was kept and why" in text and "filter: 16 turns -> 12 kept (75%); 4 dropped" in text
    assert "25.0% of turns" in text


def test_dashboard_run_page_lists_the_funnel_per_reason(shared_fake_home):
    from fastapi.testclient import TestClient

    from dashboard.app import create_app

    home, ids = shared_fake_home
    with TestClient(create_app(home)) as c:
        html = c.get(f"/runs/{ids['run_ok']}").text
        assert 'id="funnel-reasons"' in html and "What was kept and why" in html
        assert "75.0% of 16 turns" in html and "25.0% of turns" in html and ">judge</a>" in html
        # a run without drops in its quality stages has no such table
        assert 'id="funnel-reasons"' not in c.get(f"/runs/{ids['run_failed']}").text
