"""Loading SAEs with sae-lens: registry releases (the main path online) and local sae-lens folders."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from featuredict.db.errors import UserError, one_line

if TYPE_CHECKING:
    from sae_lens import SAE


class SaeLoadError(UserError, RuntimeError):
    """An SAE that cannot be loaded, with a one-line message fit to show a user."""


@dataclass(frozen=True)
class SaeSource:
    """Where an SAE comes from: ``kind='registry'`` (release + sae_id) or ``kind='folder'`` (path)."""

    kind: str
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SaeSource:
        return cls(**json.loads(text))

    @classmethod
    def parse(cls, spec: str) -> SaeSource:
        """``path/to/folder`` (a local sae-lens folder) or ``RELEASE:SAE_ID`` (a sae-lens registry entry)."""
        p = Path(spec).expanduser()
        if p.exists():
            return cls(kind="folder", path=str(p.resolve()))
        if ":" in spec:
            release, sae_id = spec.split(":", 1)
            return cls(kind="registry", release=release, sae_id=sae_id)
        raise SaeLoadError(
            f"SAE {spec!r} is neither an existing sae-lens folder nor RELEASE:SAE_ID "
            "(e.g. gpt2-small-res-jb:blocks.8.hook_resid_pre)"
        )

    def describe(self) -> str:
        return f"{self.release}:{self.sae_id}" if self.kind == "registry" else str(self.path)


def load_sae(source: SaeSource, device: str | torch.device = "cpu", dtype: str = "float32") -> SAE[Any]:
    """Load an SAE (float32 unless asked otherwise, whatever the model runs in); raise SaeLoadError with a
    one-line reason on failure."""
    from sae_lens import SAE

    try:
        with warnings.catch_warnings():
            # sae-lens advises loading the model with the SAE's model_from_pretrained_kwargs: load_runtime does
            # (for the backends whose loader takes them); train-sae records the model dtype there
            warnings.filterwarnings("ignore", message=r"(?s).*non-empty model_from_pretrained_kwargs")
            if source.kind == "folder":
                folder = Path(source.path or "")
                if not (folder / "cfg.json").exists():
                    raise SaeLoadError(f"{folder} is not a sae-lens SAE folder (no cfg.json)")
                sae = SAE.load_from_disk(str(folder), device=str(device), dtype=dtype)
            elif source.kind == "registry":
                sae = SAE.from_pretrained(source.release, source.sae_id, device=str(device), dtype=dtype)
            else:
                raise SaeLoadError(f"unknown SAE source kind {source.kind!r}")
    except SaeLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear line for the user
        raise SaeLoadError(f"cannot load SAE {source.describe()}: {one_line(e, with_type=True)}") from e
    sae.eval()
    return sae


def to_sae(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    """``x`` on the SAE's device in its dtype (the weights' own, whatever the model ran in); no copy if already."""
    w = sae.W_dec
    if x.dtype == w.dtype and x.device == w.device:
        return x
    return x.to(device=w.device, dtype=w.dtype)


#: ``normalize_activations`` modes that scale the SAE's input by a per-token norm at run time
NORM_SCALED = ("constant_norm_rescale", "layer_norm")


class Active(NamedTuple):
    """The non-zero entries of feature activations ``f`` ``[..., d_sae]`` in ``nonzero``'s order: ``token`` is
    the row of ``f.reshape(-1, d_sae)``, ascending, ``feature`` ascending within a token, ``value`` the entry."""

    token: torch.Tensor  # [nnz] int64
    feature: torch.Tensor  # [nnz] int64
    value: torch.Tensor  # [nnz], f's dtype


def active_entries(f: torch.Tensor) -> Active:
    """The non-zero entries of a dense ``f`` ``[..., d_sae]`` (one pass over it)."""
    f2 = f.reshape(-1, f.shape[-1])
    token, feature = f2.nonzero(as_tuple=True)
    return Active(token, feature, f2[token, feature])


def fast_encoder(sae: SAE[Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sae.encode``, or for a plain sae-lens ``TopKSAE`` the same tensor operations inlined.

    The inline path runs exactly sae-lens' ``TopKSAE.encode`` (``process_sae_in`` without runtime
    normalisation, ``@ W_enc + b_enc``, ``* ||W_dec||`` when rescaling, ``TopK``) minus its Python overhead
    (hook points, per-call decoder norms) and its temporaries (the bias, the rescale and the scatter act in
    place on one ``[..., d_sae]`` tensor), so the result is bitwise identical (tested); it is used only when the
    SAE has no runtime normalisation, no reshaping and no hooks on its hook points, else ``sae.encode``. The
    weights are read when it is made: make a new one after changing them.
    """
    enc = topk_encoder(sae)
    if enc is None:
        return sae.encode
    return lambda x: enc(x)[0]


def topk_encoder(sae: SAE[Any]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """For a plain sae-lens ``TopKSAE`` (see ``fast_encoder``), ``x -> (f, values, indices)``: ``f`` as
    ``sae.encode(x)`` gives it (bitwise) and the top-k it was scattered from, ``[..., k]`` each (``values``
    after the ReLU, indices in no particular order). None for any other SAE."""
    select = topk_selector(sae)
    if select is None:
        return None

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, idx, h = select(x)
        return h.zero_().scatter_(-1, idx, values), values, idx

    return encode


def topk_selector(sae: SAE[Any]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """``topk_encoder`` without the scatter: ``x -> (values, indices, h)``, the top-k of the pre-activations
    ``h`` ``[..., d_sae]`` (which the caller may overwrite: ``topk_encoder`` scatters into it). None for any
    SAE but a plain sae-lens ``TopKSAE``."""
    try:
        from sae_lens.saes.topk_sae import TopK, TopKSAE
    except ImportError:  # pragma: no cover - sae-lens layout changed
        return None
    act = getattr(sae, "activation_fn", None)
    plain = (
        type(sae) is TopKSAE
        and isinstance(act, TopK)
        and not act.use_sparse_activations
        and getattr(sae.cfg, "normalize_activations", "none") not in NORM_SCALED
        and getattr(sae.cfg, "reshape_activations", "none") in (None, "none")
        and not getattr(sae, "hook_z_reshaping_mode", False)
        and not any(
            getattr(sae, hp)._forward_hooks or getattr(sae, hp)._forward_pre_hooks
            for hp in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post")
        )
    )
    if not plain:
        return None
    assert isinstance(act, TopK)
    with torch.no_grad():
        w_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
        bias = (sae.b_dec * sae.cfg.apply_b_dec_to_input).detach()
        norms = sae.W_dec.detach().norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
    k, dtype = int(act.k), sae.dtype

    def select(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = (x.to(dtype) - bias) @ w_enc
        h.add_(b_enc)
        if norms is not None:
            h.mul_(norms)
        values, idx = torch.topk(h, k=k, dim=-1, sorted=False)
        return values.relu_(), idx, h

    return select


def topk_active(values: torch.Tensor, idx: torch.Tensor, keep_rows: torch.Tensor | None = None) -> Active:
    """``active_entries`` of the ``f`` a top-k scattered, without a pass over ``f``: ``values``, ``idx``
    ``[..., k]`` as ``topk_encoder`` gives them; ``keep_rows`` ``[...]`` bool: rows zeroed in ``f`` after."""
    k = idx.shape[-1]
    idx2, perm = idx.reshape(-1, k).sort(dim=-1)
    val2 = values.reshape(-1, k).gather(-1, perm)
    keep = val2 != 0
    if keep_rows is not None:
        keep &= keep_rows.reshape(-1, 1)
    token = torch.arange(idx2.shape[0], device=idx.device)[:, None].expand_as(idx2)
    return Active(token[keep], idx2[keep], val2[keep])


def sae_metadata(sae: SAE[Any]) -> dict[str, Any]:
    """The SAE's training metadata (hook name, model, context size, prepend_bos...) as a plain dict."""
    meta = getattr(sae.cfg, "metadata", None)
    return dict(meta.to_dict()) if meta is not None and hasattr(meta, "to_dict") else {}


@dataclass
class SaeRunStats:
    """What one run of model + SAE over a corpus measured (a build's harvest, a training run's evaluation): the
    reconstruction's fraction of variance explained, mean active features per token, the share of features
    that never fired, wall seconds, tokens per second and the dtype the model ran in."""

    fve: float
    l0: float
    dead_fraction: float
    seconds: float
    tokens_per_s: float
    dtype: str
