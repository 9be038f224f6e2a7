"""``featuredict attribute``: which SAE features caused one output token, checked by intervention.

``register(subparsers)`` adds the command (``pipelines/cli/__init__.py``). Bad input (unknown SAE, SAEs of different
models, a target that is not one token, a position past the end, a prompt over the limit, an unreadable chat
file) prints one line and exits 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featuredict.db.errors import one_line
from featuredict.db.schema import DatabaseError
from featuredict.db.store import Store
from featuredict.pipelines.cli.args import add_db_args

PROG = "featuredict attribute"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from featuredict.pipelines.attribution.attribute import MAX_PROMPT_TOKENS, MODES

    p = subparsers.add_parser(
        "attribute",
        help="attribute one output token to SAE features, error nodes and tokens (checked by ablation)",
        description="Why did the model say that: activation x gradient for one output, with every SAE spliced in "
        "and its error kept as a node, checked by ablating the top features. See docs/attribution.md.",
    )
    add_db_args(p, "repeat", "featuredict DuckDB file (read only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text (BOS is prepended when the SAE was trained with it)")
    src.add_argument("--chat", help="a JSON file: a list of {role, content} messages with an assistant turn")
    tg = p.add_mutually_exclusive_group()
    tg.add_argument("--target", help="explain this token's logit (exactly one token; #ID for a token id)")
    tg.add_argument("--contrast", nargs=2, metavar=("TOKEN_A", "TOKEN_B"), help="explain logit(A) - logit(B)")
    p.add_argument(
        "--position",
        type=int,
        default=None,
        help="the position whose next-token prediction is explained (0 = BOS; negative counts from the end; "
        "default: the last, or with --chat the one before the last reply). Without --target/--contrast the "
        "target is log p(the token that follows it), or at the last position of the model's own prediction",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="full",
        help="full: full gradient; direct: attention patterns and norm scales frozen (default full)",
    )
    p.add_argument("--top-k", type=int, default=10, help="features ablated in the intervention check (default 10)")
    p.add_argument("--show", type=int, default=20, help="features listed (default 20)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--graph", metavar="OUT.json", help="also build the pruned graph and write it (circuit-tracer JSON)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="graph: cumulative node influence kept (0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="graph: cumulative edge influence kept (0.98)")
    p.add_argument(
        "--max-feature-nodes",
        type=int,
        default=200,
        help="graph: candidate feature nodes before pruning, by |attribution| (default 200)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"longest prompt accepted, in tokens (default {MAX_PROMPT_TOKENS})",
    )
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.set_defaults(func=run)
    return p


def _err(msg: str) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from featuredict.pipelines.attribution.attribute import AttributionInputError, read_chat
    from featuredict.pipelines.attribution.freeze import FreezeError
    from featuredict.pipelines.attribution.graph import GraphConfig
    from featuredict.pipelines.attribution.load import save_graph
    from featuredict.pipelines.attribution.run import Request, dumps, to_json
    from featuredict.pipelines.attribution.run import run as run_attribution
    from featuredict.pipelines.model.loading import ModelLoadError
    from featuredict.pipelines.model.saes import SaeLoadError

    out = Path(args.graph) if args.graph else None
    if out is not None:
        if out.suffix.lower() != ".json":
            return _err("--graph must name a .json file")
        if not out.parent.exists():
            return _err(f"--graph: folder {out.parent} does not exist")
    if not Path(args.db).exists():
        return _err(f"no database at {args.db}")
    try:
        gcfg = (
            GraphConfig(args.node_threshold, args.edge_threshold, args.max_feature_nodes) if out is not None else None
        )
        chat = read_chat(args.chat) if args.chat else None
        req = Request(
            saes=list(args.sae),
            prompt=args.prompt,
            chat=chat,
            target=args.target,
            contrast=tuple(args.contrast) if args.contrast else None,
            position=args.position,
            mode=args.mode,
            top_k=args.top_k,
            graph=gcfg,
            max_tokens=args.max_tokens,
        )
    except (AttributionInputError, ValueError) as e:
        return _err(str(e))
    try:
        store = Store(args.db, read_only=True)
    except DatabaseError as e:
        return _err(str(e))
    try:
        res = run_attribution(store, req, device=args.device)
    except (AttributionInputError, FreezeError, ModelLoadError, SaeLoadError, ValueError) as e:
        return _err(one_line(e))
    finally:
        store.close()
    if out is not None and res.graph is not None:
        save_graph(res.graph, out)
    data = to_json(res, args.show)
    if args.json:
        if out is not None and res.graph is not None:
            data["graph"] = {"path": str(out), "nodes": len(res.graph.nodes), "links": len(res.graph.links)}
        print(dumps(data))
    else:
        print(render_text(data))
        if out is not None and res.graph is not None:
            print(f"graph: {len(res.graph.nodes)} nodes, {len(res.graph.links)} links -> {out}")
    return 0


def render_text(d: dict) -> str:
    t = d["target"]
    lines = [
        f"mode: {d['mode']} ({d['mode_note']})",
        f"target: {t['label']} = {t['value']:.4f}",
        "model's top predictions there: " + ", ".join(f"{p['token']!r} {p['prob']:.3f}" for p in d["top_predictions"]),
        "",
        f"{'sae':<28} {'feat':>6} {'pos':>4} {'token':<12} {'act':>8} {'grad':>9} {'attr':>9}  density  words",
    ]
    for f in d["features"]:
        dens = f"{f['density']:.2e}" if f.get("density") is not None else "   -   "
        words = (f.get("words") or "").replace("\n", " ")[:60]
        lines.append(
            f"{f['sae'][:28]:<28} {f['feature']:>6} {f['position']:>4} {f['token'][:12]!r:<12} {f['activation']:>8.3f} "
            f"{f['gradient']:>9.4f} {f['attribution']:>9.4f}  {dens}  {words}"
        )
    err = sorted(d["error_nodes"], key=lambda e: -abs(e["attribution"]))[:5]
    if err:
        lines.append(
            "largest error nodes: " + ", ".join(f"{e['sae']}@{e['position']} {e['attribution']:+.4f}" for e in err)
        )
    toks = sorted(d["tokens"], key=lambda e: -abs(e["attribution"]))[:5]
    lines.append(
        "largest tokens: " + ", ".join(f"{e['token']!r}@{e['position']} {e['attribution']:+.4f}" for e in toks)
    )
    c = d["check"]
    lines += [
        "",
        "intervention check (ablate = clamp to 0 at its position; change of the target):",
        f"  {'':<44} {'predicted':>10} {'actual':>10}",
    ]
    for a in [*c["single"], *([c["together"]] if c["together"] else [])]:
        lines.append(f"  {a['label'][:44]:<44} {a['predicted']:>+10.4f} {a['actual']:>+10.4f}")
    for s in c["sum_check"]:
        lines.append(
            f"  sum check {s['sae']}: T(clean) - T(all its nodes removed) = {s['delta']:+.4f} = features "
            f"{s['features']:+.4f} + error {s['error']:+.4f} + nonlinear remainder {s['remainder']:+.4f}"
        )
    lines.append(
        f"  feature pages: featuredict serve --db DB, then open {d['features'][0]['link']}"
        if d["features"] and d["features"][0].get("link")
        else ""
    )
    return "\n".join(lines)
