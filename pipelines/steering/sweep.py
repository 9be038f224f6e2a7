"""Strength sweeps: one steering set at a grid of strengths x seeds, generated as ONE batch, scored, and a
recommended strength.

Strengths are in units of each feature's max activation (``FeatureEdit.with_strength``: the value of add,
orthogonal and cap, ``strength x max_act`` for clamp; ablated features stay ablated). The batch holds one
unsteered baseline row per seed and one steered row per (strength, seed), all from the same prompt ids, so no
padding is needed: the edit's values are a per-row tensor and the hook leaves the baseline rows untouched
(``generation.BatchStream``). Every row is scored by ``quality.score_rows`` in one shared unedited pass.

Recommendation: per strength, the concept score (mean over the swept features, then over seeds), the
perplexity (mean over seeds; NaN when any seed's row is empty or stopped on an error) and the share of distinct
tokens (mean over seeds). The recommended strength is the one with the highest concept score whose perplexity
is at most ``max_ppl_ratio`` x the baseline's (mean over seeds) and whose text has not collapsed (distinct share
at least ``quality.MIN_DISTINCT``); ties go to the lower strength; None when no strength qualifies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from featuredict.pipelines.steering.config import (
    FeatureEdit,
    SteeringConfig,
    SteeringInputError,
    SweepSettings,
    validate_config,
)
from featuredict.pipelines.steering.formatting import prepare
from featuredict.pipelines.steering.generation import BatchStream, GenerationResult, RowSpec
from featuredict.pipelines.steering.quality import MIN_DISTINCT, Quality, score_rows

if TYPE_CHECKING:
    from featuredict.pipelines.model.runtime import Runtime

SWEEP_LOGIT_BYTES = 1 << 30  # the kept logits of a whole sweep (see BatchStream.max_logit_bytes)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def edits_at(
    edits: Sequence[FeatureEdit], strength: float, max_acts: Mapping[int, float] | None
) -> tuple[FeatureEdit, ...]:
    """``edits`` at ``strength`` x each feature's max activation (ablate unchanged); SteeringInputError for a
    clamp whose feature has no positive max activation to scale."""
    out = []
    for e in edits:
        mx = float(max_acts.get(e.feature, 0.0)) if max_acts is not None else 0.0
        if e.mode == "clamp" and not (mx > 0 and math.isfinite(mx)):
            raise SteeringInputError(
                f"feature {e.feature}: a sweep scales clamp values by the feature's max activation, which is "
                f"{mx:g} here; use a fixed clamp outside the sweep"
            )
        out.append(e.with_strength(strength, mx))
    return tuple(out)


def swept_features(config: SteeringConfig) -> tuple[int, ...]:
    """The features a sweep scales (every edit but ablate): their mean concept score ranks strengths."""
    return tuple(e.feature for e in config.edits if e.mode != "ablate")


def qualifies(row: Mapping[str, Any], limit: float) -> bool:
    """Whether a summary row (``perplexity``, optional ``distinct``) is fluent enough to recommend: perplexity
    finite and at most ``limit``, and not collapsed into repeats (distinct share >= ``MIN_DISTINCT``)."""
    ppl = float(row["perplexity"])
    distinct = float(row.get("distinct", 1.0))
    return math.isfinite(ppl) and ppl <= limit and math.isfinite(distinct) and distinct >= MIN_DISTINCT


def recommend(summary: Sequence[Mapping[str, Any]], baseline_perplexity: float, max_ppl_ratio: float) -> float | None:
    """The strength with the highest ``concept`` among ``summary`` rows (``strength``, ``concept``,
    ``perplexity``, ``distinct``) that ``qualifies`` under ``max_ppl_ratio`` x ``baseline_perplexity``; ties go to
    the lower strength. None when the baseline's perplexity is not finite or no strength qualifies."""
    if not math.isfinite(baseline_perplexity):
        return None
    limit = max_ppl_ratio * baseline_perplexity
    best: tuple[float, float] | None = None  # (concept, -strength)
    for row in summary:
        concept, s = float(row["concept"]), float(row["strength"])
        if not (qualifies(row, limit) and math.isfinite(concept)):
            continue
        if best is None or (concept, -s) > best:
            best = (concept, -s)
    return None if best is None else -best[1]


@dataclass(frozen=True)
class SweepRow:
    """One generation of a sweep: ``strength`` None is the unsteered baseline of its seed."""

    strength: float | None
    seed: int
    result: GenerationResult
    quality: Quality
    concept: float  # mean concept score over the swept features

    def to_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "seed": self.seed,
            "text": self.result.text,
            "finish": self.result.finish,
            "error": self.result.error or None,
            "concept_score": _finite(self.concept),
            **self.quality.to_dict(),
        }


@dataclass(frozen=True)
class SweepResult:
    config: SteeringConfig
    settings: SweepSettings
    features: tuple[int, ...]
    rows: tuple[SweepRow, ...]
    notes: tuple[str, ...] = ()
    seconds: float = float("nan")

    @property
    def baselines(self) -> list[SweepRow]:
        return [r for r in self.rows if r.strength is None]

    @property
    def steered(self) -> list[SweepRow]:
        return [r for r in self.rows if r.strength is not None]

    @property
    def baseline_perplexity(self) -> float:
        """Mean over seeds of the baseline's perplexity (NaN when any is NaN)."""
        vals = [r.quality.perplexity for r in self.baselines]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def baseline_concept(self) -> float:
        vals = [r.concept for r in self.baselines]
        return sum(vals) / len(vals) if vals else float("nan")

    def summary(self) -> list[dict[str, Any]]:
        """Per strength (ascending): mean concept score, perplexity, divergence and distinct-token share over
        seeds, and whether the row ``qualifies`` (perplexity within the factor of the baseline's, not collapsed)."""
        limit = self.settings.max_ppl_ratio * self.baseline_perplexity
        out = []
        for s in self.settings.strengths:
            rows = [r for r in self.steered if r.strength == s]
            if not rows:
                continue
            n = len(rows)
            concept = [r.concept for r in rows if math.isfinite(r.concept)]
            row = {
                "strength": s,
                "concept": sum(concept) / len(concept) if concept else float("nan"),
                "perplexity": sum(r.quality.perplexity for r in rows) / n,
                "divergence": sum(r.quality.divergence for r in rows) / n,
                "distinct": sum(r.quality.distinct for r in rows) / n,
            }
            out.append({**row, "within": qualifies(row, limit), "seeds": n})
        return out

    @property
    def recommended(self) -> float | None:
        return recommend(self.summary(), self.baseline_perplexity, self.settings.max_ppl_ratio)

    def config_at(self, strength: float, max_acts: Mapping[int, float] | None) -> SteeringConfig:
        """The swept config with its edits at ``strength``."""
        return replace(self.config, edits=edits_at(self.config.edits, strength, max_acts))

    def to_dict(self) -> dict[str, Any]:
        """One JSON-ready object: settings, the baselines, every steered row, the per-strength summary and the
        recommended strength."""
        return {
            "settings": self.config.to_dict(),
            "sweep": {
                "strengths": list(self.settings.strengths),
                "seeds": list(self.settings.seeds),
                "max_ppl_ratio": self.settings.max_ppl_ratio,
                "features": list(self.features),
            },
            "baseline": [r.to_dict() for r in self.baselines],
            "rows": [r.to_dict() for r in self.steered],
            "summary": [
                {k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items()} for row in self.summary()
            ],
            "baseline_perplexity": _finite(self.baseline_perplexity),
            "recommended_strength": self.recommended,
            "notes": list(self.notes),
            "seconds": _finite(self.seconds),
        }


def run_sweep(
    rt: Runtime,
    config: SteeringConfig,
    settings: SweepSettings,
    max_acts: Mapping[int, float] | None,
    *,
    stop_at_eos: bool = True,
    max_logit_bytes: int = SWEEP_LOGIT_BYTES,
) -> SweepResult:
    """Run ``config`` at every strength x seed of ``settings`` (plus a baseline per seed) as one batch and
    score every row; raises SteeringInputError (one line) for bad input."""
    t0 = time.perf_counter()
    if config.multi_turn:
        raise SteeringInputError("sweeps run on one prompt; turn multi-turn chat off")
    if not config.edits:
        raise SteeringInputError("pick at least one feature to sweep")
    features = swept_features(config)
    if not features:
        raise SteeringInputError("every feature is ablated; a sweep needs a feature with a strength")
    ids, notes = prepare(rt, config, max_acts)
    seeds = settings.seeds
    if config.generation.temperature == 0 and len(seeds) > 1:
        notes.append("greedy decoding gives every seed the same text, so one seed ran; set a temperature to vary")
        seeds = seeds[:1]
        settings = replace(settings, seeds=seeds)
    grid = {s: edits_at(config.edits, s, max_acts) for s in settings.strengths}
    for edits in grid.values():
        validate_config(replace(config, edits=edits), rt.d_sae, max_acts)
    rows = [RowSpec(False, sd) for sd in seeds]
    rows += [RowSpec(True, sd, grid[s]) for s in settings.strengths for sd in seeds]
    batch = BatchStream(
        rt,
        config,
        rows,
        ids=ids,
        notes=notes,
        max_acts=max_acts,
        record=False,
        stop_at_eos=stop_at_eos,
        keep_logits=True,
        stream=False,
        row_errors="stop",
        max_logit_bytes=max_logit_bytes,
    )
    results = batch.run()
    quality = score_rows(rt, results, max_acts, [e.feature for e in config.edits])
    labels = [None] * len(seeds) + [s for s in settings.strengths for _ in seeds]
    out = tuple(
        SweepRow(s, spec.seed, res, q, q.concept_mean(features))
        for s, spec, res, q in zip(labels, rows, results, quality, strict=True)
    )
    for r in out:
        if r.result.error:
            notes.append(f"strength {r.strength:g}, seed {r.seed}: {r.result.error}")
    return SweepResult(config, settings, features, out, tuple(dict.fromkeys(notes)), time.perf_counter() - t0)
