"""``featuredict build``: (causal LM, SAE, corpus) -> a DuckDB feature dictionary (``pipelines/harvest``)."""

from __future__ import annotations

import argparse

from featuredict.pipelines.cli.args import add_corpus_args, add_device_args, add_option, corpus_spec


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from featuredict.pipelines.harvest.build import BuildConfig
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
    from featuredict.pipelines.harvest.build import BuildConfig, build
    from featuredict.pipelines.harvest.sharding import RayOptions
    from featuredict.pipelines.harvest.state import HarvestConfig
    from featuredict.pipelines.model.saes import SaeSource

    source = SaeSource(kind="registry", release=args.sae_release, sae_id=args.sae_id) if args.sae_release else None
    if source is None:
        if not args.sae:
            raise ValueError("give --sae FOLDER_OR_RELEASE:ID, or --sae-release with --sae-id")
        source = SaeSource.parse(args.sae)
    cfg = BuildConfig(
        model=args.model,
        sae=source,
        corpus=corpus_spec(args),
        db=args.db,
        sae_name=args.name,
        hook=args.hook,
        context_size=args.context_size,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        harvest=HarvestConfig(top_k=args.top_k, samples_per_band=args.interval_samples),
        umap=not args.no_umap,
        device=args.device,
        dtype=args.dtype,
        outlier_norm_ratio=args.outlier_norm_ratio,
    )
    ray = None
    if args.ray is not None:
        ray = RayOptions(
            address=args.ray,
            shards=args.shards,
            gpus_per_shard=args.gpus_per_shard,
            cpus_per_shard=args.cpus_per_shard,
            max_retries=args.max_retries,
        )
    r = build(cfg, ray=ray)  # Ray missing or unreachable, a shard failing every attempt: a UserError (one line)
    print(r.summary())
    print(f"open it: featuredict serve --db {r.db}")
    return 0
