"""Real-browser test of the steer page: ``streamlit run dashboard/app.py`` on the tiny steering database, driven
by headless Chromium through Playwright: a feature page's steer link preselects the feature, Generate streams
baseline and steered text side by side. Screenshot copied to /tmp/fd/screens/steer.png."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

try:  # tests/ as a package or as a plain folder on sys.path
    from tests.test_steering_app import SAE_ID, build_db, live_feature
except ImportError:
    from test_steering_app import SAE_ID, build_db, live_feature

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
        if p and Path(p).exists()
    ),
    None,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(tmp_path, tiny_runtime, tiny_model_dir, tiny_sae_dir):
    if CHROMIUM is None:
        pytest.skip("no system Chromium for the browser test")
    pytest.importorskip("playwright")
    db = build_db(tmp_path / "steer.duckdb", tiny_runtime, tiny_model_dir, tiny_sae_dir)
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "dashboard" / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--",
            "--db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield base, db
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_steer_page_in_a_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, db = server
    f = live_feature(db)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.goto(f"{base}/steer?sae={SAE_ID}&feature={f}", wait_until="networkidle")
            expect(page.get_by_role("heading", name="Steer")).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"#{f}").first).to_be_visible()
            prompt = page.get_by_role("textbox", name="Prompt")
            prompt.fill("Once upon a time")
            prompt.press("Control+Enter")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text("Steered features on the generated tokens")).to_be_visible(timeout=60_000)
            boxes = page.locator("div[style*='pre-wrap']")
            expect(boxes).to_have_count(2)
            base_text, steered_text = boxes.nth(0).inner_text(), boxes.nth(1).inner_text()
            assert base_text.strip() and steered_text.strip() and base_text != steered_text
            assert page.locator("[data-testid='stException']").count() == 0
            page.wait_for_timeout(1500)  # let the data grids paint before the screenshot
            shot = tmp_path / "steer.png"
            page.screenshot(path=str(shot), full_page=True)
            try:
                Path("/tmp/fd/screens").mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, "/tmp/fd/screens/steer.png")
            except OSError:
                pass
        finally:
            browser.close()
