"""Real-browser test of the steer page: ``streamlit run dashboard/app.py`` on the tiny steering database, driven
by headless Chromium through Playwright: a feature page's steer link preselects the feature, Generate streams
baseline and steered text side by side. Screenshot copied to /tmp/fd/screens/steer.png."""

from __future__ import annotations

import pytest

from tests.helpers import (
    CHROMIUM,
    STEER_SAE_ID,
    build_steer_db,
    live_feature,
    running_app,
    screenshot,
    wait_until_idle,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture()
def server(tmp_path, tiny_runtime, tiny_model_dir, tiny_sae_dir):
    if CHROMIUM is None:
        pytest.skip("no system Chromium for the browser test")
    pytest.importorskip("playwright")
    db = build_steer_db(tmp_path / "steer.duckdb", tiny_runtime, tiny_model_dir, tiny_sae_dir)
    with running_app(db) as base:
        yield base, db


def test_steer_page_in_a_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, db = server
    f = live_feature(db)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.goto(f"{base}/steer?sae={STEER_SAE_ID}&feature={f}", wait_until="networkidle")
            expect(page.get_by_role("heading", name="Steer")).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"#{f}").first).to_be_visible()
            prompt = page.get_by_role("textbox", name="Prompt", exact=True)
            prompt.fill("Once upon a time")
            prompt.press("Control+Enter")
            wait_until_idle(page)
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text("Steered features on the generated tokens")).to_be_visible(timeout=60_000)
            boxes = page.locator("div[style*='pre-wrap']")
            expect(boxes).to_have_count(2)
            base_text, steered_text = boxes.nth(0).inner_text(), boxes.nth(1).inner_text()
            assert base_text.strip() and steered_text.strip() and base_text != steered_text
            assert page.locator("[data-testid='stException']").count() == 0
            page.wait_for_timeout(1500)  # let the data grids paint before the screenshot
            screenshot(page, tmp_path, "steer")
        finally:
            browser.close()


def test_scan_page_in_a_browser(tmp_path, tiny_runtime, tiny_model_dir, tiny_sae_dir):
    """The Scan page on a real (tiny) database: pasted text with hostile markup is scanned for a watchlist,
    the hits table appears, and the text is shown as text."""
    if CHROMIUM is None:
        pytest.skip("no system Chromium for the browser test")
    pytest.importorskip("playwright")
    from playwright.sync_api import expect, sync_playwright

    from featuredict.db import writes
    from featuredict.db.store import Store

    db = build_steer_db(tmp_path / "scan.duckdb", tiny_runtime, tiny_model_dir, tiny_sae_dir)
    store = Store(db)
    try:
        live = [
            int(r[0])
            for r in store.rows("SELECT feature FROM features WHERE sae_id = ? AND max_act > 0", [STEER_SAE_ID])
        ]
        writes.set_watch(store, "watched", STEER_SAE_ID, live, threshold=0.01, severity="high")
    finally:
        store.close()
    hostile = "<script>alert(1)</script> Once upon a time there was a little cat."
    with running_app(db) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        dialogs: list[str] = []
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{base}/scan?sae={STEER_SAE_ID}", wait_until="networkidle")
            expect(page.get_by_role("heading", name="Scan text for watched features")).to_be_visible(timeout=30_000)
            page.get_by_role("textbox", name="Text to scan (one record)").fill(hostile)
            page.get_by_role("button", name="Scan").click()
            expect(page.get_by_text("hits in 1 of 1 records", exact=False)).to_be_visible(timeout=60_000)
            assert page.get_by_text("<script>", exact=False).count() >= 1  # shown as text
            assert not dialogs and page.locator("[data-testid='stException']").count() == 0
            page.wait_for_timeout(1000)
            screenshot(page, tmp_path, "scan")

            page.goto(f"{base}/review?sae={STEER_SAE_ID}", wait_until="networkidle")
            expect(page.get_by_role("heading", name="Review queue")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("Batch actions", exact=False)).to_be_visible(timeout=30_000)
            assert page.locator("[data-testid='stException']").count() == 0
            page.wait_for_timeout(1000)
            screenshot(page, tmp_path, "review")
        finally:
            browser.close()
