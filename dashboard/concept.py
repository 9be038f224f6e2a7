"""Concept search scoring for the search page: the maths lives in ``featuredict.pipelines.search.concept`` (shared with
``featuredict search --mode concept`` and the demo); this module re-exports it for the dashboard."""

from __future__ import annotations

from featuredict.pipelines.search.concept import EPS, concept_scores, split_texts, text_stats

__all__ = ["EPS", "concept_scores", "split_texts", "text_stats"]
