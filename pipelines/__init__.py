"""featuredict offline pipelines: load model + SAE, train SAEs, harvest feature statistics into DuckDB."""

__version__ = "0.1.0"
