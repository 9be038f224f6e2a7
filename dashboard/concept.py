"""Concept search for the search page: the pipeline lives in ``featuredict.pipelines.concept`` (shared with
``featuredict search --mode concept``, the review queue and the demo); this module re-exports it for the dashboard."""

from __future__ import annotations

from featuredict.pipelines.concept import EPS, concept_scores, rank_concept, split_texts, text_stats

__all__ = ["EPS", "concept_scores", "rank_concept", "split_texts", "text_stats"]
