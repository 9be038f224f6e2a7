"""The layer contract (db <- pipelines, folder by folder <- dashboard <- cli), checked with import-linter, and the
type checker (mypy) on the packages pyproject.toml names, both as CI runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

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
    store.write_text(
        store.read_text() + "\n\ndef _leak():\n    from featuredict.pipelines.model import runtime  # noqa\n"
    )
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "featuredict.db.store -> featuredict.pipelines.model.runtime" in res.stdout


def test_dashboard_cannot_import_the_cli(tmp_path):
    """The command line is the top layer: a dashboard module that imports it is rejected."""
    for d in ("pipelines", "db", "dashboard"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    render = tmp_path / "dashboard" / "render.py"
    render.write_text(render.read_text() + "\n\ndef _leak():\n    from featuredict.pipelines.cli import main  # noqa\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "featuredict.dashboard.render -> featuredict.pipelines.cli" in res.stdout


def _typecheck(root: Path) -> subprocess.CompletedProcess[str]:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    return subprocess.run(["bash", str(root / ".ci" / "typecheck")], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_type_checker_passes():
    res = _typecheck(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "Success: no issues found" in res.stdout


@pytest.mark.slow
def test_type_checker_can_fail(tmp_path):
    """A copy whose db layer returns a str where it promises an int is rejected."""
    for d in ("pipelines", "db", "dashboard", ".ci"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    store = tmp_path / "db" / "store.py"
    store.write_text(store.read_text() + '\n\ndef _wrong() -> int:\n    return "not an int"\n')
    res = _typecheck(tmp_path)
    assert res.returncode != 0
    assert "db/store.py" in res.stdout and "Incompatible return value type" in res.stdout
