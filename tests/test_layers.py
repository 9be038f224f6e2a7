"""The layer contract (storage <- core pipelines <- dashboard/CLI), checked with import-linter as CI does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "lint-imports"


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("lint-imports") is None and not (ROOT / ".venv" / "bin" / "lint-imports").exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return subprocess.run(["bash", str(SCRIPT), str(src)], capture_output=True, text=True, timeout=300)


def test_layers_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_upward_import_is_caught(tmp_path):
    """The check can fail: a copy whose storage layer imports the pipelines is rejected."""
    for d in ("pipelines", "db", "dashboard"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    store = tmp_path / "db" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _leak():\n    from featuredict.pipelines import runtime  # noqa\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "featuredict.db.store -> featuredict.pipelines.model.runtime" in res.stdout
