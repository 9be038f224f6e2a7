"""Steering configurations: typed, checked on construction, read from one place.

``FeatureEdit``, ``GenerationSettings``, ``SteeringConfig`` and ``SweepSettings`` check their own fields in
``__post_init__`` (edit methods and positions are ``Literal`` types; values finite; generation settings in range;
each feature edited once; ablate takes no value; multi-turn chat needs the chat template), so an object that
exists is well formed. ``SteeringConfig.from_mapping`` is the one reader, for the
CLI's flags, a preset's JSON and a shared URL's query parameters. What only the SAE can tell (is the feature
id in range, is its max activation known for ``add``, is a value absurd for that feature) and whether the
config is ready to run (a prompt) is checked by ``validate_config``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, cast, get_args

from featuredict.db.errors import UserError

Mode = Literal["clamp", "add", "orthogonal", "cap", "ablate"]
Positions = Literal["all", "generated"]
MODES: tuple[Mode, ...] = get_args(Mode)
POSITIONS: tuple[Positions, ...] = get_args(Positions)
# methods whose value is in units of the feature's max activation (clamp: activation units; ablate: no value)
MAX_ACT_UNITS: tuple[Mode, ...] = ("add", "orthogonal", "cap")
# one-line descriptions, shared by the CLI's help and the dashboard
MODE_HELP: dict[Mode, str] = {
    "clamp": "set the feature's activation to VALUE (activation units), keeping the SAE's error term",
    "add": "add VALUE x max_act along the feature's decoder direction",
    "orthogonal": "replace the activation's component along the decoder direction with VALUE x max_act of it",
    "cap": "cap the activation's component along the decoder direction at VALUE x max_act",
    "ablate": "clamp the feature's activation to 0 (no value)",
}

# Limits on user input; anything outside gets a one-line SteeringInputError.
MAX_ADD = 100.0  # |a| for add, in units of max_act
MAX_CLAMP_MULTIPLE = 100.0  # |v| for clamp, in units of max_act (when max_act > 0)
MAX_ABS_VALUE = 1e4  # |v| for clamp in activation units, always
MAX_NEW_TOKENS = 1024
MAX_TEMPERATURE = 5.0
MIN_TEMPERATURE = 0.01  # below this, sampling is greedy in all but name and 1/T overflows
MAX_FEATURES = 32
MAX_SWEEP_STRENGTHS = 16
MAX_SWEEP_SEEDS = 8

# Short names of the URL query parameters (``to_query_params``), read back by ``from_mapping``.
URL_ALIASES = {
    "feature": "edits",
    "pos": "positions",
    "chat": "chat_template",
    "n": "max_new_tokens",
    "t": "temperature",
    "conv": "multi_turn",
}
# A steer link's parameters that pick the SAE or a preset rather than set the config; ``from_mapping`` skips them.
URL_OTHER_KEYS = ("sae", "preset")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


_MODE_LIST = ", ".join(MODES[:-1]) + " or " + MODES[-1]


class SteeringInputError(UserError, ValueError):
    """Bad steering input, with a one-line message fit to show a user as is."""


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _number_text(v: float) -> str:
    """Shortest text that reads back as ``v``: ``%g`` when exact (``4``, ``0.25``), else ``repr``."""
    s = f"{v:g}"
    return s if float(s) == v else repr(v)


@dataclass(frozen=True)
class FeatureEdit:
    """One feature to steer, with its method (``mode``) and strength (``value``); see ``MODE_HELP``.

    ``clamp`` values are activations; ``add``, ``orthogonal`` and ``cap`` values are multiples of the
    feature's max observed activation; ``ablate`` takes no value (it is 0).
    """

    feature: int
    mode: Mode = "clamp"
    value: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.feature):
            raise SteeringInputError(f"feature id {self.feature!r} is not an integer")
        object.__setattr__(self, "feature", int(self.feature))
        if self.mode not in MODES:
            raise SteeringInputError(f"feature {self.feature}: unknown mode {self.mode!r}; use {_MODE_LIST}")
        if not _is_real(self.value) or not math.isfinite(self.value):
            raise SteeringInputError(f"feature {self.feature}: value {self.value!r} is not a finite number")
        if self.mode == "ablate" and self.value != 0:
            raise SteeringInputError(
                f"feature {self.feature}: ablate takes no value (it clamps to 0); write {self.feature}=ablate"
            )
        object.__setattr__(self, "value", float(self.value) + 0.0)  # + 0.0: no -0.0

    def spec(self) -> str:
        """``ID=MODE:VALUE`` (``ID=ablate``), the form ``parse`` reads (CLI ``--feature``, URL ``feature``)."""
        if self.mode == "ablate":
            return f"{self.feature}=ablate"
        return f"{self.feature}={self.mode}:{_number_text(self.value)}"

    def with_strength(self, strength: float, max_act: float) -> FeatureEdit:
        """This edit at ``strength`` x max activation (a sweep's unit): the value for ``add`` / ``orthogonal``
        / ``cap``, ``strength * max_act`` for ``clamp``; ``ablate`` is returned unchanged."""
        if self.mode == "ablate":
            return self
        return replace(self, value=strength * max_act if self.mode == "clamp" else strength)

    @classmethod
    def parse(cls, text: str, default: FeatureEdit | None = None) -> FeatureEdit:
        """Read ``ID=VALUE`` (clamp), ``ID=MODE:VALUE`` (any mode of ``MODES``) or ``ID=ablate``; a bare ``ID``
        takes ``default``'s mode and value (an error when no default is given)."""
        s = text.strip()
        if not s:
            raise SteeringInputError("empty feature spec; use ID=VALUE or ID=MODE:VALUE")
        fid, sep, rest = s.partition("=")
        try:
            feature = int(fid.strip())
        except ValueError:
            raise SteeringInputError(f"feature id {fid.strip()!r} in {s!r} is not an integer") from None
        if not sep:
            if default is None:
                raise SteeringInputError(f"feature {feature} has no value; use {feature}=VALUE or {feature}=add:VALUE")
            return cls(feature, default.mode, default.value)
        if rest.strip().lower() == "ablate":
            return cls(feature, "ablate", 0.0)
        mode, colon, val = rest.strip().partition(":")
        if not colon:
            mode, val = "clamp", rest
        mode = mode.strip().lower()
        if mode not in MODES:
            raise SteeringInputError(f"unknown mode {mode!r} in {s!r}; use {_MODE_LIST}")
        try:
            value = float(val.strip())
        except ValueError:
            raise SteeringInputError(f"value of feature {feature}: {val.strip()!r} is not a number") from None
        return cls(feature, mode, value)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        n, t, p, seed = self.max_new_tokens, self.temperature, self.top_p, self.seed
        if not _is_int(n) or not 1 <= n <= MAX_NEW_TOKENS:
            raise SteeringInputError(f"max new tokens must be an integer in 1..{MAX_NEW_TOKENS}, not {n!r}")
        if not _is_real(t) or not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise SteeringInputError(
                f"temperature must be 0 (greedy) or in {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}, not {t!r}"
            )
        if not _is_real(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise SteeringInputError(f"top-p must be in (0, 1], not {p!r}")
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise SteeringInputError(f"seed must be a non-negative integer, not {seed!r}")
        for name, conv in (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("seed", int)):
            object.__setattr__(self, name, conv(getattr(self, name)))


_GENERATION_FIELDS = tuple(f.name for f in fields(GenerationSettings))


@dataclass(frozen=True)
class SteeringConfig:
    """Everything a steering run needs besides the model: what a preset stores and a URL shares.

    An empty prompt is allowed here (a preset or a link may leave it to the user); ``validate_config``
    refuses it before a run. ``multi_turn`` is the chat mode: the prompt is the user's next turn, and the
    baseline and steered runs each continue their own conversation (``steering.chat``); ``system`` is a
    system prompt given to the chat template (ignored without one).
    """

    prompt: str = ""
    edits: tuple[FeatureEdit, ...] = ()
    positions: Positions = "all"
    chat_template: bool = True  # apply the tokenizer's chat template when it has one
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    multi_turn: bool = False
    system: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise SteeringInputError(f"the prompt must be text, not {type(self.prompt).__name__}")
        if isinstance(self.edits, str | bytes) or not isinstance(self.edits, Sequence):
            raise SteeringInputError(f"edits must be a list of feature edits, not {type(self.edits).__name__}")
        object.__setattr__(self, "edits", tuple(self.edits))
        if len(self.edits) > MAX_FEATURES:
            raise SteeringInputError(f"{len(self.edits)} features selected; steer at most {MAX_FEATURES} at once")
        seen: set[int] = set()
        for e in self.edits:
            if not isinstance(e, FeatureEdit):
                raise SteeringInputError(f"edit {e!r} is not a FeatureEdit")
            if e.feature in seen:
                raise SteeringInputError(f"feature {e.feature} is listed twice; give each feature one edit")
            seen.add(e.feature)
        if self.positions not in POSITIONS:
            raise SteeringInputError(f"positions must be 'all' or 'generated', not {self.positions!r}")
        if not isinstance(self.chat_template, bool):
            raise SteeringInputError(f"chat_template must be true or false, not {self.chat_template!r}")
        if not isinstance(self.multi_turn, bool):
            raise SteeringInputError(f"multi_turn must be true or false, not {self.multi_turn!r}")
        if not isinstance(self.system, str):
            raise SteeringInputError(f"the system prompt must be text, not {type(self.system).__name__}")
        if self.multi_turn and not self.chat_template:
            raise SteeringInputError("multi-turn chat needs the chat template; turn the chat template on")
        if not isinstance(self.generation, GenerationSettings):
            raise SteeringInputError(f"generation must be GenerationSettings, not {type(self.generation).__name__}")

    # ---- writing ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what a preset stores); ``from_mapping`` reads it back."""
        d = asdict(self)
        d["edits"] = [asdict(e) for e in self.edits]
        return d

    def to_query_params(self) -> dict[str, str]:
        """URL query parameters (``steer?feature=3=clamp:5,17=add:0.5&prompt=...&pos=generated&chat=0&n=40
        &t=0.7&top_p=0.9&seed=1``, plus ``conv=1`` and ``system=...`` for chat); ``from_mapping`` reads them
        back. Empty values, and ``conv`` when off, are left out."""
        g = self.generation
        q = {
            "feature": ",".join(e.spec() for e in self.edits),
            "prompt": self.prompt,
            "pos": self.positions,
            "chat": "1" if self.chat_template else "0",
            "n": str(g.max_new_tokens),
            "t": _number_text(g.temperature),
            "top_p": _number_text(g.top_p),
            "seed": str(g.seed),
            "conv": "1" if self.multi_turn else "",
            "system": self.system,
        }
        return {k: v for k, v in q.items() if v != ""}

    def describe(self) -> str:
        return " ".join(e.spec() for e in self.edits) or "(no features)"

    # ---- reading ----------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls,
        settings: Mapping[str, Any],
        *,
        base: SteeringConfig | None = None,
        default_edit: FeatureEdit | None = None,
    ) -> SteeringConfig:
        """The config ``settings`` describe, on top of ``base`` (default: all defaults, empty prompt).

        Reads ``to_dict`` output (a preset's JSON), ``to_query_params`` output (a URL; short keys ``feature``,
        ``pos``, ``chat``, ``n``, ``t``, ``conv`` are aliases; a link's ``sae`` and ``preset`` are skipped) and the CLI's
        flags alike. Values may be typed or text (``"0.7"``, ``"0"`` for false); ``None`` or ``""`` leaves a
        setting as in ``base`` (except the prompt and system prompt, where ``""`` is the empty text). Generation settings may be
        flat or nested under ``generation``.
        ``edits`` is a list of ``FeatureEdit``, ``{"feature", "mode", "value"}`` dicts or ``ID=MODE:VALUE``
        specs, or one comma-separated string of specs; bare ids take ``default_edit``. Unknown keys and
        unreadable values raise SteeringInputError (one line).
        """
        base = base if base is not None else cls()
        items = [(str(k), str(k), v) for k, v in settings.items() if k != "generation" and k not in URL_OTHER_KEYS]
        nested = settings.get("generation")
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise SteeringInputError(f"generation must be a mapping of settings, not {nested!r}")
            items += [(f"generation.{k}", str(k), v) for k, v in nested.items()]
        known = {f.name for f in fields(cls)} | set(_GENERATION_FIELDS)
        given: dict[str, tuple[str, Any]] = {}  # field -> (key as written, raw value)
        for key, name, raw in items:
            name = URL_ALIASES.get(name, name)
            if name not in known or name == "generation":
                raise SteeringInputError(f"unknown steering setting {key!r}")
            if name in given:
                raise SteeringInputError(f"{given[name][0]!r} and {key!r} both set {name}; give one")
            if raw is None or (isinstance(raw, str) and raw.strip() == "" and name not in ("prompt", "system")):
                continue
            given[name] = (key, raw)

        top: dict[str, Any] = {}
        gen: dict[str, Any] = {}
        for name, (key, raw) in given.items():
            if name in ("prompt", "system"):
                top[name] = _as_str(key, raw)
            elif name == "edits":
                top[name] = _as_edits(key, raw, default_edit)
            elif name == "positions":
                top[name] = _as_str(key, raw).strip().lower()
            elif name in ("chat_template", "multi_turn"):
                top[name] = _as_bool(key, raw)
            elif name in ("max_new_tokens", "seed"):
                gen[name] = _as_int(key, raw)
            else:
                gen[name] = _as_float(key, raw)
        return replace(base, **top, generation=replace(base.generation, **gen))


def _as_str(key: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise SteeringInputError(f"{key} must be text, not {raw!r}")
    return raw


def _as_int(key: str, raw: Any) -> int:
    return int(_as_number(key, raw, int, _is_int, "integer"))


def _as_float(key: str, raw: Any) -> float:
    return float(_as_number(key, raw, float, _is_real, "number"))


def _as_number(key: str, raw: Any, kind: type, ok: Callable[[object], bool], noun: str) -> float:
    """``raw`` as ``kind``: a number that passes ``ok``, or text that parses as one."""
    if ok(raw):
        return kind(raw)
    if isinstance(raw, str):
        try:
            return kind(raw.strip())
        except ValueError:
            pass
    raise SteeringInputError(f"{key}={raw!r} is not a valid {noun}")


def _as_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, str | int) else ""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SteeringInputError(f"{key}={raw!r} is not a valid boolean; use 1 or 0")


def _as_edits(key: str, raw: Any, default_edit: FeatureEdit | None) -> tuple[FeatureEdit, ...]:
    if isinstance(raw, str):
        return parse_feature_list(raw, default_edit)
    if not isinstance(raw, Sequence):
        raise SteeringInputError(f"{key} must be a list of feature edits, not {raw!r}")
    out = []
    for e in raw:
        if isinstance(e, FeatureEdit):
            out.append(e)
        elif isinstance(e, str):
            out.append(FeatureEdit.parse(e, default_edit))
        elif isinstance(e, Mapping):
            extra = set(e) - {"feature", "mode", "value"}
            if "feature" not in e or extra:
                raise SteeringInputError(f"edit {dict(e)!r} is malformed; give feature, mode and value")
            mode = cast(Mode, _as_str("mode", e.get("mode", "clamp")).strip().lower())  # checked by FeatureEdit
            out.append(FeatureEdit(_as_int("feature", e["feature"]), mode, _as_float("value", e.get("value", 0.0))))
        else:
            raise SteeringInputError(f"edit {e!r} is not a feature edit; use ID=VALUE or ID=add:VALUE")
    return tuple(out)


def parse_feature_list(text: str, default_edit: FeatureEdit | None = None) -> tuple[FeatureEdit, ...]:
    """``'3'``, ``'3,17'`` or ``'3=clamp:5,17=add:0.5'`` -> edits (bare ids take ``default_edit``)."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    return tuple(FeatureEdit.parse(p, default_edit) for p in parts)


def unsteered(config: SteeringConfig) -> SteeringConfig:
    """``config`` without edits."""
    return replace(config, edits=())


# ---- what only the SAE can tell ---------------------------------------------------------------------------
def validate_config(config: SteeringConfig, d_sae: int, max_acts: Mapping[int, float] | None = None) -> None:
    """Raise SteeringInputError (one line) unless ``config`` can run on an SAE with ``d_sae`` features.

    Needs a non-empty prompt. ``max_acts`` maps feature id -> features.max_act for the SAE (all its
    features); when given, ids missing from it are unknown. Without it, ids are checked against ``d_sae`` only
    and ``add`` is refused (its unit is max_act).
    """
    if not config.prompt.strip():
        raise SteeringInputError("the prompt is empty; type a prompt to continue")
    for e in config.edits:
        check_edit(e, d_sae, max_acts)


def check_edit(edit: FeatureEdit, d_sae: int, max_acts: Mapping[int, float] | None = None) -> None:
    """Raise SteeringInputError unless ``edit``'s feature exists and its value is sane for that feature.

    ``add``, ``orthogonal`` and ``cap`` are in units of max_act: they need a known, positive, finite max_act
    and ``|value| <= MAX_ADD``. ``clamp`` needs ``|value| <= min(MAX_ABS_VALUE, MAX_CLAMP_MULTIPLE x max_act)``.
    ``ablate`` needs only a known feature.
    """
    f, v = edit.feature, edit.value
    if not 0 <= f < d_sae:
        raise SteeringInputError(f"unknown feature id {f}: this SAE has features 0..{d_sae - 1}")
    if max_acts is not None and f not in max_acts:
        raise SteeringInputError(f"unknown feature id {f}: it is not in this SAE's feature table")
    mx = None if max_acts is None else float(max_acts[f])
    if edit.mode == "ablate":
        return
    if edit.mode in MAX_ACT_UNITS:
        m = edit.mode
        if mx is None:
            raise SteeringInputError(
                f"feature {f}: {m} is in units of the feature's max activation, which is unknown here; use clamp"
            )
        if not mx > 0:
            raise SteeringInputError(
                f"feature {f} never fired on the corpus (max_act {mx:g}), so {m} (in units of max_act) is "
                "undefined; use clamp"
            )
        if not math.isfinite(mx):
            raise SteeringInputError(f"feature {f}: its stored max_act {mx:g} is not finite; use clamp")
        if abs(v) > MAX_ADD:
            raise SteeringInputError(f"feature {f}: {m} {v:g} x max_act is absurd; keep |value| <= {MAX_ADD:g}")
        return
    limit = MAX_ABS_VALUE if mx is None or not mx > 0 else min(MAX_ABS_VALUE, MAX_CLAMP_MULTIPLE * mx)
    if abs(v) > limit:
        extra = "" if mx is None else f" (max_act {mx:.3g})"
        raise SteeringInputError(f"feature {f}: clamp value {v:g} is absurd{extra}; keep |value| <= {limit:.4g}")


# ---- strength sweeps --------------------------------------------------------------------------------------
def geometric_strengths(lo: float = 0.5, hi: float = 16.0, steps: int = 8) -> tuple[float, ...]:
    """``steps`` strengths spaced geometrically from ``lo`` to ``hi`` (both included), each rounded to 3
    significant digits (``0.5, 0.821, 1.35, 2.21, 3.63, 5.96, 9.78, 16`` by default)."""
    for name, x in (("lowest", lo), ("highest", hi)):
        if not _is_real(x) or not math.isfinite(x) or not 0 < x <= MAX_ADD:
            raise SteeringInputError(f"the {name} sweep strength must be in (0, {MAX_ADD:g}], not {x!r}")
    if not _is_int(steps) or not 1 <= steps <= MAX_SWEEP_STRENGTHS:
        raise SteeringInputError(f"a sweep takes 1..{MAX_SWEEP_STRENGTHS} strengths, not {steps!r}")
    if steps == 1 or lo == hi:
        return (float(f"{lo:.3g}"),)
    if hi < lo:
        raise SteeringInputError(f"the highest sweep strength {hi:g} is below the lowest {lo:g}")
    ratio = (hi / lo) ** (1 / (steps - 1))
    return tuple(dict.fromkeys(float(f"{lo * ratio**k:.3g}") for k in range(steps)))


@dataclass(frozen=True)
class SweepSettings:
    """A strength sweep: every strength (in units of each swept feature's max activation, see
    ``FeatureEdit.with_strength``) x every seed, one generation each, run as one batch.

    ``max_ppl_ratio``: the recommended strength is the one with the highest concept score whose perplexity
    (under the unsteered model) stays within this factor of the baseline's.
    """

    strengths: tuple[float, ...] = field(default_factory=geometric_strengths)
    seeds: tuple[int, ...] = (0,)
    max_ppl_ratio: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.strengths, str | bytes) or not isinstance(self.strengths, Sequence):
            raise SteeringInputError(f"sweep strengths must be a list of numbers, not {self.strengths!r}")
        if not 1 <= len(self.strengths) <= MAX_SWEEP_STRENGTHS:
            raise SteeringInputError(f"a sweep takes 1..{MAX_SWEEP_STRENGTHS} strengths, not {len(self.strengths)}")
        for x in self.strengths:
            if not _is_real(x) or not math.isfinite(x) or not 0 < x <= MAX_ADD:
                raise SteeringInputError(f"sweep strength {x!r} must be a number in (0, {MAX_ADD:g}]")
        if len(set(self.strengths)) != len(self.strengths):
            raise SteeringInputError("sweep strengths must be distinct")
        object.__setattr__(self, "strengths", tuple(sorted(float(x) for x in self.strengths)))
        if isinstance(self.seeds, str | bytes) or not isinstance(self.seeds, Sequence):
            raise SteeringInputError(f"sweep seeds must be a list of integers, not {self.seeds!r}")
        if not 1 <= len(self.seeds) <= MAX_SWEEP_SEEDS:
            raise SteeringInputError(f"a sweep takes 1..{MAX_SWEEP_SEEDS} seeds, not {len(self.seeds)}")
        for sd in self.seeds:
            if not _is_int(sd) or not 0 <= sd < 2**63:
                raise SteeringInputError(f"sweep seed {sd!r} must be a non-negative integer")
        if len(set(self.seeds)) != len(self.seeds):
            raise SteeringInputError("sweep seeds must be distinct")
        object.__setattr__(self, "seeds", tuple(int(sd) for sd in self.seeds))
        r = self.max_ppl_ratio
        if not _is_real(r) or not math.isfinite(r) or not 1 <= r <= 1000:
            raise SteeringInputError(f"the perplexity factor must be a number in 1..1000, not {r!r}")
        object.__setattr__(self, "max_ppl_ratio", float(r))
