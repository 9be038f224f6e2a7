"""Latency of the review queue (``q.review_queue``) on a 65,536-feature SYNTHETIC database with 5% reviewed.

Usage::

    python bench/synth_db.py /tmp/fd/full.duckdb                # SYNTHETIC 65,536 features (once)
    python bench/bench_review.py /tmp/fd/full.duckdb [--repeats 50] [--reviewed 0.05]

Marks ``--reviewed`` of the features reviewed (through ``writes.set_review``, as the page does; skipped when
already done), puts 500 features on a watchlist, then times the first page (100 rows) of the queue for every
priority: max activation, density, watchlist, and concept scores (1,000 features with scores; on a
synthetic database there is no model to run the concept texts through, so the bench supplies the scores the
page would compute: it measures the query, not the model). Prints a markdown table of p50 / p95 in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from featuredict.db import queries as q  # noqa: E402
from featuredict.db import writes  # noqa: E402
from featuredict.db.schema import REVIEW_STATUSES  # noqa: E402
from featuredict.db.store import Store  # noqa: E402

WATCHLIST = "bench-watchlist"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--sae", default=None, help="SAE id (default: the first)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--reviewed", type=float, default=0.05, help="fraction of features to mark reviewed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    store = Store(args.db)
    sae = args.sae or store.rows("SELECT sae_id FROM saes ORDER BY sae_id LIMIT 1")[0][0]
    n_feat = q.feature_count(store, sae)
    rng = np.random.default_rng(args.seed)
    want = int(round(args.reviewed * n_feat))
    have = store.rows("SELECT count(*) FROM reviews WHERE sae_id = ?", [sae])[0][0]
    if have < want:
        reviewed = {f for (f,) in store.rows("SELECT feature FROM reviews WHERE sae_id = ?", [sae])}
        todo = [int(f) for f in rng.permutation(n_feat) if int(f) not in reviewed][: want - have]
        for f in tqdm(todo, desc="reviewing", unit="feature"):
            writes.set_review(store, sae, f, str(rng.choice(REVIEW_STATUSES[1:])), reason="bench", reviewer="bench")
    writes.add_to_list(store, WATCHLIST, sae, [int(f) for f in rng.choice(n_feat, 500, replace=False)])
    scores = pd.DataFrame({"feature": rng.choice(n_feat, 1000, replace=False), "score": rng.random(1000)})
    n_rev = store.rows("SELECT count(*) FROM reviews WHERE sae_id = ?", [sae])[0][0]
    print(f"{n_feat:,} features, {n_rev:,} reviewed ({n_rev / n_feat:.1%}), {args.repeats} repeats\n")
    print("| priority | p50 ms | p95 ms |\n|---|---:|---:|")
    cases = {
        "max activation": q.QueueRequest(sae, "max_act"),
        "density": q.QueueRequest(sae, "density"),
        "watchlist (500)": q.QueueRequest(sae, "watchlist", watchlist=WATCHLIST),
        "concept (1,000 scores)": q.QueueRequest(sae, "concept", scores=scores),
        "max activation, status concerning": q.QueueRequest(sae, "max_act", statuses=("concerning",)),
    }
    for name, req in cases.items():
        for _ in range(3):
            q.review_queue(store, req)
        ms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            q.review_queue(store, req)
            ms.append((time.perf_counter() - t0) * 1000)
        print(f"| {name} | {statistics.median(ms):.1f} | {float(np.percentile(ms, 95)):.1f} |")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
