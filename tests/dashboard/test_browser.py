"""Real-browser test: ``streamlit run dashboard/app.py -- --db <synthetic db>`` on 127.0.0.1 driven by headless
Chromium (system executable) through Playwright's python API. Screenshots go to the pytest tmp dir and are
copied to /tmp/fd/screens/ for humans."""

from __future__ import annotations

import pytest

from tests.helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    HOSTILE_FEATURE,
    HOSTILE_IMG,
    HOSTILE_SCRIPT,
    SAE_ID,
    copy_db,
    running_app,
    screenshot,
)

pytestmark = pytest.mark.browser


@pytest.fixture
def server(synth_db_master, tmp_path):
    db = copy_db(synth_db_master, tmp_path / "browser.duckdb")
    with running_app(db, "--client.showErrorDetails", "none") as base:
        yield base, db


def test_browser_search_and_feature_page(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium executable (/usr/bin/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"playwright python package not importable: {e}")
    base, db = server
    from featuredict.db import queries as q
    from featuredict.db.store import Store

    s = Store(db, read_only=True)
    word = min(
        (t.strip() for t in q.feature(s, SAE_ID, 7)["max_tokens"]),
        key=lambda w: s.rows("SELECT count(*) FROM features WHERE contains(search_text, ?)", [w])[0][0],
    )
    nb = int(q.feature(s, SAE_ID, 7)["neighbours"][0])
    s.close()

    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        try:
            # overview at the root URL
            page.goto(base + "/", wait_until="domcontentloaded")
            page.get_by_text("Feature density", exact=False).first.wait_for(timeout=30_000)

            # search: type a word from feature 7's contexts
            page.goto(f"{base}/search?sae={SAE_ID}", wait_until="domcontentloaded")
            box = page.get_by_role("textbox", name="Search features")
            box.wait_for(timeout=30_000)
            box.fill(word)
            box.press("Enter")
            page.get_by_text("Select a row (or use 'open') to see a feature", exact=False).wait_for(timeout=30_000)
            assert f"query={word}" in page.url  # shareable
            screenshot(page, tmp_path, "browser_search")

            # feature page by URL: highlighted tokens with activation in the title attribute
            page.goto(f"{base}/feature?sae={SAE_ID}&feature=7", wait_until="domcontentloaded")
            page.get_by_role("heading", name="Feature 7").wait_for(timeout=30_000)
            spans = page.locator("span[title*='act ']")
            spans.first.wait_for(timeout=30_000)
            assert spans.count() > 100
            screenshot(page, tmp_path, "browser_feature")

            # follow a decoder-neighbour link inside the app
            page.get_by_text(f"#{nb} · cos", exact=False).first.click()
            page.get_by_role("heading", name=f"Feature {nb}").wait_for(timeout=30_000)
            page.wait_for_url(f"**feature={nb}**", timeout=10_000)  # the URL follows (shareable)

            # the map: clicking a point opens that feature's page (300 points: SVG marks we can click)
            page.goto(f"{base}/map?sae={SAE_ID}", wait_until="domcontentloaded")
            mark = page.locator(".vega-embed .mark-symbol path").nth(7)
            mark.wait_for(timeout=30_000)
            screenshot(page, tmp_path, "browser_map")
            mark.click(force=True)
            page.wait_for_url("**/feature?**", timeout=20_000)
            page.get_by_role("heading", name="Feature ").first.wait_for(timeout=30_000)
            assert "feature=" in page.url

            # hostile corpus/label text is shown as text, never run
            page.goto(f"{base}/feature?sae={SAE_ID}&feature={HOSTILE_FEATURE}", wait_until="domcontentloaded")
            page.get_by_role("heading", name=f"Feature {HOSTILE_FEATURE}").wait_for(timeout=30_000)
            page.locator("span[title*='act ']").first.wait_for(timeout=30_000)
            assert page.get_by_text(HOSTILE_SCRIPT, exact=True).count() >= 1
            assert page.get_by_text(HOSTILE_IMG, exact=True).count() >= 1
            page.wait_for_timeout(500)
            assert page.locator("img[src='x']").count() == 0
            screenshot(page, tmp_path, "browser_hostile")
            assert not dialogs, f"script ran: {dialogs}"
            assert not page.locator("text=Traceback").count()
        finally:
            browser.close()
