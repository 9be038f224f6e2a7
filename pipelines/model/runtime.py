"""A model + SAE + hook site bundle: what the build, prompt search and steering all run.

``Runtime.encode`` is the one activation path: it runs the model only up to the hook, moves the activations to
the SAE's device and dtype and encodes them, giving ``(x, f, valid)`` with feature activations zeroed where
a token does not count (BOS, padding, attention-sink norm outliers). The build's harvest, train-sae's
evaluation, ``feature_acts`` and the dashboard's prompt search all read activations through it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featuredict.db.records import SaeRecord, sae_record
from featuredict.pipelines.harvest.stages import StageTimes, timed
from featuredict.pipelines.model.backends import ModelBackend, backend_for_hook
from featuredict.pipelines.model.hooks import HookSite
from featuredict.pipelines.model.loading import load_model, pick_device
from featuredict.pipelines.model.saes import (
    Active,
    SaeSource,
    active_entries,
    fast_encoder,
    load_sae,
    sae_metadata,
    to_sae,
    topk_active,
    topk_selector,
)

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformers import PreTrainedTokenizerBase

_TOKEN_CACHE: dict[int, dict[int, str]] = {}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0 (padding is masked)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Display text of each token id on its own, cached per tokenizer."""
    cache = _TOKEN_CACHE.setdefault(id(tokenizer), {})
    out = []
    for i in ids:
        s = cache.get(i)
        if s is None:
            piece = tokenizer.convert_ids_to_tokens(int(i))
            text = str(tokenizer.decode([int(i)]))
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            cache[i] = s = text
        out.append(s)
    return out


def norm_outliers(x: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[batch, pos]`` bool: valid positions whose ``||x||`` exceeds ``ratio`` x their context's median norm.

    Per context (not per batch), so re-running one stored context reproduces the mask exactly.
    """
    norms = x.detach().float().norm(dim=-1).cpu()
    v = valid.cpu()
    med = torch.nanmedian(torch.where(v, norms, torch.nan), dim=1).values  # [batch]
    return (v & (norms > ratio * med.unsqueeze(1))).to(valid.device)


OUTLIER_NORM_RATIO = 10.0


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that never count in statistics: BOS and pad."""
    ids = {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "pad_token_id", None)}
    return {int(i) for i in ids if i is not None}


def valid_mask(
    input_ids: torch.Tensor,
    specials: set[int],
    attention_mask: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO,
) -> torch.Tensor:
    """``[batch, pos]`` bool: True where the token counts (not a special id, not masked, not a norm outlier of
    the hook activations ``x`` when given and ``outlier_norm_ratio`` > 0). ``Runtime.valid_mask`` and
    train-sae's activation cache both use it."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    for sid in specials:
        mask &= input_ids != sid
    if attention_mask is not None:
        mask &= attention_mask.bool()
    if x is not None and outlier_norm_ratio > 0:
        mask &= ~norm_outliers(x, mask, outlier_norm_ratio)
    return mask


@dataclass
class Runtime:
    backend: ModelBackend
    sae: SAE[Any]
    site: HookSite
    source: SaeSource
    prepend_bos: bool = True
    context_size: int = 128
    # Positions whose hook-activation norm exceeds this multiple of their context's median norm are excluded
    # from statistics like BOS ("massive activations" at attention-sink positions; SmolLM2 has ~50x outliers
    # on some first tokens). 0 disables.
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backend.tokenizer

    @property
    def pad_id(self) -> int:
        """The token id batches of contexts are padded with (see ``pad_token_id``)."""
        return pad_token_id(self.tokenizer)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 - sae-lens naming
        """Decoder, ``[d_sae, d_in]``."""
        return self.sae.W_dec

    def special_ids(self) -> set[int]:
        return special_ids(self.tokenizer)

    def tokenize(self, text: str, max_len: int | None = None) -> torch.Tensor:
        """``[1, pos]`` token ids, with BOS prepended when the SAE was trained that way."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self.prepend_bos and bos is not None:
            ids = [bos, *ids]
        if max_len is not None:
            ids = ids[:max_len]
        return torch.tensor([ids], dtype=torch.long)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token as display text, keeping its leading space (sentencepiece '▁' pieces included)."""
        return token_strings(self.tokenizer, ids)

    def valid_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[batch, pos]`` bool: True where the token counts in statistics (not BOS/pad, not a norm outlier).

        Norm outliers are only detected when the hook activations ``x`` ``[batch, pos, d_in]`` are given.
        """
        return valid_mask(input_ids, self.special_ids(), attention_mask, x, self.outlier_norm_ratio)

    def check_width(self, d_in: int) -> Runtime:
        """Raise ValueError unless activations at the hook have the SAE's input width."""
        x = self.hook_acts(self.tokenize("Hello world", max_len=8))
        if x.shape[-1] != d_in:
            raise ValueError(
                f"activations at {self.site.hook_name} have width {x.shape[-1]} but the SAE expects "
                f"d_in={d_in}: wrong model or hook"
            )
        return self

    @torch.no_grad()
    def hook_acts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Activations at the hook, ``[batch, pos, d_in]``, in the SAE's dtype on the SAE's device."""
        return to_sae(self.sae, self.site.activations(input_ids, attention_mask))

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        stages: StageTimes | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one activation path: ``(x, f, valid)`` from one forward pass up to the hook.

        ``x`` ``[batch, pos, d_in]``: hook activations in the SAE's dtype on its device; ``f``
        ``[batch, pos, d_sae]``: SAE feature activations, zero where not valid (only valid positions are run through
        the SAE); ``valid`` ``[batch, pos]`` bool on
        the SAE's device: False at BOS/pad/masked positions and at norm outliers (see ``valid_mask``).
        With ``stages``, the forward pass is timed as ``forward`` and the rest as ``encode``.
        """
        x, f, valid, _ = self._encode(input_ids, attention_mask, stages, with_active=False)
        return x, f, valid

    @torch.no_grad()
    def encode_active(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        stages: StageTimes | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Active]:
        """``encode``'s ``(x, f, valid)`` and ``f``'s non-zero entries (``saes.Active``), which a TopK SAE's
        encoder gives without a pass over ``f`` (other SAEs: ``active_entries(f)``)."""
        x, f, valid, active = self._encode(input_ids, attention_mask, stages, with_active=True)
        assert active is not None
        return x, f, valid, active

    def _encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        stages: StageTimes | None,
        with_active: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Active | None]:
        with timed(stages, "forward"):
            x = self.hook_acts(input_ids, attention_mask)
        with timed(stages, "encode"):
            valid = self.valid_mask(input_ids, attention_mask, x).to(x.device)
            rows = valid.reshape(-1)
            xv = x[valid]  # only the positions that count are encoded (not BOS, padding or norm outliers)
            n, select = rows.shape[0], topk_selector(self.sae)
            active = None
            if select is not None:  # the top-k of each encoded row, scattered once into a zeroed f
                v, i, _ = select(xv)
                values = v.new_zeros((n, v.shape[-1]))
                idx = torch.zeros((n, i.shape[-1]), dtype=i.dtype, device=i.device)
                values[rows], idx[rows] = v, i
                f = torch.zeros((n, self.d_sae), dtype=v.dtype, device=v.device).scatter_(1, idx, values)
                if with_active:
                    active = topk_active(values, idx, rows)
            else:
                fv = fast_encoder(self.sae)(xv)
                f = fv.new_zeros((n, fv.shape[-1]))
                f[rows] = fv
                if with_active:
                    active = active_entries(f)
        return x, f.view(*valid.shape, f.shape[-1]), valid, active

    def decode(self, f: torch.Tensor, active: Active | None = None) -> torch.Tensor:
        """The SAE's reconstruction of feature activations ``f`` ``[..., d_sae]``: ``decode(self.sae, f, active)``."""
        return decode(self.sae, f, active)

    @torch.no_grad()
    def feature_acts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """SAE feature activations ``[batch, pos, d_sae]``; zero on BOS/pad positions and norm outliers."""
        return self.encode(input_ids, attention_mask)[1]


@torch.no_grad()
def decode(sae: Any, f: torch.Tensor, active: Active | None = None) -> torch.Tensor:
    """``sae``'s reconstruction of feature activations ``f`` ``[..., d_sae]``, as ``sae.decode`` gives it.

    For TopK SAEs (whose ``decode`` is sae-lens's ``TopKSAE.decode``: ``f @ W_dec + b_dec``, with ``f`` first
    divided by the decoder rows' norms when ``rescale_acts_by_decoder_norm``, then its output hook and norm),
    only the active features' decoder rows are summed (``embedding_bag`` over the non-zero entries): k of d_sae
    per token, instead of a dense ``[tokens, d_sae] @ [d_sae, d_in]`` product; ``active`` (``f``'s non-zero
    entries, when the caller has them) saves the pass that finds them. Other SAEs decode densely.
    """
    if not _sparse_decode(sae) or f.layout != torch.strided or f.dim() < 2:
        return sae.decode(f)
    rows, cols, weights = active_entries(f) if active is None else active  # each token's entries contiguous
    offsets = torch.searchsorted(rows, torch.arange(f[..., 0].numel(), device=f.device))
    w_dec = sae.W_dec
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        weights = weights * (1 / w_dec.norm(dim=-1))[cols]  # as sae-lens's act_times_W_dec scales f
    out = torch.nn.functional.embedding_bag(cols, w_dec, offsets, mode="sum", per_sample_weights=weights)
    out = sae.hook_sae_recons(out.reshape(*f.shape[:-1], w_dec.shape[1]) + sae.b_dec)
    out = sae.run_time_activation_norm_fn_out(out)
    return sae.reshape_fn_out(out, sae.d_head)


def _sparse_decode(sae: Any) -> bool:
    """Whether the SAE's decode is sae-lens's ``TopKSAE.decode`` itself (with or without decoder-norm
    rescaling), which ``Runtime.decode`` reproduces sparsely."""
    try:
        from sae_lens import TopKSAE
    except ImportError:
        return False
    return getattr(type(sae), "decode", None) is TopKSAE.decode


def load_runtime(
    model_spec: str,
    source: SaeSource,
    *,
    hook_name: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    sae: SAE[Any] | None = None,
) -> Runtime:
    """Load model and SAE and splice them at the SAE's hook (or ``hook_name`` when given).

    The model runs in ``dtype``, else ``default_dtype`` of the device (float32 on CPU); the SAE stays float32.
    """
    dev = pick_device(device)
    if sae is None:
        sae = load_sae(source, device=dev)
    meta = sae_metadata(sae)
    hook = hook_name or meta.get("hook_name")
    if not hook:
        raise ValueError("the SAE's config names no hook_name; pass --hook")
    kwargs = dict(meta.get("model_from_pretrained_kwargs") or {})
    kwargs.update(model_kwargs or {})
    backend = backend_for_hook(hook)
    loaded = load_model(
        model_spec, hook_kind=backend.kind, device=str(dev), dtype=dtype, model_kwargs=backend.sae_model_kwargs(kwargs)
    )
    site = HookSite(loaded, hook)
    d_in = int(sae.cfg.d_in)
    prepend = meta.get("prepend_bos")
    return Runtime(
        backend=loaded,
        sae=sae,
        site=site,
        source=source,
        prepend_bos=True if prepend is None else bool(prepend),
        context_size=int(meta.get("context_size") or 128),
    ).check_width(d_in)


_CACHE: dict[tuple, Runtime] = {}
_CACHE_LOCK = threading.Lock()


def runtime_from_row(row: SaeRecord | Mapping[str, Any], device: str | None = None) -> Runtime:
    """Load the runtime that built a ``saes`` row (an ``SaeRecord``, or the row's mapping)."""
    rec = sae_record(row)
    rt = load_runtime(
        rec.model_spec,
        SaeSource.from_json(rec.sae_source),
        hook_name=rec.hook_name,
        device=device,
        dtype=rec.reload_dtype,
        model_kwargs=dict(rec.model_kwargs),
    )
    rt.prepend_bos = rec.prepend_bos
    rt.outlier_norm_ratio = rec.outlier_norm_ratio
    # rt.context_size stays the SAE's training context (from its config): saes.context_size is the build's
    # (usually shorter) display window, not what the SAE was trained on
    return rt


def _weights_stamp(source: str) -> int | None:
    """Newest modification time of a local SAE folder's files, so a retrained folder is loaded again."""
    try:
        src = SaeSource.from_json(source)
        if src.kind != "folder" or not src.path:
            return None
        return max((f.stat().st_mtime_ns for f in Path(src.path).iterdir() if f.is_file()), default=None)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def runtime_cache_key(row: SaeRecord | Mapping[str, Any], device: str | None = None) -> tuple:
    """Everything ``runtime_from_row`` reads from the row, plus the device and the SAE folder's file times."""
    rec = sae_record(row)
    return (
        rec.model_spec,
        rec.sae_source,
        rec.hook_name,
        rec.reload_dtype,
        json.dumps(rec.model_kwargs, sort_keys=True),
        rec.prepend_bos,
        rec.outlier_norm_ratio,
        device,
        _weights_stamp(rec.sae_source),
    )


def cached_runtime_from_row(row: SaeRecord | Mapping[str, Any], device: str | None = None) -> Runtime:
    """Process-wide cache of runtimes (each loaded once), keyed by ``runtime_cache_key``.

    Rows that differ in settings get their own runtime. One loaded from older files of the same SAE folder
    (retrained since) is dropped, so a retrained SAE is not served stale and old copies do not pile up.
    """
    rec = sae_record(row)
    key = runtime_cache_key(rec, device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if k[:2] == key[:2] and k[-1] != key[-1]]:
                del _CACHE[old]
            _CACHE[key] = runtime_from_row(rec, device)
        return _CACHE[key]
