"""``featuredict build``: (causal LM, SAE, corpus) -> a DuckDB feature dictionary (``pipelines/harvest``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featuredict.pipelines.cli.args import add_corpus_args, add_device_args, add_option, config_from, corpus_spec


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.harvest.state import HarvestConfig

    b = sub.add_parser("build", help="harvest feature statistics into a DuckDB feature dictionary")
    b.add_argument(
        "--model", required=True, help="preset (smollm2-135m), local HF folder, HF id, or TransformerLens name (gpt2)"
    )
    b.add_argument("--sae", help="a local sae-lens folder or RELEASE:SAE_ID from the sae-lens registry")
    b.add_argument("--sae-release", help="sae-lens registry release (e.g. gpt2-small-res-jb)")
    b.add_argument("--sae-id", help="SAE id within the release (e.g. blocks.8.hook_resid_pre)")
    add_corpus_args(b)
    add_option(b, "--db", BuildConfig, "db", "database file")
    b.add_argument("--name", default=None, help="SAE name in the database (default: MODEL/HOOK/D_SAE)")
    b.add_argument("--hook", default=None, help="override the SAE's hook name (normally read from the SAE)")
    add_option(b, "--context-size", BuildConfig, "context_size", "tokens per context incl. BOS")
    add_option(b, "--max-tokens", BuildConfig, "max_tokens", "token budget", ",")
    add_option(b, "--batch-size", BuildConfig, "batch_size", "contexts per forward pass")
    add_option(b, "--top-k", HarvestConfig, "top_k", "top activating contexts kept per feature")
    add_option(b, "--interval-samples", HarvestConfig, "samples_per_band", "samples per activation band")
    b.add_argument("--no-umap", action="store_true", help="skip the UMAP layout")
    b.add_argument(
        "--eval-contexts",
        type=int,
        default=32,
        help="after the build, the corpus contexts the SAE's quality (ΔLM loss, loss recovered, KL, FVE, L0) is "
        "measured on through the splice and stored (table sae_evals); 0 skips it (default 32)",
    )
    b.add_argument(
        "--no-words",
        action="store_true",
        help="skip the offline explanations and the meaning index that build writes at the end (featuredict words)",
    )
    add_option(
        b,
        "--outlier-norm-ratio",
        BuildConfig,
        "outlier_norm_ratio",
        "exclude positions whose activation norm is > this x their context's median, like BOS "
        "(attention-sink 'massive activations'); 0 disables",
        "g",
    )
    add_device_args(b)
    rg = b.add_argument_group("Ray (optional extra: pip install 'featuredict[ray]'; see docs/distributed.md)")
    rg.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|local|ADDRESS",
        help="harvest in shards on a Ray cluster: auto (the running cluster, else a local one), local, or the "
        "cluster's address (HOST:PORT or ray://HOST:10001); same tables as without it",
    )
    rg.add_argument("--shards", type=int, default=None, help="shards (default: as many as the cluster runs at once)")
    rg.add_argument(
        "--gpus-per-shard",
        type=float,
        default=None,
        help="GPUs per shard (default: 1 when the cluster has GPUs and --device is not cpu, else 0)",
    )
    rg.add_argument("--cpus-per-shard", type=float, default=1.0, help="CPUs (torch threads) per shard (default 1)")
    rg.add_argument("--max-retries", type=int, default=2, help="retries of a failing shard (default 2)")
    b.set_defaults(func=run)
    return b


def run(args: argparse.Namespace) -> int:
    from featuredict.pipelines.harvest.build import build
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.harvest.sharding import RayOptions
    from featuredict.pipelines.harvest.state import HarvestConfig
    from featuredict.pipelines.model.saes import SaeSource

    source = SaeSource(kind="registry", release=args.sae_release, sae_id=args.sae_id) if args.sae_release else None
    if source is None:
        if not args.sae:
            raise ValueError("give --sae FOLDER_OR_RELEASE:ID, or --sae-release with --sae-id")
        source = SaeSource.parse(args.sae)
    cfg = config_from(
        args,
        BuildConfig,
        {"sae_name": "name"},
        sae=source,
        corpus=corpus_spec(args),
        harvest=HarvestConfig(top_k=args.top_k, samples_per_band=args.interval_samples),
        umap=not args.no_umap,
    )
    ray = None if args.ray is None else config_from(args, RayOptions, {"address": "ray"})
    r = build(cfg, ray=ray)  # Ray missing or unreachable, a shard failing every attempt: a UserError (one line)
    print(r.summary())
    if args.eval_contexts > 0:  # SAE quality through the splice path, stored in sae_evals (docs/attribution.md)
        from featuredict.pipelines.attribution.quality import store_build_eval

        ev = store_build_eval(
            r.db, r.sae_id, cfg.corpus, n_contexts=args.eval_contexts, device=args.device, rt=r.runtime
        )
        if ev is not None:
            print(
                f"quality: ΔLM loss {ev.delta_lm_loss:+.4f} nats, loss recovered {ev.loss_recovered or 0:.1%}, "
                f"KL {ev.kl:.4f}, FVE {ev.fve:.3f}, L0 {ev.l0:.1f} ({ev.tokens:,} tokens)"
            )
    r.release()  # the model is not needed for the words
    if args.no_words:
        from featuredict.pipelines.words import words_command

        print(f"no explanations or meaning index (--no-words); add them with: {words_command(r.db, r.sae_id)}")
    else:
        _add_words(r.db, r.sae_id)
    print(f"open it: featuredict serve --db {r.db}")
    return 0


def _add_words(db: str | Path, sae_id: str) -> None:
    """After a build: explanations for every live feature and the meaning index (``pipelines.words``). The
    dictionary is built either way, so a failure here is one line and the command that retries it."""
    from featuredict.pipelines.words import add_words, words_command

    try:
        add_words(db, sae_id, out=sys.stdout)
    except ValueError as e:
        print(f"no explanations or meaning index ({e}); add them later with: {words_command(db, sae_id)}")
