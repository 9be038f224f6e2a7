"""One call from a database and a request to an attribution, its intervention check and (optionally) its graph.

``load_slots`` loads the model once and every requested SAE on it (SAEs of different models are refused);
``run`` tokenises the prompt or chat, picks the target, attributes, checks by intervention and builds the
graph, all in one ``linearised`` block, so ``direct`` mode's checks run on the same frozen model.
``feature_words`` gives each feature its words (best explanation, else label, else top tokens), density and
dashboard link. ``to_json`` is what ``featuredict attribute --json`` prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from featuredict.db import queries as q
from featuredict.db.records import SaeRecord
from featuredict.db.store import Store
from featuredict.pipelines.attribution.attribute import (
    MAX_PROMPT_TOKENS,
    Attribution,
    AttributionInputError,
    Mode,
    Prompt,
    linearised,
    make_target,
    prompt_from_chat,
    prompt_from_text,
)
from featuredict.pipelines.attribution.attribute import attribute as attribute_nodes
from featuredict.pipelines.attribution.checks import Check, check
from featuredict.pipelines.attribution.graph import Graph, GraphConfig, build_graph
from featuredict.pipelines.attribution.splice import Slot, slots_in_order
from featuredict.pipelines.model.backends import ModelBackend
from featuredict.pipelines.model.hooks import HookSite
from featuredict.pipelines.model.runtime import cached_runtime_from_row
from featuredict.pipelines.model.saes import SaeSource, load_sae


@dataclass
class Request:
    saes: list[str]
    prompt: str | None = None
    chat: list[dict[str, str]] | None = None
    target: str | None = None
    contrast: tuple[str, str] | None = None
    position: int | None = None
    mode: Mode = "full"
    top_k: int = 10
    graph: GraphConfig | None = None
    max_tokens: int = MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if not self.saes:
            raise AttributionInputError("give at least one --sae")
        if (self.prompt is None) == (self.chat is None):
            raise AttributionInputError("give exactly one of --prompt and --chat")
        if self.target is not None and self.contrast is not None:
            raise AttributionInputError("give --target or --contrast, not both")
        if self.top_k < 1:
            raise AttributionInputError("--top-k must be at least 1")
        if self.max_tokens < 2:
            raise AttributionInputError("--max-tokens must be at least 2")


@dataclass
class Result:
    prompt: Prompt
    attribution: Attribution
    check: Check
    graph: Graph | None
    words: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    model: str = ""


def sae_rows(store: Store, names: list[str]) -> list[dict[str, Any]]:
    """The ``saes`` rows of ``names``, checked to be distinct and of one model (AttributionInputError)."""
    if len(set(names)) != len(names):
        raise AttributionInputError("an SAE is named twice")
    rows = []
    for n in names:
        row = q.sae_info(store, n)
        if row is None:
            raise AttributionInputError(f"no SAE {n!r} in the database (have: {', '.join(q.sae_ids(store))})")
        rows.append(dict(row))
    models = {(r["model_spec"], r.get("hook_kind") or "", r.get("model_kwargs") or "{}") for r in rows}
    if len(models) > 1:
        raise AttributionInputError(
            "the SAEs are of different models ("
            + "; ".join(f"{r['sae_id']}: {r['model_spec']}" for r in rows)
            + "): an attribution runs one model"
        )
    return rows


def load_slots(rows: list[dict[str, Any]], device: str | None = None) -> tuple[ModelBackend, list[Slot]]:
    """Load the model once (through the first row's runtime) and every SAE of ``rows`` on it, in hook order."""
    rt = cached_runtime_from_row(rows[0], device)
    slots = [Slot(rows[0]["sae_id"], rt.sae, rt.site, rt.outlier_norm_ratio)]
    for r in rows[1:]:
        sae = load_sae(SaeSource.from_json(r["sae_source"]), device=rt.backend.device)
        site = HookSite(rt.backend, r["hook_name"])
        slots.append(Slot(r["sae_id"], sae, site, SaeRecord.from_row(r).outlier_norm_ratio))
    return rt.backend, slots_in_order(rt.backend, slots)


def feature_words(store: Store, sae_id: str, features: list[int]) -> dict[int, dict[str, Any]]:
    """Per feature: ``words`` (best explanation, else label, else top tokens), ``density``, ``link``."""
    feats = sorted({int(f) for f in features})
    out: dict[int, dict[str, Any]] = {}
    if not feats:
        return out
    summary = q.features_by_ids(store, sae_id, feats)
    expl = q.best_explanations(store, sae_id, feats, q.sae_fingerprint(store, sae_id))
    texts = {int(r.feature): str(r.text) for r in expl.itertuples()} if not expl.empty else {}
    for r in summary.itertuples():
        f = int(r.feature)
        words = texts.get(f) or (r.label if isinstance(r.label, str) and r.label else None) or str(r.top_tokens or "")
        density = None if r.density is None else float(r.density)
        out[f] = {"words": words, "density": density, "link": f"feature?sae={_quote(sae_id)}&feature={f}"}
    return out


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def run(store: Store, req: Request, device: str | None = None) -> Result:
    """Load, attribute, check and (when ``req.graph``) build the graph; AttributionInputError on bad input."""
    rows = sae_rows(store, req.saes)
    loaded, slots = load_slots(rows, device)
    return run_loaded(store, loaded, slots, req, prepend_bos=bool(rows[0].get("prepend_bos", True)))


def run_loaded(
    store: Store | None, loaded: ModelBackend, slots: list[Slot], req: Request, *, prepend_bos: bool = True
) -> Result:
    limit = min(req.max_tokens, loaded.context_length or req.max_tokens)
    tok = loaded.tokenizer
    prompt = (
        prompt_from_text(tok, req.prompt, prepend_bos, limit)
        if req.prompt is not None
        else prompt_from_chat(tok, req.chat or [], limit)
    )
    ids = prompt.ids.to(loaded.device)
    prompt.ids = ids
    with torch.no_grad():
        logits = loaded.forward(ids)
    target = make_target(tok, prompt, logits, target=req.target, contrast=req.contrast, position=req.position)
    words: dict[str, dict[int, dict[str, Any]]] = {}
    with linearised(loaded, req.mode, ids):
        attribution = attribute_nodes(loaded, slots, prompt, target, req.mode)
        if store is not None:
            for s in attribution.saes:
                top = [r["feature"] for r in attribution.ranked() if r["sae"] == s.name][:500]
                words[s.name] = feature_words(store, s.name, top)
        chk = check(loaded, slots, attribution, req.top_k)
        graph = None
        if req.graph is not None:
            graph = build_graph(
                loaded,
                slots,
                prompt,
                attribution,
                req.graph,
                clerp=lambda sae, f: str(words.get(sae, {}).get(f, {}).get("words", ""))[:200],
            )
    return Result(prompt, attribution, chk, graph, words, getattr(loaded, "name", ""))


def to_json(res: Result, top: int = 20) -> dict[str, Any]:
    a = res.attribution
    feats = []
    for r in a.ranked(top):
        w = res.words.get(r["sae"], {}).get(r["feature"], {})
        feats.append({**r, "words": w.get("words"), "density": w.get("density"), "link": w.get("link")})
    return {
        "mode": a.mode,
        "mode_note": MODE_NOTES[a.mode],
        "model": res.model,
        "prompt_tokens": a.tokens,
        "target": {**a.target.to_json(), "value": a.target_value},
        "top_predictions": [{"token": t, "prob": p} for t, p in a.top_predictions],
        "saes": [s.name for s in a.saes],
        "features": feats,
        "error_nodes": [
            {"sae": s.name, "position": p, "attribution": float(s.error_attr[p]), "norm": float(s.error_norm[p])}
            for s in a.saes
            for p in range(len(a.tokens))
            if bool(s.valid[p])
        ],
        "tokens": [
            {"position": p, "token": a.tokens[p], "attribution": float(a.token_attr[p])} for p in range(len(a.tokens))
        ],
        "check": res.check.to_json(),
    }


MODE_NOTES = {
    "full": "full gradient: the model as it is (attention, norms and MLPs all differentiated)",
    "direct": "direct effects: attention patterns and norm scales frozen at their clean values (MLPs not frozen)",
}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2)
