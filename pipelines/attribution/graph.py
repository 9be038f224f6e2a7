"""Attribution graphs across SAEs: nodes, direct-effect edges, influence pruning, circuit-tracer graph JSON.

Nodes: the input tokens (one per position), for each SAE its candidate feature nodes (the ``max_feature_nodes``
largest ``|attribution|`` over all SAEs) and its error node at every valid position, and the target. With
residual-stream SAEs at layers ``l_1 < ... < l_n`` each SAE cuts the model: everything after ``l_k`` depends on
the prompt only through ``x_{l_k}``. So edges go tokens -> SAE 1, SAE k -> SAE k+1 and SAE n -> target:

    weight(u -> v) = a_u * d pre_v / d a_u

where ``pre_v`` is feature ``v``'s encoder output (its activation, for an active TopK / ReLU feature) and
``a_u`` the source's activation (a feature: ``f_u`` along ``s(x) D_u``; an error node: its vector; a token: its
embedding). An error node has incoming edges too: a residual-stream SAE's error ``e_k = x_k - decode(encode(x_k))``
is a function of everything before it (as in Marks et al.), so its ``pre_v`` is its attribution ``e_k[p] .
g_k[p]`` with ``g_k = dT/dx_k`` held fixed, and the edges say how much of that each earlier node carries. So only
the tokens are leaves, and an earlier feature's influence counts the paths through later errors as well, as
its attribution (taken in the plain model) does. Edges into the target are the last SAE's attributions. One
backward pass per target node (batched over rows), each stopped at the target node's hook.

Pruning (circuit-tracer's rule): with ``A`` the edge-weight matrix (rows: targets, columns: sources), ``Â`` its
absolute values normalised so each row sums to 1, the influence of a node on the target is its entry of
``e_target (Â + Â^2 + ...)``. Feature and error nodes are kept, largest influence first, until their cumulative
influence reaches ``node_threshold`` (0.8) of the total; tokens and the target are always kept. On what is kept,
edges are scored ``Â[v, u] * (influence(v) + [v is the target])`` and kept, best first, until ``edge_threshold``
(0.98) of the total score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from featuredict.pipelines.attribution.attribute import Attribution, Prompt
from featuredict.pipelines.attribution.splice import Slot
from featuredict.pipelines.model.backends import ModelBackend
from featuredict.pipelines.model.saes import to_sae
from featuredict.pipelines.steering.edits import output_scale

FEATURE_TYPE = "cross layer transcoder"  # what circuit-tracer's and Neuronpedia's viewers draw as a feature
ERROR_TYPE = "mlp reconstruction error"  # ... as an error node
TOKEN_TYPE = "embedding"
TARGET_TYPE = "logit"
REQUIRED_NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "clerp", "influence", "activation")
REQUIRED_LINK_FIELDS = ("source", "target", "weight")


@dataclass
class GraphConfig:
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_feature_nodes: int = 200
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], not {v}")
        if self.max_feature_nodes < 1 or self.batch_size < 1:
            raise ValueError("max_feature_nodes and batch_size must be at least 1")


@dataclass
class Graph:
    metadata: dict[str, Any]
    nodes: list[dict[str, Any]]
    links: list[dict[str, Any]]
    qparams: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        q = self.qparams or {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
        return {"metadata": self.metadata, "qParams": q, "nodes": self.nodes, "links": self.links}


def hook_layer(hook: str, fallback: int) -> int:
    """The block index in a hook name (``model.layers.15`` -> 15, ``blocks.8.hook_resid_pre`` -> 8)."""
    m = re.search(r"(?:layers|blocks|h)\.(\d+)", hook) or re.search(r"(\d+)", hook)
    return int(m.group(1)) if m else fallback


class _Stop(Exception):
    pass


def _edges_into(
    loaded: ModelBackend,
    slots: Sequence[Slot],
    ids: torch.Tensor,
    b: int,
    rows: list[tuple[int, int]],
    attribution: Attribution,
) -> torch.Tensor:
    """``d pre / d source`` for each row of SAE ``b`` in ``rows``: ``(position, feature)`` for a feature node,
    ``(position, -1)`` for its error node. The gradient, ``[R, T, d]``, at the previous SAE's hook (or the token
    embeddings when ``b`` is 0). The forward pass stops at SAE ``b``'s hook."""
    store: dict[str, torch.Tensor] = {}
    src_hook = slots[b - 1].hook if b > 0 else None
    dst = slots[b]

    def keep_src(act: torch.Tensor) -> None:
        store["src"] = act
        return None

    def stop_dst(act: torch.Tensor) -> None:
        store["dst"] = act
        raise _Stop

    R = len(rows)
    handle = None
    with torch.enable_grad(), ExitStack() as stack:
        if src_hook is None:
            handle = loaded.input_embedding_module().register_forward_hook(lambda m, i, o: store.__setitem__("src", o))
        else:
            stack.enter_context(slots[b - 1].site.intervene(keep_src))
        try:
            stack.enter_context(dst.site.intervene(stop_dst))
            try:
                loaded.forward(ids.expand(R, -1).to(loaded.device))
            except _Stop:
                pass
        finally:
            if handle is not None:
                handle.remove()
        if "dst" not in store or "src" not in store:
            raise RuntimeError("the forward pass did not reach both hooks of an edge")
        xd = to_sae(dst.sae, store["dst"])
        at = torch.arange(R, device=xd.device)
        pos = torch.tensor([p for p, _ in rows], device=xd.device)
        feat = torch.tensor([max(f, 0) for _, f in rows], device=xd.device)
        is_err = torch.tensor([f < 0 for _, f in rows], device=xd.device)
        pre = torch.zeros(R, dtype=xd.dtype, device=xd.device)
        if bool((~is_err).any()):
            pre = torch.where(is_err, pre, _pre_activation(dst, xd[at, pos], feat))
        if bool(is_err.any()):
            nodes = next(s for s in attribution.saes if s.name == dst.name)
            valid = nodes.valid.to(xd.device).reshape(1, -1).expand(R, -1)
            _, _, err = dst.parts(xd, valid)
            g = to_sae(dst.sae, attribution.grads[dst.hook])[0].to(err.dtype)  # [T, d], held fixed
            pre = torch.where(is_err, (err[at, pos] * g[pos]).sum(-1), pre)
        (grad,) = torch.autograd.grad(pre.sum(), [store["src"]])
    return grad.detach()


def _pre_activation(slot: Slot, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """Feature ``feat[r]``'s encoder output on ``x[r]`` (``[R, d_in]``), differentiable in ``x``: the SAE's own
    ``encode`` (so TopK selection, JumpReLU thresholds and input normalisation are its own)."""
    f = slot.sae.encode(x.unsqueeze(1)).squeeze(1)
    return f[torch.arange(x.shape[0], device=x.device), feat]


def build_graph(
    loaded: ModelBackend,
    slots: Sequence[Slot],
    prompt: Prompt,
    attribution: Attribution,
    config: GraphConfig | None = None,
    *,
    clerp: Callable[[str, int], str] | None = None,
    model_name: str = "",
) -> Graph:
    """The pruned graph (see the module docstring); call inside the attribution's ``linearised`` block."""
    cfg = config or GraphConfig()
    ids = prompt.ids
    T = prompt.length
    n_layers = int(loaded.n_layers)
    ranked = attribution.ranked()
    cand = ranked[: cfg.max_feature_nodes]
    layers = [hook_layer(s.hook, i) for i, s in enumerate(slots)]
    nodes_of = {s.name: s for s in attribution.saes}

    # ---- node table
    nodes: list[dict[str, Any]] = []
    index: dict[tuple, int] = {}

    def add(key: tuple, node: dict[str, Any]) -> None:
        index[key] = len(nodes)
        nodes.append(node)

    for p in range(T):
        tid = int(ids[0, p])
        add(
            ("tok", p),
            {
                "node_id": f"E_{tid}_{p}",
                "feature": tid,
                "layer": "E",
                "ctx_idx": p,
                "feature_type": TOKEN_TYPE,
                "clerp": prompt.tokens[p],
                "activation": None,
                "attribution": float(attribution.token_attr[p]),
            },
        )
    per_sae: list[list[dict[str, Any]]] = [[] for _ in slots]
    slot_no = {s.name: i for i, s in enumerate(slots)}
    for c in cand:
        per_sae[slot_no[c["sae"]]].append(c)
    for si, s in enumerate(slots):
        L = layers[si]
        for c in per_sae[si]:
            add(
                ("f", si, c["position"], c["feature"]),
                {
                    "node_id": f"{L}_{c['feature']}_{c['position']}",
                    "feature": c["feature"],
                    "layer": str(L),
                    "ctx_idx": c["position"],
                    "feature_type": FEATURE_TYPE,
                    "sae": s.name,
                    "clerp": clerp(s.name, c["feature"]) if clerp else "",
                    "activation": c["activation"],
                    "attribution": c["attribution"],
                },
            )
        nd = nodes_of[s.name]
        for p in range(T):
            if bool(nd.valid[p]):
                add(
                    ("e", si, p),
                    {
                        "node_id": f"{L}_error_{p}",
                        "feature": None,
                        "layer": str(L),
                        "ctx_idx": p,
                        "feature_type": ERROR_TYPE,
                        "sae": s.name,
                        "clerp": f"error of {s.name}",
                        "activation": float(nd.error_norm[p]),
                        "attribution": float(nd.error_attr[p]),
                    },
                )
    t = attribution.target
    add(
        ("target",),
        {
            "node_id": f"{n_layers}_{t.token}_{t.position}",
            "feature": t.token,
            "layer": str(n_layers),
            "ctx_idx": t.position,
            "feature_type": TARGET_TYPE,
            "clerp": t.label,
            "activation": attribution.target_value,
            "is_target_logit": True,
            "token_prob": _prob(attribution),
        },
    )
    N = len(nodes)
    A = torch.zeros(N, N, dtype=torch.float64)
    tgt = index[("target",)]

    # ---- edges into the target: the last SAE's nodes
    last = len(slots) - 1
    for c in per_sae[last]:
        A[tgt, index[("f", last, c["position"], c["feature"])]] = c["attribution"]
    nd_last = nodes_of[slots[last].name]
    for p in range(T):
        if ("e", last, p) in index:
            A[tgt, index[("e", last, p)]] = float(nd_last.error_attr[p])

    # ---- edges into each candidate feature and each error node from the layer before
    for si in range(len(slots)):
        todo = [(c["position"], c["feature"]) for c in per_sae[si]]
        todo += [(p, -1) for p in range(T) if ("e", si, p) in index]
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            grad = _edges_into(loaded, slots, ids, si, chunk, attribution)  # [R, T, d]
            for r, (q, j) in enumerate(chunk):
                row = index[("e", si, q) if j < 0 else ("f", si, q, j)]
                _fill_sources(A, row, grad[r], si, slots, per_sae, index, attribution, T)

    # ---- pruning
    keep_node, influence = _prune_nodes(A, nodes, tgt, cfg.node_threshold)
    for i, n in enumerate(nodes):
        n["influence"] = float(influence[i])
    kept = [i for i in range(N) if keep_node[i]]
    sub = A[kept][:, kept]
    inf_sub = influence[kept]
    tgt_sub = kept.index(tgt)
    edges = _prune_edges(sub, inf_sub, tgt_sub, cfg.edge_threshold)
    out_nodes = [nodes[i] for i in kept]
    for n in out_nodes:
        n["jsNodeId"] = n["node_id"]
        n.setdefault("is_target_logit", False)
        n.setdefault("token_prob", 0.0)
    links = [
        {"source": out_nodes[u]["node_id"], "target": out_nodes[v]["node_id"], "weight": float(sub[v, u])}
        for v, u in edges
    ]
    meta = {
        "slug": "featuredict-attribution",
        "scan": model_name or getattr(loaded, "name", ""),
        "prompt_tokens": list(prompt.tokens),
        "prompt": prompt.text,
        "node_threshold": cfg.node_threshold,
        "edge_threshold": cfg.edge_threshold,
        "mode": attribution.mode,
        "target": attribution.target.to_json(),
        "saes": [{"sae": s.name, "hook": s.hook, "layer": layers[i]} for i, s in enumerate(slots)],
        "info": {"generator": {"name": "featuredict attribute"}, "candidates": len(cand), "nodes_before": N},
    }
    return Graph(meta, out_nodes, links)


def _prob(attribution: Attribution) -> float:
    t = attribution.target
    return float(torch.exp(torch.tensor(attribution.target_value))) if t.kind == "logprob" else 0.0


def _fill_sources(
    A: torch.Tensor,
    row: int,
    grad: torch.Tensor,
    si: int,
    slots: Sequence[Slot],
    per_sae: list[list[dict[str, Any]]],
    index: dict[tuple, int],
    attribution: Attribution,
    T: int,
) -> None:
    """Edge weights into node ``row`` from every source of the layer before, given ``grad`` ``[T, d]``."""
    if si == 0:  # token embeddings: emb . grad
        assert attribution.emb is not None
        cols = torch.tensor([index[("tok", p)] for p in range(T)])
        A[row, cols] = (attribution.emb[0].float() * grad.float()).sum(-1).double().cpu()
        return
    prev = slots[si - 1]
    g = to_sae(prev.sae, grad)
    srcs = per_sae[si - 1]
    if srcs:
        feat = torch.tensor([c["feature"] for c in srcs], device=g.device)
        pos = torch.tensor([c["position"] for c in srcs], device=g.device)
        w = (prev.directions[feat] * g[pos]).sum(-1)
        s = output_scale(prev.sae, to_sae(prev.sae, attribution.acts[prev.hook]))
        if s is not None:
            w = w * s[0, pos, 0]
        act = torch.tensor([c["activation"] for c in srcs], device=g.device, dtype=w.dtype)
        cols = torch.tensor([index[("f", si - 1, c["position"], c["feature"])] for c in srcs])
        A[row, cols] = (w * act).double().cpu()
    err = attribution.errors[prev.hook]  # [T, d]
    ew = (err.to(g.dtype) * g).sum(-1).double().cpu()
    have = [p for p in range(T) if ("e", si - 1, p) in index]
    if have:
        A[row, torch.tensor([index[("e", si - 1, p)] for p in have])] = ew[torch.tensor(have)]


def influence_on(A: torch.Tensor, target: int) -> torch.Tensor:
    """``e_target (Â + Â^2 + ...)`` with ``Â`` = ``|A|`` row-normalised (the graph is acyclic: the series ends)."""
    absA = A.abs()
    rows = absA.sum(1, keepdim=True)
    norm = torch.where(rows > 0, absA / rows.clamp_min(1e-300), torch.zeros_like(absA))
    v = torch.zeros(A.shape[0], dtype=A.dtype)
    v[target] = 1.0
    total = torch.zeros_like(v)
    for _ in range(A.shape[0]):
        v = v @ norm
        if float(v.abs().sum()) == 0.0:
            break
        total += v
    return total


def _prune_nodes(
    A: torch.Tensor, nodes: list[dict[str, Any]], target: int, threshold: float
) -> tuple[list[bool], torch.Tensor]:
    infl = influence_on(A, target)
    prunable = [i for i, n in enumerate(nodes) if n["feature_type"] in (FEATURE_TYPE, ERROR_TYPE)]
    keep = [n["feature_type"] not in (FEATURE_TYPE, ERROR_TYPE) for n in nodes]
    order = sorted(prunable, key=lambda i: -float(infl[i]))
    total = float(sum(float(infl[i]) for i in prunable))
    acc = 0.0
    for i in order:
        if total <= 0 or acc >= threshold * total:
            break
        keep[i] = True
        acc += float(infl[i])
    return keep, infl


def _prune_edges(A: torch.Tensor, infl: torch.Tensor, target: int, threshold: float) -> list[tuple[int, int]]:
    absA = A.abs()
    rows = absA.sum(1, keepdim=True)
    norm = torch.where(rows > 0, absA / rows.clamp_min(1e-300), torch.zeros_like(absA))
    weight = infl.clone()
    weight[target] += 1.0
    score = norm * weight.unsqueeze(1)
    vs, us = (score > 0).nonzero(as_tuple=True)
    vals = score[vs, us]
    order = vals.argsort(descending=True)
    total = float(vals.sum())
    out, acc = [], 0.0
    for o in order.tolist():
        if acc >= threshold * total:
            break
        out.append((int(vs[o]), int(us[o])))
        acc += float(vals[o])
    return out
