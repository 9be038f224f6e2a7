"""``featuredict explain``: words for every feature, generated and scored (``pipelines/explain``).

    featuredict explain --db DB [--sae SAE_ID] (--features 0-499,1000 | --all) --explainer tokens
    featuredict explain --db DB --all --explainer openai:http://localhost:8000/v1 --model NAME --concurrency 8 --score
    featuredict explain --db DB --features 0-99 --explainer hf:smollm2-135m --score
    featuredict explain --db DB --all --score --scorer keyword          # score what is there

Bad input prints one line to stderr and exits with code 2, without a traceback; so does a run that stopped
early (bad API key, wrong URL or model, too many failures in a row), after its summary.
"""

from __future__ import annotations

import argparse
import sys

from featuredict.pipelines.cli.args import add_db_args

EXIT_BAD_INPUT = 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand to ``subparsers`` (an ``argparse`` sub-parsers action)."""
    p = subparsers.add_parser(
        "explain",
        help="write (and score) a short explanation of each SAE feature",
        description=(
            "Explain SAE features from their stored contexts: 'tokens' summarises max tokens, their neighbours and "
            "promoted tokens (no LLM, seconds for 65k features); 'openai:URL' asks any OpenAI-compatible chat "
            "endpoint (key from $FEATUREDICT_API_KEY or $OPENAI_API_KEY); 'hf:MODEL' runs a Hugging Face "
            "instruct model here. Resumable: features that already have this explainer's explanation for the "
            "current SAE weights are skipped unless --force. --score scores new and existing explanations "
            "(detection and fuzzing, balanced accuracy on held-out contexts)."
        ),
    )
    add_db_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", default=None, metavar="RANGES", help="feature ids and ranges: 0-499,1000")
    which.add_argument("--all", action="store_true", help="every feature of the SAE (dead ones are skipped)")
    p.add_argument(
        "--explainer",
        default=None,
        metavar="METHOD",
        help="tokens | phrases (offline keyphrases) | openai:URL (with --model) | hf:MODEL (smollm2-135m, a folder or a hub id); "
        "omit it to only --score existing explanations",
    )
    p.add_argument("--model", default=None, help="model name the openai: endpoint serves")
    p.add_argument("--force", action="store_true", help="explain (and score) again features already done")
    p.add_argument("--score", action="store_true", help="score new and existing explanations (detection, fuzzing)")
    p.add_argument(
        "--scorer",
        default=None,
        metavar="METHOD",
        help="keyword (deterministic, lexical) | embedding (MiniLM AUROC) | openai:URL | hf:MODEL (default: the explainer's LLM)",
    )
    p.add_argument("--scorer-model", default=None, help="model name for --scorer openai:URL (default: --model)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel LLM calls for openai: (default 4)")
    p.add_argument(
        "--retries", type=int, default=4, help="retries per call on 429/5xx/timeouts/bad answers (default 4)"
    )
    p.add_argument(
        "--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each time (default 1)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="answer length for explanations (default 80)")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="env var holding the API key (default: FEATUREDICT_API_KEY, else OPENAI_API_KEY)",
    )
    p.add_argument("--top-examples", type=int, default=10, help="top contexts shown to the explainer (default 10)")
    p.add_argument("--interval-examples", type=int, default=5, help="interval samples shown (default 5)")
    p.add_argument(
        "--score-examples",
        type=int,
        default=10,
        help="held-out activating contexts per score, and as many non-activating (default 10)",
    )
    p.add_argument("--score-batch", type=int, default=10, help="contexts per scoring call (default 10)")
    p.add_argument(
        "--max-failures-in-a-row", type=int, default=25, help="stop after this many features fail in a row (0: never)"
    )
    p.add_argument("--author", default=None, help="stored as the explanations' author")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and shuffles (default 0)")
    p.add_argument("--device", default=None, help="device for hf: models (default: cuda when present, else cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for hf: models (default: torch's; 1 is faster on a CPU other busy processes share)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``featuredict explain``; 0 on success, 2 on bad input or a run that stopped early."""
    from featuredict.db.schema import DatabaseError
    from featuredict.pipelines.cli.args import config_from
    from featuredict.pipelines.explain.clients import ChatSettings
    from featuredict.pipelines.explain.run import ExplainConfig, run_explain
    from featuredict.pipelines.model.loading import ModelLoadError

    try:
        chat = config_from(args, ChatSettings, {"backoff_s": "backoff", "timeout_s": "timeout"})
        cfg = config_from(
            args,
            ExplainConfig,
            {"sae_id": "sae", "all_features": "all"},
            chat=chat,
            progress=not args.no_progress,
        )
        summary = run_explain(cfg)
    except KeyboardInterrupt:
        print(
            "featuredict explain: interrupted; explanations written so far are kept (run it again to resume)",
            file=sys.stderr,
        )
        return 130
    except (ValueError, DatabaseError, ModelLoadError, FileNotFoundError, PermissionError) as e:
        print(f"featuredict explain: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if summary.stopped:
        print(f"featuredict explain: stopped early: {summary.stopped}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
