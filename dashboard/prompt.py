"""Model + SAE runs on pasted text for the search page: the code lives in ``featuredict.pipelines.search.by_prompt``
(shared with ``featuredict search --mode prompt|concept``); this module re-exports it for the dashboard."""

from __future__ import annotations

from featuredict.pipelines.search.by_prompt import (
    MAX_TOKENS,
    PromptResult,
    dense_valid_acts,
    feature_over_tokens,
    run_prompt,
    token_features,
    whole_text_features,
)

__all__ = [
    "MAX_TOKENS",
    "PromptResult",
    "dense_valid_acts",
    "feature_over_tokens",
    "run_prompt",
    "token_features",
    "whole_text_features",
]
