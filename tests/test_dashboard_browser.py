"""The dashboard in a real headless Chromium: runs page -> run -> sessions -> character -> session."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"),
]


@pytest.fixture
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_click_through_a_run(browser, dashboard_server, tmp_path):
    srv, ids = dashboard_server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(srv.url) else None)

    page.goto(srv.url + "/")
    assert page.title().startswith("Runs")
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 2
    assert page.locator("#runs .badge.failed").count() == 1
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

    page.click(f"a.run-link:text('{ids['run_failed']}')")
    page.wait_for_url(f"**/runs/{ids['run_failed']}")
    assert page.locator("#shard-grid .cell.failed").count() == 1
    assert "engine said no" in page.locator("#failures").inner_text()
    assert page.locator("svg.funnel rect").count() == 12  # rows in and out for each of 6 stages
    page.screenshot(path=str(tmp_path / "run_failed.png"), full_page=True)

    page.goto(srv.url + "/")
    page.click(f"a.run-link:text('{ids['run_ok']}')")
    page.wait_for_url(f"**/runs/{ids['run_ok']}")
    assert page.locator("#shard-grid .cell.done").count() == 12  # 6 stages x 2 shards
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    page.click("#samples-link")
    page.fill("#q", "ada")
    page.click("form.search button")
    page.wait_for_url("**/samples?q=ada")
    assert page.locator("#characters tbody tr").count() == 1
    page.click("a.character-link")
    page.wait_for_url(f"**/characters/{ids['character_id'].replace('@', '%40')}")
    assert "out of character" in page.locator("#rejects").inner_text()
    page.click("a.session-link")
    page.wait_for_url(f"**/sessions/{ids['session_id']}")
    assert page.locator("#turns > li").count() == 3
    assert "<b>day 0</b>" in page.locator("#turns").inner_text()  # shown as text, not markup
    page.screenshot(path=str(tmp_path / "session.png"), full_page=True)

    page.click("header nav a:text('Evaluations')")
    page.wait_for_url("**/evaluations")
    assert page.locator("#charts svg").count() == 2
    page.screenshot(path=str(tmp_path / "evaluations.png"), full_page=True)

    assert not errors, errors
    assert not external, external  # everything is served locally
    for name in ("runs", "run_failed", "run", "session", "evaluations"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_real_small_run(browser, tmp_path, fake_overrides, list_source, prefect_server):
    """A run made by build_dataset (fake engine), browsed from the runs page down to one session."""
    from dashboard.app import create_app
    from flows.build import run_build
    from tests.plugins.ops import ServerThread

    home = tmp_path / "home"
    summary = run_build(overrides=[*fake_overrides, "filter.enabled=false"], home=home, until="dedup")
    run_id = summary["run_id"]
    with ServerThread(create_app(home)) as srv:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(srv.url + "/")
        page.click(f"a.run-link:text('{run_id}')")
        page.wait_for_url(f"**/runs/{run_id}")
        assert page.locator("#shard-grid .cell.done").count() == 5 * summary["num_shards"]
        assert page.locator("#shard-grid .cell.failed").count() == 0
        page.click("#samples-link")
        page.wait_for_url("**/samples")
        assert page.locator("#characters tbody tr").count() == 8
        page.locator("a.character-link").first.click()
        page.wait_for_url("**/characters/**")
        page.locator("a.session-link").first.click()
        page.wait_for_url("**/sessions/**")
        assert page.locator("#turns > li").count() >= 1
        assert page.locator(".turn.assistant p").first.inner_text().strip()
        page.screenshot(path=str(tmp_path / "real_session.png"), full_page=True)
    assert (tmp_path / "real_session.png").stat().st_size > 5000
