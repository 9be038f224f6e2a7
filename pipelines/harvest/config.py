"""The build's typed config and result (``featuredict build``; flags in ``pipelines/cli/build.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from featuredict.pipelines.harvest.corpus import (
    CorpusSpec,
)
from featuredict.pipelines.harvest.stages import StageTimes
from featuredict.pipelines.harvest.state import (
    HarvestConfig,
)
from featuredict.pipelines.model.runtime import Runtime
from featuredict.pipelines.model.saes import SaeRunStats, SaeSource

FVE_WARN = 0.5


@dataclass
class BuildConfig:
    model: str
    sae: SaeSource
    corpus: CorpusSpec
    db: str = "featuredict.duckdb"
    sae_name: str | None = None  # sae_id in the database; default derived from model + hook + d_sae
    hook: str | None = None  # override the SAE's hook_name (rarely right)
    context_size: int = 64
    max_tokens: int = 200_000
    batch_size: int = 16
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    n_interval_bands: int = 5
    n_logits: int = 10
    n_neighbours: int = 10
    umap: bool = True
    outlier_norm_ratio: float = 10.0  # see Runtime.outlier_norm_ratio; 0 disables
    device: str | None = None
    dtype: str | None = None  # model dtype; None: float32 on CPU, bfloat16 (else float16) on CUDA
    corpus_description: str | None = None
    progress: bool = True


@dataclass(kw_only=True)
class BuildResult(SaeRunStats):
    db: Path
    sae_id: str
    n_tokens: int
    n_contexts: int
    d_sae: int
    shards: int = 0  # Ray shards the harvest ran in (0: in this process)
    stages: StageTimes = field(default_factory=StageTimes)
    # the model + SAE the build ran, for the steps that follow it in the same process (the quality eval), so
    # they do not load the model again; None after ``release``
    runtime: Runtime | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Drop the reference to the runtime (its memory goes once nothing else holds it)."""
        self.runtime = None

    def summary(self) -> str:
        """One line of results, then (when stages were timed) a ``stages: ...`` line."""
        where = f" over {self.shards} Ray shards" if self.shards else ""
        first = (
            f"{self.sae_id}: {self.n_tokens:,} tokens in {self.n_contexts:,} contexts, d_sae={self.d_sae}, "
            f"FVE={self.fve:.3f}, L0={self.l0:.1f}, dead={self.dead_fraction:.1%}, "
            f"{self.seconds:.1f}s ({self.tokens_per_s:,.0f} tok/s harvest{where}, model in {self.dtype}) -> {self.db}"
        )
        line = self.stages.line()
        return f"{first}\nstages: {line}" if line else first


def default_sae_name(model: str, hook: str, d_sae: int) -> str:
    return f"{Path(model).name or model}/{hook}/{d_sae}"
