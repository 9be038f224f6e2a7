"""``featuredict scan``: scan a file of texts for the watched features of a list (``featuredict watch`` sets them).

``register(subparsers)`` adds the command (``pipelines/cli/__init__.py``). Exit codes: 0 no hit reached ``--fail-on``
(or no ``--fail-on``), 1 some record reached it, 2 bad usage (no database, unknown SAE, empty watchlist,
unreadable input). Bad records are reported on stderr with their line number and skipped.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import IO

from tqdm import tqdm

from featuredict.db import queries as q
from featuredict.db.errors import one_line
from featuredict.db.schema import DatabaseError
from featuredict.db.store import Store
from featuredict.pipelines.cli.args import add_watchlist_args
from featuredict.pipelines.scan import SEVERITY_ORDER, BadRecord, ScanResult, Watch, reaches, read_records, scan_text


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``scan`` subcommand."""
    p = subparsers.add_parser(
        "scan",
        help="scan texts for the watched features of a watchlist",
        description="Scan a .txt / .jsonl / .parquet file for features of a watchlist over their thresholds.",
    )
    add_watchlist_args(p, read_write=False)
    p.add_argument("--input", required=True, help=".txt (one record per line), .jsonl or .parquet")
    p.add_argument("--text-field", default="text", help="text field / column (default: text; else 'messages')")
    p.add_argument("--out", default=None, help="report file: .jsonl (one line per record) or .html")
    p.add_argument("--fail-on", choices=SEVERITY_ORDER, default=None, help="exit 1 when a hit reaches this severity")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens scanned per record (default 1024)")
    p.set_defaults(func=run)
    return p


def _err(msg: str) -> int:
    print(f"featuredict scan: {msg}", file=sys.stderr)
    return 2


def _html_head(sae: str, watchlist: str) -> str:
    title = html.escape(f"featuredict scan: {watchlist} on {sae}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "mark{background:#fbb}</style></head><body>"
        f"<h1>{title}</h1><table><tr><th>line</th><th>severity</th><th>score</th><th>hits</th></tr>"
    )


def _html_row(r: ScanResult) -> str:
    hits = "<br>".join(
        html.escape(
            f"#{h['feature']} {h['severity']} max {h['max_act']:.3f} mean {h['mean_act']:.4f}: "
            + " | ".join(s["text"] for s in h["spans"])
        )
        for h in r.hits
    )
    return f"<tr><td>{r.line}</td><td>{html.escape(r.severity or '')}</td><td>{r.score:.3f}</td><td>{hits}</td></tr>"


def run(args: argparse.Namespace) -> int:
    if not Path(args.input).exists():
        return _err(f"no input file at {args.input}")
    try:
        store = Store(args.db, read_only=True)
    except DatabaseError as e:
        return _err(str(e))
    try:
        try:
            rec = q.sae_record(store, q.resolve_sae(store, args.sae, args.db))
        except q.UnknownSae as e:
            return _err(str(e))
        wl = q.watchlist(store, args.watchlist, args.sae)
        if wl.empty:
            return _err(f"list {args.watchlist!r} has no features of SAE {args.sae!r}")
        watch = Watch.from_frame(wl)
    finally:
        store.close()
    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.suffix.lower() not in (".jsonl", ".html"):
        return _err("--out must end in .jsonl or .html")
    if args.max_tokens < 1:
        return _err("--max-tokens must be at least 1")
    from featuredict.pipelines.model.runtime import cached_runtime_from_row

    try:
        assert rec is not None  # resolve_sae found it
        runtime = cached_runtime_from_row(rec)
    except Exception as e:  # noqa: BLE001 - any load failure: one line, not a traceback
        return _err(f"cannot load the model and SAE of {args.sae!r}: {one_line(e)}")
    fh: IO[str] = out_path.open("w", encoding="utf-8") if out_path else sys.stdout
    is_html = out_path is not None and out_path.suffix.lower() == ".html"
    n = n_bad = n_hit = 0
    failed = False
    try:
        if is_html:
            fh.write(_html_head(args.sae, args.watchlist))
        records = read_records(args.input, args.text_field, runtime.tokenizer)
        for rec in tqdm(records, desc="scanning", unit="record", disable=not sys.stderr.isatty()):
            if isinstance(rec, BadRecord):
                n_bad += 1
                print(f"featuredict scan: {args.input} line {rec.line}: {rec.reason}; skipped", file=sys.stderr)
                continue
            n += 1
            res = scan_text(runtime, rec.text, watch, line=rec.line, max_len=args.max_tokens)
            n_hit += bool(res.hits)
            failed |= reaches(res.severity, args.fail_on)
            if is_html:
                if res.hits:
                    fh.write(_html_row(res))
            else:
                fh.write(json.dumps(res.to_json(), ensure_ascii=False) + "\n")
        if is_html:
            fh.write("</table></body></html>\n")
    except (ValueError, OSError) as e:
        return _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        if out_path is not None:
            fh.close()
    print(
        f"featuredict scan: {n} records scanned, {n_hit} with hits, {n_bad} bad records skipped"
        + (f"; a hit reached --fail-on {args.fail_on}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0
