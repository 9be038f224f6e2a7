"""SAE quality at build time: `featuredict build` stores ΔLM loss, loss recovered, KL, FVE, L0 through the splice
in ``sae_evals``; they match ``quality.evaluate`` on the same tokens; the overview page shows them; a rebuild of
another SAE keeps them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featuredict.db import queries as q
from featuredict.db.store import Store
from featuredict.pipelines.cli import main
from tests.helpers import APP, tiny_build_argv


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path):
    db = tmp_path_factory.mktemp("evals") / "evals.duckdb"
    extra = ("--max-tokens", "600", "--context-size", "16", "--no-umap", "--eval-contexts", "6")
    assert main(tiny_build_argv(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, *extra)) == 0
    return db


def test_build_stores_splice_quality(built: Path, tiny_corpus: Path, capsys) -> None:
    from featuredict.pipelines.attribution.quality import corpus_batches, evaluate
    from featuredict.pipelines.attribution.splice import Slot
    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.model.runtime import cached_runtime_from_row

    s = Store(built, read_only=True)
    try:
        ev = q.sae_evals(s)
        row = q.sae_info(s, q.sae_ids(s)[0])
    finally:
        s.close()
    assert len(ev) == 1 and ev.method.iloc[0] == "splice" and ev.n_contexts.iloc[0] == 6
    assert ev.context_size.iloc[0] == 16 and ev.n_tokens.iloc[0] == 6 * 15  # BOS does not count
    rt = cached_runtime_from_row(dict(row))
    again = evaluate(
        rt.backend,
        Slot(row["sae_id"], rt.sae, rt.site),
        corpus_batches(rt.tokenizer, CorpusSpec(str(tiny_corpus)), 16, 6),
    )
    for k in ("delta_lm_loss", "loss_recovered", "kl", "fve", "l0"):
        assert float(ev[k].iloc[0]) == pytest.approx(getattr(again, k), rel=1e-6, abs=1e-9), k
    assert float(ev.delta_lm_loss.iloc[0]) == pytest.approx(again.ce_sae - again.ce_clean)


def test_build_evaluates_with_its_own_runtime(
    tmp_path: Path, tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path, monkeypatch
) -> None:
    """The quality eval after a build reuses the model the build loaded (no second load); the figures equal a
    fresh load's (``test_build_stores_splice_quality``)."""
    from featuredict.pipelines.attribution import quality

    def no_reload(*a, **k):
        raise AssertionError("the eval loaded the model again")

    monkeypatch.setattr(quality, "cached_runtime_from_row", no_reload)
    db = tmp_path / "again.duckdb"
    extra = ("--max-tokens", "300", "--context-size", "16", "--no-umap", "--eval-contexts", "3", "--no-words")
    assert main(tiny_build_argv(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, *extra)) == 0
    s = Store(db, read_only=True)
    try:
        assert len(q.sae_evals(s)) == 1
    finally:
        s.close()


def test_overview_shows_quality(built: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FEATUREDICT_DB", str(built))
    at = AppTest.from_file(APP, default_timeout=60).run()  # the overview is the default page
    assert not at.exception, at.exception
    frames = [d.value for d in at.dataframe]
    assert any("delta_lm_loss" in f.columns and "loss_recovered" in f.columns for f in frames)
    assert any("spliced" in c.value for c in at.caption)


def test_rebuild_of_another_sae_keeps_the_evals(built: Path, tmp_path: Path, tiny_model_dir, tiny_corpus) -> None:
    from tests.helpers import build_tiny_db, make_tiny_sae

    db = tmp_path / "copy.duckdb"
    shutil.copy(built, db)
    other = make_tiny_sae(tmp_path / "other_sae", tiny_model_dir, hook="model.layers.0", seed=9)
    build_tiny_db(db, tiny_model_dir, other, tiny_corpus, sae_name="second", umap=False)
    s = Store(db, read_only=True)
    try:
        first = [i for i in q.sae_ids(s) if i != "second"]
        assert len(first) == 1 and q.sae_evals(s).sae_id.tolist() == first
    finally:
        s.close()
