"""The intervention check every attribution comes with: ablate the top features and compare.

Rows of one batched forward pass (same prompt, same mode: the frozen model in ``direct`` mode):
- one row per top-k feature node, that node ablated (its activation clamped to 0 at its position, with the
  steering edit code, ``steering.edits.steer_activations``; every other activation and the SAE's error kept);
- one row with all k ablated together;
- one row per SAE with every node of that SAE removed (features and error at every valid position, i.e. the
  activation replaced by ``decode(0)``): the sum check's baseline.

Predicted change of a row = minus the sum of the removed nodes' attributions; actual = the target in that row
minus the clean target. Sum check, per SAE: ``T(clean) - T(baseline) = sum(feature attributions) + sum(error
attributions) + remainder``. The remainder is what the linear estimate misses: zero (to rounding) when
everything after the SAE is linear in its activation (hook at the last residual stream, final norm frozen:
``direct`` mode), and otherwise not zero (MLPs after a residual SAE are nonlinear, softmax and norms too in
``full`` mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from featuredict.pipelines.attribution.attribute import Attribution, Target
from featuredict.pipelines.attribution.splice import Slot, baseline
from featuredict.pipelines.model.backends import ModelBackend
from featuredict.pipelines.model.saes import to_sae
from featuredict.pipelines.steering.config import Mode
from featuredict.pipelines.steering.edits import EditPlan, decoder_directions, steer_activations


def _clamps(n: int) -> tuple[Mode, ...]:
    """The edit methods of ``n`` features clamped (to their ablated values)."""
    return tuple("clamp" for _ in range(n))


@dataclass
class Ablation:
    label: str
    nodes: list[tuple[str, int, int]]  # (sae, position, feature)
    predicted: float
    actual: float


@dataclass
class SumCheck:
    sae: str
    delta: float  # T(clean) - T(baseline)
    features: float
    error: float
    remainder: float


@dataclass
class Check:
    singles: list[Ablation]
    together: Ablation | None
    sums: list[SumCheck]
    clean: float

    def to_json(self) -> dict[str, Any]:
        def ab(a: Ablation) -> dict[str, Any]:
            return {"label": a.label, "nodes": [list(n) for n in a.nodes], "predicted": a.predicted, "actual": a.actual}

        return {
            "clean_target": self.clean,
            "single": [ab(a) for a in self.singles],
            "together": ab(self.together) if self.together else None,
            "sum_check": [vars(s) for s in self.sums],
        }


def _edit_fn(slot: Slot, ids: torch.Tensor, ablate: torch.Tensor, remove_all: torch.Tensor):
    """Hook function for one slot: ``ablate`` ``[rows, T, d_sae]`` bool marks (row, position, feature) to clamp
    to 0; ``remove_all`` ``[rows]`` bool marks rows whose every valid activation becomes ``decode(0)``."""
    feats = ablate.any(dim=(0, 1)).nonzero(as_tuple=True)[0]

    def fn(act: torch.Tensor) -> torch.Tensor:
        xs = to_sae(slot.sae, act)
        rows = act.shape[0]
        valid = slot.valid(ids.expand(rows, -1), xs)
        out = act
        if feats.numel():
            f = slot.encode(xs) * valid.unsqueeze(-1).to(xs.dtype)
            m = ablate[..., feats].to(xs.device)
            vals = torch.where(m, torch.zeros_like(f[..., feats]), f[..., feats])
            plan = EditPlan(
                features=feats.to(xs.device),
                methods=_clamps(int(feats.numel())),
                values=vals,
                directions=decoder_directions(slot.sae, feats.to(xs.device)).detach(),
            )
            out, _ = steer_activations(slot.sae, act, plan, mask=m.any(-1), f=f)
        if bool(remove_all.any()):
            base = baseline(slot.sae, xs).to(act.dtype)
            sel = remove_all.to(act.device).view(-1, 1, 1) & valid.unsqueeze(-1)
            out = torch.where(sel, base, out)
        return out

    return fn


def check(
    loaded: ModelBackend, slots: Sequence[Slot], attribution: Attribution, k: int = 10, *, sum_check: bool = True
) -> Check:
    """Run the rows described in the module docstring (inside the same ``linearised`` block as the attribution)."""
    ranked = attribution.ranked(k)
    by_name = {s.name: s for s in slots}
    nodes_of = {s.name: s for s in attribution.saes}
    n_single = len(ranked)
    together = n_single > 1
    n_sum = len(slots) if sum_check else 0
    rows = n_single + int(together) + n_sum + 1  # the last row is the clean prompt
    ids = attribution.ids
    T = ids.shape[1]
    fns = []
    for si, s in enumerate(slots):
        ab = torch.zeros(rows, T, int(s.sae.cfg.d_sae), dtype=torch.bool)
        for r, node in enumerate(ranked):
            if node["sae"] == s.name:
                ab[r, node["position"], node["feature"]] = True
                if together:
                    ab[n_single, node["position"], node["feature"]] = True
        remove = torch.zeros(rows, dtype=torch.bool)
        if sum_check:
            remove[n_single + int(together) + si] = True
        fns.append((s, _edit_fn(s, ids, ab, remove)))
    target: Target = attribution.target
    with torch.no_grad(), ExitStack() as stack:
        for s, fn in fns:
            stack.enter_context(s.site.intervene(fn))
        logits = loaded.forward(ids.expand(rows, -1).to(loaded.device))
    vals = target.value(logits).cpu().tolist()
    clean = vals[-1]
    singles = [
        Ablation(
            f"ablate {n['sae']} #{n['feature']} at {n['position']}",
            [(n["sae"], n["position"], n["feature"])],
            -n["attribution"],
            vals[r] - clean,
        )
        for r, n in enumerate(ranked)
    ]
    tog = None
    if together:
        tog = Ablation(
            f"ablate the top {n_single} together",
            [(n["sae"], n["position"], n["feature"]) for n in ranked],
            -sum(n["attribution"] for n in ranked),
            vals[n_single] - clean,
        )
    sums = []
    if sum_check:
        for si, s in enumerate(slots):
            nd = nodes_of[s.name]
            delta = clean - vals[n_single + int(together) + si]
            fsum, esum = float(nd.attribution.sum()), float(nd.error_attr.sum())
            sums.append(SumCheck(s.name, delta, fsum, esum, delta - fsum - esum))
    del by_name
    return Check(singles, tog, sums, clean)
