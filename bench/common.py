"""What several bench scripts share: the CPU's name, timing and percentiles, the dashboard's feature page.

Imported as ``from bench.common import ...`` once the script has put the repository root on ``sys.path``
(each ``bench/bench_*.py`` does so before its first import from here).
"""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from featuredict.db import queries as q


def cpu_model() -> str:
    """The CPU's model name from ``lscpu`` (``platform.processor()`` or "unknown CPU" where that fails)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def page_fn(db: Any, sae: str, picks: Callable[[], int]) -> Callable[[], None]:
    """The queries of one whole feature page of the dashboard, for the feature ``picks()`` gives."""

    def page() -> None:
        f = picks()
        q.feature(db, sae, f)
        q.examples(db, sae, f, "top")
        q.examples(db, sae, f, "interval")
        q.neighbours(db, sae, f)
        q.label(db, sae, f)
        q.lists_of_feature(db, sae, f)

    return page
