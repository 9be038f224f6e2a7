"""Direct-effects mode: the model with its attention patterns and norm scales frozen (circuit-tracer's linearisation).

``Frozen(loaded)`` is a context manager. On entry it installs hooks; the first forward pass run inside it
(batch 1, the clean prompt) *records* every attention pattern ``A = softmax(QK^T / sqrt(d) + mask)`` and every
norm scale (RMSNorm ``r = 1 / sqrt(mean(x^2) + eps)``, LayerNorm ``1 / std``); every later pass *replays* them:
attention output ``A_clean @ V``, norm output ``w * x * r_clean`` (LayerNorm: ``w * (x - mean(x)) * r_clean + b``).
The replayed passes are what the gradient sees, so no gradient flows through a softmax or a norm's denominator,
and interventions inside the block run on the same frozen model (rows of a batch share the recorded values).
MLPs stay as they are: with a residual-stream SAE they are the nonlinear part that remains.

Backends:
- Hugging Face: the attention function is swapped for one registered with transformers' ``AttentionInterface``
  (eager maths, the pattern recorded or replayed); norms are hooked module by module. A norm of a kind not
  handled here raises ``FreezeError`` rather than being silently left unfrozen.
- TransformerLens: the ``hook_pattern`` and ``hook_scale`` hook points are recorded and replayed.

Every hook is a handle removed in ``finally``, and the attention implementation is restored on exit. Hooks act
only on the thread that opened the block (the frozen attention function computes plain eager attention for any
other thread), so a steering session sharing the model is not frozen by an attribution running beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from featuredict.pipelines.model.backends import HFBackend, ModelBackend, TLBackend

FROZEN_ATTN = "featuredict_frozen"


class FreezeError(ValueError):
    """The model has a part the direct-effects mode cannot freeze (one line, fit for a user)."""


class _State:
    """Recorded values of one frozen block: ``record`` until the first pass ends, then ``replay``."""

    def __init__(self) -> None:
        self.mode = "record"
        self.values: dict[int, torch.Tensor] = {}

    def put(self, key: int, value: torch.Tensor) -> torch.Tensor:
        if self.mode == "record":
            self.values[key] = value.detach()
            return value
        stored = self.values.get(key)
        if stored is None:
            raise FreezeError("a frozen pass met a module the recording pass never ran")
        return stored

    def get(self, key: int) -> torch.Tensor:
        stored = self.values.get(key)
        if stored is None:
            raise FreezeError("a frozen pass met a module the recording pass never ran")
        return stored


_LOCAL = threading.local()


def _state() -> _State | None:
    return getattr(_LOCAL, "state", None)


def _frozen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose pattern is recorded on the first pass and replayed after (see module docstring)."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    st = _state()
    if st is None or st.mode == "record":
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if st is not None:
            st.put(id(module), weights)
    else:
        weights = st.get(id(module))
    out = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, weights


def _register_attention() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(FROZEN_ATTN, _frozen_attention)
    AttentionMaskInterface.register(FROZEN_ATTN, eager_mask)


def _norm_hook(st: _State):
    def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if _state() is not st:  # another thread's pass: the model as it is
            return None
        x = inputs[0]
        xf = x.float()
        if isinstance(module, torch.nn.LayerNorm):
            centred = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps)
            scale = st.put(id(module), scale)
            y = centred * scale
            if module.weight is not None:
                y = y * module.weight.float()
            if module.bias is not None:
                y = y + module.bias.float()
        else:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            if eps is None:
                raise TypeError(f"{type(module).__name__} has no epsilon: not an RMS norm this code knows")
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + float(eps))
            scale = st.put(id(module), scale)
            y = module.weight.float() * (xf * scale)
        y = y.to(output.dtype if isinstance(output, torch.Tensor) else x.dtype)
        if st.mode == "record" and isinstance(output, torch.Tensor):
            if not torch.allclose(y, output, rtol=1e-4, atol=1e-5):
                raise FreezeError(
                    f"norm {type(module).__name__} does not compute w * x / rms(x) (or LayerNorm): the direct-effects "
                    "mode cannot freeze it; use --mode full"
                )
            return output
        return y

    return hook


def _is_norm(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.LayerNorm):
        return True
    name = type(module).__name__
    return name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)


@contextmanager
def frozen(loaded: ModelBackend) -> Iterator[_State]:
    """Record-then-replay block (see the module docstring). Not re-entrant on one thread."""
    if _state() is not None:
        raise RuntimeError("a frozen block is already active on this thread")
    st = _State()
    handles: list[RemovableHandle] = []
    restore: tuple[Any, str] | None = None
    try:
        if isinstance(loaded, TLBackend):
            for name, hp in loaded.model.hook_dict.items():
                if name.endswith("hook_pattern") or name.endswith("hook_scale"):
                    handles.append(
                        hp.register_forward_hook(lambda m, i, o: st.put(id(m), o) if _state() is st else None)
                    )
        elif isinstance(loaded, HFBackend):
            _register_attention()
            cfg = loaded.model.config
            old = getattr(cfg, "_attn_implementation", None) or "sdpa"
            _set_attn(loaded.model, FROZEN_ATTN)
            restore = (loaded.model, old)
            for _, mod in loaded.model.named_modules():
                if _is_norm(mod):
                    handles.append(mod.register_forward_hook(_norm_hook(st)))
        else:
            raise FreezeError(f"the direct-effects mode does not support {type(loaded).__name__} models")
        _LOCAL.state = st
        yield st
    finally:
        _LOCAL.state = None
        for h in handles:
            h.remove()
        if restore is not None:
            _set_attn(*restore)


def _set_attn(model: torch.nn.Module, name: str) -> None:
    """Set the attention implementation on the model's config and every sub-config that carries one."""
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            try:
                cfg._attn_implementation = name
            except (AttributeError, ValueError):
                cfg.__dict__["_attn_implementation"] = name


def end_recording(st: _State) -> None:
    """Switch a frozen block from recording (the clean pass just ran) to replaying."""
    if not st.values:
        raise FreezeError("the recording pass froze nothing: no attention or norm module was found")
    st.mode = "replay"
