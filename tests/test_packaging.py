"""The wheel holds every module of the tree, and each one imports from the wheel alone (not the checkout)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

ROOTS = ("pipelines", "db", "dashboard")
# Streamlit scripts: running them draws pages, so they are shipped as files and checked by name only.
SCRIPTS = ("dashboard/app.py", "dashboard/views/")

IMPORT_ALL = r"""
import importlib, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, sys.argv[1])
where = {}
for name in json.loads(sys.argv[2]):
    where[name] = importlib.import_module(name).__file__
print(json.dumps(where))
"""


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", *ROOTS], cwd=ROOT, capture_output=True, text=True, check=True)
    return sorted(f for f in out.stdout.split() if f.endswith(".py") and (ROOT / f).exists())


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("featuredict", *parts))


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0 and "setuptools" in res.stderr and "Could not find" in res.stderr:
        pytest.skip("no setuptools>=77 to build the wheel with (offline, and not installed)")
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = out.glob("featuredict-*.whl")
    unpacked = out / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    return unpacked


@pytest.mark.slow
def test_wheel_has_every_module_and_each_imports_from_it(wheel_dir: Path):
    files = source_files()
    assert any(f.startswith("pipelines/cli/") for f in files)  # the tree is what this test thinks it is
    shipped = {str(p.relative_to(wheel_dir / "featuredict")) for p in (wheel_dir / "featuredict").rglob("*.py")}
    missing = [f for f in files if f not in shipped]
    assert not missing, f"not in the wheel: {missing}"
    corpus = list((wheel_dir / "featuredict" / "pipelines" / "demo").glob("model_written_*.txt"))
    assert corpus, "the demo's shipped model-written corpus is not in the wheel"
    modules = [module_name(f) for f in files if not f.startswith(SCRIPTS)]
    res = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(wheel_dir), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    where = json.loads(res.stdout.strip().splitlines()[-1])
    outside = {m: f for m, f in where.items() if not str(f).startswith(str(wheel_dir))}
    assert not outside, f"imported from outside the wheel: {outside}"
    assert len(where) == len(modules)


@pytest.mark.slow
def test_a_subpackage_needs_no_listing(tmp_path: Path):
    """A new folder with an __init__.py under pipelines/ lands in the wheel without touching pyproject.toml."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    for d in ROOTS:
        for f in source_files():
            if f.startswith(d + "/"):
                (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / f).write_text((ROOT / f).read_text())
    (tmp_path / "pipelines" / "brand_new").mkdir()
    (tmp_path / "pipelines" / "brand_new" / "__init__.py").write_text("VALUE = 7\n")
    out = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = out.glob("featuredict-*.whl")
    assert "featuredict/pipelines/brand_new/__init__.py" in zipfile.ZipFile(wheel).namelist()
