"""Concept search: which features are about the topic of some example texts (and not of counter-examples).

``concept_scores`` is pure numpy/pandas (no model, no database), so it is unit-tested directly; ``rank_concept``
is the whole pipeline every caller uses (the dashboard's search page, ``featuredict search --mode concept``,
the review queue's safety priorities, the demo's steering pick): run the example and counter-example texts
through the SAE, read the corpus baselines, score, and (when the SAE has a meaning index) blend in how close
each feature's words are to the examples.

Inputs are per-text activation matrices ``acts [pos, d_sae]`` restricted to valid (non-BOS/pad) tokens.
Activations are first put on each feature's own scale by dividing by its corpus ``max_act`` (so a feature
that tops out at 0.5 and one that tops out at 40 compare; a feature that never fired in the corpus uses the
largest activation seen in the given texts). Then, per feature (method ``peak``, the default):

- ``peak_pos``: the mean over example texts of the feature's PEAK normalised activation in that text. A
  feature about dogs fires hard on the dog sentence and not at all on the lion sentence: 1/3 of its peak, where
  a mean per token would dilute it by the text's length and a coverage factor would divide it by 3 again;
- ``base``: what the feature is expected to show on ordinary text of the same lengths, from its corpus
  density ``d`` and mean activation: ``(1 - (1 - d)^n) * mean_act / max_act`` for a text of ``n`` tokens. A broad
  feature (fires on most tokens) has a base close to its typical activation, so firing on the examples earns it
  nothing: the density penalty;
- ``peak_neg``: the same mean of peaks over the counter-examples (NaN without them);
- ``contrast = peak_pos - max(base, peak_neg)``: evidence above both the corpus and the counter-examples (the
  difference of means that Goodfire's ``contrast`` ranks by, on per-text peaks);
- ``score = contrast`` (plus ``MEANING_WEIGHT * cosine`` in ``rank_concept`` when the SAE has a meaning index).

Method ``mass`` is the first ranking (``coverage * log2 lift`` of the mean mass per token over the
counter-examples or the corpus), kept so bench/bench_topics.py can compare: it ranked broad features first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from featuredict.db.records import FeatureBaselines

if TYPE_CHECKING:
    from featuredict.pipelines.model.runtime import Runtime

EPS = 1e-4  # normalised activation per token below which differences do not count
MEANING_WEIGHT = 5.0  # weight of the meaning cosine added to the contrast (bench_topics: 4-6 best of 0.25-8)
MEANING_POOL = 200  # rank_concept blends the meaning score into this many best contrast candidates
Method = Literal["peak", "mass"]
COLUMNS = [
    "feature",
    "score",
    "contrast",
    "peak_pos",
    "peak_neg",
    "base",
    "coverage",
    "neg_coverage",
    "lift",
    "mass_pos",
    "mass_neg",
    "max_on_examples",
]


def text_stats(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-text summary of ``acts [pos, d_sae]``: (sum over tokens ``[d_sae]``, fires-anywhere bool
    ``[d_sae]``, number of tokens)."""
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"acts must be [pos, d_sae], got shape {a.shape}")
    return a.sum(0), np.asarray((a > 0).any(0)), int(a.shape[0])


def _peaks(texts: Sequence[np.ndarray], d_sae: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(per-text peak ``[n_texts, d_sae]`` raw, per-text token sums ``[n_texts, d_sae]``, fires ``[n_texts,
    d_sae]`` bool, token counts ``[n_texts]``)."""
    peak = np.zeros((len(texts), d_sae))
    sums = np.zeros((len(texts), d_sae))
    n_tok = np.zeros(len(texts))
    for i, a in enumerate(texts):
        s, _, n = text_stats(a)
        if int(np.asarray(a).shape[1]) != d_sae:
            raise ValueError(f"every text's acts must have {d_sae} features, got {np.asarray(a).shape[1]}")
        sums[i] = s
        n_tok[i] = n
        if n:
            peak[i] = np.asarray(a, dtype=np.float64).max(0)
    return peak, sums, peak > 0, n_tok


def concept_scores(
    examples: Sequence[np.ndarray],
    counter: Sequence[np.ndarray] | None,
    baselines: FeatureBaselines,
    top: int = 50,
    eps: float = EPS,
    method: Method = "peak",
) -> pd.DataFrame:
    """Rank features by how much more they fire on ``examples`` than on ``counter`` and on ordinary text.

    ``examples`` / ``counter``: lists of ``[pos_i, d_sae]`` arrays (valid tokens only). ``baselines``: the
    ``[d_sae]`` corpus statistics (density, mean_act, max_act; 0 for dead features). ``method``: ``peak`` (the
    default, see the module docstring) or ``mass`` (the first ranking).
    Returns the ``top`` rows with score > 0, best first: columns ``COLUMNS`` (``max_on_examples``: raw max
    activation over the examples; ``peak_neg`` / ``neg_coverage`` NaN without counter-examples).
    """
    if not examples:
        raise ValueError("give at least one example text")
    if method not in ("peak", "mass"):
        raise ValueError(f"unknown concept method {method!r} (peak or mass)")
    d_sae = int(np.asarray(examples[0]).shape[1])
    if baselines.d_sae != d_sae:
        raise ValueError(f"baselines must have shape [{d_sae}], got [{baselines.d_sae}]")
    dens = np.clip(baselines.density, 0.0, 1.0)
    mean = baselines.mean_act
    peak_p, sums_p, fires_p, n_p = _peaks(examples, d_sae)
    have_neg = bool(counter)
    peak_n, sums_n, fires_n, n_n = _peaks(counter or [], d_sae)
    raw_max = peak_p.max(0)
    seen = np.maximum(raw_max, peak_n.max(0) if have_neg else 0.0)
    m = baselines.max_act
    scale = np.where(m > 0, m, np.where(seen > 0, seen, 1.0))  # [d_sae]: each feature's own scale
    coverage = fires_p.mean(0)
    neg_cov = fires_n.mean(0) if have_neg else np.full(d_sae, np.nan)
    typical = mean / scale  # normalised activation when it fires
    # Expected per-text peak on ordinary text of each example's length: P(fires somewhere) * typical.
    p_fire = 1.0 - np.power(1.0 - dens[None, :], np.maximum(n_p, 1.0)[:, None])
    base = (p_fire * typical[None, :]).mean(0)
    pos = (peak_p / scale).mean(0)
    neg = (peak_n / scale).mean(0) if have_neg else np.full(d_sae, np.nan)
    contrast = pos - (np.maximum(base, neg) if have_neg else base)
    mass_pos = sums_p.sum(0) / max(float(n_p.sum()), 1.0) / scale
    mass_neg = sums_n.sum(0) / max(float(n_n.sum()), 1.0) / scale if have_neg else dens * typical
    lift = np.log2((mass_pos + eps) / (mass_neg + eps))
    if method == "peak":
        score = contrast
    else:
        score = coverage * lift * ((1.0 - neg_cov) if have_neg else 1.0)
    score = np.where(coverage > 0, score, 0.0)
    df = pd.DataFrame(
        {
            "feature": np.arange(d_sae),
            "score": score,
            "contrast": contrast,
            "peak_pos": pos,
            "peak_neg": neg,
            "base": base,
            "coverage": coverage,
            "neg_coverage": neg_cov,
            "lift": lift,
            "mass_pos": mass_pos,
            "mass_neg": mass_neg,
            "max_on_examples": raw_max,
        }
    )
    df = df[df["score"] > 0].sort_values(["score", "peak_pos"], ascending=False, kind="stable")
    return df.head(top).reset_index(drop=True)


def rank_concept(
    runtime: Runtime,
    store: Any,
    sae_id: str,
    examples: Sequence[str],
    counter: Sequence[str] | None = None,
    top: int = 50,
    method: Method = "peak",
    meaning_weight: float | None = None,
) -> pd.DataFrame:
    """Concept search end to end: features about the topic of ``examples`` and not of ``counter``, best first.

    Runs the texts through ``runtime`` (``pipelines.prompt.dense_valid_acts``), reads the SAE's corpus baselines
    (``db.queries.feature_baselines``) and scores with ``concept_scores``. When the SAE has a meaning index
    (``featuredict embed``), the ``MEANING_POOL`` best candidates also get ``meaning`` (cosine between the
    feature's stored vector and the mean embedding of the examples) and ``score = contrast + meaning_weight *
    meaning`` (default ``MEANING_WEIGHT``; 0 turns it off). Columns: ``COLUMNS`` + ``meaning`` (NaN without an
    index). Raises ValueError without an example text."""
    from featuredict.db import queries as q
    from featuredict.pipelines.search.by_prompt import dense_valid_acts

    texts = [t.strip() for t in examples if t and t.strip()]
    negs = [t.strip() for t in counter or [] if t and t.strip()]
    if not texts:
        raise ValueError("give at least one example text")
    pos = [dense_valid_acts(runtime, t) for t in texts]
    neg = [dense_valid_acts(runtime, t) for t in negs]
    base = q.feature_baselines(store, sae_id, int(pos[0].shape[1]))
    weight = MEANING_WEIGHT if meaning_weight is None else float(meaning_weight)
    pool = max(int(top), MEANING_POOL) if weight > 0 else int(top)
    ranked = concept_scores(pos, neg or None, base, pool, method=method)
    ranked["meaning"] = np.nan
    if weight > 0 and not ranked.empty:
        cos = _meaning_scores(store, sae_id, texts, ranked["feature"].to_numpy())
        if cos is not None:
            ranked["meaning"] = cos
            ranked["score"] = ranked["contrast" if method == "peak" else "score"] + weight * np.nan_to_num(cos)
            ranked = ranked.sort_values(["score", "peak_pos"], ascending=False, kind="stable")
    return ranked.head(int(top)).reset_index(drop=True)


def _meaning_scores(store: Any, sae_id: str, texts: Sequence[str], features: np.ndarray) -> np.ndarray | None:
    """Cosine of each feature's stored meaning vector with the mean embedding of ``texts`` (NaN for a feature
    without a vector); None when the SAE has no meaning index or the embedding model cannot load."""
    from featuredict.pipelines.model import embedder
    from featuredict.pipelines.search import meaning

    model = meaning.default_model(store, sae_id)
    if model is None:
        return None
    try:
        enc = meaning.load_embedder(model)
    except embedder.EmbedModelError:
        return None
    index = meaning.vector_index(store, sae_id, model)
    if index.n == 0:
        return None
    with embedder.one_thread():
        centre = enc.encode(list(texts)).mean(0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    pos = np.clip(np.searchsorted(index.features, features), 0, index.n - 1)
    found = index.features[pos] == features
    out = np.full(len(features), np.nan)
    out[found] = index.vectors[pos[found]] @ centre.astype(np.float32)
    return out


def split_texts(blob: str) -> list[str]:
    """Example texts from a text area: separated by blank lines, or one per line when there is no blank
    line. Blank entries dropped."""
    blob = (blob or "").replace("\r\n", "\n").strip()
    if not blob:
        return []
    parts = blob.split("\n\n") if "\n\n" in blob else blob.split("\n")
    return [p.strip() for p in parts if p.strip()]
