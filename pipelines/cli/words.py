"""``featuredict words``: offline explanations for every live feature and the meaning index (``pipelines/words.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featuredict.pipelines.cli.args import add_db_args
from featuredict.pipelines.words import add_words


def register(subparsers: Any) -> Any:
    """Add the ``words`` subcommand."""
    w = subparsers.add_parser(
        "words",
        help="explain every live feature offline and build the meaning index (what build and demo do at the end)",
    )
    add_db_args(w)
    w.add_argument("--no-embed", action="store_true", help="write the explanations only, no meaning index")
    w.add_argument("--threads", type=int, default=None, help="torch CPU threads for the embedding")
    w.set_defaults(func=cmd_words)
    return w


def cmd_words(args: Any) -> int:
    import sys

    if not Path(args.db).exists():
        raise ValueError(f"{args.db} does not exist")
    add_words(args.db, args.sae, embed=not args.no_embed, threads=args.threads, out=sys.stdout)
    return 0
