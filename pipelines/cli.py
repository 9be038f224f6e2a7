"""The ``featuredict`` command line: build, browse, explain, search, review and steer SAE feature dictionaries.

Commands: train-sae, build, demo, serve, steer, sweep, explain, embed, search, neuronpedia, watch, scan, attribute,
words.

Every expected failure (bad path, bad option, model/SAE/corpus that cannot be loaded, unusable database)
prints one ``error:`` line and exits with status 2; no traceback. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from . import __version__

EXPECTED_ERRORS: tuple[type[BaseException], ...] = ()


def _expected() -> tuple[type[BaseException], ...]:
    from featuredict.db.schema import DatabaseError

    from .corpus import CorpusError
    from .models import ModelLoadError
    from .saes import SaeLoadError

    return (DatabaseError, CorpusError, ModelLoadError, SaeLoadError, ValueError, FileNotFoundError, PermissionError)


def _corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--corpus",
        required=required,
        help="a .txt / .jsonl / .parquet file, or a Hugging Face dataset name (streamed; needs network)",
    )
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF rows (default: text)")
    p.add_argument(
        "--separator",
        default="<|endoftext|>",
        help="document separator for .txt: a string, 'blank' (blank lines) or 'line' (default: <|endoftext|>)",
    )
    p.add_argument("--split", default="train", help="HF dataset split (default: train)")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.add_argument(
        "--dtype",
        default=None,
        help="model dtype: float32 / bfloat16 / float16 (default: float32 on CPU; on CUDA bfloat16 where the GPU "
        "supports it, else float16)",
    )


def _corpus(args: argparse.Namespace):
    from .corpus import CorpusSpec

    return CorpusSpec(args.corpus, text_field=args.text_field, separator=args.separator, split=args.split)


def cmd_train(args: argparse.Namespace) -> int:
    from .train_sae import TrainConfig, train_sae

    cfg = TrainConfig(
        model=args.model,
        corpus=_corpus(args),
        out=args.out,
        hook=args.hook,
        d_sae=args.d_sae,
        k=args.k,
        training_tokens=args.tokens,
        context_size=args.context_size,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        lr_decay=args.lr_decay,
        activations=args.activations,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
    )
    r = train_sae(cfg)
    print(
        f"trained TopK SAE (d_sae={cfg.d_sae}, k={cfg.k}) at {cfg.hook} of {cfg.model} on {cfg.training_tokens:,} "
        f"tokens in {r.seconds:.0f}s ({r.tokens_per_s:,.0f} tok/s, model in {r.dtype}, activations {r.mode})"
    )
    print(f"FVE={r.fve:.3f}  L0={r.l0:.1f}  dead={r.dead_fraction:.1%}  -> {r.out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build
    from .distributed import DistributedError, RayOptions
    from .harvest import HarvestConfig
    from .saes import SaeSource

    source = SaeSource(kind="registry", release=args.sae_release, sae_id=args.sae_id) if args.sae_release else None
    if source is None:
        if not args.sae:
            raise ValueError("give --sae FOLDER_OR_RELEASE:ID, or --sae-release with --sae-id")
        source = SaeSource.parse(args.sae)
    cfg = BuildConfig(
        model=args.model,
        sae=source,
        corpus=_corpus(args),
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
    try:
        r = build(cfg, ray=ray)
    except DistributedError as e:  # Ray missing, unreachable, or a shard that failed on every attempt
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(r.summary())
    if args.eval_contexts > 0:  # SAE quality through the splice path, stored in sae_evals (docs/attribution.md)
        from .attribution.quality import store_build_eval

        ev = store_build_eval(r.db, r.sae_id, cfg.corpus, n_contexts=args.eval_contexts, device=args.device)
        if ev is not None:
            print(
                f"quality: ΔLM loss {ev.delta_lm_loss:+.4f} nats, loss recovered {ev.loss_recovered or 0:.1%}, "
                f"KL {ev.kl:.4f}, FVE {ev.fve:.3f}, L0 {ev.l0:.1f} ({ev.tokens:,} tokens)"
            )
    if args.no_words:
        from .words import words_command

        print(f"no explanations or meaning index (--no-words); add them with: {words_command(r.db, r.sae_id)}")
    else:
        _add_words(r.db, r.sae_id)
    print(f"open it: featuredict serve --db {r.db}")
    return 0


def _add_words(db: str, sae_id: str) -> None:
    """After a build: explanations for every live feature and the meaning index (``pipelines.words``). The
    dictionary is built either way, so a failure here is one line and the command that retries it."""
    from .words import add_words, words_command

    try:
        add_words(db, sae_id, out=sys.stdout)
    except ValueError as e:
        print(f"no explanations or meaning index ({e}); add them later with: {words_command(db, sae_id)}")


def build_parser() -> argparse.ArgumentParser:
    from .train_sae import CACHED_DEFAULTS, STREAMED_DEFAULTS  # torch is imported here anyway (the demo's parser)

    p = argparse.ArgumentParser(prog="featuredict", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"featuredict {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-sae", help="train a TopK SAE with sae-lens on a local model + corpus")
    t.add_argument("--model", required=True, help="preset (smollm2-135m), local HF folder or HF id")
    _corpus_args(t)
    t.add_argument("--out", required=True, help="output folder (sae-lens format)")
    t.add_argument(
        "--hook", default="model.layers.15", help="HF module name whose output is read (default: model.layers.15)"
    )
    t.add_argument("--d-sae", type=int, default=4608)
    t.add_argument("--k", type=int, default=32, help="TopK k (default 32)")
    t.add_argument("--tokens", type=int, default=100_000, help="training tokens (default 100k)")
    t.add_argument("--context-size", type=int, default=128)
    t.add_argument(
        "--activations",
        choices=["auto", "stream", "cache"],
        default="auto",
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
    t.add_argument("--seed", type=int, default=42)
    _device_args(t)
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("build", help="harvest feature statistics into a DuckDB feature dictionary")
    b.add_argument(
        "--model", required=True, help="preset (smollm2-135m), local HF folder, HF id, or TransformerLens name (gpt2)"
    )
    b.add_argument("--sae", help="a local sae-lens folder or RELEASE:SAE_ID from the sae-lens registry")
    b.add_argument("--sae-release", help="sae-lens registry release (e.g. gpt2-small-res-jb)")
    b.add_argument("--sae-id", help="SAE id within the release (e.g. blocks.8.hook_resid_pre)")
    _corpus_args(b)
    b.add_argument("--db", default="featuredict.duckdb", help="database file (default: featuredict.duckdb)")
    b.add_argument("--name", default=None, help="SAE name in the database (default: MODEL/HOOK/D_SAE)")
    b.add_argument("--hook", default=None, help="override the SAE's hook name (normally read from the SAE)")
    b.add_argument("--context-size", type=int, default=64, help="tokens per context incl. BOS (default 64)")
    b.add_argument("--max-tokens", type=int, default=200_000, help="token budget (default 200k)")
    b.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default 16)")
    b.add_argument("--top-k", type=int, default=20, help="top activating contexts kept per feature (default 20)")
    b.add_argument("--interval-samples", type=int, default=5, help="samples per activation band (default 5)")
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
    b.add_argument(
        "--outlier-norm-ratio",
        type=float,
        default=10.0,
        help="exclude positions whose activation norm is > this x their context's median, like BOS "
        "(attention-sink 'massive activations'); 0 disables (default 10)",
    )
    _device_args(b)
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
    b.set_defaults(func=cmd_build)

    from featuredict.dashboard.serve import register as register_serve

    from .attribute_cli import register as register_attribute
    from .demo import register as register_demo
    from .explain.cli import register as register_explain
    from .interop_cli import register as register_interop
    from .scan_cli import register as register_scan
    from .search_cli import register as register_search
    from .steer_cli import register as register_steer
    from .words import register as register_words

    register_demo(sub)
    register_serve(sub)
    register_steer(sub)
    register_explain(sub)
    register_search(sub)
    register_interop(sub)
    register_scan(sub)
    register_attribute(sub)
    register_words(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; the database was left as it was", file=sys.stderr)
        return 130
    except _expected() as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
