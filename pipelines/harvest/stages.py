"""Wall-clock time per build stage, for the build's summary and the ``saes.stage_seconds`` column.

A build is: load the model and SAE, run the corpus forward to the hook, SAE encode, fold the batch into the
harvest state, then the weight statistics (logit effects, neighbours, UMAP), the example rows and the write.
``StageTimes`` adds up seconds per stage (a stage entered many times, like ``forward``, accumulates) and keeps
the order of ``STAGES`` when shown, so summaries from different builds line up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES: tuple[str, ...] = (
    "model_load",  # model + SAE load and splice at the hook
    "neighbours",  # exact kNN of decoder directions (also the UMAP's neighbour graph)
    "forward",  # the model up to the hook, over the corpus
    "encode",  # SAE encode (and decode, for FVE)
    "update",  # folding each batch into the harvest state
    "harvest",  # the harvest loop as a whole (forward + encode + update + tokenising)
    "logit_effects",  # decoder directions through the unembedding
    "umap",  # the 2-D map (what is left of it after the harvest when it ran alongside)
    "rows",  # feature and example rows as Arrow tables
    "write",  # the atomic write of the DuckDB file
)
# Stages that are parts of another one: not added again when the total is shown.
PARTS: frozenset[str] = frozenset({"forward", "encode", "update"})


@dataclass
class StageTimes:
    """Seconds per stage, summed over every time the stage was entered."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown build stage {stage!r} (one of {', '.join(STAGES)})")
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``stage`` (also when the body raises)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t)

    def get(self, stage: str) -> float:
        return self.seconds.get(stage, 0.0)

    def ordered(self) -> dict[str, float]:
        """The stages that ran, in ``STAGES`` order."""
        return {s: self.seconds[s] for s in STAGES if s in self.seconds}

    def line(self) -> str:
        """``model_load 4.9 s · forward 31.9 s · ...`` (empty when nothing was timed)."""
        return " · ".join(f"{s} {v:.1f} s" for s, v in self.ordered().items())

    def to_json(self) -> str:
        return json.dumps({s: round(v, 4) for s, v in self.ordered().items()})

    @classmethod
    def from_json(cls, text: str | None) -> StageTimes:
        """Parse ``to_json`` output; unknown stages and bad values are dropped (None or bad JSON: empty)."""
        out = cls()
        try:
            data = json.loads(text) if text else {}
        except (TypeError, ValueError):
            return out
        if isinstance(data, dict):
            for k, v in data.items():
                if k in STAGES and isinstance(v, int | float):
                    out.add(k, float(v))
        return out


@contextmanager
def timed(stages: StageTimes | None, stage: str) -> Iterator[None]:
    """``stages.timed(stage)``, or nothing when ``stages`` is None (callers that do not profile)."""
    if stages is None:
        yield
        return
    with stages.timed(stage):
        yield
