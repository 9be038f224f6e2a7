"""The ``featuredict`` command line: build, browse, explain, search, review and steer SAE feature dictionaries.

Commands: train-sae, build, demo, serve, steer, sweep, explain, embed, search, neuronpedia, watch, scan.

One module per command (``COMMANDS``, in ``--help`` order), each with ``register(subparsers)`` that adds its
parser and sets ``func``; ``args`` holds the flags they share. Every expected failure (a ``UserError``: bad
path, model/SAE/corpus that cannot be loaded, unusable database, unknown SAE; or a config's ``ValueError``)
prints one ``error:`` line and exits with status 2; no traceback. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from featuredict.db.errors import UserError, one_line
from featuredict.pipelines import __version__

#: the command modules of this package, in ``--help`` order
COMMANDS = (
    "train_sae",
    "build",
    "demo",
    "serve",
    "steer",
    "explain",
    "embed",
    "search",
    "neuronpedia",
    "watch",
    "scan",
    "attribute",
    "words",
)

#: what ``main`` prints as one line (exit 2) instead of a traceback: errors users meet, and configs' checks
EXPECTED = (UserError, ValueError, FileNotFoundError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featuredict", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"featuredict {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
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
    except EXPECTED as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(e, 2000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
