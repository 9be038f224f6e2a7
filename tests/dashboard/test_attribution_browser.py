"""Real browser: the Attribution page through app.py, deep-linked with a hostile prompt and two SAEs: every
section renders, the hostile text stays text (no dialog, no injected element), a screenshot is kept."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, L0, L1, make_two_sae_db, running_app, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]
HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script> Once upon a time"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_corpus: Path) -> Path:
    return make_two_sae_db(tmp_path_factory.mktemp("attr_browser"), tiny_model_dir, tiny_corpus)


def test_browser_attribution_page(db: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium executable (/usr/bin/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"playwright python package not importable: {e}")
    dialogs: list[str] = []
    with running_app(db, "--client.showErrorDetails", "none") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        try:
            query = urlencode({"sae": L1, "saes": L0, "prompt": HOSTILE, "mode": "direct"})
            page.goto(f"{base}/attribution?{query}", wait_until="domcontentloaded")
            page.get_by_text("Checked by intervention").first.wait_for(timeout=120_000)
            page.get_by_text("Sum check").first.wait_for(timeout=30_000)
            for head in ("Features that drove it", "Token x feature", "Graph"):
                assert page.get_by_text(head, exact=True).count() >= 1, head
            page.wait_for_timeout(1500)  # let the charts draw
            shot = screenshot(page, tmp_path, "attribution_page")
            assert shot.stat().st_size > 10_000
            assert page.locator("img[src='x']").count() == 0
            assert page.locator("text=Traceback").count() == 0
            assert page.locator("[data-testid='stException']").count() == 0
            assert page.get_by_text("**", exact=False).count() == 0  # markdown rendered, not shown escaped
            # the graph, scrolled into view, and the link that sends the top features to Steer
            page.get_by_text("Graph", exact=True).first.scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            screenshot(page, tmp_path, "attribution_graph")
            steer = page.locator("a[href*='steer?']")
            assert steer.count() == 1 and "ablate" in (steer.first.get_attribute("href") or "")
        finally:
            browser.close()
    assert dialogs == []
