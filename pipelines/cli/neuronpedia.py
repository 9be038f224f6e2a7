"""``featuredict neuronpedia``: import Neuronpedia explanation exports, export a dictionary for Neuronpedia.

    featuredict neuronpedia import --db DB --sae SAE_ID --source MODEL/LAYER PATH... [--author NAME]
    featuredict neuronpedia export --db DB --sae SAE_ID --source MODEL/LAYER --out DIR
        [--batch-size 1024] [--no-labels] [--creator-id ID] [--force]

``--source`` names the Neuronpedia model id and source id (``layer``), e.g. ``gpt2-small/6-res-jb``: on import
only rows of that source are imported into ``--sae`` (the rest are counted and listed); on export the files
carry those ids. PATH is a batch file (``batch-N.jsonl.gz``), a folder of them, or a source folder with an
``explanations/`` subfolder. See docs/neuronpedia.md.
"""

from __future__ import annotations

import argparse

from featuredict.pipelines.cli.args import add_db_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``neuronpedia`` subcommand (with ``import`` and ``export``)."""
    p = subparsers.add_parser(
        "neuronpedia",
        help="import Neuronpedia explanations, or export a dictionary as Neuronpedia batch files",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    sub = p.add_subparsers(dest="np_command", required=True)

    i = sub.add_parser("import", help="import explanations/batch-N.jsonl.gz files into the explanations table")
    i.add_argument("paths", nargs="+", metavar="PATH", help="batch files, folders of them, or a source folder")
    add_db_args(i, "required")
    i.add_argument("--source", required=True, metavar="MODEL/LAYER", help="Neuronpedia model id / source id")
    i.add_argument("--author", default=None, help="author recorded on the imported rows")
    i.set_defaults(func=run_import)

    e = sub.add_parser("export", help="write features, activations and explanations as Neuronpedia batch files")
    add_db_args(e, "required")
    e.add_argument("--source", required=True, metavar="MODEL/LAYER", help="Neuronpedia model id / source id to use")
    e.add_argument("--out", required=True, help="output folder (files go to OUT/MODEL/LAYER/...)")
    e.add_argument("--batch-size", type=int, default=1024, help="features per batch file (default 1024)")
    e.add_argument("--no-labels", action="store_true", help="do not export labels as explanations")
    e.add_argument("--creator-id", default=None, help="Neuronpedia user id for creatorId / authorId")
    e.add_argument("--force", action="store_true", help="replace batch files already in the output folder")
    e.set_defaults(func=run_export)


def run_import(args: argparse.Namespace) -> int:
    from featuredict.db.store import Store
    from featuredict.pipelines.neuronpedia import import_neuronpedia

    store = Store(args.db)
    try:
        rep = import_neuronpedia(store, args.sae, args.source, args.paths, author=args.author)
    finally:
        store.close()
    print(rep.summary())
    return 0


def run_export(args: argparse.Namespace) -> int:
    from featuredict.db.store import Store
    from featuredict.pipelines.neuronpedia import export_neuronpedia

    store = Store(args.db, read_only=True)
    try:
        rep = export_neuronpedia(
            store,
            args.sae,
            args.source,
            args.out,
            batch_size=args.batch_size,
            include_labels=not args.no_labels,
            creator_id=args.creator_id,
            force=args.force,
        )
    finally:
        store.close()
    print(rep.summary())
    return 0
