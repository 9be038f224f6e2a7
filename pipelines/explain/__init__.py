"""Words for features: ``featuredict explain`` (``run``), explainers (``methods``), Delphi-style scoring
(``scoring``), LLM clients for OpenAI-compatible endpoints and in-process Hugging Face models (``llm``), and what
a feature's contexts look like to them (``data``)."""

from featuredict.pipelines.explain.run import ExplainConfig, ExplainStopped, ExplainSummary, parse_features, run_explain

__all__ = ["ExplainConfig", "ExplainStopped", "ExplainSummary", "parse_features", "run_explain"]
