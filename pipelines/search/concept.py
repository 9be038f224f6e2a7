"""Concept search scoring: which features fire more on example texts than on counter-examples or the corpus.

Pure numpy/pandas (no Streamlit, no database), so it is unit-tested directly. It lives in the pipelines layer so
that the dashboard's search page, ``featuredict search --mode concept`` and the demo share one implementation
(the dashboard imports it from here).

Inputs are per-text activation matrices ``acts [pos, d_sae]`` restricted to valid (non-BOS/pad) tokens.
Activations are first put on each feature's own scale by dividing by its corpus ``max_act`` (so a feature
that tops out at 0.5 and one that tops out at 40 compare; a feature that never fired in the corpus uses the
largest activation seen in the given texts). Then, per feature:

- ``mass_pos``: mean normalised activation per token over all example tokens;
- ``mass_neg``: the same over counter-example tokens, or, without counter-examples, the corpus
  expectation ``density * mean_act / max_act`` (mean activation per corpus token, normalised);
- ``coverage``: fraction of example texts in which the feature fires at all;
- ``neg_coverage``: fraction of counter-examples in which it fires (NaN without counter-examples);
- ``lift = log2((mass_pos + eps) / (mass_neg + eps))``;
- ``score = coverage * lift`` (``* (1 - neg_coverage)`` with counter-examples), so a feature must fire on
  most examples, much more than it usually does, and rarely on counter-examples to rank high.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

EPS = 1e-4  # normalised activation per token below which differences do not count


def text_stats(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-text summary of ``acts [pos, d_sae]``: (sum over tokens ``[d_sae]``, fires-anywhere bool
    ``[d_sae]``, number of tokens)."""
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"acts must be [pos, d_sae], got shape {a.shape}")
    return a.sum(0), (a > 0).any(0), a.shape[0]


def concept_scores(
    examples: Sequence[np.ndarray],
    counter: Sequence[np.ndarray] | None,
    density: np.ndarray,
    mean_act: np.ndarray,
    max_act: np.ndarray,
    top: int = 50,
    eps: float = EPS,
) -> pd.DataFrame:
    """Rank features by how much more they fire on ``examples`` than on ``counter`` (or the corpus).

    ``examples`` / ``counter``: lists of ``[pos_i, d_sae]`` arrays (valid tokens only). ``density``,
    ``mean_act``, ``max_act``: ``[d_sae]`` corpus statistics (0 for dead features).
    Returns the ``top`` rows with score > 0, best first: columns feature, score, lift, coverage,
    neg_coverage, mass_pos, mass_neg, max_on_examples (raw max activation over the examples).
    """
    if not examples:
        raise ValueError("give at least one example text")
    d_sae = int(np.asarray(examples[0]).shape[1])
    for name, arr in (("density", density), ("mean_act", mean_act), ("max_act", max_act)):
        if np.asarray(arr).shape != (d_sae,):
            raise ValueError(f"{name} must have shape [{d_sae}], got {np.asarray(arr).shape}")

    def pooled(texts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean activation per token ``[d_sae]``, fraction of texts firing, max activation)."""
        sums = np.zeros(d_sae)
        fires = np.zeros(d_sae)
        peak = np.zeros(d_sae)
        n_tok = 0
        for a in texts:
            s, f, n = text_stats(a)
            sums += s
            fires += f
            n_tok += n
            if n:
                peak = np.maximum(peak, np.asarray(a, dtype=np.float64).max(0))
        return sums / max(n_tok, 1), fires / max(len(texts), 1), peak

    raw_pos, coverage, peak = pooled(examples)
    raw_neg, neg_cov, peak_neg = pooled(counter) if counter else (None, None, np.zeros(d_sae))
    # Each feature's own scale: its corpus max, or (never fired in the corpus) the max seen here.
    seen = np.maximum(peak, peak_neg)
    m = np.asarray(max_act, dtype=np.float64)
    scale = np.where(m > 0, m, np.where(seen > 0, seen, 1.0))  # [d_sae]
    mass_pos = raw_pos / scale
    if counter:
        mass_neg = raw_neg / scale
        penalty = 1.0 - neg_cov
    else:
        mass_neg = np.asarray(density, dtype=np.float64) * np.asarray(mean_act, dtype=np.float64) / scale
        neg_cov = np.full(d_sae, np.nan)
        penalty = np.ones(d_sae)
    lift = np.log2((mass_pos + eps) / (mass_neg + eps))
    score = coverage * lift * penalty
    score[coverage == 0] = 0.0
    df = pd.DataFrame(
        {
            "feature": np.arange(d_sae),
            "score": score,
            "lift": lift,
            "coverage": coverage,
            "neg_coverage": neg_cov,
            "mass_pos": mass_pos,
            "mass_neg": mass_neg,
            "max_on_examples": peak,
        }
    )
    df = df[df["score"] > 0].sort_values(["score", "mass_pos"], ascending=False, kind="stable")
    return df.head(top).reset_index(drop=True)


def split_texts(blob: str) -> list[str]:
    """Example texts from a text area: separated by blank lines, or one per line when there is no blank
    line. Blank entries dropped."""
    blob = (blob or "").replace("\r\n", "\n").strip()
    if not blob:
        return []
    parts = blob.split("\n\n") if "\n\n" in blob else blob.split("\n")
    return [p.strip() for p in parts if p.strip()]
