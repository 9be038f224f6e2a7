"""Attribution benchmarks on a built featuredict database (SmolLM2-135M-Instruct for the issue's targets).

Usage (from the repo root):

    python -m bench.bench_attribution cost --db DB --sae SAE [--tokens 64] [--repeats 5]
    python -m bench.bench_attribution graph --db DB --sae SAE1 --sae SAE2 --sae SAE3 [--tokens 64]
    python -m bench.bench_attribution faithfulness --db DB --sae SAE [--prompts 20] [--top 20]

Without ``--db``, each ``--sae`` is a sae-lens folder of an SAE of ``--model`` (default smollm2-135m): the
demo's SAE folder works before its harvest has finished.

- cost: one attribution (1 SAE, a ``--tokens``-token prompt, one target: the log-probability of the model's
  prediction at the last position) against one plain forward and backward pass of the model (the same target's
  gradient with respect to the token embeddings), alternated ``--repeats`` times, medians; both modes. Nothing
  else (no intervention check, no graph) is in the timed attribution.
- graph: ``featuredict attribute``'s graph path (attribution, checks and the pruned graph) over the SAEs given,
  default thresholds; wall time, kept nodes and links, and the process's peak RSS (``ru_maxrss``) before and
  after.
- faithfulness: for each of ``--prompts`` prompts, the top ``--top`` features by |attribution| are ablated one at
  a time (clamped to 0 at their position, the intervention check's code); the Spearman rank correlation between
  predicted (-attribution) and actual change of the target, averaged over prompts, for both modes. In direct
  mode "actual" is measured on the frozen model (what the linearisation claims to predict) and also on the real
  model.

Prints one JSON line per measurement with the CPU (``lscpu``) and thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "To bake a loaf of bread you need flour, water, salt and",
    "The stock market fell sharply today after the central bank announced that",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Photosynthesis is the process by which plants convert sunlight into",
    "She opened the door slowly and saw that the room was",
    "The best way to learn a new language is to practise speaking it every",
    "Water boils at one hundred degrees Celsius at sea level, but on a high mountain it boils at a",
    "My favourite kind of music is jazz because the melodies are",
    "Never share your password with anyone who emails you, because scammers",
    "In 1969 the first humans walked on the",
    "The recipe calls for two cups of sugar, three eggs and a teaspoon of",
    "He trained every morning for the marathon, running ten miles before",
    "The doctor said that the patient should rest and drink plenty of",
    "A triangle has three sides, a square has four sides and a pentagon has",
    "The cat climbed the tree and refused to come down until",
    "Rain is expected tomorrow, so remember to bring an",
    "The museum's new exhibition shows paintings from the nineteenth",
    "If you want to travel from London to Paris quickly, you can take the",
]


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(kind: str, **kw: Any) -> None:
    print(json.dumps({"bench": kind, "cpu": cpu(), "threads": torch.get_num_threads(), **kw}), flush=True)


def _setup(db: str | None, saes: list[str], model: str = "smollm2-135m"):
    """From a database (``--db`` with SAE ids), or straight from sae-lens folders (no ``--db``: ``--sae`` are
    folders of SAEs of ``--model``; no feature words then)."""
    from featuredict.pipelines.attribution.run import load_slots, sae_rows
    from featuredict.pipelines.attribution.splice import Slot, slots_in_order
    from featuredict.pipelines.model.hooks import HookSite
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource, load_sae

    if db:
        from featuredict.db.store import Store

        store = Store(db, read_only=True)
        rows = sae_rows(store, saes)
        loaded, slots = load_slots(rows)
        return store, rows, loaded, slots
    rt = load_runtime(model, SaeSource(kind="folder", path=saes[0]))
    slots = [Slot(saes[0], rt.sae, rt.site)]
    for f in saes[1:]:
        sae = load_sae(SaeSource(kind="folder", path=f))
        slots.append(Slot(f, sae, HookSite(rt.backend, str(sae.cfg.metadata.hook_name))))
    return None, [{"prepend_bos": rt.prepend_bos}], rt.backend, slots_in_order(rt.backend, slots)


def _prompt(loaded: Any, n_tokens: int):
    from featuredict.pipelines.attribution.attribute import Prompt
    from featuredict.pipelines.model.runtime import token_strings

    tok = loaded.tokenizer
    text = " ".join(PROMPTS)
    ids = tok(text, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    bos = tok.bos_token_id
    ids = ([bos] if bos is not None else []) + ids
    ids = ids[:n_tokens]
    return Prompt(torch.tensor([ids]), token_strings(tok, ids), tok.decode(ids))


def cost(args: argparse.Namespace) -> None:
    from featuredict.pipelines.attribution.attribute import attribute, linearised, make_target

    _, _, loaded, slots = _setup(args.db, args.sae, args.model)
    p = _prompt(loaded, args.tokens)
    with torch.no_grad():
        logits = loaded.forward(p.ids)
    target = make_target(loaded.tokenizer, p, logits)
    emb_mod = loaded.input_embedding_module()

    def fwd_bwd() -> None:
        store: dict[str, torch.Tensor] = {}
        h = emb_mod.register_forward_hook(lambda m, i, o: store.__setitem__("e", o))
        try:
            with torch.enable_grad():
                v = target.value(loaded.forward(p.ids))[0]
                torch.autograd.grad(v, [store["e"]])
        finally:
            h.remove()

    def attr(mode: str):
        def run() -> None:
            with linearised(loaded, mode, p.ids):
                attribute(loaded, slots, p, target, mode)

        return run

    runs = {"fwd_bwd": fwd_bwd, "full": attr("full"), "direct": attr("direct")}
    for fn in runs.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(
        "attribution_cost",
        model=loaded.name,
        sae=args.sae,
        tokens=p.length,
        repeats=args.repeats,
        seconds=med,
        ratio_full=med["full"] / med["fwd_bwd"],
        ratio_direct=med["direct"] / med["fwd_bwd"],
    )


def graph(args: argparse.Namespace) -> None:
    from featuredict.pipelines.attribution.graph import GraphConfig
    from featuredict.pipelines.attribution.run import Request, run_loaded

    store, rows, loaded, slots = _setup(args.db, args.sae, args.model)
    p = _prompt(loaded, args.tokens)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for mode in args.modes:
        req = Request(saes=args.sae, prompt=p.text, mode=mode, graph=GraphConfig(), top_k=10)
        t0 = time.perf_counter()
        res = run_loaded(store, loaded, slots, req, prepend_bos=bool(rows[0].get("prepend_bos", True)))
        dt = time.perf_counter() - t0
        g = res.graph
        assert g is not None
        n_feat = sum(n["feature_type"] == "cross layer transcoder" for n in g.nodes)
        emit(
            "attribution_graph",
            model=loaded.name,
            saes=args.sae,
            mode=mode,
            tokens=res.prompt.length,
            seconds=dt,
            nodes=len(g.nodes),
            feature_nodes=n_feat,
            links=len(g.links),
            peak_rss_mib_before=rss0,
            peak_rss_mib_after=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def faithfulness(args: argparse.Namespace) -> None:
    from featuredict.pipelines.attribution.attribute import attribute, linearised, make_target, prompt_from_text
    from featuredict.pipelines.attribution.checks import check

    _, rows, loaded, slots = _setup(args.db, args.sae, args.model)
    out: dict[str, list[float]] = {"full": [], "direct": [], "direct_vs_real": []}
    t0 = time.perf_counter()
    for text in PROMPTS[: args.prompts]:
        p = prompt_from_text(loaded.tokenizer, text, bool(rows[0].get("prepend_bos", True)))
        with torch.no_grad():
            target = make_target(loaded.tokenizer, p, loaded.forward(p.ids))
        for mode in ("full", "direct"):
            with linearised(loaded, mode, p.ids):
                a = attribute(loaded, slots, p, target, mode)
                c = check(loaded, slots, a, args.top, sum_check=False)
            out[mode].append(_spearman([s.predicted for s in c.singles], [s.actual for s in c.singles]))
            if mode == "direct":
                real = check(loaded, slots, a, args.top, sum_check=False)  # the same ablations, real model
                out["direct_vs_real"].append(
                    _spearman([s.predicted for s in real.singles], [s.actual for s in real.singles])
                )
    emit(
        "attribution_faithfulness",
        model=loaded.name,
        sae=args.sae,
        prompts=args.prompts,
        top=args.top,
        spearman_mean={k: statistics.fmean(v) for k, v in out.items()},
        spearman_min={k: min(v) for k, v in out.items()},
        seconds=time.perf_counter() - t0,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name, fn in (("cost", cost), ("graph", graph), ("faithfulness", faithfulness)):
        s = sub.add_parser(name)
        s.add_argument("--db", default=None, help="a featuredict database (else --sae are sae-lens folders)")
        s.add_argument("--sae", action="append", required=True, help="SAE id in --db, or an SAE folder")
        s.add_argument("--model", default="smollm2-135m", help="without --db: the model (default smollm2-135m)")
        s.add_argument("--tokens", type=int, default=64)
        s.add_argument("--repeats", type=int, default=5)
        s.add_argument("--prompts", type=int, default=20)
        s.add_argument("--top", type=int, default=20)
        s.add_argument("--modes", nargs="+", default=["full", "direct"])
        s.set_defaults(func=fn)
    args = ap.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
