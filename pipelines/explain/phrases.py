"""The ``phrases`` explainer: an explanation in words, offline, with no chat model.

For each feature, candidate keyphrases (content words and two-word phrases, KeyBERT-style) are taken from the
windows around the max token of the top contexts the explainer may see (the even ranks; the odd ranks are held
out for scoring, ``data.load_features``). Each candidate gets:

- ``lexical``: the share of the feature's windows that contain it minus its share of a fixed sample of
  non-activating windows (``queries.context_sample``, contexts of other features);
- ``semantic``: the cosine of its sentence embedding (all-MiniLM-L6-v2) with the centroid of the feature's
  windows, minus its cosine with the centroid of the non-activating windows. A window's vector is the mean of
  the vectors of its content words: each distinct string is embedded once per process
  (``model.embedder.Embedder.token_vectors``), so a whole dictionary costs one pass over its vocabulary, not one per
  window.

The best candidate by ``lexical + semantic`` names the feature, with the runner-up when it scores at least
``SECOND_SHARE`` of the best, shares no word with it and is close to it in meaning (cosine >= ``RELATED``);
the token line follows:
``dogs and puppies · fires on: dog, puppy``. A feature with no candidate above zero gets the token line alone.

Texts are untrusted corpus text: whoever shows them escapes them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from featuredict.db import queries as q
from featuredict.db.queries import Reader
from featuredict.pipelines.harvest import contexts

MAX_PHRASE = 300
N_WINDOWS = 10  # shown top contexts read per feature
WINDOW = (12, 4)  # tokens before and after the max token
N_BACKGROUND = 400  # non-activating windows (one sample per run)
N_CANDIDATES = 12  # best lexical candidates ranked by the embedding model
MIN_SHARE = 0.2  # a candidate must occur in at least this share of the feature's windows (and in 2)
SECOND_SHARE = 0.6
RELATED = 0.45  # the runner-up joins only when its embedding is this close to the best one's ("dogs and puppies")
N_TOKENS = 3  # tokens on the "fires on" line
# one feature's ranking input: its best candidates, each window's content words, the lexical scores
Prepared = tuple[list[str], list[list[str]], dict[str, float]]
_WORD = re.compile(r"[a-z][a-z'\-]*[a-z]|[a-z]")


def _stop_words() -> frozenset[str]:
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError:  # pragma: no cover - scikit-learn comes with umap-learn
        return frozenset()
    return frozenset(ENGLISH_STOP_WORDS) | {"said", "says", "like", "just", "also", "really", "got", "did", "does"}


STOP = _stop_words()


def window_text(tokens: Sequence[str], max_pos: int, skip_first: bool) -> str:
    """The text of ``WINDOW`` tokens around ``max_pos`` (never position 0 when it is BOS), space marks as spaces."""
    return contexts.window_text(tokens, max_pos, WINDOW[0], WINDOW[1], skip_first)


def candidates(text: str) -> tuple[set[str], list[str]]:
    """(candidate keyphrases of one window: content words of 3+ letters and pairs of adjacent content words,
    its content words in order)."""
    words = _WORD.findall(text.lower())
    content = [w for w in words if len(w) >= 3 and w not in STOP]
    out = set(content)
    for a, b in zip(words, words[1:], strict=False):
        if len(a) >= 3 and len(b) >= 3 and a not in STOP and b not in STOP and a != b:
            out.add(f"{a} {b}")
    return out, content


def token_line(raw: Sequence[str], n: int = N_TOKENS) -> str:
    """``fires on: a, b, c``: the commonest max tokens, stripped, distinct (empty when there are none)."""
    toks = list(dict.fromkeys(t for t in (" ".join(str(r).translate(contexts.SPACE_MARKS).split()) for r in raw) if t))
    return ("fires on: " + ", ".join(toks[:n])) if toks else ""


class PhrasesExplainer:
    """Keyphrases from the activating windows, ranked lexically and with the sentence-embedding model against
    non-activating windows, plus the token line (see the module docstring). Bulk; no chat model."""

    bulk: ClassVar[bool] = True
    method = "phrases"
    CHUNK = 2048

    def __init__(self, embedder: Any | None = None, seed: int = 0):
        from featuredict.pipelines.model.embedder import load_embedder

        self.embedder = embedder if embedder is not None else load_embedder()  # EmbedModelError: one line
        self.model = self.embedder.model_id
        self.seed = seed
        self._bg: tuple[str, Counter[str], int, np.ndarray] | None = None

    def _vec(self, words: Sequence[str]) -> dict[str, np.ndarray]:
        return self.embedder.token_vectors(list(words))

    def _centroid(self, windows: Sequence[list[str]], vecs: dict[str, np.ndarray]) -> np.ndarray:
        rows = [np.mean([vecs[w] for w in ws], axis=0) for ws in windows if ws]
        if not rows:
            return np.zeros(self.embedder.dim, dtype=np.float32)
        c = np.mean(rows, axis=0)
        return c / max(float(np.linalg.norm(c)), 1e-12)

    def _background(self, db: Reader, sae_id: str, skip_first: bool) -> tuple[Counter[str], int, np.ndarray]:
        if self._bg is None or self._bg[0] != sae_id:
            pool = q.context_sample(db, sae_id, N_BACKGROUND, self.seed)
            df: Counter[str] = Counter()
            contents: list[list[str]] = []
            for toks, mp in zip(pool["tokens"], pool["max_pos"], strict=True):
                cands, content = candidates(window_text(list(toks), int(mp), skip_first))
                df.update(cands)
                contents.append(content)
            vecs = self._vec([w for ws in contents for w in ws])
            self._bg = (sae_id, df, max(len(pool), 1), self._centroid(contents, vecs))
        return self._bg[1], self._bg[2], self._bg[3]

    def explain_many(self, db: Reader, sae_id: str, features: Sequence[int], skip_first: bool) -> pd.DataFrame:
        """Columns feature, text (None where the feature has no stored context and no max token)."""
        ids = [int(f) for f in features]
        bg_df, n_bg, bg_c = self._background(db, sae_id, skip_first)
        ex = q.examples_for_features(db, sae_id, ids)
        ex = ex[(ex["kind"] == "top") & (ex["rank"] % 2 == 0)]
        per: dict[int, list[str]] = {}
        for f, toks, mp in zip(ex["feature"], ex["tokens"], ex["max_pos"], strict=True):
            lst = per.setdefault(int(f), [])
            if len(lst) < N_WINDOWS:
                lst.append(window_text(list(toks), int(mp), skip_first))
        summary = q.max_token_summary(db, sae_id, ids, skip_first)
        raw_of = {
            int(f): (list(r) if r is not None else [])
            for f, r in zip(summary["feature"], summary["max_raw"], strict=True)
        }
        prepared = [self._candidates(per.get(f, []), bg_df, n_bg) for f in ids]
        # every string the features need, embedded in one call (sorted by length inside it: little padding)
        vecs = self._vec([w for p in prepared if p is not None for w in _strings(p)])
        texts = []
        for f, p in zip(ids, prepared, strict=True):
            phrase = self._rank(*p, vecs, bg_c) if p is not None else ""
            texts.append(self.text(phrase, raw_of.get(f, [])))
        return pd.DataFrame({"feature": np.asarray(ids, dtype=np.int64), "text": texts})

    @staticmethod
    def text(phrase: str, raw: Sequence[str]) -> str | None:
        """``phrase · fires on: ...`` (either part alone when the other is empty; None when both are)."""
        return " · ".join(x for x in (phrase, token_line(raw)) if x)[:MAX_PHRASE] or None

    def phrase(self, windows: list[str], bg_df: Counter[str], n_bg: int, bg_c: np.ndarray) -> str:
        """The keyphrase part for one feature's window texts ('' when no candidate scores above zero)."""
        p = self._candidates(windows, bg_df, n_bg)
        if p is None:
            return ""
        return self._rank(*p, self._vec(_strings(p)), bg_c)

    @staticmethod
    def _candidates(windows: list[str], bg_df: Counter[str], n_bg: int) -> Prepared | None:
        """(the best ``N_CANDIDATES`` candidates by lexical score, each window's content words, the lexical
        scores), or None when no candidate scores above zero."""
        if not windows:
            return None
        df: Counter[str] = Counter()
        contents: list[list[str]] = []
        for w in windows:
            cands, content = candidates(w)
            df.update(cands)
            contents.append(content)
        n = len(windows)
        need = max(2, int(np.ceil(MIN_SHARE * n))) if n >= 2 else 1
        lex = {c: k / n - bg_df.get(c, 0) / n_bg for c, k in df.items() if k >= need}
        best = sorted((c for c in lex if lex[c] > 0), key=lambda c: (-lex[c], c))[:N_CANDIDATES]
        return (best, contents, lex) if best else None

    def _rank(
        self,
        best: list[str],
        contents: list[list[str]],
        lex: dict[str, float],
        vecs: dict[str, np.ndarray],
        bg_c: np.ndarray,
    ) -> str:
        """The best candidate by ``lexical + semantic``, with a close, related runner-up (module docstring)."""
        act_c = self._centroid(contents, vecs)
        score = {c: lex[c] + float(vecs[c] @ act_c) - float(vecs[c] @ bg_c) for c in best}
        ranked = sorted(best, key=lambda c: (-score[c], c))
        top = ranked[0]
        out = [top]
        for c in ranked[1:]:
            related = float(vecs[c] @ vecs[top]) >= RELATED
            if related and score[c] >= SECOND_SHARE * score[top] and not set(c.split()) & set(top.split()):
                out.append(c)
                break
        return " and ".join(out)


def _strings(prepared: Prepared) -> list[str]:
    """The strings one feature's ranking embeds: its candidates, then its windows' content words."""
    best, contents, _ = prepared
    return [*best, *(w for ws in contents for w in ws)]
