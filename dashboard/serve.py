"""``featuredict serve``: start the Streamlit dashboard on a database.

The ``featuredict`` CLI (``pipelines/cli/__init__.py``) calls ``register(subparsers)``; ``run(args)`` replaces the process with
``python -m streamlit run dashboard/app.py [server flags] -- --db PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


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


def streamlit_argv(args: argparse.Namespace) -> list[str]:
    """The full command line ``run`` executes."""
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(int(args.port)),
        "--server.headless",
        "true" if getattr(args, "headless", False) else "false",
        "--client.showErrorDetails",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--browser.gatherUsageStats",
        "false",
    ]
    if getattr(args, "address", None):
        argv += ["--server.address", str(args.address)]
    app_args = ["--db", str(Path(args.db).expanduser().resolve())]
    if getattr(args, "read_only", False):
        app_args.append("--read-only")
    return [*argv, "--", *app_args]


def run(args: argparse.Namespace) -> int:
    """Check the database path, then exec streamlit (does not return on success)."""
    db = Path(args.db).expanduser()
    if not db.exists():
        print(
            f"featuredict serve: no database at {db}. Build one with `featuredict build` or `featuredict demo`.",
            file=sys.stderr,
        )
        return 2
    argv = streamlit_argv(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # unreachable


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m dashboard.serve serve --db PATH``."""
    ap = argparse.ArgumentParser(prog="featuredict")
    register(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
