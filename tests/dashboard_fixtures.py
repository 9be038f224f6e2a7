"""Helpers and fixtures for the dashboard tests: SYNTHETIC databases (bench/synth_db.py), hostile content,
and a database whose SAE row points at the tiny test model + SAE (so prompt/concept search really run).

Import the fixtures into a test module with ``from tests.dashboard_fixtures import *`` style or by name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synth_db import SAE_ID, build_synthetic_db  # noqa: E402

APP = str(ROOT / "dashboard" / "app.py")
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(1)>"
HOSTILE_FEATURE = 1
TINY_HOOK = "model.layers.1"  # as in conftest.py


def make_synth_db(path: Path, n_features: int = 300, **kw) -> Path:
    """A small synthetic database (labelled synthetic: sae_id 'synthetic')."""
    return build_synthetic_db(path, n_features=n_features, **kw)


def inject_hostile(path: Path, feature: int = HOSTILE_FEATURE) -> None:
    """Put script/img-onerror strings into a feature's top contexts, search text, max tokens, logit tokens,
    label, tags and notes, and into a list name."""
    con = duckdb.connect(str(path))
    try:
        con.execute(
            """UPDATE examples SET tokens = list_concat(tokens[1:max_pos], [?], tokens[max_pos + 2:])
               WHERE sae_id = ? AND feature = ? AND kind = 'top'""",
            [HOSTILE_SCRIPT, SAE_ID, feature],
        )
        con.execute(
            """UPDATE examples SET tokens = list_concat(tokens[1:max_pos - 1], [?], tokens[max_pos + 1:])
               WHERE sae_id = ? AND feature = ? AND kind = 'top'""",
            [HOSTILE_IMG, SAE_ID, feature],
        )
        con.execute(
            """UPDATE features SET search_text = ? || ' ' || ? || ' ' || search_text,
                   max_tokens = list_concat([?], max_tokens[2:]), pos_tokens = list_concat([?], pos_tokens[2:])
               WHERE sae_id = ? AND feature = ?""",
            [HOSTILE_SCRIPT, HOSTILE_IMG, HOSTILE_SCRIPT, HOSTILE_IMG, SAE_ID, feature],
        )
        con.execute("DELETE FROM labels WHERE sae_id = ? AND feature = ?", [SAE_ID, feature])
        con.execute(
            "INSERT INTO labels VALUES (?, ?, ?, [?], ?, ?, now())",
            [SAE_ID, feature, f"evil {HOSTILE_SCRIPT}", HOSTILE_IMG, f"note {HOSTILE_IMG}", HOSTILE_SCRIPT],
        )
        con.execute(
            "INSERT INTO lists VALUES (?, ?, ?, ?, now())", [f"list {HOSTILE_SCRIPT}", SAE_ID, feature, HOSTILE_IMG]
        )
    finally:
        con.close()


def point_at_tiny_model(path: Path, model_dir: Path, sae_dir: Path, d_in: int = 32) -> None:
    """Make the synthetic SAE row reload the tiny test model + SAE (64 features, hook model.layers.1)."""
    con = duckdb.connect(str(path))
    try:
        con.execute(
            """UPDATE saes SET model_spec = ?, model_name = 'tiny test model (random weights)', sae_source = ?,
                   hook_name = ?, hook_kind = 'hf_module', d_in = ?, context_size = 32, prepend_bos = true
               WHERE sae_id = ?""",
            [
                str(model_dir),
                json.dumps({"kind": "folder", "path": str(sae_dir), "release": None, "sae_id": None}),
                TINY_HOOK,
                d_in,
                SAE_ID,
            ],
        )
    finally:
        con.close()


@contextmanager
def raw_connection(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A plain read-write DuckDB connection to ``path`` taken the way featuredict writers take one (under the
    file's exclusive lock): a Store of this process closes its read connection first, and reopens after."""
    from featuredict.db.filelock import lock_for

    with lock_for(path).exclusive():
        con = duckdb.connect(str(path))
        try:
            yield con
        finally:
            con.close()


def copy_db(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture(scope="session")
def synth_db_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session master copy: 300 synthetic features + hostile content on feature 1 (never opened by tests)."""
    p = make_synth_db(tmp_path_factory.mktemp("synth") / "master.duckdb", n_features=300, seed=1)
    inject_hostile(p)
    return p


@pytest.fixture
def synth_db(synth_db_master: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic database for one test (writes allowed)."""
    return copy_db(synth_db_master, tmp_path / "synth.duckdb")


@pytest.fixture(scope="session")
def big_map_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """65,536 synthetic features with minimal examples (1 short top context each): for the map's row count."""
    return make_synth_db(
        tmp_path_factory.mktemp("bigmap") / "big.duckdb",
        n_features=65536,
        n_top=1,
        ctx_len=8,
        n_bands=0,
        per_band=0,
        d_in=8,
        n_labels=500,
        seed=2,
    )


@pytest.fixture(scope="session")
def model_db_master(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sae_dir: Path) -> Path:
    """64 synthetic features whose SAE row reloads the real tiny model + SAE (prompt/concept search run)."""
    p = make_synth_db(tmp_path_factory.mktemp("modeldb") / "model.duckdb", n_features=64, seed=3)
    point_at_tiny_model(p, tiny_model_dir, tiny_sae_dir)
    return p


# ---- real-browser tests -----------------------------------------------------------------------------------
CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
        if p and Path(p).exists()
    ),
    None,
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENS = Path("/tmp/fd/screens")  # screenshots are copied here for humans


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("streamlit did not become healthy")


@contextmanager
def running_app(db: Path, *streamlit_args: str) -> Iterator[str]:
    """``streamlit run dashboard/app.py -- --db DB`` on a free local port; yields its base URL, stops it after."""
    port = free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port)]
    cmd += ["--server.address", "127.0.0.1", *streamlit_args, "--", "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot into the test's tmp dir, copied to SCREENS when that is writable."""
    p = tmp_path / f"{name}.png"
    page.screenshot(path=str(p), full_page=True)
    try:
        SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, SCREENS / p.name)
    except OSError:
        pass
    return p
