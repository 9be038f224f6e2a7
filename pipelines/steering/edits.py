"""The exact activation edit, pure torch on an sae-lens SAE (no model, no tokenizer).

Let ``x`` (``[d_in]``) be the activation at the SAE's hook at one position and ``f = sae.encode(x)``
(``[d_sae]``), computed by the SAE's own ``encode`` so input normalisation, ``b_dec`` subtraction, TopK /
JumpReLU thresholds and ``rescale_acts_by_decoder_norm`` are all exactly as in the feature statistics. Every
sae-lens decoder that reconstructs its own input (Standard, TopK, BatchTopK, JumpReLU, Gated, Matryoshka,
matching pursuit) has the form::

    decode(f) = out_x( L(f) + b )       L(f) = f @ D,   D[i] = W_dec[i] / ||W_dec[i]||  (TopK family with
                                                        rescale_acts_by_decoder_norm: see act_times_W_dec)
                                                        D[i] = W_dec[i]                 (everything else)

where ``out_x`` is sae-lens' ``run_time_activation_norm_fn_out``, affine per position with slope ``s(x)``:
``1`` (normalize_activations none / expected_average_only_in / folded), ``||x|| / sqrt(d_in)``
(constant_norm_rescale: out divides by ``sqrt(d_in) / ||x||``) or ``std(x)`` (layer_norm: out is
``y * std + mean``). Hence for ``f' = f + Δf``::

    decode(f') - decode(f) = s(x) * (Δf @ D)

and the edit applied is ``x <- x + s(x) * (Δf @ D)``, i.e. exactly ``x + decode(f') - decode(f)``. The SAE's
error term ``x - decode(f)`` is kept, so where ``Δf = 0`` the model is untouched bit for bit. We compute the
difference in closed form rather than calling ``decode`` twice because sae-lens' normalising
``decode`` is stateful (it reads and deletes a coefficient stored by the preceding ``encode``), which is
neither thread-safe nor callable twice; the tests check the closed form against ``sae.decode``.

Methods, per feature ``i`` (``m_i`` = ``features.max_act``, the feature's max observed activation):
- ``clamp`` (value ``v``, in activation units): ``Δf_i = v - f_i(x)``, so the feature reads ``v``.
- ``ablate``: clamp to 0, ``Δf_i = -f_i(x)``.
- ``add`` (value ``a``, in units of ``m_i``): ``Δf_i = a * m_i``, i.e. ``x <- x + a * m_i * s(x) * D[i]``; no
  encode needed.

These three are SAE-space edits: all of them are computed from the same ``f = encode(x)`` and ``s(x)`` and
summed into one ``Δf``. The two direction methods then act, in the order the features are listed, on the
activation ``y`` that results (``y = x`` when there are no SAE-space edits). With ``π_i(y) = (y · D[i]) /
||D[i]||²``, the coordinate of ``y``'s projection on the decoder direction (the projection is ``π_i(y) D[i]``)
and the target ``t_i = a * m_i * s(x)`` (``a`` in units of ``m_i``, so ``t_i D[i]`` is feature ``i``'s
contribution to ``decode`` at activation ``a * m_i``):
- ``orthogonal``: ``y <- y - (π_i(y) - t_i) D[i]``: the component along ``D[i]`` is replaced by ``t_i D[i]``.
- ``cap``: ``y <- y - max(0, π_i(y) - t_i) D[i]``: the component along ``D[i]`` is capped at ``t_i D[i]``.

What is kept: ``y - π_i(y) D[i]``, the part of the activation orthogonal to ``D[i]``, exactly; that includes
the SAE's error term's orthogonal part and every other feature's. The error term's component along ``D[i]``
is replaced (orthogonal) or capped (cap) with the rest of that component, because these methods act on the
activation, not on the SAE's reading of it. A zero decoder row has no direction: it edits nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from featuredict.pipelines.model.saes import to_sae
from featuredict.pipelines.steering.config import MAX_ACT_UNITS, FeatureEdit, Mode, SteeringInputError

if TYPE_CHECKING:
    from sae_lens import SAE


def decoder_directions(sae: SAE[Any], features: torch.Tensor) -> torch.Tensor:
    """Effective decoder rows ``D[features]``, ``[n, d_in]``: ``L(e_i)`` of the SAE's linear decode.

    ``W_dec[i] / ||W_dec[i]||`` when the SAE rescales activations by decoder norm (sae-lens
    ``act_times_W_dec``), else ``W_dec[i]``.
    """
    w = sae.W_dec[features.to(sae.W_dec.device)]
    if bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)):
        # a zero decoder row has no direction: it edits nothing (sae-lens would divide by zero there too)
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w


def output_scale(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor | None:
    """Slope ``s(x)`` of the SAE's run-time output de-normalisation, ``[..., 1]``; None when it is 1.

    ``x`` is ``[..., d_in]`` in the SAE's dtype; mirrors sae-lens ``_setup_activation_normalization``.
    """
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / (sae.cfg.d_in**0.5)
    if norm == "layer_norm":
        return (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
    return None


def check_steerable(sae: SAE[Any]) -> None:
    """Raise SteeringInputError for SAEs whose decoder does not write back to the hook they read."""
    arch_attr = getattr(sae.cfg, "architecture", "")
    arch = str(arch_attr() if callable(arch_attr) else arch_attr)
    d_in = int(sae.cfg.d_in)
    if "transcoder" in arch.lower() or tuple(sae.W_dec.shape[-1:]) != (d_in,):
        raise SteeringInputError(
            f"this SAE ({arch or type(sae).__name__}) writes to a different site than it reads; "
            "steering needs an SAE that reconstructs its own input"
        )
    if getattr(sae.cfg, "reshape_activations", "none") not in (None, "none"):
        raise SteeringInputError("steering supports SAEs on [batch, pos, d_in] activations (not hook_z reshaping)")


SAE_SPACE: tuple[Mode, ...] = ("clamp", "add")  # ablate is planned as clamp 0
DIRECTION: tuple[Mode, ...] = ("orthogonal", "cap")


@dataclass(frozen=True)
class EditPlan:
    """Resolved edits as tensors on the SAE's device (use ``dataclasses.replace`` to change a field).

    features:   ``[n]`` long, feature ids
    methods:    ``n`` of ``clamp`` / ``add`` / ``orthogonal`` / ``cap`` (``ablate`` is planned as clamp 0)
    values:     broadcastable to ``[..., n]`` (per feature; per row ``[rows, 1, n]`` in a batched sweep, or per
                position ``[batch, pos, n]``): clamp target ``v`` (activation units); for add the activation
                increment ``a * max_act``; for orthogonal / cap the target activation ``a * max_act``
                (already multiplied)
    directions: ``[n, d_in]`` effective decoder rows ``D[features]`` (see ``decoder_directions``)

    Derived once: ``clamp_pos`` (indices into ``features`` of the clamps, ``[n_clamp]``), ``clamp_values``
    (``[..., n_clamp]``), ``clamp_dirs`` (``[n_clamp, d_in]``), ``add_delta`` (``[..., d_in]``, the summed
    add edits ``Σ values_j D_j`` before the output scale; None without adds), and for the direction methods in
    listed order ``dir_values`` (``[..., n_dir]``), ``dir_dirs`` (``[n_dir, d_in]``), ``dir_norm2`` (``||D||²``
    as floats) and ``dir_cap`` (True for cap).
    """

    features: torch.Tensor
    methods: tuple[Mode, ...]
    values: torch.Tensor
    directions: torch.Tensor
    clamp_pos: torch.Tensor = field(init=False)
    clamp_values: torch.Tensor = field(init=False)
    clamp_dirs: torch.Tensor = field(init=False)
    add_delta: torch.Tensor | None = field(init=False)
    dir_values: torch.Tensor = field(init=False)
    dir_dirs: torch.Tensor = field(init=False)
    dir_norm2: tuple[float, ...] = field(init=False)
    dir_cap: tuple[bool, ...] = field(init=False)
    all_clamp: bool = field(init=False)
    needs_encode: bool = field(init=False)

    def __post_init__(self) -> None:
        n = int(self.features.numel())
        object.__setattr__(self, "methods", tuple(self.methods))
        if len(self.methods) != n or any(m not in (*SAE_SPACE, *DIRECTION) for m in self.methods):
            raise ValueError(f"methods {self.methods!r} do not match {n} features (use clamp/add/orthogonal/cap)")
        vals = self.values.expand(*self.values.shape[:-1], n) if self.values.dim() else self.values.expand(n)
        dev = self.features.device

        def where(kinds: tuple[str, ...]) -> torch.Tensor:
            return torch.tensor([i for i, m in enumerate(self.methods) if m in kinds], dtype=torch.long, device=dev)

        cpos, apos, dpos = where(("clamp",)), where(("add",)), where(DIRECTION)
        sets = object.__setattr__
        sets(self, "clamp_pos", cpos)
        sets(self, "all_clamp", bool(cpos.numel() == n))
        sets(self, "needs_encode", bool(cpos.numel() > 0))
        sets(self, "clamp_values", vals if self.all_clamp else vals[..., cpos])
        sets(self, "clamp_dirs", self.directions if self.all_clamp else self.directions[cpos])
        sets(self, "add_delta", vals[..., apos] @ self.directions[apos] if apos.numel() else None)
        sets(self, "dir_values", vals[..., dpos])
        sets(self, "dir_dirs", self.directions[dpos])
        sets(self, "dir_norm2", tuple(float(v) for v in (self.directions[dpos].double() ** 2).sum(-1)))
        sets(self, "dir_cap", tuple(self.methods[int(i)] == "cap" for i in dpos))

    @classmethod
    def build(
        cls, sae: SAE[Any], edits: Sequence[FeatureEdit], max_acts: Mapping[int, float] | None = None
    ) -> EditPlan:
        """Tensors for ``edits``; values in units of max_act (add, orthogonal, cap) are multiplied by
        ``max_acts[feature]``; ablate becomes clamp 0."""
        dev, dt = sae.W_dec.device, sae.W_dec.dtype
        feats = torch.tensor([e.feature for e in edits], dtype=torch.long, device=dev)
        with torch.no_grad():
            return cls(
                features=feats,
                methods=tuple("clamp" if e.mode == "ablate" else e.mode for e in edits),
                values=torch.tensor(plan_values(edits, max_acts), dtype=dt, device=dev),
                directions=decoder_directions(sae, feats).detach() if len(edits) else sae.W_dec[:0].detach(),
            )


def plan_values(edits: Sequence[FeatureEdit], max_acts: Mapping[int, float] | None = None) -> list[float]:
    """``EditPlan.values`` of ``edits`` as floats: clamp ``v``, ablate 0, else ``value * max_acts[feature]``."""
    out = []
    for e in edits:
        if e.mode in MAX_ACT_UNITS:
            if max_acts is None or e.feature not in max_acts:
                raise SteeringInputError(f"feature {e.feature}: {e.mode} needs the feature's max_act")
            out.append(float(e.value) * float(max_acts[e.feature]))
        else:
            out.append(float(e.value))  # clamp; ablate is 0
    return out


def _direction_edits(
    xs: torch.Tensor, delta: torch.Tensor | None, plan: EditPlan, scale: torch.Tensor | None
) -> torch.Tensor:
    """``delta`` (``[..., d_in]``, the SAE-space edit, or None) plus the direction methods applied in order to
    ``y = xs + delta`` (see the module docstring); returns the total change ``y_final - xs``."""
    d = delta if delta is not None else torch.zeros_like(xs)
    for k, (n2, cap) in enumerate(zip(plan.dir_norm2, plan.dir_cap, strict=True)):
        if n2 == 0.0:  # a zero decoder row has no direction
            continue
        direction = plan.dir_dirs[k]
        target = plan.dir_values[..., k]
        if scale is not None:
            target = target * scale[..., 0]
        excess = ((xs + d) @ direction) / n2 - target  # π(y) - t, [batch, pos]
        if cap:
            excess = excess.clamp_min(0.0)
        d = d - excess.unsqueeze(-1) * direction
    return d


def steer_activations(
    sae: SAE[Any],
    x: torch.Tensor,
    plan: EditPlan,
    mask: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``plan`` to activations ``x`` ``[batch, pos, d_in]``; returns ``(x_new, f_sel)``.

    For SAE-space edits ``x_new = x + mask * s(x) * (Δf @ D)`` = ``x + decode(f') - decode(f)``; direction
    methods then act on that result (see the module docstring). In ``x``'s dtype and device. ``mask``
    ``[batch, pos]`` bool selects the positions edited (None: all). ``f_sel`` ``[batch, pos, n]`` are the steered features' activations ``sae.encode(x)[..., features]``
    before the edit (None when the plan needs no encode and ``f`` is not given). Pass ``f``
    (``[batch, pos, d_sae]``, ``sae.encode(x)``) to reuse an encode already done.
    """
    xs = to_sae(sae, x)
    if f is None and plan.needs_encode:
        f = sae.encode(xs)
    f_sel = None if f is None else f[..., plan.features]
    if plan.features.numel() == 0:
        return x, f_sel
    delta: torch.Tensor | None = None
    if plan.needs_encode:
        assert f_sel is not None
        f_clamp = f_sel if plan.all_clamp else f_sel[..., plan.clamp_pos]
        delta = (plan.clamp_values - f_clamp) @ plan.clamp_dirs  # [b, p, d_in]
    if plan.add_delta is not None:
        delta = plan.add_delta if delta is None else delta + plan.add_delta
    scale = output_scale(sae, xs)
    if delta is not None and scale is not None:
        delta = delta * scale
    if plan.dir_norm2:
        delta = _direction_edits(xs, delta, plan, scale)
    assert delta is not None
    if mask is not None:  # where(), not a product: masked-out positions stay exact even if delta is not finite
        delta = torch.where(mask.to(delta.device).unsqueeze(-1), delta, delta.new_zeros(()))
    if delta.device != x.device or delta.dtype != x.dtype:
        delta = delta.to(device=x.device, dtype=x.dtype)
    return x + delta, f_sel
