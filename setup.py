"""Package discovery only (everything else lives in pyproject.toml).

The top-level folders ``pipelines/``, ``db/`` and ``dashboard/`` install as ``featuredict.pipelines``,
``featuredict.db`` and ``featuredict.dashboard``. Every folder with an ``__init__.py`` under them is a subpackage,
found here, so a new one can never be missing from the wheel (``tests/test_packaging.py`` builds the wheel and
imports every module from it).
"""

from setuptools import find_packages, setup

ROOTS = ("pipelines", "db", "dashboard")

setup(
    packages=[
        f"featuredict.{name}" for root in ROOTS for name in (root, *(f"{root}.{p}" for p in find_packages(root)))
    ],
    package_dir={f"featuredict.{root}": root for root in ROOTS},
)
