"""Explanation quality on a real database: explainers compared on the same features, with a chance control.

Usage (from the repo root):

    python -m bench.bench_explain_quality --db ~/.cache/featuredict/demo/smollm2-demo.duckdb \
        --work /tmp/fd/explain.duckdb --n 200 --explainers tokens hf:smollm2-135m [--scorer keyword]

The database is copied to ``--work`` once (explanations are written there; reruns resume, as ``featuredict
explain`` does). The ``--n`` features are spread evenly over the live features (every (live/n)-th). Each explainer
explains them and ``--scorer`` scores every explanation (detection and fuzzing, balanced accuracy on held-out
contexts; ``keyword`` is the deterministic lexical scorer, ``hf:MODEL`` / ``openai:URL`` an LLM). A control
scores each feature against the first explainer's explanation of ANOTHER feature of the sample (the next one),
through the same scorer code: what a wrong explanation gets. Prints per explainer: features explained,
features/minute of the explain step (this machine, now), and the mean detection and fuzzing over the features
scored by all of them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.explain import ExplainConfig, run_explain
    from featuredict.pipelines.explain.data import load_features, negative_pool
    from featuredict.pipelines.explain.scorers import KeywordScorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="a built featuredict database (not changed)")
    ap.add_argument("--work", required=True, help="working copy (made once; explanations are written here)")
    ap.add_argument("--n", type=int, default=200, help="features, spread evenly over the live ones (default 200)")
    ap.add_argument("--explainers", nargs="+", default=["tokens", "hf:smollm2-135m"])
    ap.add_argument("--scorer", default="keyword", help="keyword | hf:MODEL | openai:URL (default keyword)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    if not work.exists():
        shutil.copyfile(args.db, work)
    store = Store(str(work), read_only=True)
    sae = q.sae_ids(store)[0]
    live = [
        int(r[0])
        for r in store.rows("SELECT feature FROM features WHERE sae_id = ? AND max_act > 0 ORDER BY feature", [sae])
    ]
    store.close()
    step = len(live) / args.n
    feats = [live[int(i * step)] for i in range(min(args.n, len(live)))]
    ranges = ",".join(map(str, feats))

    speed: dict[str, float] = {}
    for spec in args.explainers:
        t0 = time.perf_counter()
        s = run_explain(ExplainConfig(db=str(work), features=ranges, explainer=spec, progress=False))
        if s.explained:
            speed[spec] = s.explained / ((time.perf_counter() - t0) / 60)
        run_explain(ExplainConfig(db=str(work), features=ranges, explainer=spec, score=True, scorer=args.scorer,
                                  progress=False))  # fmt: skip

    store = Store(str(work), read_only=True)
    rows = store.df(
        "SELECT feature, method, explainer_model, text, detection, fuzzing FROM explanations "
        "WHERE sae_id = ? AND scorer_model = ? AND error IS NULL",
        [sae, args.scorer if args.scorer == "keyword" else args.scorer.split(":", 1)[1]],
    )
    rows = rows[rows["feature"].isin(feats)]
    first = args.explainers[0]
    control = None
    if args.scorer == "keyword":  # the wrong-explanation control, through the same scorer
        base = rows[rows["method"] == first.split(":")[0]].drop_duplicates("feature").set_index("feature")["text"]
        order = [f for f in feats if f in base.index]
        data = load_features(store, sae, order, negative_pool(store, sae, 4000, 0), 10, 5, 10, 0)
        skip_first = bool(q.sae_info(store, sae)["prepend_bos"])
        det, fuz = [], []
        for i, f in enumerate(order):
            wrong = base[order[(i + 1) % len(order)]]
            sc = KeywordScorer().score(wrong, data[f], skip_first, 0)
            det.append(sc.detection)
            fuz.append(sc.fuzzing)
        control = (
            np.nanmean([np.nan if d is None else d for d in det]),
            np.nanmean([np.nan if x is None else x for x in fuz]),
        )
    store.close()

    print(f"{len(feats)} features of {sae} ({len(live)} live), scorer {args.scorer}")
    print(f"{'explainer':<40} {'explained':>9} {'feat/min':>9} {'detection':>9} {'fuzzing':>8}")
    for spec in args.explainers:
        method, _, model = spec.partition(":")
        mine = rows[(rows["method"] == method) & ((rows["explainer_model"] == model) if model else True)]
        print(
            f"{spec:<40} {mine['feature'].nunique():>9} {speed.get(spec, float('nan')):>9.1f} "
            f"{mine['detection'].mean():>9.3f} {mine['fuzzing'].mean():>8.3f}"
        )
    if control is not None:
        print(
            f"{'control: another feature`s ' + first + ' text':<40} {'':>9} {'':>9} {control[0]:>9.3f} {control[1]:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
