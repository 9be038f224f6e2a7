"""Scan throughput against the bare forward pass to the hook, on the same records one at a time.

    python bench/bench_scan.py --db ~/.cache/featuredict/demo/smollm2-demo.duckdb --input corpus.txt --records 200

Both sides run each record alone (batch 1), as ``featuredict scan`` does: (a) the model up to the hook only,
(b) ``scan_text`` (model to the hook + SAE encode + threshold spans) with every live feature watched at 0.5 x
its max activation. Prints one JSON line with tokens/s of each, the ratio (target >= 0.8) and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--sae", default=None, help="SAE id (default: the first)")
    ap.add_argument("--input", required=True, help=".txt, one record per non-empty line")
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_train import cpu_model

    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.model.runtime import cached_runtime_from_row
    from featuredict.pipelines.scan import Record, Watch, read_records, scan_text

    store = Store(args.db, read_only=True)
    sae_id = args.sae or q.sae_ids(store)[0]
    row = q.sae_info(store, sae_id)
    live = store.df("SELECT feature, max_act FROM features WHERE sae_id = ? AND max_act > 0 ORDER BY feature", [sae_id])
    store.close()
    watch = Watch(
        live["feature"].to_numpy(), [0.5] * len(live), ["high"] * len(live), live["max_act"].to_numpy(dtype=float)
    )
    rt = cached_runtime_from_row(row)
    texts = [r.text for r in read_records(args.input) if isinstance(r, Record)][: args.records]
    ids = [rt.tokenize(t)[:, :1024] for t in texts]
    n_tok = sum(int(i.shape[1]) for i in ids)
    rt.hook_acts(ids[0])  # warm-up
    scan_text(rt, texts[0], watch)
    best_fwd = best_scan = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for i in ids:
            rt.hook_acts(i)
        best_fwd = min(best_fwd, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for line, t in enumerate(texts):
            scan_text(rt, t, watch, line=line)
        best_scan = min(best_scan, time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "threads": args.threads,
                "records": len(texts),
                "tokens": n_tok,
                "watched": len(live),
                "forward_tok_s": round(n_tok / best_fwd),
                "scan_tok_s": round(n_tok / best_scan),
                "scan_over_forward": round(best_fwd / best_scan, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
