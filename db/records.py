"""Typed records that cross the db -> pipelines boundary: ``SaeRecord`` (a ``saes`` row, its JSON parsed once)
and ``FeatureBaselines`` (an SAE's corpus statistics as dense arrays).

Pages that only display a row keep the plain dict of ``queries.sae_info``; everything that reloads a model,
an SAE or scores against the corpus takes these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: positions whose activation norm is above this x their context's median are left out (the build's default)
DEFAULT_OUTLIER_NORM_RATIO = 10.0


def _json_object(text: object) -> dict[str, Any]:
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(str(text)) if text else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class SaeRecord:
    """One ``saes`` row: how to reload the model + SAE that built a dictionary, and what the build measured."""

    sae_id: str
    model_spec: str
    sae_source: str  # JSON of ``SaeSource`` (pipelines/model/saes.py), kept as stored: it is also a cache key
    hook_name: str
    d_in: int
    d_sae: int
    hook_kind: str = "hf_module"
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # what the model ran in during the build
    architecture: str | None = None
    context_size: int = 64
    prepend_bos: bool = True
    corpus: str | None = None
    n_tokens: int = 0
    n_contexts: int = 0
    fve: float | None = None
    l0: float | None = None
    dead_fraction: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the build's config (``config_json``)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SaeRecord:
        """From a ``saes`` row as a mapping (``queries.sae_info``); other columns are ignored."""

        def opt_float(k: str) -> float | None:
            v = row.get(k)
            return None if v is None else float(v)

        return cls(
            sae_id=str(row["sae_id"]),
            model_spec=str(row["model_spec"]),
            sae_source=str(row["sae_source"]),
            hook_name=str(row["hook_name"]),
            d_in=int(row["d_in"]),
            d_sae=int(row["d_sae"]),
            hook_kind=str(row.get("hook_kind") or "hf_module"),
            model_name=row.get("model_name"),
            model_kwargs=_json_object(row.get("model_kwargs")),
            dtype=row.get("dtype") or None,
            architecture=row.get("architecture"),
            context_size=int(row.get("context_size") or 64),
            prepend_bos=bool(row.get("prepend_bos", True)),
            corpus=row.get("corpus"),
            n_tokens=int(row.get("n_tokens") or 0),
            n_contexts=int(row.get("n_contexts") or 0),
            fve=opt_float("fve"),
            l0=opt_float("l0"),
            dead_fraction=opt_float("dead_fraction"),
            config=_json_object(row.get("config_json")),
        )

    @property
    def reload_dtype(self) -> str | None:
        """The dtype to reload the model in: the one the build ran in, unless the build picked it by default
        (config dtype null), in which case None: the default of the device it is reloaded on."""
        if "dtype" in self.config and self.config["dtype"] is None:
            return None
        return self.dtype

    @property
    def outlier_norm_ratio(self) -> float:
        try:
            return float(self.config.get("outlier_norm_ratio", DEFAULT_OUTLIER_NORM_RATIO))
        except (TypeError, ValueError):
            return DEFAULT_OUTLIER_NORM_RATIO


def sae_record(row: SaeRecord | Mapping[str, Any]) -> SaeRecord:
    """``row`` as an ``SaeRecord`` (a record is returned as it is)."""
    return row if isinstance(row, SaeRecord) else SaeRecord.from_row(row)


@dataclass(frozen=True)
class FeatureBaselines:
    """An SAE's corpus statistics as dense float64 arrays ``[d_sae]`` indexed by feature id (missing or dead
    features: 0): the fraction of tokens it fires on, its mean activation when firing, and its max."""

    density: np.ndarray
    mean_act: np.ndarray
    max_act: np.ndarray

    def __post_init__(self) -> None:
        for name in ("density", "mean_act", "max_act"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        shapes = {a.shape for a in (self.density, self.mean_act, self.max_act)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"baselines must be three 1-d arrays of one length; got shapes {sorted(shapes)}")

    @property
    def d_sae(self) -> int:
        return int(self.density.shape[0])

    @classmethod
    def zeros(cls, d_sae: int) -> FeatureBaselines:
        return cls(*(np.zeros(d_sae, dtype=np.float64) for _ in range(3)))
