"""``featuredict serve``: start the Streamlit dashboard on a database (``dashboard/serve.py`` execs streamlit)."""

from __future__ import annotations

import argparse
import os

from featuredict.dashboard.serve import run


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand (``--db``, ``--port``, ``--headless``, ``--read-only``) with ``func=run``."""
    p = subparsers.add_parser(
        "serve",
        help="open the feature-dictionary dashboard in a browser",
        description="Serve the featuredict dashboard (Streamlit) on a database.",
    )
    p.add_argument(
        "--db",
        default=os.environ.get("FEATUREDICT_DB", "featuredict.duckdb"),
        help="DuckDB file written by `featuredict build` (default: $FEATUREDICT_DB or featuredict.duckdb)",
    )
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    p.add_argument("--address", default=None, help="address to bind (Streamlit's default when omitted)")
    p.add_argument("--headless", action="store_true", help="do not open a browser window")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="serve without any writes: the file is opened read-only, edit widgets are disabled and every write "
        "(labels, reviews, lists, presets, embeddings) is refused",
    )
    p.set_defaults(func=run)
    return p
