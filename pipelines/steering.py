"""Live steering with SAE features: typed configs, the exact activation edit, and streamed generation.

The edit
--------
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

Modes, per feature ``i``:
- ``clamp`` (value ``v``, in activation units): ``Δf_i = v - f_i(x)``, so the feature reads ``v``.
- ``add`` (value ``a``, in units of the feature's max observed activation ``features.max_act``):
  ``Δf_i = a * max_act_i``, i.e. ``x <- x + a * max_act_i * s(x) * D[i]``; no encode needed.

Positions: ``all`` edits every prompt and generated position; ``generated`` edits from the last prompt token
on (the positions whose outputs predict the generated tokens), leaving the prompt's other positions (and so
its cached keys/values) untouched. BOS/pad positions are never edited: the SAE statistics exclude them and
their activations are outliers.

Generation runs our own token loop (KV cache for Hugging Face models) so that baseline and steered runs are
streamed token by token, share the sampling seed, and the steered features' activations on the generated
tokens are measured inside the steered run. The hook is entered around each forward pass only (never across a
``yield``), so an abandoned or closed stream never leaves a hook behind, and interleaving a baseline and a
steered stream in one thread cannot mix them.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

Mode = Literal["clamp", "add"]
Positions = Literal["all", "generated"]
MODES: tuple[str, ...] = ("clamp", "add")
POSITIONS: tuple[str, ...] = ("all", "generated")

# Limits on user input; anything outside gets a one-line SteeringInputError.
MAX_ADD = 100.0  # |a| for add, in units of max_act
MAX_CLAMP_MULTIPLE = 100.0  # |v| for clamp, in units of max_act (when max_act > 0)
MAX_ABS_VALUE = 1e4  # |v| for clamp in activation units, always
MAX_NEW_TOKENS = 1024
MAX_TEMPERATURE = 5.0
MIN_TEMPERATURE = 0.01  # below this, sampling is greedy in all but name and 1/T overflows
MAX_FEATURES = 32
NORM_SCALED = ("constant_norm_rescale", "layer_norm")


class SteeringInputError(ValueError):
    """Bad steering input, with a one-line message fit to show a user as is."""


# ---- configs --------------------------------------------------------------------------------------------
def _parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SteeringInputError(f"{what}: {text!r} is not a number") from None


@dataclass(frozen=True)
class FeatureEdit:
    """One feature to steer: ``clamp`` its activation to ``value`` or ``add`` ``value`` x max_act."""

    feature: int
    mode: str = "clamp"
    value: float = 0.0

    def spec(self) -> str:
        """``ID=MODE:VALUE``, the form ``parse`` reads (CLI ``--feature`` and the URL ``feature`` param)."""
        return f"{self.feature}={self.mode}:{self.value:g}"

    @classmethod
    def parse(cls, text: str, default: FeatureEdit | None = None) -> FeatureEdit:
        """Read ``ID=VALUE`` (clamp), ``ID=clamp:VALUE``, ``ID=add:VALUE``; a bare ``ID`` takes ``default``'s
        mode and value (an error when no default is given)."""
        s = text.strip()
        if not s:
            raise SteeringInputError("empty feature spec; use ID=VALUE or ID=add:VALUE")
        fid, sep, rest = s.partition("=")
        try:
            feature = int(fid.strip())
        except ValueError:
            raise SteeringInputError(f"feature id {fid.strip()!r} in {s!r} is not an integer") from None
        if not sep:
            if default is None:
                raise SteeringInputError(f"feature {feature} has no value; use {feature}=VALUE or {feature}=add:VALUE")
            return cls(feature, default.mode, default.value)
        mode, colon, val = rest.strip().partition(":")
        if not colon:
            mode, val = "clamp", rest
        mode = mode.strip().lower()
        if mode not in MODES:
            raise SteeringInputError(f"unknown mode {mode!r} in {s!r}; use clamp or add")
        return cls(feature, mode, _parse_float(val.strip(), f"value of feature {feature}"))


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class SteeringConfig:
    """Everything a steering run needs besides the model: what a preset stores and a URL shares."""

    prompt: str
    edits: tuple[FeatureEdit, ...] = ()
    positions: str = "all"  # 'all' | 'generated'
    chat_template: bool = True  # apply the tokenizer's chat template when it has one
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["edits"] = [asdict(e) for e in self.edits]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SteeringConfig:
        try:
            edits = tuple(
                FeatureEdit(int(e["feature"]), str(e.get("mode", "clamp")), float(e.get("value", 0.0)))
                for e in d.get("edits", ())
            )
            gen = GenerationSettings(**dict(d.get("generation") or {}))
            return cls(
                prompt=str(d.get("prompt", "")),
                edits=edits,
                positions=str(d.get("positions", "all")),
                chat_template=bool(d.get("chat_template", True)),
                generation=gen,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SteeringInputError(f"malformed steering config: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> SteeringConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SteeringInputError(f"malformed steering config JSON: {e}") from None

    # ---- URL sharing: steer?sae=ID&feature=3=clamp:5,17=add:0.5&prompt=...&pos=generated&chat=0&n=40&t=0.7&top_p=0.9&seed=1
    def to_query_params(self) -> dict[str, str]:
        g = self.generation
        q = {
            "feature": ",".join(e.spec() for e in self.edits),
            "prompt": self.prompt,
            "pos": self.positions,
            "chat": "1" if self.chat_template else "0",
            "n": str(g.max_new_tokens),
            "t": f"{g.temperature:g}",
            "top_p": f"{g.top_p:g}",
            "seed": str(g.seed),
        }
        return {k: v for k, v in q.items() if v != ""}

    @classmethod
    def from_query_params(cls, params: Mapping[str, str], default_edit: FeatureEdit | None = None) -> SteeringConfig:
        """Inverse of ``to_query_params``; missing params take defaults. ``feature`` may be one id or a comma
        list of ids (each gets ``default_edit``) or full ``ID=MODE:VALUE`` specs."""
        base = cls(prompt="")
        g = base.generation
        edits = parse_feature_list(params.get("feature", ""), default_edit or FeatureEdit(0, "add", 1.0))

        def num(key: str, conv: type, default: Any) -> Any:
            raw = params.get(key)
            if raw is None or raw == "":
                return default
            try:
                return conv(raw)
            except ValueError:
                raise SteeringInputError(f"URL parameter {key}={raw!r} is not a valid {conv.__name__}") from None

        return cls(
            prompt=params.get("prompt", ""),
            edits=edits,
            positions=params.get("pos", base.positions),
            chat_template=params.get("chat", "1") not in ("0", "false", "no"),
            generation=GenerationSettings(
                max_new_tokens=num("n", int, g.max_new_tokens),
                temperature=num("t", float, g.temperature),
                top_p=num("top_p", float, g.top_p),
                seed=num("seed", int, g.seed),
            ),
        )

    def describe(self) -> str:
        return " ".join(e.spec() for e in self.edits) or "(no features)"


def parse_feature_list(text: str, default_edit: FeatureEdit | None = None) -> tuple[FeatureEdit, ...]:
    """``'3'``, ``'3,17'`` or ``'3=clamp:5,17=add:0.5'`` -> edits (bare ids take ``default_edit``)."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    return tuple(FeatureEdit.parse(p, default_edit) for p in parts)


# ---- validation -----------------------------------------------------------------------------------------
def validate_config(
    config: SteeringConfig,
    d_sae: int,
    max_acts: Mapping[int, float] | None = None,
) -> None:
    """Raise SteeringInputError (one line) for an unusable config.

    ``max_acts`` maps feature id -> features.max_act for the SAE (all its features); when given, ids missing
    from it are unknown. Without it, ids are checked against ``d_sae`` only and ``add`` is refused (its unit is
    max_act).
    """
    if not config.prompt or not config.prompt.strip():
        raise SteeringInputError("the prompt is empty; type a prompt to continue")
    if config.positions not in POSITIONS:
        raise SteeringInputError(f"positions must be 'all' or 'generated', not {config.positions!r}")
    if len(config.edits) > MAX_FEATURES:
        raise SteeringInputError(f"{len(config.edits)} features selected; steer at most {MAX_FEATURES} at once")
    seen: set[int] = set()
    for e in config.edits:
        if isinstance(e.feature, bool) or not isinstance(e.feature, int):
            raise SteeringInputError(f"feature id {e.feature!r} is not an integer")
        if e.feature < 0 or e.feature >= d_sae:
            raise SteeringInputError(f"unknown feature id {e.feature}: this SAE has features 0..{d_sae - 1}")
        if max_acts is not None and e.feature not in max_acts:
            raise SteeringInputError(f"unknown feature id {e.feature}: it is not in this SAE's feature table")
        if e.feature in seen:
            raise SteeringInputError(f"feature {e.feature} is listed twice; give each feature one edit")
        seen.add(e.feature)
        if e.mode not in MODES:
            raise SteeringInputError(f"feature {e.feature}: unknown mode {e.mode!r}; use clamp or add")
        v = e.value
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SteeringInputError(f"feature {e.feature}: value {v!r} is not a finite number")
        mx = None if max_acts is None else float(max_acts[e.feature])
        if e.mode == "add":
            if mx is None:
                raise SteeringInputError(
                    f"feature {e.feature}: add is in units of the feature's max activation, which is unknown here; "
                    "use clamp"
                )
            if not mx > 0:
                raise SteeringInputError(
                    f"feature {e.feature} never fired on the corpus (max_act {mx:g}), so add (in units of max_act) "
                    "does nothing; use clamp"
                )
            if not math.isfinite(mx):
                raise SteeringInputError(f"feature {e.feature}: its stored max_act {mx:g} is not finite; use clamp")
            if abs(v) > MAX_ADD:
                raise SteeringInputError(
                    f"feature {e.feature}: add {v:g} x max_act is absurd; keep |value| <= {MAX_ADD:g}"
                )
        else:
            limit = MAX_ABS_VALUE if mx is None or not mx > 0 else min(MAX_ABS_VALUE, MAX_CLAMP_MULTIPLE * mx)
            if abs(v) > limit:
                extra = "" if mx is None else f" (max_act {mx:.3g})"
                raise SteeringInputError(
                    f"feature {e.feature}: clamp value {v:g} is absurd{extra}; keep |value| <= {limit:.4g}"
                )
    g = config.generation
    if (
        isinstance(g.max_new_tokens, bool)
        or not isinstance(g.max_new_tokens, int)
        or not (1 <= g.max_new_tokens <= MAX_NEW_TOKENS)
    ):
        raise SteeringInputError(f"max new tokens must be an integer in 1..{MAX_NEW_TOKENS}, not {g.max_new_tokens!r}")
    if (
        not isinstance(g.temperature, int | float)
        or not math.isfinite(g.temperature)
        or not (0 <= g.temperature <= MAX_TEMPERATURE)
        or 0 < g.temperature < MIN_TEMPERATURE
    ):
        raise SteeringInputError(
            f"temperature must be 0 (greedy) or in {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}, not {g.temperature!r}"
        )
    if not isinstance(g.top_p, int | float) or not math.isfinite(g.top_p) or not (0 < g.top_p <= 1):
        raise SteeringInputError(f"top-p must be in (0, 1], not {g.top_p!r}")
    if isinstance(g.seed, bool) or not isinstance(g.seed, int) or not (0 <= g.seed < 2**63):
        raise SteeringInputError(f"seed must be a non-negative integer, not {g.seed!r}")


# ---- the edit (pure functions) --------------------------------------------------------------------------
def decoder_directions(sae: Any, features: torch.Tensor) -> torch.Tensor:
    """Effective decoder rows ``D[features]``, ``[n, d_in]``: ``L(e_i)`` of the SAE's linear decode.

    ``W_dec[i] / ||W_dec[i]||`` when the SAE rescales activations by decoder norm (sae-lens
    ``act_times_W_dec``), else ``W_dec[i]``.
    """
    w = sae.W_dec[features.to(sae.W_dec.device)]
    if bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)):
        # a zero decoder row has no direction: it edits nothing (sae-lens would divide by zero there too)
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return w


def output_scale(sae: Any, x: torch.Tensor) -> torch.Tensor | None:
    """Slope ``s(x)`` of the SAE's run-time output de-normalisation, ``[..., 1]``; None when it is 1.

    ``x`` is ``[..., d_in]`` in the SAE's dtype; mirrors sae-lens ``_setup_activation_normalization``.
    """
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / (sae.cfg.d_in**0.5)
    if norm == "layer_norm":
        return (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
    return None


def check_steerable(sae: Any) -> None:
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


def fast_encoder(sae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sae.encode``, or for a plain sae-lens ``TopKSAE`` the same tensor operations inlined.

    The inline path runs exactly sae-lens' ``TopKSAE.encode`` (``process_sae_in`` without runtime
    normalisation, ``@ W_enc + b_enc``, ``* ||W_dec||`` when rescaling, ``TopK``) minus its Python overhead
    (hook points, per-call decoder norms), so the result is bitwise identical (tested); it is used only when
    the SAE has no runtime normalisation, no reshaping and no hooks on its hook points, else ``sae.encode``.
    """
    try:
        from sae_lens.saes.topk_sae import TopK, TopKSAE
    except ImportError:  # pragma: no cover - sae-lens layout changed
        return sae.encode
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
        return sae.encode
    with torch.no_grad():
        w_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
        bias = (sae.b_dec * sae.cfg.apply_b_dec_to_input).detach()
        norms = sae.W_dec.detach().norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
    k, dtype = int(act.k), sae.dtype

    def encode(x: torch.Tensor) -> torch.Tensor:
        h = (x.to(dtype) - bias) @ w_enc + b_enc
        if norms is not None:
            h = h * norms
        values, idx = torch.topk(h, k=k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter_(-1, idx, values.relu())

    return encode


@dataclass(frozen=True)
class EditPlan:
    """Resolved edits as tensors on the SAE's device (use ``dataclasses.replace`` to change a field).

    features:   ``[n]`` long, feature ids
    is_clamp:   ``[n]`` bool, clamp (True) or add (False)
    values:     broadcastable to ``[..., n]``: clamp target ``v`` (activation units) or, for add, the
                activation increment ``a * max_act`` (already multiplied)
    directions: ``[n, d_in]`` effective decoder rows ``D[features]`` (see ``decoder_directions``)

    Derived once: ``clamp_pos`` (indices into ``features`` of the clamps, ``[n_clamp]``), ``clamp_values``
    (``[..., n_clamp]``), ``clamp_dirs`` (``[n_clamp, d_in]``) and ``add_delta`` (``[..., d_in]``, the summed
    add edits ``Σ values_j D_j`` before the output scale; None without adds).
    """

    features: torch.Tensor
    is_clamp: torch.Tensor
    values: torch.Tensor
    directions: torch.Tensor
    clamp_pos: torch.Tensor = field(init=False)
    clamp_values: torch.Tensor = field(init=False)
    clamp_dirs: torch.Tensor = field(init=False)
    add_delta: torch.Tensor | None = field(init=False)
    all_clamp: bool = field(init=False)
    needs_encode: bool = field(init=False)

    def __post_init__(self) -> None:
        n = int(self.features.numel())
        vals = self.values.expand(*self.values.shape[:-1], n) if self.values.dim() else self.values.expand(n)
        cpos = self.is_clamp.nonzero().flatten()
        apos = (~self.is_clamp).nonzero().flatten()
        sets = object.__setattr__
        sets(self, "clamp_pos", cpos)
        sets(self, "all_clamp", bool(cpos.numel() == n))
        sets(self, "needs_encode", bool(cpos.numel() > 0))
        sets(self, "clamp_values", vals if self.all_clamp else vals[..., cpos])
        sets(self, "clamp_dirs", self.directions if self.all_clamp else self.directions[cpos])
        sets(self, "add_delta", vals[..., apos] @ self.directions[apos] if apos.numel() else None)

    @classmethod
    def build(
        cls, sae: Any, edits: tuple[FeatureEdit, ...] | list[FeatureEdit], max_acts: Mapping[int, float] | None = None
    ) -> EditPlan:
        """Tensors for ``edits``; ``add`` values are multiplied by ``max_acts[feature]``."""
        dev, dt = sae.W_dec.device, sae.W_dec.dtype
        feats = torch.tensor([e.feature for e in edits], dtype=torch.long, device=dev)
        vals = []
        for e in edits:
            if e.mode == "add":
                if max_acts is None or e.feature not in max_acts:
                    raise SteeringInputError(f"feature {e.feature}: add needs the feature's max_act")
                vals.append(float(e.value) * float(max_acts[e.feature]))
            else:
                vals.append(float(e.value))
        with torch.no_grad():
            return cls(
                features=feats,
                is_clamp=torch.tensor([e.mode == "clamp" for e in edits], dtype=torch.bool, device=dev),
                values=torch.tensor(vals, dtype=dt, device=dev),
                directions=decoder_directions(sae, feats).detach() if len(edits) else sae.W_dec[:0].detach(),
            )


def steer_activations(
    sae: Any,
    x: torch.Tensor,
    plan: EditPlan,
    mask: torch.Tensor | None = None,
    f: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``plan`` to activations ``x`` ``[batch, pos, d_in]``; returns ``(x_new, f_sel)``.

    ``x_new = x + mask * s(x) * (Δf @ D)`` = ``x + decode(f') - decode(f)`` (see the module docstring), in
    ``x``'s dtype and device. ``mask`` ``[batch, pos]`` bool selects the positions edited (None: all).
    ``f_sel`` ``[batch, pos, n]`` are the steered features' activations ``sae.encode(x)[..., features]``
    before the edit (None when the plan needs no encode and ``f`` is not given). Pass ``f``
    (``[batch, pos, d_sae]``, ``sae.encode(x)``) to reuse an encode already done.
    """
    w = sae.W_dec
    xs = x if (x.dtype == w.dtype and x.device == w.device) else x.to(device=w.device, dtype=w.dtype)
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
    assert delta is not None
    scale = output_scale(sae, xs)
    if scale is not None:
        delta = delta * scale
    if mask is not None:  # where(), not a product: masked-out positions stay exact even if delta is not finite
        delta = torch.where(mask.to(delta.device).unsqueeze(-1), delta, delta.new_zeros(()))
    if delta.device != x.device or delta.dtype != x.dtype:
        delta = delta.to(device=x.device, dtype=x.dtype)
    return x + delta, f_sel


# ---- prompt ---------------------------------------------------------------------------------------------
def model_context(rt: Any) -> int | None:
    """The model's maximum sequence length, or None when unknown."""
    model = rt.loaded.model
    if rt.loaded.kind == "transformer_lens":
        return int(model.cfg.n_ctx)
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else None


def format_prompt(rt: Any, config: SteeringConfig) -> str:
    """The prompt text fed to the model: the chat template applied for chat models when enabled."""
    tok = rt.tokenizer
    if config.chat_template and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": config.prompt}], add_generation_prompt=True, tokenize=False
        )
    return config.prompt


def prompt_ids(rt: Any, config: SteeringConfig) -> torch.Tensor:
    """``[1, pos]`` prompt token ids; BOS prepended when the SAE was trained with it (not doubled when a
    chat template already starts with it)."""
    text = format_prompt(rt, config)
    ids = list(rt.tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(rt.tokenizer, "bos_token_id", None)
    if rt.prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [int(bos), *ids]
    return torch.tensor([ids], dtype=torch.long)


def check_prompt(rt: Any, config: SteeringConfig, ids: torch.Tensor) -> list[str]:
    """Raise SteeringInputError when the prompt + generation cannot fit the model; return notes (strings)."""
    n = int(ids.shape[1])
    bos = getattr(rt.tokenizer, "bos_token_id", None)
    if n == 0 or (n == 1 and bos is not None and int(ids[0, 0]) == bos):
        raise SteeringInputError("the prompt is empty after tokenisation; type a prompt to continue")
    ctx = model_context(rt)
    total = n + config.generation.max_new_tokens
    if ctx is not None and n >= ctx:
        raise SteeringInputError(f"the prompt is {n} tokens, longer than the model's context of {ctx} tokens")
    if ctx is not None and total > ctx:
        raise SteeringInputError(
            f"the prompt ({n} tokens) plus {config.generation.max_new_tokens} new tokens exceeds the model's "
            f"context of {ctx} tokens; shorten the prompt or lower max new tokens"
        )
    notes = []
    if total > rt.context_size:
        notes.append(
            f"prompt + generation is {total} tokens, beyond the {rt.context_size}-token contexts the SAE was "
            "trained on; later positions may steer less reliably"
        )
    return notes


def prepare(
    rt: Any, config: SteeringConfig, max_acts: Mapping[int, float] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Validate ``config`` for ``rt`` (raises SteeringInputError); return the prompt ids and notes."""
    check_steerable(rt.sae)
    validate_config(config, rt.d_sae, max_acts)
    ids = prompt_ids(rt, config)
    return ids, check_prompt(rt, config, ids)


# ---- generation -----------------------------------------------------------------------------------------
class _Halt(Exception):
    """Raised by the hook to end a forward pass once the activation it needs is recorded."""


class _StepHook:
    """The per-forward-pass function given to ``HookSite.intervene``: edits and/or records activations.

    The loop sets ``start`` (absolute position of the chunk's first token) and ``chunk`` (``[1, L]`` ids)
    before each forward pass; ``act`` arrives as ``[1, L, d_in]``.
    """

    def __init__(
        self,
        sae: Any,
        plan: EditPlan | None,
        edit_from: int,
        special: set[int],
        record_features: torch.Tensor | None,
        record_from: int,
    ):
        self.sae = sae
        self.encode = fast_encoder(sae)
        self.plan = plan
        self.edit_from = edit_from  # first absolute position edited
        self.special = special
        self.record_features = record_features  # [n] or None
        self.record_from = record_from  # absolute position of the first generated token
        self.start = 0
        self.chunk: torch.Tensor = torch.zeros(1, 0, dtype=torch.long)
        self.halt = False
        self.pre_x: list[torch.Tensor] = []  # per generated token: [d_in] activation arriving at the hook
        self.post_x: list[torch.Tensor | None] = []  # per generated token: [d_in] edited activation (None: unedited)

    @torch.no_grad()
    def finalize(self, n: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded features' activations on the first ``n`` generated tokens: ``(before, after)``, each
        ``[n, n_features]`` float32 on CPU; before = ``encode(x)``, after = ``encode(x_edited)``."""
        assert self.record_features is not None
        feats = self.record_features
        k = int(feats.numel())
        n = min(n, len(self.pre_x))
        if n == 0:
            return torch.zeros(0, k), torch.zeros(0, k)

        def enc(rows: list[torch.Tensor]) -> torch.Tensor:
            parts = [self.encode(torch.stack(rows[i : i + chunk]))[:, feats] for i in range(0, len(rows), chunk)]
            return torch.cat(parts).float().cpu()

        before = enc(self.pre_x[:n])
        after = before.clone()
        edited = [i for i in range(n) if self.post_x[i] is not None]
        if edited:
            after[edited] = enc([self.post_x[i] for i in edited])  # type: ignore[misc]
        return before, after

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sae.W_dec
        return self.encode(x if (x.dtype == w.dtype and x.device == w.device) else x.to(w.device, w.dtype))

    def __call__(self, act: torch.Tensor) -> torch.Tensor | None:
        L = act.shape[1]
        rec_lo = self.record_from + len(self.pre_x)
        plan = self.plan if self.plan is not None and self.plan.features.numel() else None
        if L == 1:  # decode step: plain Python ints, no position tensors
            p = self.start
            edit = plan is not None and p >= self.edit_from and int(self.chunk[0, 0]) not in self.special
            rec_idx = slice(0, 1) if self.record_features is not None and p >= rec_lo else None
            mask = None
        else:
            pos = torch.arange(self.start, self.start + L)
            keep = pos >= self.edit_from
            for sid in self.special:
                keep &= self.chunk[0].cpu() != sid
            edit = plan is not None and bool(keep.any())
            mask = keep.unsqueeze(0)
            rec_idx = None
            if self.record_features is not None:
                r = (pos >= rec_lo).nonzero().flatten()
                rec_idx = r if r.numel() else None
        out = None
        if edit:
            assert plan is not None
            f = self._encode(act) if plan.needs_encode else None
            out, _ = steer_activations(self.sae, act, plan, mask, f=f)
        if rec_idx is not None:
            # keep the activations; finalize() encodes them all at once (same values, far cheaper per token)
            w = self.sae.W_dec
            pre = act[0, rec_idx].detach().to(device=w.device, dtype=w.dtype).clone()
            self.pre_x.extend(pre)
            if out is None:
                self.post_x.extend([None] * pre.shape[0])
            else:
                self.post_x.extend(out[0, rec_idx].detach().to(device=w.device, dtype=w.dtype).clone())
        if self.halt:
            raise _Halt()
        return out


@dataclass
class GenerationResult:
    """One finished (or stopped) generation."""

    steered: bool
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = ""  # 'eos' | 'length' | 'closed' | 'error'
    features: list[int] = field(default_factory=list)
    # [n_generated, n_features], filled when the stream finishes or is closed (None while running / on error)
    acts_before: torch.Tensor | None = None  # before the edit (in the steered run)
    acts_after: torch.Tensor | None = None  # [n_generated, n_features] after the edit
    notes: list[str] = field(default_factory=list)


def _sample(logits: torch.Tensor, g: GenerationSettings, gen: torch.Generator) -> int:
    """Next token from ``[vocab]`` logits: argmax when temperature is 0, else temperature + top-p."""
    logits = logits.float().cpu()
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()) or not bool(torch.isfinite(logits).any()):
        raise SteeringInputError(
            "the model produced NaN/inf logits: the edit is too large for this model or dtype; use a smaller value"
        )
    if g.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / g.temperature, dim=-1)
    if g.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, 0) - sp) < g.top_p  # always keeps the top token
        sp = sp * keep
        choice = int(torch.multinomial(sp / sp.sum(), 1, generator=gen))
        return int(si[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def _decode(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (decoding is normally prefix-stable; if a tokenizer
    rewrites earlier text, the stream emits only the new tail and ``result.text`` stays exact)."""
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cache_kwarg(model: Any) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def eos_ids(rt: Any) -> set[int]:
    ids: set[int] = set()
    tok_eos = getattr(rt.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gc = getattr(rt.loaded.model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, list | tuple):
        ids.update(int(i) for i in e)
    return ids


class GenerationStream:
    """Token-by-token generation; iterate for text pieces, read ``result`` any time (filled as it runs).

    ``steer=False`` runs the unedited model (hook-free unless ``record`` asks for the steered features'
    natural activations); ``steer=True`` applies ``config.edits``. ``close()`` (or dropping the stream) stops
    it; no hook outlives a forward pass.
    """

    def __init__(
        self,
        rt: Any,
        config: SteeringConfig,
        *,
        steer: bool = True,
        max_acts: Mapping[int, float] | None = None,
        record: bool = True,
        stop_at_eos: bool = True,
        ids: torch.Tensor | None = None,
        notes: list[str] | None = None,
    ):
        if ids is None:
            ids, notes = prepare(rt, config, max_acts)
        self.rt = rt
        self.config = config
        self.steer = steer
        self.stop_at_eos = stop_at_eos
        feats = [e.feature for e in config.edits]
        self.result = GenerationResult(
            steered=steer, prompt_ids=ids[0].tolist(), features=feats, notes=list(notes or [])
        )
        n_prompt = int(ids.shape[1])
        plan = EditPlan.build(rt.sae, config.edits, max_acts) if steer and config.edits else None
        want_rec = record and bool(feats)
        self._hook: _StepHook | None = None
        if plan is not None or want_rec:
            self._hook = _StepHook(
                rt.sae,
                plan,
                edit_from=0 if config.positions == "all" else n_prompt - 1,
                special=rt.special_ids(),
                record_features=torch.tensor(feats, dtype=torch.long, device=rt.sae.W_dec.device) if want_rec else None,
                record_from=n_prompt,
            )
        self._ids = ids
        self._cache_kw = _cache_kwarg(rt.loaded.model) if rt.loaded.kind != "transformer_lens" else ""
        self._it = self._run()

    # iterator protocol
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _forward(self, chunk: torch.Tensor, start: int, cache: Any, halt: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass over ``chunk`` ``[1, L]`` at absolute ``start``; returns last logits ``[vocab]``."""
        loaded = self.rt.loaded
        dev = loaded.device
        hook = self._hook
        with torch.no_grad():
            if hook is not None:
                hook.start, hook.chunk, hook.halt = start, chunk, halt
                with self.rt.site.intervene(hook):
                    return self._call(chunk.to(dev), cache)
            return self._call(chunk.to(dev), cache)

    def _call(self, chunk: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        model = self.rt.loaded.model
        if self.rt.loaded.kind == "transformer_lens":
            return model(chunk, return_type="logits")[0, -1], None
        out = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[0, -1], new_cache

    def _run(self) -> Iterator[str]:
        res = self.result
        g = self.config.generation
        tok = self.rt.tokenizer
        incremental = self.rt.loaded.kind != "transformer_lens"
        stops = eos_ids(self.rt) if self.stop_at_eos else set()
        gen = torch.Generator(device="cpu").manual_seed(int(g.seed))
        ids = self._ids
        all_ids = ids[0].tolist()
        res.finish = "closed"
        shown = ""
        try:
            logits, cache = self._forward(ids, 0, None)
            for _ in range(g.max_new_tokens):
                nxt = _sample(logits, g, gen)
                if nxt in stops:
                    res.finish = "eos"
                    break
                all_ids.append(nxt)
                res.token_ids.append(nxt)
                text = _decode(tok, res.token_ids)
                if not text.endswith("\ufffd"):  # hold back half of a multi-byte character
                    piece = text[_common_prefix(shown, text) :]
                    shown = text
                    res.text = text
                    if piece:
                        yield piece
                if len(res.token_ids) == g.max_new_tokens:
                    res.finish = "length"
                    break
                step = torch.tensor([[nxt]], dtype=torch.long)
                if incremental:
                    logits, cache = self._forward(step, len(all_ids) - 1, cache)
                else:
                    logits, _ = self._forward(torch.tensor([all_ids]), 0, None)
            res.text = _decode(tok, res.token_ids)
            if res.text != shown and res.text[_common_prefix(shown, res.text) :]:
                yield res.text[_common_prefix(shown, res.text) :]
            # activation on the last generated token: one more pass, stopped at the hook
            hook = self._hook
            if hook is not None and hook.record_features is not None and len(hook.pre_x) < len(res.token_ids):
                last = torch.tensor([[all_ids[-1]]]) if incremental else torch.tensor([all_ids])
                try:
                    self._forward(last, len(all_ids) - 1 if incremental else 0, cache, halt=True)
                except _Halt:
                    pass
        except GeneratorExit:
            res.finish = "closed"
            raise
        except BaseException:
            res.finish = "error"
            raise
        finally:
            hook = self._hook
            if hook is not None and hook.record_features is not None and res.finish != "error":
                res.acts_before, res.acts_after = hook.finalize(len(res.token_ids))


def generate(
    rt: Any,
    config: SteeringConfig,
    *,
    steer: bool = True,
    max_acts: Mapping[int, float] | None = None,
    record: bool = True,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Run a whole generation (see ``GenerationStream``) and return its result."""
    s = GenerationStream(rt, config, steer=steer, max_acts=max_acts, record=record, stop_at_eos=stop_at_eos)
    for _ in s:
        pass
    return s.result


def paired_streams(
    rt: Any,
    config: SteeringConfig,
    max_acts: Mapping[int, float] | None = None,
    *,
    record: bool = True,
) -> dict[str, GenerationStream]:
    """``{'baseline': ..., 'steered': ...}`` streams on the same prompt ids and sampling seed (validated once;
    raises SteeringInputError)."""
    ids, notes = prepare(rt, config, max_acts)
    return {
        "baseline": GenerationStream(rt, config, steer=False, max_acts=max_acts, record=record, ids=ids, notes=notes),
        "steered": GenerationStream(rt, config, steer=True, max_acts=max_acts, record=record, ids=ids, notes=notes),
    }


def interleave(streams: Mapping[str, GenerationStream]) -> Iterator[tuple[str, str]]:
    """Advance the streams in turn, one token each, yielding ``(name, piece)`` until all are done. Closing
    this generator closes every stream."""
    live = dict(streams)
    try:
        while live:
            for name in list(live):
                try:
                    piece = next(live[name])
                except StopIteration:
                    del live[name]
                    continue
                yield name, piece
    finally:
        for s in streams.values():
            s.close()


def side_by_side(
    rt: Any,
    config: SteeringConfig,
    max_acts: Mapping[int, float] | None = None,
    *,
    record: bool = True,
) -> Iterator[tuple[str, str, GenerationStream]]:
    """Baseline and steered generation interleaved token by token: yields ``(which, piece, stream)`` with
    ``which`` in {'baseline', 'steered'}. Closing this generator closes both streams."""
    streams = paired_streams(rt, config, max_acts, record=record)
    events = interleave(streams)
    try:
        for name, piece in events:
            yield name, piece, streams[name]
    finally:
        events.close()


def unsteered(config: SteeringConfig) -> SteeringConfig:
    """``config`` without edits."""
    return replace(config, edits=())
