"""SAE training throughput against the bare forward pass to the hook, and fp16 vs fp32 on this CPU.

    python bench/bench_train.py --model smollm2-135m --hook model.layers.15 --tokens 20000

Three figures, measured in one run (compare ratios, not absolute times from different days):
1. forward to the hook, fp32 and fp16 weights, tokens/s (batches of 8 x 128 tokens; the model is cut after
   the hook layer the way the harvest stops there): the fp16/fp32 ratio tells whether this CPU has fast fp16;
2. ``train-sae`` (sae-lens, through featuredict.pipelines.train.sae) on ``--tokens`` tokens, tokens/s;
3. the ratio train/forward(fp32). Target: at least 0.5.
``--activations cache`` times train-sae's cached mode instead (one forward pass over the corpus, then epochs over
the cached activations; the ratio can exceed 1 when training runs several epochs).
Prints one JSON line; ``lscpu``'s model name is included so RESULTS.md rows name their CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def forward_tokens_per_s(folder: str, hook: str, dtype: torch.dtype, batches: list[torch.Tensor]) -> float:
    from featuredict.pipelines.model.hooks import HookSite
    from featuredict.pipelines.model.loading import load_model

    loaded = load_model(folder, dtype=dtype, device="cpu")
    assert next(loaded.model.parameters()).dtype == dtype, "the model did not load in the dtype asked for"
    site = HookSite(loaded, hook)
    site.activations(batches[0])  # warm-up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for ids in batches:
            site.activations(ids)
        best = min(best, time.perf_counter() - t0)
    return sum(int(b.numel()) for b in batches) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="model.layers.15")
    ap.add_argument("--corpus", default=None, help="training text (.txt); default: the demo's built-in corpus")
    ap.add_argument("--tokens", type=int, default=20_000, help="training tokens")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--fwd-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--activations",
        choices=["stream", "cache", "auto"],
        default="stream",
        help="train-sae's activation source (default stream: the model runs for every training token)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.model.loading import resolve_hf_path
    from featuredict.pipelines.train.sae import TrainConfig, train_sae

    folder = resolve_hf_path(args.model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(10, 1000, (8, 128), generator=g) for _ in range(args.fwd_batches)]
    fwd32 = forward_tokens_per_s(folder, args.hook, torch.float32, batches)
    fwd16 = forward_tokens_per_s(folder, args.hook, torch.float16, batches)

    corpus = args.corpus
    with tempfile.TemporaryDirectory() as tmp:
        if corpus is None:
            from featuredict.pipelines.demo.run import python_docs_paragraphs

            corpus = str(Path(tmp) / "docs.txt")
            Path(corpus).write_text("\n<|endoftext|>\n".join(python_docs_paragraphs()))
        cfg = TrainConfig(
            model=args.model,
            corpus=CorpusSpec(corpus),
            out=str(Path(tmp) / "sae"),
            hook=args.hook,
            d_sae=args.d_sae,
            k=args.k,
            training_tokens=args.tokens,
            device="cpu",
            activations=args.activations,
        )
        r = train_sae(cfg)
    out = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "model": args.model,
        "hook": args.hook,
        "forward_fp32_tok_s": round(fwd32),
        "forward_fp16_tok_s": round(fwd16),
        "fp32_over_fp16": round(fwd32 / fwd16, 2),
        "train_tokens": args.tokens,
        "activations": r.mode,
        "cached_tokens": r.corpus_tokens,
        "train_tok_s": round(r.tokens_per_s),
        "train_over_forward_fp32": round(r.tokens_per_s / fwd32, 2),
        "train_fve": round(r.fve, 3),
        "train_dead": round(r.dead_fraction, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
