"""``featuredict explain``: the tokens explainer, the ``openai:`` client, scoring, resumability, fingerprints.

The LLM here is a TEST DOUBLE: a real HTTP server started on localhost in a thread, speaking the OpenAI
chat-completions protocol. It "explains" by naming the commonest marked token and "scores" by keyword
matching. It is no model; it lets the client, retries, error rows, concurrency and the scoring arithmetic be
tested for real over HTTP. Databases: SYNTHETIC (bench/synth_db.py) and the tiny real build (conftest.py).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.store import Store
from featuredict.pipelines.cli import main
from featuredict.pipelines.explain import ExplainConfig, parse_features, run_explain
from featuredict.pipelines.explain.clients import BadAnswer, ChatError, ChatFatal, ChatSettings, OpenAIChat
from featuredict.pipelines.explain.data import load_features, negative_pool
from featuredict.pipelines.explain.explainers import parse_explanation, tokens_phrase
from featuredict.pipelines.explain.scorers import (
    KeywordScorer,
    LLMScorer,
    balanced_accuracy,
    keywords,
    parse_binary_list,
)
from tests.helpers import SAE_ID, FakeLLM, copy_db, make_synth_db

SAE = SAE_ID
FAST = ChatSettings(retries=2, backoff_s=0.01, max_backoff_s=0.05, timeout_s=0.5, concurrency=4)
ZEBRA_FEATURE = 11  # the synthetic feature given a known meaning below: it fires on " zebra"


# ------------------------------------------------------------------------------------- the test double
# FakeLLM (tests/helpers.py): a localhost chat-completions server.


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture(scope="module")
def zebra_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 synthetic features; feature ZEBRA_FEATURE's stored contexts carry ' zebra' at their max position
    (and nowhere else in the database), so its meaning is known."""
    p = make_synth_db(tmp_path_factory.mktemp("zebra") / "z.duckdb", n_features=300, seed=5)
    con = duckdb.connect(str(p))
    try:
        con.execute(
            "UPDATE features SET dead = false, max_act = 5 WHERE sae_id = ? AND feature = ?", [SAE, ZEBRA_FEATURE]
        )
        con.execute(
            """UPDATE examples SET tokens = list_concat(tokens[1:max_pos], [' zebra'], tokens[max_pos + 2:])
               WHERE sae_id = ? AND feature = ?""",
            [SAE, ZEBRA_FEATURE],
        )
    finally:
        con.close()
    return p


@pytest.fixture
def zebra_db(zebra_master: Path, tmp_path: Path) -> Path:
    return copy_db(zebra_master, tmp_path / "z.duckdb")


def _cfg(db: Path, **kw) -> ExplainConfig:
    kw.setdefault("progress", False)
    kw.setdefault("chat", FAST)
    return ExplainConfig(db=str(db), **kw)


def _pseudo_word(db: Path, feature: int) -> str:
    """A word only this synthetic feature's prompt contains: its own pseudo-word (5th promoted token)."""
    word = Store(db).rows("SELECT pos_tokens[5] FROM features WHERE sae_id = ? AND feature = ?", [SAE, feature])
    return f'"{word[0][0].strip()}"'  # as the prompt quotes it among the promoted tokens


# ---------------------------------------------------------------------------------------------- units


def test_parse_features():
    assert parse_features("0-3, 7,2", 10) == [0, 1, 2, 3, 7]
    for bad in ("3-1", "x", "12", ""):
        with pytest.raises(ValueError):
            parse_features(bad, 10)


def test_parsers_and_balanced_accuracy():
    assert parse_explanation('blah\nEXPLANATION: "Bread" and baking.\n') == '"Bread" and baking'
    assert parse_explanation('EXPLANATION: "bread and baking"') == "bread and baking"
    assert parse_explanation("Explanation: bread and baking.") == "bread and baking"
    assert parse_explanation("just a phrase") == "just a phrase"
    with pytest.raises(BadAnswer):
        parse_explanation("  \n ")
    assert parse_binary_list("ok [1, 0, true, '0']", 4) == [1, 0, 1, 0]
    with pytest.raises(BadAnswer):
        parse_binary_list("[1, 0]", 3)
    with pytest.raises(BadAnswer):
        parse_binary_list("yes no yes", 3)
    assert balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0]) == 0.75
    assert balanced_accuracy([1, 1], [1, 1]) is None
    assert keywords('"bread" (40%), "the"; promotes "oven"') == ["bread", "oven"]
    assert keywords("Mentions of baking bread") == ["baking", "bread"]


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="--explainer"):
        ExplainConfig(db="x", features="1")
    with pytest.raises(ValueError, match="--features"):
        ExplainConfig(db="x", explainer="tokens")
    with pytest.raises(ValueError, match="--model"):
        ExplainConfig(db="x", all_features=True, explainer="openai:http://localhost:1/v1")
    with pytest.raises(ValueError, match="scorer"):
        ExplainConfig(db="x", all_features=True, explainer="tokens", score=True)
    with pytest.raises(ValueError, match="unknown explainer"):
        ExplainConfig(db="x", all_features=True, explainer="gpt:foo")


# ------------------------------------------------------------------------------------- tokens explainer


def test_tokens_explainer_on_tiny_db(tiny_db: Path, tmp_path: Path, capsys):
    db = shutil.copyfile(tiny_db, tmp_path / "tiny.duckdb")
    assert main(["explain", "--db", str(db), "--all", "--explainer", "tokens", "--no-progress"]) == 0
    out = capsys.readouterr().out
    s = Store(db)
    sae = q.sae_ids(s)[0]
    live = s.rows("SELECT count(*) FROM features WHERE sae_id = ? AND NOT dead", [sae])[0][0]
    best = q.best_explanations(s, sae)
    assert len(best) == live > 0 and f"explained {live}," in out
    fp = q.sae_fingerprint(s, sae)
    assert fp and fp.startswith("dec-sha256:")
    # Each phrase names the feature's commonest max token, as the examples table has it.
    f = int(best["feature"].iloc[0])
    ex = q.examples(s, sae, f, "top")
    toks = Counter(t[int(p)].strip().lower() for t, p in zip(ex["tokens"], ex["max_pos"], strict=True))
    inter = q.examples(s, sae, f, "interval")
    toks.update(t[int(p)].strip().lower() for t, p in zip(inter["tokens"], inter["max_pos"], strict=True))
    top_word = toks.most_common(1)[0][0]
    text = best["text"].iloc[0]
    assert text.lower().startswith(f'"{top_word}"') or (top_word == "" and text.startswith('"'))
    rows = s.df("SELECT * FROM explanations")
    assert set(rows["method"]) == {"tokens"} and rows["explainer_model"].isna().all()
    assert (rows["sae_fingerprint"] == fp).all() and rows["id"].is_unique
    # Resumable: a second run skips everything; --force redoes it without duplicating rows.
    assert main(["explain", "--db", str(db), "--all", "--explainer", "tokens", "--no-progress"]) == 0
    assert "explained 0," in capsys.readouterr().out
    assert main(["explain", "--db", str(db), "--all", "--explainer", "tokens", "--force", "--no-progress"]) == 0
    assert f"explained {live}," in capsys.readouterr().out
    assert len(Store(db).df("SELECT * FROM explanations")) == len(rows)


def test_tokens_phrase_uses_neighbours_and_logits():
    row = {
        "n": 10,
        "max_keys": ["bread", "dough"],
        "max_raw": [" bread", " Dough"],
        "max_n": [6, 4],
        "prev_keys": ["the"],
        "prev_raw": [" the"],
        "prev_n": [5],
        "next_keys": ["\n"],
        "next_raw": ["\n"],
        "next_n": [1],
        "pos_tokens": [" oven", " ", " yeast"],
    }
    assert tokens_phrase(row) == '"bread" (60%), "Dough"; after "the"; promotes "oven", "yeast"'
    assert tokens_phrase({"n": 0, "pos_tokens": []}) is None


def test_stale_fingerprint_reexplains(zebra_db: Path, capsys):
    run_explain(_cfg(zebra_db, features="0-9", explainer="tokens"))
    s = Store(zebra_db)
    fp = q.sae_fingerprint(s, SAE)
    assert not q.explanations(s, SAE, 3, fp)["stale"].any()
    # Other weights: change one decoder row (and the build time, as a rebuild would).
    s.write(
        lambda c: c.execute("UPDATE features SET decoder = list_transform(decoder, lambda x: x * 2) WHERE feature = 0")
    )
    s.write(lambda c: c.execute("UPDATE saes SET built_at = built_at + INTERVAL 1 SECOND"))
    fp2 = q.sae_fingerprint(s, SAE)
    assert fp2 != fp
    assert q.explanations(s, SAE, 3, fp2)["stale"].all()
    assert q.best_explanations(s, SAE, [3], fp2)["stale"].all()
    s.close()
    summary = run_explain(_cfg(zebra_db, features="0-9", explainer="tokens"))
    assert summary.skipped_done == 0 and summary.explained > 0
    s = Store(zebra_db)
    assert not q.explanations(s, SAE, 3, fp2)["stale"].any() and len(q.explanations(s, SAE, 3, fp2)) == 1


# -------------------------------------------------------------------------------------- openai: client


def test_openai_client_good_answer_sends_key_and_counts_tokens(llm: FakeLLM, monkeypatch):
    monkeypatch.setenv("FEATUREDICT_API_KEY", "sk-secret-123")
    c = OpenAIChat(llm.url, "fake-model", FAST)
    text, used = c.complete([{"role": "user", "content": "<<bread>> and <<bread>>"}], 20, parse_explanation)
    assert text == 'the word "bread"' and used == 10
    assert llm.auth[-1] == "Bearer sk-secret-123"


@pytest.mark.parametrize("mode", ["500", "429", "timeout", "malformed", "empty", "nochoices"])
def test_openai_client_retries_then_one_line_error(mode: str, monkeypatch):
    monkeypatch.setenv("FEATUREDICT_API_KEY", "sk-secret-123")
    server = FakeLLM({"poison": mode})
    try:
        c = OpenAIChat(server.url, "m", ChatSettings(retries=2, backoff_s=0.01, timeout_s=0.3))
        with pytest.raises(ChatError) as e:
            c.complete([{"role": "user", "content": "poison"}], 20, parse_explanation)
        assert server.hits[mode] == 3, "first try + 2 retries"
        msg = str(e.value)
        assert "\n" not in msg and "after 3 tries" in msg and "sk-secret" not in msg
    finally:
        server.close()


def test_openai_client_flaky_recovers_and_401_is_fatal(monkeypatch):
    monkeypatch.delenv("FEATUREDICT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    server = FakeLLM({"flaky": "flaky", "denied": "401"})
    try:
        c = OpenAIChat(server.url, "m", FAST)
        text, _ = c.complete([{"role": "user", "content": "flaky <<cat>>"}], 20, parse_explanation)
        assert text == 'the word "cat"' and server.hits["flaky"] == 3
        with pytest.raises(ChatFatal, match="401"):
            c.complete([{"role": "user", "content": "denied"}], 20, parse_explanation)
        assert server.hits["401"] == 1, "a bad key is not retried"
        assert server.auth[-1] == "Bearer sk-other"
    finally:
        server.close()


def test_llm_run_records_errors_and_goes_on_then_resumes(zebra_db: Path):
    bad = {_pseudo_word(zebra_db, 2): "500", _pseudo_word(zebra_db, 4): "malformed", _pseudo_word(zebra_db, 6): "empty"}
    bad[_pseudo_word(zebra_db, 8)] = "timeout"
    server = FakeLLM(bad)
    try:
        summary = run_explain(
            _cfg(zebra_db, features="0-11", explainer=f"openai:{server.url}", model="fake", chat=FAST)
        )
    finally:
        server.close()
    s = Store(zebra_db)
    dead = {int(f) for (f,) in s.rows("SELECT feature FROM features WHERE dead AND feature < 12")}
    rows = s.df("SELECT feature, text, error, method, explainer_model, tokens_used FROM explanations ORDER BY feature")
    failed = rows[rows["text"].isna()]
    assert set(failed["feature"]) == {2, 4, 6, 8} - dead
    assert all("after 3 tries" in e and "\n" not in e for e in failed["error"])
    ok = rows[rows["text"].notna()]
    assert len(ok) == 12 - len(dead) - len(failed) == summary.explained
    assert summary.failed == len(failed) and summary.tokens_used == int(ok["tokens_used"].sum()) > 0
    assert set(ok["method"]) == {"openai"} and set(ok["explainer_model"]) == {"fake"}
    z = ok[ok["feature"] == ZEBRA_FEATURE]["text"].iloc[0]
    assert z == 'the word "zebra"'
    # Resume with a healthy server: only the failed features are asked again; their error rows are replaced.
    server = FakeLLM()
    try:
        again = run_explain(_cfg(zebra_db, features="0-11", explainer=f"openai:{server.url}", model="fake"))
        assert again.explained == len(failed) and again.skipped_done == len(ok)
        assert server.requests == len(failed)
    finally:
        server.close()
    rows = Store(zebra_db).df("SELECT feature, text FROM explanations")
    assert rows["text"].notna().all() and rows["feature"].is_unique


def test_llm_run_stops_on_bad_key_with_one_line(zebra_db: Path, capsys):
    server = FakeLLM({"": "401"})  # every request
    try:
        rc = main(
            ["explain", "--db", str(zebra_db), "--features", "0-20", "--explainer", f"openai:{server.url}",
             "--model", "fake", "--no-progress", "--retries", "0"]
        )  # fmt: skip
    finally:
        server.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "401" in err[0] and "Traceback" not in err[0]


def test_too_many_failures_in_a_row_stop_the_run(zebra_db: Path):
    server = FakeLLM({"": "500"})
    try:
        summary = run_explain(
            _cfg(zebra_db, features="0-40", explainer=f"openai:{server.url}", model="fake", max_failures_in_a_row=5,
                 chat=ChatSettings(retries=0, backoff_s=0, concurrency=1))
        )  # fmt: skip
    finally:
        server.close()
    assert summary.stopped and "5 features in a row" in summary.stopped and summary.failed == 5


# ------------------------------------------------------------------------------------------- scoring


def _feature(db: Path, f: int):
    s = Store(db)
    pool = negative_pool(s, SAE, 2000, 0)
    return load_features(s, SAE, [f], pool, n_top=10, n_interval=5, n_score=10, seed=0)[f]


def test_held_out_contexts_are_not_shown_and_negatives_are_other_contexts(zebra_db: Path):
    fd = _feature(zebra_db, ZEBRA_FEATURE)
    shown = {c.context_id for c in fd.shown}
    assert fd.held_out and not shown & {c.context_id for c in fd.held_out}
    assert fd.negatives and not {c.context_id for c in fd.negatives} & (shown | {c.context_id for c in fd.held_out})
    assert all(" zebra" not in c.tokens for c in fd.negatives)


def test_detection_tells_right_from_wrong_explanation_over_http(zebra_db: Path, llm: FakeLLM):
    fd = _feature(zebra_db, ZEBRA_FEATURE)
    scorer = LLMScorer(OpenAIChat(llm.url, "judge", FAST), batch=7)
    right = scorer.score('the word "zebra"', fd, skip_first=True, seed=0)
    wrong = scorer.score('the word "violin"', fd, skip_first=True, seed=0)
    assert right.detection is not None and wrong.detection is not None
    assert right.detection >= 0.9 and wrong.detection <= 0.6
    assert right.fuzzing is not None and right.fuzzing >= 0.9 and wrong.fuzzing <= 0.6
    assert right.tokens_used > 0
    kw = KeywordScorer()
    assert kw.score('"zebra"', fd, True, 0).detection >= 0.9 > 0.6 >= kw.score('"violin"', fd, True, 0).detection


def test_score_flag_scores_new_and_existing(zebra_db: Path, llm: FakeLLM, capsys):
    s = Store(zebra_db)
    fp = q.sae_fingerprint(s, SAE)
    writes.add_explanations(
        s,
        [
            {"sae_id": SAE, "feature": ZEBRA_FEATURE, "text": "the violin", "method": "import", "sae_fingerprint": fp},
        ],
    )
    s.close()
    rc = main(
        ["explain", "--db", str(zebra_db), "--features", str(ZEBRA_FEATURE), "--explainer", f"openai:{llm.url}",
         "--model", "fake", "--score", "--no-progress", "--concurrency", "2"]
    )  # fmt: skip
    assert rc == 0 and "scored 1," in capsys.readouterr().out
    # Without --explainer, --score scores what is there (the imported one too), with the keyword scorer here.
    rc = main(["explain", "--db", str(zebra_db), "--features", str(ZEBRA_FEATURE), "--score", "--scorer", "keyword",
               "--no-progress"])  # fmt: skip
    assert rc == 0 and "scored 2," in capsys.readouterr().out
    s = Store(zebra_db)
    ex = q.explanations(s, SAE, ZEBRA_FEATURE, fp)
    assert ex["text"].iloc[0] == 'the word "zebra"' and ex["detection"].iloc[0] >= 0.9  # best first
    assert ex["scorer_model"].iloc[0] == "keyword"
    violin = ex[ex["method"] == "import"].iloc[0]
    assert violin["detection"] <= 0.6
    best = q.best_explanations(s, SAE, [ZEBRA_FEATURE], fp)
    assert best["text"].tolist() == ['the word "zebra"']


def test_http_explainer_concurrency(zebra_db: Path):
    """8 concurrent calls against a server that takes 100 ms per answer: much faster than one at a time."""
    server = FakeLLM(delay=0.1)
    try:
        t0 = time.perf_counter()
        summary = run_explain(
            _cfg(zebra_db, features="0-63", explainer=f"openai:{server.url}", model="fake",
                 chat=ChatSettings(concurrency=8, retries=0, timeout_s=5))
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        server.close()
    assert summary.explained > 50 and summary.failed == 0
    assert wall < summary.explained * 0.1 / 2, f"{wall:.2f}s for {summary.explained} features at 100 ms each"


def test_writes_validate_and_assign_ids(zebra_db: Path):
    s = Store(zebra_db)
    with pytest.raises(ValueError, match="method"):
        writes.add_explanations(s, [{"sae_id": SAE, "feature": 1, "text": "x", "method": ""}])
    with pytest.raises(ValueError, match="score"):
        writes.add_explanations(s, [{"sae_id": SAE, "feature": 1, "text": "x", "method": "m", "detection": 1.5}])
    a = writes.add_explanations(s, [{"sae_id": SAE, "feature": 1, "text": "x", "method": "m"}], replace=False)
    b = writes.add_explanations(s, [{"sae_id": SAE, "feature": 1, "text": "y", "method": "m"}], replace=False)
    assert b[0] == a[0] + 1 and len(q.explanations(s, SAE, 1)) == 2
    c = writes.add_explanations(s, [{"sae_id": SAE, "feature": 1, "text": "z", "method": "m"}])
    assert q.explanations(s, SAE, 1)["id"].tolist() == c
    assert writes.set_explanation_scores(s, [(c[0], 0.5, None, "keyword"), (999999, 0.1, 0.1, "x")]) == 1
    assert writes.delete_explanation(s, c[0]) == 1 and q.explanations(s, SAE, 1).empty


# ------------------------------------------------------------------------------------------ hf: backend


def test_hf_explainer_runs_in_process_on_tiny_model(zebra_db: Path, tiny_model_dir: Path, tmp_path: Path, capsys):
    """The hf: path end to end on the tiny RANDOM model (its words are noise: this checks the plumbing, chat
    template, token counts and rows, not quality). Without a chat template it is one line and exit code 2."""
    from transformers import AutoTokenizer

    assert main(["explain", "--db", str(zebra_db), "--features", "0", "--explainer", f"hf:{tiny_model_dir}",
                 "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0]
    folder = tmp_path / "tiny_chat"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tok.save_pretrained(folder)
    summary = run_explain(
        _cfg(zebra_db, features="0-3", explainer=f"hf:{folder}", max_new_tokens=8,
             chat=ChatSettings(retries=1, device="cpu", threads=1))
    )  # fmt: skip
    rows = Store(zebra_db).df("SELECT * FROM explanations ORDER BY feature")
    assert len(rows) == summary.explained + summary.failed == 4 - summary.skipped_dead
    assert set(rows["method"]) == {"hf"} and set(rows["explainer_model"]) == {str(folder)}
    made = rows[rows["text"].notna()]
    assert (made["tokens_used"] > 8).all() and summary.tokens_used == int(made["tokens_used"].sum())
