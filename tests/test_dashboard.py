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
