"""``featuredict serve``: start the Streamlit dashboard on a database.

``featuredict serve`` (``pipelines/cli/serve.py``) calls ``run(args)``, which replaces the process with
``python -m streamlit run dashboard/app.py [server flags] -- --db PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


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
