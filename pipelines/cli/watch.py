"""``featuredict watch``: make features watched members of a list, with a scan threshold and a severity.

``featuredict scan`` then scans texts for them. ``register(subparsers)`` adds the command
(``pipelines/cli/__init__.py``). Exit codes: 0 done, 2 bad usage (no database, unknown SAE, bad feature ids).
"""

from __future__ import annotations

import argparse
import sys

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.schema import DatabaseError
from featuredict.db.store import Store
from featuredict.pipelines.cli.args import add_watchlist_args
from featuredict.pipelines.scan import SEVERITY_ORDER


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``watch`` subcommand."""
    w = subparsers.add_parser(
        "watch",
        help="make features watched members of a list (threshold, severity)",
        description="Set the scan threshold and severity of features in a list (adds them to it when missing).",
    )
    add_watchlist_args(w, read_write=True)
    w.add_argument("--features", required=True, help="feature ids, comma-separated")
    w.add_argument("--threshold", type=float, default=0.5, help="fraction of the feature's max activation (0.5)")
    w.add_argument("--severity", choices=SEVERITY_ORDER, default="medium", help="severity of a hit (medium)")
    w.add_argument("--author", default=None, help="who made the change (recorded in the history)")
    w.set_defaults(func=run)


def _err(msg: str) -> int:
    print(f"featuredict watch: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        ids = [int(x) for x in str(args.features).replace(",", " ").split()]
    except ValueError:
        return _err("--features takes integers separated by commas")
    if not ids:
        return _err("--features is empty")
    try:
        store = Store(args.db)
    except DatabaseError as e:
        return _err(str(e))
    try:
        q.resolve_sae(store, args.sae, args.db)
        n = writes.set_watch(store, args.watchlist, args.sae, ids, args.threshold, args.severity, args.author)
    except ValueError as e:
        return _err(str(e))
    finally:
        store.close()
    print(f"watching {n} features in list {args.watchlist!r}: threshold {args.threshold:g} x max, {args.severity}")
    return 0
