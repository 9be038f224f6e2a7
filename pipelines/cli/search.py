"""``featuredict search``: the dashboard's search page from the command line.

    featuredict search --db DB [--sae SAE_ID] --mode text|meaning|prompt|concept QUERY... [--json] [--top N]
        text, meaning: [--min-log10-density X] [--max-log10-density X] [--min-max-act X]
                       [--labelled | --unlabelled] [--tag TAG] [--include-dead]
        meaning:       [--model ID] [--no-refresh]
        prompt:        [--rank-by max|relative|total] [--device D]
        concept:       [--example TEXT]... [--examples-file F] [--counter TEXT]... [--counter-file F] [--device D]

Each mode runs the same code as the page: ``db.queries.search`` (text), ``pipelines.search.meaning.meaning_search``
(meaning), ``pipelines.search.prompt`` (prompt) and ``pipelines.search.concept.rank_concept`` (concept). In concept mode
every QUERY word given separately (quote whole texts) is one example text; files hold texts separated by blank
lines, or one per line. ``--json`` prints one object: {sae, mode, query, ..., results: [...]}. Bad input prints
one ``error:`` line and exits with 2 (``pipelines.cli``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from featuredict.pipelines.cli.args import add_db_args

MODES = ("text", "meaning", "prompt", "concept")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand."""
    p = subparsers.add_parser(
        "search",
        help="search features by text, meaning, prompt or concept (as the dashboard's search page)",
        description="Search one SAE's features as the dashboard's search page does, and print the results.",
    )
    p.add_argument("query", nargs="*", metavar="QUERY", help="the query (concept mode: each argument is one example)")
    add_db_args(p)
    p.add_argument("--mode", choices=MODES, default="text", help="search mode (default: text)")
    p.add_argument("--top", type=int, default=20, help="results to print (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    f = p.add_argument_group("filters (text and meaning modes)")
    f.add_argument("--min-log10-density", type=float, default=None)
    f.add_argument("--max-log10-density", type=float, default=None)
    f.add_argument("--min-max-act", type=float, default=None, help="minimum max activation")
    lab = f.add_mutually_exclusive_group()
    lab.add_argument("--labelled", action="store_const", const="labelled", dest="labelled", default="any")
    lab.add_argument("--unlabelled", action="store_const", const="unlabelled", dest="labelled")
    f.add_argument("--tag", default=None, help="only features with this tag")
    f.add_argument("--include-dead", action="store_true", help="include dead features")
    m = p.add_argument_group("meaning mode")
    m.add_argument("--model", default=None, help="embedding model (default: the one the SAE was embedded with)")
    m.add_argument("--no-refresh", action="store_true", help="do not re-embed features whose words changed first")
    r = p.add_argument_group("prompt and concept modes")
    r.add_argument("--rank-by", choices=("max", "relative", "total"), default="max", help="prompt mode ranking")
    r.add_argument("--example", action="append", default=[], metavar="TEXT", help="concept example (repeatable)")
    r.add_argument("--examples-file", default=None, help="concept examples, blank-line or line separated")
    r.add_argument("--counter", action="append", default=[], metavar="TEXT", help="counter-example (repeatable)")
    r.add_argument("--counter-file", default=None, help="counter-examples, blank-line or line separated")
    r.add_argument("--device", default=None, help="cpu / cuda for the model run (default: cuda when present)")
    p.set_defaults(func=run_search)


# ----------------------------------------------------------------------------------------------- search


def pick_sae(store: Any, wanted: str | None) -> str:
    """``wanted`` when the database has it; the only SAE when none is given; else ``UnknownSae`` (one line)."""
    from featuredict.db import queries as q

    return q.resolve_sae(store, wanted)


def read_texts(path: str | None) -> list[str]:
    """Texts of a file: separated by blank lines, or one per line (``concept.split_texts``)."""
    from featuredict.pipelines.search.concept import split_texts

    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no file {p}")
    return split_texts(p.read_text(encoding="utf-8"))


def run_search(args: argparse.Namespace) -> int:
    from featuredict.db.store import Store

    if args.top < 1:
        raise ValueError("--top must be at least 1")
    query = " ".join(args.query).strip()
    if args.mode in ("meaning", "prompt") and not query:
        raise ValueError(f"give the {args.mode} query: featuredict search --mode {args.mode} WORDS...")
    write = args.mode == "meaning" and not args.no_refresh  # refreshing stale vectors writes
    store = Store(args.db, read_only=not write)
    try:
        sae_id = pick_sae(store, args.sae)
        out = {"text": _text, "meaning": _meaning, "prompt": _prompt, "concept": _concept}[args.mode](
            store, sae_id, query, args
        )
    finally:
        store.close()
    out = {"sae": sae_id, "mode": args.mode, **out}
    if args.json:
        print(json.dumps(_jsonable(out), ensure_ascii=False))
    else:
        print_table(out, sys.stdout)
    return 0


def _filters(args: argparse.Namespace) -> Any:
    from featuredict.db.queries import SearchFilters

    return SearchFilters(
        min_log10_density=args.min_log10_density,
        max_log10_density=args.max_log10_density,
        min_max_act=args.min_max_act,
        labelled=args.labelled,
        tag=args.tag,
        include_dead=args.include_dead,
    )


def _text(store: Any, sae_id: str, query: str, args: argparse.Namespace) -> dict[str, Any]:
    from featuredict.db import queries as q
    from featuredict.pipelines.search.meaning import attach_explanations

    res = q.search(store, sae_id, query, _filters(args), limit=args.top)
    res = attach_explanations(store, sae_id, res)
    cols = [
        "feature",
        "score",
        "explanation",
        "label",
        "tags",
        "matched",
        "snippet",
        "top_tokens",
        "density",
        "max_act",
    ]
    return {"query": query, "results": res[cols]}


def _meaning(store: Any, sae_id: str, query: str, args: argparse.Namespace) -> dict[str, Any]:
    from featuredict.pipelines.search.meaning import RESULT_COLUMNS, default_model, meaning_search

    model = args.model or default_model(store, sae_id)
    res = meaning_search(
        store, sae_id, query, _filters(args), limit=args.top, model_id=model, refresh=not args.no_refresh
    )
    cols = [c for c in RESULT_COLUMNS if c != "text"]  # "matched" holds the words; the whole text is long
    return {"query": query, "model": model, "results": res[cols]}


def _runtime(store: Any, sae_id: str, device: str | None) -> Any:
    from featuredict.db import queries as q
    from featuredict.pipelines.model.runtime import runtime_from_row

    rec = q.sae_record(store, sae_id)
    if rec is None:
        raise q.UnknownSae(f"no SAE {sae_id!r} in {store.path}")
    return runtime_from_row(rec, device=device)


def _labels(store: Any, sae_id: str, df: pd.DataFrame) -> pd.DataFrame:
    from featuredict.db import queries as q
    from featuredict.pipelines.search.meaning import attach_explanations

    info = q.features_by_ids(store, sae_id, df["feature"].tolist())[["feature", "label", "top_tokens", "density"]]
    return attach_explanations(store, sae_id, df.merge(info, on="feature", how="left"))


def _prompt(store: Any, sae_id: str, query: str, args: argparse.Namespace) -> dict[str, Any]:
    from featuredict.db import queries as q
    from featuredict.pipelines.search.by_prompt import run_prompt, whole_text_features

    rt = _runtime(store, sae_id, args.device)
    res = run_prompt(rt, query)
    base = q.feature_baselines(store, sae_id, res.d_sae)
    whole = whole_text_features(res, base.max_act, rank_by=args.rank_by, top=args.top)
    whole["top_token"] = [res.tokens[int(p)] for p in whole["argmax_pos"]]
    whole = _labels(store, sae_id, whole)
    cols = ["feature", "max_here", "relative", "total", "n_tokens", "top_token", "explanation", "label", "top_tokens"]
    return {
        "query": query,
        "tokens": res.tokens,
        "truncated": res.truncated,
        "rank_by": args.rank_by,
        "results": whole[cols],
    }


def _concept(store: Any, sae_id: str, query: str, args: argparse.Namespace) -> dict[str, Any]:
    from featuredict.pipelines.search.concept import rank_concept

    examples = [t.strip() for t in [*args.query, *args.example] if t.strip()] + read_texts(args.examples_file)
    counter = [t.strip() for t in args.counter if t.strip()] + read_texts(args.counter_file)
    if not examples:
        raise ValueError("give at least one example text (QUERY arguments, --example or --examples-file)")
    rt = _runtime(store, sae_id, args.device)
    ranked = rank_concept(rt, store, sae_id, examples, counter, top=args.top)
    ranked = _labels(store, sae_id, ranked)
    cols = ["feature", "score", "contrast", "meaning", "peak_pos", "base", "peak_neg", "coverage", "explanation"]
    cols += ["label", "top_tokens", "density"]
    return {"examples": examples, "counter_examples": counter, "results": ranked[cols]}


# ----------------------------------------------------------------------------------------------- output


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(v: Any, width: int | None = None) -> str:
    """A value as one line of terminal-safe text: control characters (terminal escape sequences included)
    shown as ``\\xNN``, newlines and tabs as spaces, lists joined by ', ', floats short; cut to ``width``."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        s = ""
    elif isinstance(v, list | tuple | np.ndarray):
        s = ", ".join(plain(x) for x in v)
    elif isinstance(v, bool | np.bool_):
        s = "yes" if v else ""
    elif isinstance(v, float | np.floating):
        s = f"{float(v):.3g}" if abs(float(v)) < 1e-2 and v != 0 else f"{float(v):.3f}"
    else:
        s = str(v)
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s.replace("\n", " ").replace("\t", " "))
    if width is not None and len(s) > width:
        s = s[: max(width - 1, 0)] + "…"
    return s


def print_table(out: dict[str, Any], stream: TextIO) -> None:
    """The results as an aligned text table, headed by what was searched."""
    res: pd.DataFrame = out["results"]
    head = f"{out['mode']} search of {out['sae']}"
    if out.get("query"):
        head += f" for {plain(out['query'], 80)!r}"
    if out.get("model"):
        head += f" ({out['model']})"
    if "examples" in out:
        head += f": {len(out['examples'])} examples, {len(out['counter_examples'])} counter-examples"
    stream.write(head + f": {len(res)} results\n")
    if res.empty:
        return
    widths = {"explanation": 40, "label": 24, "matched": 40, "snippet": 40, "top_tokens": 30, "tags": 20}
    cols = [c for c in res.columns if c != "stale"]
    cells = [[plain(r[c], widths.get(c, 12)) for c in cols] for _, r in res.iterrows()]
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    stream.write("  ".join(c.ljust(w[i]) for i, c in enumerate(cols)).rstrip() + "\n")
    for row in cells:
        stream.write("  ".join(x.ljust(w[i]) for i, x in enumerate(row)).rstrip() + "\n")


def _jsonable(v: Any) -> Any:
    """JSON-safe: DataFrames as lists of records, numpy scalars/arrays as Python, NaN as null."""
    if isinstance(v, pd.DataFrame):
        return [_jsonable(r) for r in v.to_dict(orient="records")]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if v is pd.NA or v is pd.NaT or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)
