"""Words and a meaning index for a whole dictionary, in one step: ``featuredict words``, and what ``build`` and
``demo`` run after the harvest.

``add_words`` explains every live feature that has no explanation from the default offline explainer yet
(``featuredict explain --all``, resumable) and then embeds every feature (``featuredict embed``: only changed
texts), so search by meaning works on the dictionary straight away. Both steps are offline. The default
explainer is ``phrases`` (it beat ``tokens`` on both detection scorers on the demo's dictionary:
bench/RESULTS.md); it needs the meaning extra (sentence-transformers + the bundled MiniLM). When that is
missing, ``tokens`` explanations are written instead, there is no meaning index, and the report says which
command installs it.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

DEFAULT_EXPLAINER = "phrases"  # the offline explainer whose text every dictionary gets (docs/explanations.md)
FALLBACK_EXPLAINER = "tokens"  # written instead when the embedding model the default needs cannot load


@dataclass(frozen=True)
class WordsReport:
    sae_id: str
    explained: int
    explain_seconds: float
    embedded: int
    embed_seconds: float
    skipped_embed: str | None  # why the meaning index was not made (one line), or None
    explainer: str = DEFAULT_EXPLAINER

    def summary(self) -> str:
        out = f"words: explained {self.explained:,} features ({self.explainer}) in {self.explain_seconds:.1f}s"
        if self.skipped_embed:
            return out + f"; no meaning index: {self.skipped_embed}"
        return out + f", embedded {self.embedded:,} in {self.embed_seconds:.1f}s: search by meaning is ready"


def words_command(db: str | Path, sae_id: str | None = None, cli: str = "featuredict") -> str:
    """The one command that adds words and a meaning index to ``db``."""
    args = [cli, "words", "--db", str(db)] + (["--sae", sae_id] if sae_id else [])
    return " ".join(shlex.quote(a) if i else a for i, a in enumerate(args))


def add_words(
    db: str | Path,
    sae_id: str | None = None,
    explainer: str = DEFAULT_EXPLAINER,
    embed: bool = True,
    progress: bool = True,
    out: TextIO | None = None,
    threads: int | None = None,
) -> WordsReport:
    """Explain every live feature of ``sae_id`` (None: the database's only SAE) without an explanation from
    ``explainer``, then embed the SAE's features (``embed``). When ``explainer`` is the default and the embedding
    model it needs cannot load, ``FALLBACK_EXPLAINER`` explains instead. Raises ValueError (one line) for an
    unknown SAE or an SAE with no live features."""
    import io

    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.explain.run import ExplainConfig, run_explain
    from featuredict.pipelines.model.embedder import EmbedModelError

    store = Store(str(db))
    try:
        ids = q.sae_ids(store)
        if sae_id is None:
            if len(ids) != 1:
                raise ValueError(f"give --sae: {db} holds {len(ids)} SAEs ({', '.join(ids) or 'none'})")
            sae_id = ids[0]
        elif sae_id not in ids:
            raise ValueError(f"no SAE {sae_id!r} in {db} (it has: {', '.join(ids) or 'none'})")
        live = store.rows("SELECT count(*) FROM features WHERE sae_id = ? AND NOT dead", [sae_id])[0][0]
    finally:
        store.close()
    if not live:
        raise ValueError(f"SAE {sae_id!r} in {db} has no live features: nothing to explain or embed")
    t0 = time.perf_counter()
    log = io.StringIO()

    def explain_with(method: str) -> Any:
        cfg = ExplainConfig(db=str(db), sae_id=sae_id, all_features=True, explainer=method, progress=progress)
        return run_explain(cfg, log)

    try:
        summary = explain_with(explainer)
    except EmbedModelError:
        if explainer != DEFAULT_EXPLAINER:
            raise
        explainer = FALLBACK_EXPLAINER
        summary = explain_with(explainer)
    explain_s = time.perf_counter() - t0
    if summary.stopped:
        raise ValueError(f"explaining stopped: {summary.stopped}")
    if embed:
        skipped, embedded, embed_s = _embed(db, sae_id, progress, threads)
    else:
        skipped, embedded, embed_s = f"skipped (later: {words_command(db, sae_id)})", 0, 0.0
    report = WordsReport(sae_id, summary.explained, explain_s, embedded, embed_s, skipped, explainer)
    if out is not None:
        print(report.summary(), file=out)
    return report


def _embed(db: str | Path, sae_id: str, progress: bool, threads: int | None) -> tuple[str | None, int, float]:
    """(why it was skipped or None, features embedded, seconds)."""
    from featuredict.db.store import Store
    from featuredict.pipelines.model.embedder import EmbedModelError
    from featuredict.pipelines.search import meaning

    try:
        enc = meaning.load_embedder()
    except EmbedModelError as e:
        return str(e), 0, 0.0
    store = Store(str(db))
    try:
        with _threads(threads):
            rep = meaning.embed_features(store, sae_id, embedder=enc, progress=progress)
    finally:
        store.close()
    return None, rep.embedded, rep.seconds


class _threads:
    """torch on ``n`` threads for the duration (None: as it is)."""

    def __init__(self, n: int | None):
        self.n: int | None = n
        self.old: int | None = None

    def __enter__(self) -> None:
        if self.n:
            import torch

            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            import torch

            torch.set_num_threads(self.old)


# ----------------------------------------------------------------------------------------------- CLI
