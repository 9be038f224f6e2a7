"""Offline explainers compared on held-out contexts: mean detection score of ``tokens``, ``phrases`` and a
control (each feature given ANOTHER feature's ``tokens`` text), under the keyword and the embedding scorer.

Usage (from the repo root):

    python -m bench.bench_explainers --db PATH [--sae-id ID] [--n 200] [--seed 0] [--threads 1]

``n`` live features are drawn at random (seeded). Each explainer sees the feature's even-ranked top contexts;
the scorers judge the odd-ranked (held-out) top and interval contexts against as many non-activating contexts
(``pipelines.explain.data.load_features``, exactly as ``featuredict explain --score`` does). Detection is
balanced accuracy for ``keyword`` and AUROC for ``embedding``; 0.5 is chance for both. Nothing is written to the
database. Prints a markdown table, a few example explanations and the CPU model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import cpu_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.explain.data import load_features, negative_pool
    from featuredict.pipelines.explain.explainers import TokensExplainer
    from featuredict.pipelines.explain.phrases import PhrasesExplainer
    from featuredict.pipelines.explain.scorers import EmbeddingScorer, KeywordScorer
    from featuredict.pipelines.search import meaning

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True)
    p.add_argument("--sae-id", default=None)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    store = Store(args.db, read_only=True)
    try:
        sae = args.sae_id or q.sae_ids(store)[0]
        info = q.sae_info(store, sae)
        skip_first = bool(info.get("prepend_bos", True))
        live = [r[0] for r in store.rows("SELECT feature FROM features WHERE sae_id = ? AND NOT dead", [sae])]
        rng = np.random.default_rng(args.seed)
        feats = sorted(int(f) for f in rng.choice(live, size=min(args.n, len(live)), replace=False))
        pool = negative_pool(store, sae, 4000, args.seed)
        data = load_features(store, sae, feats, pool, 10, 5, 10, args.seed)
        embedder = meaning.load_embedder()
        texts: dict[str, dict[int, str]] = {}
        secs: dict[str, float] = {}
        for name, ex in (("tokens", TokensExplainer()), ("phrases", PhrasesExplainer(embedder, seed=args.seed))):
            t0 = time.perf_counter()
            df = ex.explain_many(store, sae, feats, skip_first)
            secs[name] = time.perf_counter() - t0
            texts[name] = {int(f): t for f, t in zip(df["feature"], df["text"], strict=True) if t}
        order = [f for f in feats if f in texts["tokens"]]
        texts["control (another feature's tokens text)"] = {
            f: texts["tokens"][order[(i + len(order) // 2) % len(order)]] for i, f in enumerate(order)
        }
        scorers = {"keyword": KeywordScorer(), "embedding": EmbeddingScorer(embedder)}
        results: dict[tuple[str, str], list[float]] = {}
        t0 = time.perf_counter()
        for name, by_f in texts.items():
            for sname, scorer in scorers.items():
                vals = []
                for f in feats:
                    if f in by_f and data[f].held_out and data[f].negatives:
                        d = scorer.score(by_f[f], data[f], skip_first, args.seed).detection
                        if d is not None:
                            vals.append(d)
                results[(name, sname)] = vals
        score_s = time.perf_counter() - t0
    finally:
        store.close()
    print(
        f"# {len(feats)} live features of {sae} in {args.db}; CPU: {cpu_model()} ({os.cpu_count()} cores visible), "
        f"torch {torch.__version__}, {args.threads} thread(s); scoring took {score_s:.0f}s"
    )
    print("\n| explainer | keyword detection (balanced acc.) | embedding detection (AUROC) | explained | time |")
    print("|---|---:|---:|---:|---:|")
    for name, by_f in texts.items():
        kw, em = results[(name, "keyword")], results[(name, "embedding")]
        t = f"{secs[name]:.1f} s" if name in secs else "-"
        print(f"| {name} | {np.mean(kw):.3f} (n={len(kw)}) | {np.mean(em):.3f} (n={len(em)}) | {len(by_f)} | {t} |")
    print("\nexamples:")
    for f in feats[:8]:
        print(f"  {f}: tokens: {texts['tokens'].get(f)!r}\n  {' ' * len(str(f))}  phrases: {texts['phrases'].get(f)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
