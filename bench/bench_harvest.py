"""Harvest throughput vs the bare forward pass to the hook, and peak memory at two corpus sizes.

    python bench/bench_harvest.py --model smollm2-135m --sae ~/.cache/featuredict/demo/sae_... \
        --corpus ../shared/corpora/web_sample_133KB.txt --tokens 20000

Throughput: the same contexts are run (a) through the model up to the hook only, and (b) through the build's
own harvest loop (``loop.harvest_batches``: model to hook + the SAE's encode/decode + the mergeable state
update), in turn; the ratio (b)/(a) time is the harvest overhead (target: at most 10% extra), given best over
best, as the median of the pairs run back to back, and by the loop's own stage timers. Memory: a fresh process
harvests N and 2N tokens and reports its peak RSS (target: flat, i.e. bounded by the dictionary, not the corpus).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _contexts(rt, corpus: str, tokens: int, context_size: int, batch_size: int):
    from featuredict.pipelines.harvest.corpus import CorpusSpec, batch_contexts, iter_contexts, iter_documents

    tok = rt.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches, n = [], 0
    for ids, mask in batch_contexts(
        iter_contexts(iter_documents(CorpusSpec(corpus)), tok, context_size), batch_size, context_size, pad
    ):
        batches.append((ids, mask))
        n += int(mask.sum())
        if n >= tokens:
            break
    return batches, n


def _config(args, **kw):
    """The build's config for these arguments (no progress bar)."""
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.model.saes import SaeSource

    return BuildConfig(
        model=args.model,
        sae=SaeSource.parse(args.sae),
        corpus=CorpusSpec(args.corpus),
        context_size=args.context_size,
        batch_size=args.batch_size,
        progress=False,
        **kw,
    )


def throughput(args) -> dict:
    """The bare forward pass to the hook and the build's own harvest loop (``loop.harvest_batches``: forward,
    the SAE's top-k encode, the sparse decode and the state update from the active entries), over the same
    batches, in turn, ``repeats`` times each.

    Three figures, because on a shared host one run of the forward pass can differ from the next by more than
    the overhead being measured: best harvest over best bare forward; the median over the pairs (each harvest
    against the bare forward run just before it, so both saw the same load); and the harvest's own stage
    timers (its time over the forward pass inside it, in the same run)."""
    from featuredict.pipelines.harvest.loop import harvest_batches
    from featuredict.pipelines.harvest.stages import StageTimes
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    torch.set_num_threads(args.threads)
    rt = load_runtime(args.model, SaeSource.parse(args.sae), device=args.device)
    batches, n = _contexts(rt, args.corpus, args.tokens, args.context_size, args.batch_size)
    cfg = _config(args)
    with torch.no_grad():
        rt.hook_acts(*batches[0])  # warm-up
    fwd, har, in_loop = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for ids, mask in batches:
                rt.hook_acts(ids, mask)
        fwd.append(time.perf_counter() - t)
        stages = StageTimes()
        t = time.perf_counter()
        harvest_batches(rt, cfg, batches, stages=stages)
        har.append(time.perf_counter() - t)
        in_loop.append(stages.get("harvest") / stages.get("forward"))
    pairs = sorted(h / f for h, f in zip(har, fwd, strict=True))
    return {
        "tokens": n,
        "d_sae": rt.d_sae,
        "forward_tok_s": n / min(fwd),
        "harvest_tok_s": n / min(har),
        "overhead": min(har) / min(fwd) - 1,
        "pair_median": statistics.median(pairs) - 1,
        "pairs": [p - 1 for p in pairs],
        "in_loop": statistics.median(in_loop) - 1,
    }


def memory_child(args) -> None:
    from featuredict.pipelines.harvest.loop import harvest_corpus
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    rt = load_runtime(args.model, SaeSource.parse(args.sae), device=args.device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = _config(args, max_tokens=args.tokens)
    st = harvest_corpus(rt, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": st.n_tokens, "rss_after_load_mb": base / 1024, "peak_rss_mb": peak / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default=None)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    r = throughput(args)
    print(
        "| tokens | d_sae | forward to hook tok/s | harvest tok/s | overhead, best over best"
        " | median of pairs | the loop over its own forward |"
    )
    print("|---|---|---|---|---|---|---|")
    pairs = ", ".join(f"{p:+.1%}" for p in r["pairs"])
    print(
        f"| {r['tokens']:,} | {r['d_sae']} | {r['forward_tok_s']:,.0f} | {r['harvest_tok_s']:,.0f}"
        f" | {r['overhead']:+.1%} | {r['pair_median']:+.1%} ({pairs}) | {r['in_loop']:+.1%} |"
    )
    print("\n| harvest tokens | RSS after model load (MB) | peak RSS (MB) |\n|---|---|---|")
    for n in (args.tokens, 2 * args.tokens):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            "--model",
            args.model,
            "--sae",
            args.sae,
            "--corpus",
            args.corpus,
            "--tokens",
            str(n),
            "--context-size",
            str(args.context_size),
            "--batch-size",
            str(args.batch_size),
        ] + (["--device", args.device] if args.device else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        m = json.loads(out)
        print(f"| {m['tokens']:,} | {m['rss_after_load_mb']:,.0f} | {m['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
