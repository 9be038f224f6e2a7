"""SAEs spliced into the forward pass: ``x -> decode(encode(x)) + error``, the error held as a node of its own.

A ``Slot`` is one SAE at its hook on a loaded model (several slots share one model). ``spliced(slots)`` runs
every forward pass inside the block with each slot's activation replaced by its reconstruction plus its error,
``x_hat + (x - x_hat)``, at the positions that count (``valid``: not BOS / pad / a norm outlier, as in every
statistic of the dictionary); elsewhere the activation passes untouched. Numerically that is ``x`` again (up to
rounding), so the logits equal the plain model's: the tests check it. ``keep_error=False`` drops the error
term, which is the "SAE in place of x" pass the quality figures use, and ``zero=True`` puts zero in place of
``x`` (the zero-ablation baseline of "fraction of loss recovered").

``slots_in_order`` sorts slots by the order their hooks run in one forward pass, which is what the graph's
layers follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from featuredict.pipelines.model.backends import ModelBackend
from featuredict.pipelines.model.hooks import HookSite
from featuredict.pipelines.model.runtime import OUTLIER_NORM_RATIO, special_ids, valid_mask
from featuredict.pipelines.model.saes import fast_encoder, to_sae
from featuredict.pipelines.steering.edits import decoder_directions, output_scale

if TYPE_CHECKING:
    from sae_lens import SAE


@dataclass
class Slot:
    """One SAE spliced at its hook. ``name`` is the SAE's id in the database (or any label)."""

    name: str
    sae: SAE[Any]
    site: HookSite
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO

    @property
    def hook(self) -> str:
        return self.site.hook_name

    @property
    def directions(self) -> torch.Tensor:
        """Every feature's effective decoder row ``D`` ``[d_sae, d_in]`` (computed once, detached)."""
        d = self.__dict__.get("_directions")
        if d is None or d.device != self.sae.W_dec.device or d.dtype != self.sae.W_dec.dtype:
            with torch.no_grad():
                d = decoder_directions(self.sae, torch.arange(int(self.sae.cfg.d_sae), device=self.sae.W_dec.device))
            self.__dict__["_directions"] = d.detach()
        return d

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``sae.encode`` of activations ``x`` (any dtype; cast to the SAE's)."""
        return fast_encoder(self.sae)(to_sae(self.sae, x))

    def valid(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[batch, pos]`` bool: positions that count (see ``runtime.valid_mask``)."""
        tok = self.site.backend.tokenizer
        return valid_mask(ids.to(x.device), special_ids(tok), None, x, self.outlier_norm_ratio)

    def parts(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f, recon, error)`` of activations ``x`` ``[b, p, d_in]``: features (zero where not valid), the linear
        part of the reconstruction ``s(x) * (f @ D)`` and the error ``x - decode(f)``, all in the SAE's dtype.
        Where not valid, ``f`` and ``recon`` are zero and the error is zero too: the activation there is a
        constant, not a node."""
        xs = to_sae(self.sae, x)
        f = self.encode(xs) * valid.unsqueeze(-1).to(xs.dtype)
        recon = linear_decode(self.sae, f, xs, self.directions)
        base = baseline(self.sae, xs)
        err = torch.where(valid.unsqueeze(-1), xs - recon - base, torch.zeros_like(xs))
        return f, recon, err


def linear_decode(sae: SAE[Any], f: torch.Tensor, xs: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """``s(x) * (f @ D)``: the part of ``decode(f)`` linear in ``f`` (see ``steering.edits``); ``d`` is ``D``
    when the caller has it."""
    if d is None:
        d = decoder_directions(sae, torch.arange(int(sae.cfg.d_sae), device=sae.W_dec.device))
    out = f @ d
    s = output_scale(sae, xs)
    return out if s is None else out * s


def baseline(sae: SAE[Any], xs: torch.Tensor) -> torch.Tensor:
    """``decode(0)``, the activation with every feature and the error removed: ``out_x(b_dec)`` with the
    per-position de-normalisation of ``xs`` (``b_dec`` for SAEs without run-time normalisation)."""
    b = sae.b_dec.to(xs.dtype)
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm == "constant_norm_rescale":
        return b * (xs.norm(dim=-1, keepdim=True) / (sae.cfg.d_in**0.5))
    if norm == "layer_norm":
        centred = xs - xs.mean(dim=-1, keepdim=True)
        return b * centred.std(dim=-1, keepdim=True) + xs.mean(dim=-1, keepdim=True)
    return b.expand_as(xs)


@contextmanager
def spliced(
    slots: Sequence[Slot], ids: torch.Tensor, *, keep_error: bool = True, zero: bool = False
) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Every forward pass inside the block runs with each slot spliced in (see the module docstring).

    Yields a dict filled per slot name with the last pass's ``x``, ``f``, ``error`` and ``valid`` (detached).
    ``ids`` are the input ids of the passes (for the valid mask); every pass must use them.
    """
    seen: dict[str, dict[str, torch.Tensor]] = {}
    with ExitStack() as stack:
        for slot in slots:
            stack.enter_context(slot.site.intervene(splice_fn(slot, ids, seen, keep_error=keep_error, zero=zero)))
        yield seen


def splice_fn(
    slot: Slot,
    ids: torch.Tensor,
    seen: dict[str, dict[str, torch.Tensor]],
    *,
    keep_error: bool = True,
    zero: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``spliced`` puts in place of ``slot``'s activation (see there), as a function of the activation; it
    records the pass's ``x``, ``f``, ``error`` and ``valid`` under ``seen[slot.name]``."""

    def fn(act: torch.Tensor) -> torch.Tensor:
        xs = to_sae(slot.sae, act)
        valid = slot.valid(ids.expand(act.shape[0], -1), xs)
        with torch.no_grad():
            f, recon, err = slot.parts(xs, valid)
        seen[slot.name] = {"x": xs.detach(), "f": f, "error": err, "valid": valid}
        if zero:
            new = torch.zeros_like(xs)
        else:
            new = recon + baseline(slot.sae, xs) + (err if keep_error else 0.0)
        out = torch.where(valid.unsqueeze(-1), new, xs)
        return out.to(act.dtype)

    return fn


def slots_in_order(loaded: ModelBackend, slots: Sequence[Slot]) -> list[Slot]:
    """``slots`` sorted by when their hooks run in a forward pass (ValueError when two share one hook)."""
    hooks = [s.hook for s in slots]
    if len(set(hooks)) != len(hooks):
        raise ValueError("two of the SAEs read the same hook; give each hook once")
    order: list[str] = []

    def note(hook: str) -> Callable[[torch.Tensor], None]:
        def fn(act: torch.Tensor) -> None:
            order.append(hook)

        return fn

    with ExitStack() as stack:
        for s in slots:
            stack.enter_context(s.site.intervene(note(s.hook)))
        ids = torch.tensor([[int(getattr(loaded.tokenizer, "bos_token_id", None) or 0)] * 2], device=loaded.device)
        with torch.no_grad():
            loaded.forward(ids)
    rank = {h: i for i, h in enumerate(dict.fromkeys(order))}
    return sorted(slots, key=lambda s: rank.get(s.hook, len(rank)))
