"""``featuredict train-sae``: train a TopK SAE with sae-lens on a local model and corpus (``pipelines/train``)."""

from __future__ import annotations

import argparse

from featuredict.pipelines.cli.args import (
    add_corpus_args,
    add_device_args,
    add_option,
    config_from,
    corpus_spec,
    default,
)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from featuredict.pipelines.train.sae import ACTIVATION_MODES, CACHED_DEFAULTS, STREAMED_DEFAULTS, TrainConfig

    t = sub.add_parser("train-sae", help="train a TopK SAE with sae-lens on a local model + corpus")
    t.add_argument("--model", required=True, help="preset (smollm2-135m), local HF folder or HF id")
    add_corpus_args(t)
    t.add_argument("--out", required=True, help="output folder (sae-lens format)")
    add_option(t, "--hook", TrainConfig, "hook", "HF module name whose output is read")
    add_option(t, "--d-sae", TrainConfig, "d_sae", "SAE width")
    add_option(t, "--k", TrainConfig, "k", "TopK k")
    add_option(t, "--tokens", TrainConfig, "training_tokens", "training tokens", ",")
    add_option(t, "--context-size", TrainConfig, "context_size", "tokens per context")
    t.add_argument(
        "--activations",
        choices=list(ACTIVATION_MODES),
        default=default(TrainConfig, "activations"),
        help="cache: run the model once over the corpus and train epochs over the activations in memory; stream: "
        "sae-lens runs the model for every training token; auto (default): cache when they fit in 2 GiB",
    )
    (cb, clr, cdec), (sb, slr, sdec) = CACHED_DEFAULTS, STREAMED_DEFAULTS
    t.add_argument(
        "--batch-tokens", type=int, default=None, help=f"tokens per step (default: {cb} cached, {sb} streamed)"
    )
    t.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {clr:g} cached, {slr:g} streamed)")
    t.add_argument(
        "--lr-decay",
        type=float,
        default=None,
        help=f"fraction of the steps, at the end, over which the lr decays to a tenth (default: {cdec:g} cached, "
        f"{sdec:g} streamed)",
    )
    add_option(t, "--seed", TrainConfig, "seed", "random seed")
    add_device_args(t)
    t.set_defaults(func=run)
    return t


def run(args: argparse.Namespace) -> int:
    from featuredict.pipelines.train.sae import TrainConfig, train_sae

    cfg = config_from(args, TrainConfig, {"training_tokens": "tokens"}, corpus=corpus_spec(args))
    r = train_sae(cfg)
    print(
        f"trained TopK SAE (d_sae={cfg.d_sae}, k={cfg.k}) at {cfg.hook} of {cfg.model} on {cfg.training_tokens:,} "
        f"tokens in {r.seconds:.0f}s ({r.tokens_per_s:,.0f} tok/s, model in {r.dtype}, activations {r.mode})"
    )
    print(f"FVE={r.fve:.3f}  L0={r.l0:.1f}  dead={r.dead_fraction:.1%}  -> {r.out}")
    return 0
