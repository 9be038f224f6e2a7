"""Explainers: registry name -> class. Each turns what the database holds about a feature into a short phrase.

- ``tokens`` (``TokensExplainer``): no LLM, deterministic. Summarises, from SQL aggregates over all the
  feature's stored contexts, the commonest tokens at the max position, the token usually just before / after
  them (when one is common), and the top promoted logit tokens, e.g.
  ``"bread" (40%), "flour", "dough"; after "the"; promotes "yeast", "oven"``. Bulk: a few queries per chunk of
  16,384 features, never one per feature.
- ``phrases`` (``phrases.PhrasesExplainer``): no LLM. Keyphrases from the activating windows, ranked lexically
  and with the sentence-embedding model against non-activating windows, then the token line:
  ``dogs and puppies · fires on: dog, puppy``.
- ``openai`` / ``hf`` (``LLMExplainer``): an LLM reads the shown top and interval contexts with the activating
  tokens marked <<like this>> and the promoted tokens, and answers ``EXPLANATION: <phrase>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pandas as pd

from featuredict.db import queries as q
from featuredict.db.queries import Reader
from featuredict.pipelines.explain.clients import BadAnswer, HFChat, Messages, OpenAIChat
from featuredict.pipelines.explain.data import FeatureData, activating, render, visible, window
from featuredict.pipelines.explain.phrases import PhrasesExplainer

MAX_PHRASE = 300

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher studying one feature of a sparse autoencoder trained on a language "
    "model. You are shown text excerpts in which the feature fires; the tokens where it fires are marked "
    "<<like this>>. Find what the marked tokens have in common, taking the words around them into account: a "
    "word or word family, a concept, a grammatical role, a format. Be specific and short. Do not list the "
    "excerpts and do not mention the << >> marks. Reply with exactly one line:\n"
    "EXPLANATION: <what the feature detects, in at most 15 words>"
)


def explain_messages(fd: FeatureData, skip_first: bool) -> Messages:
    """The chat messages asking for an explanation of one feature."""
    lines: list[str] = []
    top = [c for c in fd.shown if c.kind == "top"]
    inter = [c for c in fd.shown if c.kind == "interval"]
    if top:
        lines.append("Excerpts where the feature fires most strongly:")
        lines += [f"{i}. {render(c, *window(c, skip_first), activating(c))}" for i, c in enumerate(top, 1)]
    if inter:
        lines.append("")
        lines.append("Excerpts where it fires more weakly:")
        lines += [f"{i}. {render(c, *window(c, skip_first), activating(c))}" for i, c in enumerate(inter, 1)]
    promoted = [visible(t).strip() for t in fd.pos_tokens[:10] if t and t.strip()]
    if promoted:
        lines.append("")
        lines.append("Tokens the feature makes more likely to come next: " + ", ".join(f'"{t}"' for t in promoted))
    lines.append("")
    lines.append("What does this feature detect? Answer with one line starting with EXPLANATION:")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


_EXPLANATION_RE = re.compile(r"explanation\s*[:\-]\s*(.+)", re.IGNORECASE)


def parse_explanation(answer: str) -> str:
    """The phrase in an ``EXPLANATION: ...`` answer (the last such line), or else the answer's first non-empty
    line; quotes and a final full stop trimmed. BadAnswer when nothing usable is left."""
    hits = _EXPLANATION_RE.findall(answer or "")
    text = hits[-1] if hits else next((ln for ln in (answer or "").splitlines() if ln.strip()), "")
    text = " ".join(text.replace("**", "").split()).rstrip(".").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":  # the whole phrase quoted
        text = text[1:-1].strip()
    if not text:
        raise BadAnswer("empty explanation")
    if text.upper().startswith("<WHAT THE FEATURE"):
        raise BadAnswer("the answer repeated the template")
    return text[:MAX_PHRASE]


class LLMExplainer:
    """An explainer that asks a chat backend (``openai:`` or ``hf:``)."""

    bulk: ClassVar[bool] = False

    def __init__(self, backend: OpenAIChat | HFChat, max_new_tokens: int = 80):
        self.backend = backend
        self.method = backend.kind
        self.model = backend.model
        self.max_new_tokens = max_new_tokens

    def explain(self, fd: FeatureData, skip_first: bool) -> tuple[str, int]:
        """(explanation, tokens used); raises ChatError / ChatFatal / ValueError."""
        if not fd.shown:
            raise ValueError("no stored contexts to explain")
        messages = explain_messages(fd, skip_first)
        return self.backend.complete(messages, self.max_new_tokens, parse_explanation, avoid_repeats=True)


def _quote(tok: str) -> str:
    s = visible(tok).strip()
    if not s:
        s = "␣" if tok.strip(" ") == "" and tok else "∅"
    return '"' + s.replace('"', "'") + '"'


def tokens_phrase(row: dict, n_shown: int = 3, min_share: float = 0.3) -> str | None:
    """The ``tokens`` explanation of one row of ``queries.max_token_summary`` (None when there is nothing)."""
    n = int(row.get("n") or 0)
    parts: list[str] = []
    keys, raws, ns = row.get("max_keys"), row.get("max_raw"), row.get("max_n")
    max_keys: set[str] = set()
    if keys is not None and raws is not None and ns is not None and len(keys) and n > 0:
        toks = [_quote(str(r)) for r in raws[:n_shown]]
        share = int(ns[0]) / n
        toks[0] += f" ({share:.0%})" if share < 0.995 else ""
        parts.append(", ".join(toks))
        max_keys = {str(k) for k in keys[:n_shown]}
    for slot, word in (("prev", "after"), ("next", "before")):
        k, r, c = row.get(f"{slot}_keys"), row.get(f"{slot}_raw"), row.get(f"{slot}_n")
        if k is None or r is None or c is None:
            continue
        if len(k) and n > 0 and int(c[0]) / n >= min_share and str(k[0]) not in max_keys:
            parts.append(f"{word} {_quote(str(r[0]))}")
    pos = row.get("pos_tokens")
    promoted = [t for t in (list(pos) if pos is not None else []) if isinstance(t, str) and t.strip()][:n_shown]
    if promoted:
        parts.append("promotes " + ", ".join(_quote(t) for t in promoted))
    return "; ".join(parts)[:MAX_PHRASE] if parts else None


class TokensExplainer:
    """Deterministic summary of max tokens, their neighbours and promoted tokens (no LLM)."""

    bulk: ClassVar[bool] = True
    method = "tokens"
    model: str | None = None
    CHUNK = 16384

    def explain_many(self, db: Reader, sae_id: str, features: Sequence[int], skip_first: bool) -> pd.DataFrame:
        """Columns feature, text (None where the feature has nothing to summarise), for ``features``."""
        summary = q.max_token_summary(db, sae_id, list(features), skip_first)
        texts = [tokens_phrase(r) for r in summary.to_dict("records")]
        return pd.DataFrame({"feature": summary["feature"].to_numpy(np.int64), "text": texts})


EXPLAINERS: dict[str, type[TokensExplainer] | type[PhrasesExplainer] | type[LLMExplainer]] = {
    "tokens": TokensExplainer,
    "phrases": PhrasesExplainer,
    "openai": LLMExplainer,
    "hf": LLMExplainer,
}
