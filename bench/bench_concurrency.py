"""Feature-page latency with the file shared between processes, and how long a CLI command waits (issue 19).

Usage::

    python bench/synth_db.py /tmp/fd/full.duckdb            # SYNTHETIC 65,536 features x 20 x 64 tokens
    cp /tmp/fd/full.duckdb /tmp/fd/control.duckdb                   # optional: for --control
    python bench/bench_concurrency.py /tmp/fd/full.duckdb [--repeats 200] [--rounds 4] [--control /tmp/fd/control.duckdb]

Three feature-page figures, each the whole page of bench_dashboard.py (header row, top examples, interval
samples, neighbours, label, lists) for random live features:

- ``one connection``: how the app read before this change: one read-write connection held for the process's
  life, a cursor per query (no other process could open the file meanwhile);
- ``idle``: ``db.store.Store`` as the app reads now (shared read-only connection under the file's shared lock);
- ``during explain --all``: the same while ``featuredict explain --all --explainer tokens --force`` writes
  every feature's explanation from another process (batches of 2,048 rows, the lock free in between).

With ``--control COPY`` (a copy of the database), explain first runs on the copy while the page loads run on
the original: the same CPU share, no lock in common, so the gap to ``during explain --all`` is what sharing
the file costs. The first two alternate in ``--rounds`` rounds so a busy machine slows both alike. Then the CLI wait: a second
process that holds a Store with its read connection open and idle (an open dashboard) is running while this
one takes the exclusive lock, ``--waits`` times; the figure is the time from asking to holding it.
The explain run writes explanations into the file: run this on a copy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import page_fn, pct, timed  # noqa: E402
from featuredict.db import queries as q  # noqa: E402
from featuredict.db.filelock import lock_for  # noqa: E402
from featuredict.db.store import Store  # noqa: E402

FEATUREDICT = str(Path(sys.executable).with_name("featuredict"))


class OneConnection:
    """The reader before this change: one read-write connection for the process's life, a cursor per query."""

    def __init__(self, path: str):
        self._con = duckdb.connect(path)

    def df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        cur = self._con.cursor()
        try:
            return cur.execute(sql, list(params or [])).df()
        finally:
            cur.close()

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        cur = self._con.cursor()
        try:
            return cur.execute(sql, list(params or [])).fetchall()
        finally:
            cur.close()

    def close(self) -> None:
        self._con.close()


IDLE_DASHBOARD = """
import sys, time
from featuredict.db.store import Store
from featuredict.db import queries as q
s = Store(sys.argv[1], read_only=True)
sae = s.rows("SELECT sae_id FROM saes ORDER BY sae_id LIMIT 1")[0][0]
for line in sys.stdin:  # each line: show a page (the read connection opens), then sit idle
    if line.strip() == "quit":
        break
    q.feature(s, sae, 1); q.examples(s, sae, 1, "top")
    print("open", flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--repeats", type=int, default=200, help="timed page loads per variant and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--waits", type=int, default=20, help="CLI lock waits measured against an idle dashboard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--control",
        default=None,
        help="a copy of the database: explain --all runs on it first, so the page shares the CPU but not the lock",
    )
    args = ap.parse_args(argv)
    path = str(Path(args.db).resolve())

    store = Store(path)
    sae = store.rows("SELECT sae_id FROM saes ORDER BY sae_id LIMIT 1")[0][0]
    live = [r[0] for r in store.rows("SELECT feature FROM features WHERE sae_id = ? AND NOT dead", [sae])]
    n_feat = q.feature_count(store, sae)
    rng = np.random.default_rng(args.seed)
    picks = iter(rng.choice(live, size=1_000_000).tolist())

    def nxt() -> int:
        return int(next(picks))

    res: dict[str, list[float]] = {"one connection": [], "idle": []}
    for _ in range(args.rounds):
        store.close()  # the old-style connection needs the file to itself
        old = OneConnection(path)
        res["one connection"] += timed(page_fn(old, sae, nxt), args.repeats)
        old.close()
        res["idle"] += timed(page_fn(store, sae, nxt), args.repeats)

    store.close()
    explain_lines: list[str] = []

    def during_explain(target: str) -> list[float] | None:
        """Page loads (ms) on ``path`` while ``explain --all`` runs on ``target``; None when explain failed."""
        explain = subprocess.Popen(
            [FEATUREDICT, "explain", "--db", target, "--all", "--explainer", "tokens", "--force", "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ts: list[float] = []
        page = page_fn(store, sae, nxt)
        while explain.poll() is None:
            t0 = time.perf_counter()
            page()
            ts.append((time.perf_counter() - t0) * 1000)
        out, err = explain.communicate()
        if explain.returncode != 0:
            print(f"explain failed ({explain.returncode}): {err.strip()}", file=sys.stderr)
            return None
        explain_lines.append(next((ln for ln in out.splitlines() if "explained" in ln), out.strip()).strip())
        return ts

    if args.control:  # the same CPU load, no lock shared with the page: what the lock itself costs is the gap
        control = during_explain(str(Path(args.control).resolve()))
        if control is None:
            return 1
        res["during explain --all on another file (control)"] = control
    gens0 = store.generation()
    during = during_explain(path)
    if during is None:
        return 1
    writes_seen = store.generation() - gens0
    explain_line = "; ".join(explain_lines)
    res["during explain --all"] = during

    dash = subprocess.Popen(
        [sys.executable, "-c", IDLE_DASHBOARD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert dash.stdout is not None and dash.stdin is not None
    lock = lock_for(path)
    waits = []
    for _ in range(args.waits):
        dash.stdin.write("page\n")
        dash.stdin.flush()
        if dash.stdout.readline().strip() != "open":
            print("the idle dashboard process stopped", file=sys.stderr)
            return 1
        time.sleep(0.5)  # the dashboard sits idle with its read connection open
        t0 = time.perf_counter()
        with lock.exclusive():
            waits.append((time.perf_counter() - t0) * 1000)
    dash.stdin.write("quit\n")
    dash.stdin.flush()
    dash.wait(30)

    base = statistics.median(res["one connection"])
    print(
        f"Database: `{args.db}` — SAE `{sae}`: {n_feat:,} features ({Path(path).stat().st_size / 2**20:,.0f} MiB); "
        f"{args.rounds} rounds x {args.repeats} page loads per idle variant, alternating; "
        f"{len(during)} page loads during explain ({explain_line}; {writes_seen} writes to this file).\n"
    )
    print("| whole feature page | n | p50 ms | p95 ms | max ms | p50 vs one connection |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ts in res.items():
        print(
            f"| {name} | {len(ts)} | {statistics.median(ts):.1f} | {pct(ts, 95):.1f} | {max(ts):.1f} | "
            f"{statistics.median(ts) / base:.2f}x |"
        )
    print(
        f"\nCLI write lock wait with a dashboard process open and idle ({len(waits)} tries): "
        f"p50 {statistics.median(waits):.1f} ms, max {max(waits):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
