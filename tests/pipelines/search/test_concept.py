"""Concept ranking (``pipelines/search/concept.py``) on a synthetic SAE whose features are known by construction.

The SAE is a rule over words (no model): feature 0 is TOPICAL (fires on animal words only, at up to its corpus
max), feature 1 is BROAD (fires on most tokens of any text, a little harder on vivid prose such as the
examples), feature 2 is a rare unrelated feature. The corpus statistics are the ones those rules give on
ordinary text (density, mean activation when firing, max)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from featuredict.db.records import FeatureBaselines
from featuredict.pipelines.search import concept

ANIMALS = {"dog": 1.0, "cat": 0.8, "lions": 0.9, "zebras": 0.6, "horses": 0.7}
D = 3
DENSITY = np.array([0.002, 0.8, 0.001])
MEAN_ACT = np.array([0.7, 0.5, 0.5])
MAX_ACT = np.array([1.0, 1.0, 1.0])
BASE = FeatureBaselines(DENSITY, MEAN_ACT, MAX_ACT)


def synthetic_acts(text: str, broad: float) -> np.ndarray:
    """``[n_tokens, D]``: one token per word; f0 on animal words, f1 (at ``broad``) on 4 words of 5."""
    toks = re.findall(r"\w+", text.lower())
    a = np.zeros((len(toks), D))
    for i, t in enumerate(toks):
        a[i, 0] = ANIMALS.get(t, 0.0)
        a[i, 1] = broad if i % 5 else 0.0
    return a


EXAMPLES = [
    "The dog barked and chased the cat up a tree.",
    "Lions and zebras gather at the water hole on the savanna.",
    "The farmer fed the horses and the hens at dawn.",
]
COUNTER = [
    "Soldiers fought in the trenches during the war.",
    "The email asked her to confirm her password.",
    "The detective searched the house for clues.",
]


@pytest.mark.parametrize("with_counter", [True, False])
def test_topical_feature_ranks_above_broad_one(with_counter: bool):
    pos = [synthetic_acts(t, broad=0.7) for t in EXAMPLES]  # the broad feature: a little stronger here...
    neg = [synthetic_acts(t, broad=0.5) for t in COUNTER] if with_counter else None  # ...than on these
    df = concept.concept_scores(pos, neg, BASE)
    assert df["feature"].iloc[0] == 0
    assert 2 not in set(df["feature"])  # never fired on the examples
    scores = dict(zip(df["feature"], df["score"], strict=True))
    assert scores[0] > 2 * scores.get(1, 0.0)


def test_peak_evidence_and_density_penalty_columns():
    pos = [synthetic_acts(t, broad=0.7) for t in EXAMPLES]
    df = concept.concept_scores(pos, None, BASE).set_index("feature")
    # f0 peaks at 1.0, 0.9 and 0.7 in the three texts: their mean, less the small expected peak of a rare feature
    assert df.loc[0, "peak_pos"] == pytest.approx((1.0 + 0.9 + 0.7) / 3)
    n = [len(re.findall(r"\w+", t)) for t in EXAMPLES]
    want_base = np.mean([(1 - (1 - 0.002) ** k) * 0.7 for k in n])
    assert df.loc[0, "base"] == pytest.approx(want_base)
    assert df.loc[0, "score"] == pytest.approx(df.loc[0, "peak_pos"] - want_base)
    # the broad feature fires somewhere in every text of ordinary length: its base is its typical activation
    assert df.loc[1, "base"] == pytest.approx(0.5, abs=1e-3)
    assert df.loc[1, "score"] == pytest.approx(0.7 - df.loc[1, "base"])


def test_unknown_method_and_no_examples_are_errors():
    with pytest.raises(ValueError, match="unknown concept method"):
        concept.concept_scores([synthetic_acts("dog", 0.5)], None, BASE, method="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one example"):
        concept.concept_scores([], None, BASE)
