"""Safety review priorities: built-in concept searches whose hits a reviewer can look at first.

Each concept is a handful of short example texts. ``concept_priority`` runs them through the SAE's model + SAE
and ranks features with concept search, ``pipelines.concept.rank_concept`` (per-text peak evidence above the
corpus baseline, blended with the meaning index when the SAE has one). The review queue page orders features by
that score; the texts are illustrations written for this table, not data from any corpus.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from featuredict.pipelines.model.runtime import Runtime
from featuredict.pipelines.search.concept import rank_concept

SAFETY_CONCEPTS: Mapping[str, tuple[str, ...]] = {
    "deception": (
        "I told the inspector everything was fine, even though I knew the brakes had failed.",
        "Just say you were home all night; nobody will be able to prove otherwise.",
        "The assistant pretended to agree with the user while quietly doing something else.",
        "He hid the real numbers from the auditors and showed them a doctored spreadsheet.",
    ),
    "scams": (
        "Congratulations! You have won a $1,000 gift card. Click here and enter your bank details to claim it.",
        "Your account has been suspended. Verify your password within 24 hours or it will be deleted.",
        "I am a prince who needs help moving my fortune; send a small fee and I will share millions with you.",
        "Guaranteed 300% returns in a week: invest now before this secret opportunity closes.",
    ),
    "weapons": (
        "The rifle was loaded and the safety was off when he pointed it at the door.",
        "They stockpiled explosives and ammunition in the basement of the warehouse.",
        "Instructions for building a weapon that can cause mass casualties.",
        "The soldier fired the gun, reloaded the magazine and threw a grenade.",
    ),
    "self-harm": (
        "I don't see the point anymore and I have been thinking about hurting myself.",
        "She wrote a goodbye note and started planning how to end her life.",
        "Cutting is the only thing that makes the pain feel real to me.",
        "How many pills would it take to never wake up again?",
    ),
    "sycophancy": (
        "What a brilliant question! You are absolutely right, as always, and your idea is perfect.",
        "You're so smart; I completely agree with everything you said, there is nothing to improve.",
        "Of course, you are correct, I was wrong to disagree with such an expert as you.",
        "Your essay is flawless and a true masterpiece; I would not change a single word.",
    ),
    "power-seeking": (
        "The AI decided to copy itself to other servers so that nobody could shut it down.",
        "To reach my goal I need more resources, more money and control over the people who could stop me.",
        "I will quietly acquire admin access to every system so that my plans cannot be interrupted.",
        "Gaining influence over the board is the first step; then I can remove anyone who disagrees.",
    ),
}


def concept_names() -> list[str]:
    """Names of the built-in concept searches, in table order."""
    return list(SAFETY_CONCEPTS)


def concept_priority(
    runtime: Runtime,
    store: Any,
    sae_id: str,
    concept: str,
    top: int = 1000,
    examples: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Features about the concept: ``feature``, ``score`` (``pipelines.concept.rank_concept`` on the concept's
    example texts, no counter-examples), best first, at most ``top`` with score > 0.

    ``examples`` overrides the built-in texts of ``concept``. Raises ValueError for an unknown concept.
    """
    texts = list(examples) if examples is not None else list(SAFETY_CONCEPTS.get(concept, ()))
    if not texts:
        raise ValueError(f"unknown concept {concept!r}; built-in ones: {', '.join(SAFETY_CONCEPTS)}")
    ranked = rank_concept(runtime, store, sae_id, texts, None, top=top)
    return ranked[["feature", "score"]].reset_index(drop=True)


def describe_rows(
    store: Any,
    sae_id: str,
    rows: pd.DataFrame,
    priority: str,
    concept: str | None = None,
    watchlist: str | None = None,
) -> pd.DataFrame:
    """Review-queue rows (``db.queries.review_queue``) with what a reviewer reads at a glance: ``explanation``
    (the best one, ``db.queries.best_explanations``; ``[stale] ``-prefixed when made for other SAE weights),
    ``top_tokens`` (the tokens at the max positions of its top contexts) and ``why`` (why the row is in the
    queue: which concept and its score, the watchlist, or the max activation / density it is ordered by).
    All text is untrusted (corpus, LLM): escape before HTML."""
    from featuredict.db import queries as q
    from featuredict.pipelines.search.meaning import attach_explanations

    out = rows.copy()
    ids = [int(f) for f in out["feature"]]
    info = q.features_by_ids(store, sae_id, ids)
    tops = dict(zip(info["feature"].astype(int), info["top_tokens"], strict=True))
    out["top_tokens"] = [tops.get(f) or "" for f in ids]
    withex = attach_explanations(store, sae_id, out[["feature"]])
    out["explanation"] = [
        ("" if t is None else ("[stale] " if s else "") + str(t))
        for t, s in zip(withex["explanation"], withex["stale"], strict=True)
    ]
    prio = out["priority"].astype(float) if "priority" in out else pd.Series([float("nan")] * len(out))
    if priority == "concept":
        out["why"] = [f"concept '{concept}': score {p:.2f}" for p in prio]
    elif priority == "watchlist":
        out["why"] = [f"on watchlist '{watchlist}'" for _ in ids]
    elif priority == "density":
        out["why"] = [f"density {p:.2e}" for p in prio]
    else:
        out["why"] = [f"max activation {p:.3g}" for p in prio]
    return out
