"""``featuredict demo``: SmolLM2-135M + a TopK SAE trained here + a harvest + UMAP, offline (``pipelines/demo``)."""

from __future__ import annotations

import argparse
from typing import Any

from featuredict.pipelines.cli.args import config_from
from featuredict.pipelines.demo.run import CPU_BUDGETS, CUDA_SCALE, DemoConfig, parse_layers, run_demo


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand (budgets default to None = chosen for the machine, see ``resolve_budgets``)."""
    d = subparsers.add_parser("demo", help="offline demo: SmolLM2-135M + a TopK SAE trained here + a harvest + UMAP")
    c = CPU_BUDGETS
    d.add_argument("--db", default=None, help="database file (default: $FEATUREDICT_CACHE/demo/smollm2-demo.duckdb)")
    d.add_argument("--corpus", default=None, help="corpus file; default: built-in topic texts the model writes")
    d.add_argument(
        "--tokens", type=int, default=None, help=f"harvest token budget (default {c.tokens:,}; x{CUDA_SCALE} on CUDA)"
    )
    d.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help=f"SAE training tokens (default {c.train_tokens:,}; x{CUDA_SCALE} on CUDA)",
    )
    d.add_argument("--d-sae", type=int, default=4608)
    d.add_argument("--k", type=int, default=32)
    d.add_argument(
        "--gen-tokens",
        type=int,
        default=None,
        help=f"tokens the model writes for the built-in corpus (default {c.gen_tokens:,}; x{CUDA_SCALE} on CUDA)",
    )
    d.add_argument("--layer", type=int, default=15, help="residual layer of the 30 (default 15)")
    d.add_argument(
        "--layers",
        default=None,
        help="train and harvest SAEs at several layers, e.g. 6,15,24, for attribution graphs across SAEs (about "
        "3 min more per extra layer on 2 cores); --layer stays the one the steering hint uses",
    )
    d.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    switches = {
        "--no-steer-hint": "skip the concept search for a steering example",
        "--force": "redo every step even where cached",
        "--regenerate-corpus": "let the model write the built-in corpus (~2 min on 2 cores) instead of using the "
        "copy shipped in pipelines/demo/ for the default budget",
    }
    for flag, text in switches.items():
        d.add_argument(flag, action="store_true", help=text)
    d.set_defaults(func=run)
    return d


def run(args: argparse.Namespace) -> int:
    return run_demo(
        config_from(
            args,
            DemoConfig,
            steer_hint=not getattr(args, "no_steer_hint", False),
            layers=parse_layers(getattr(args, "layers", None)),
        )
    )
