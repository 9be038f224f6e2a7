"""Latency of the dashboard's database queries: feature page and text search (p50 / p95), markdown table.

Usage::

    python bench/synth_db.py /tmp/fd/full.duckdb            # SYNTHETIC 65,536 features x 20 x 64 tokens
    python bench/bench_dashboard.py /tmp/fd/full.duckdb [--repeats 50]

Feature-page queries run for random live features (everything the page reads: header row, top examples,
interval samples, neighbours, label, lists). Text search runs a mix of single words, two-word queries,
rare and common words, and a filtered query. All through ``db.store.Store`` as the app does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import page_fn, pct, timed  # noqa: E402
from featuredict.db import queries as q  # noqa: E402
from featuredict.db.store import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--sae", default=None, help="SAE id (default: the first)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    store = Store(args.db)
    sae = args.sae or store.rows("SELECT sae_id FROM saes ORDER BY sae_id LIMIT 1")[0][0]
    n_feat = q.feature_count(store, sae)
    n_ex = store.rows("SELECT count(*) FROM examples WHERE sae_id = ?", [sae])[0][0]
    ctx = store.rows("SELECT len(tokens) FROM examples WHERE sae_id = ? LIMIT 1", [sae])[0][0]
    rng = np.random.default_rng(args.seed)
    live = [r[0] for r in store.rows("SELECT feature FROM features WHERE sae_id = ? AND NOT dead", [sae])]
    picks = iter(rng.choice(live, size=100_000).tolist())

    def nxt() -> int:
        return int(next(picks))

    # words for search: common theme words, rare per-feature words from max_tokens, two-word queries
    some = [q.feature(store, sae, int(f)) for f in rng.choice(live, size=20)]
    rare = [min((t.strip() for t in (f["max_tokens"] or [" x"])), key=len) for f in some]
    common = [t.strip() for f in some for t in (f["pos_tokens"] or [])[:1]]
    queries = [*common[:10], *rare[:10], *[f"{a} {b}" for a, b in zip(common[:5], common[5:10], strict=False)]]
    qiter = iter(queries * 1000)

    page = page_fn(store, sae, nxt)

    flt = q.SearchFilters(min_log10_density=-4.0, max_log10_density=-2.0, min_max_act=2.0)
    rows = [
        ("feature header row (`q.feature`)", lambda: q.feature(store, sae, nxt())),
        ("top examples (20 x ctx)", lambda: q.examples(store, sae, nxt(), "top")),
        ("interval samples", lambda: q.examples(store, sae, nxt(), "interval")),
        ("decoder neighbours + labels", lambda: q.neighbours(store, sae, nxt())),
        ("**whole feature page (all of the above + label + lists)**", page),
        ("text search, mixed queries", lambda: q.search(store, sae, next(qiter))),
        ("text search, 1 common word", lambda: q.search(store, sae, common[0])),
        ("text search, 2 words", lambda: q.search(store, sae, f"{common[0]} {common[1]}")),
        ("text search + filters (density, max act)", lambda: q.search(store, sae, next(qiter), flt)),
        ("feature id lookup ('#123')", lambda: q.search(store, sae, f"#{nxt()}")),
        ("map points (all features, cached in the app)", lambda: q.map_points(store, sae)),
    ]
    print(
        f"Database: `{args.db}` — SAE `{sae}`: {n_feat:,} features, {n_ex:,} example rows x {ctx} tokens "
        f"({Path(args.db).stat().st_size / 2**20:,.0f} MiB); {args.repeats} timed calls each.\n"
    )
    print("| query | p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, fn in rows:
        reps = max(5, args.repeats // 5) if name.startswith("map") else args.repeats
        ts = timed(fn, reps)
        print(f"| {name} | {statistics.median(ts):.1f} | {pct(ts, 95):.1f} | {max(ts):.1f} |")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
