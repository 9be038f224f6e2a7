"""Safety review workflow: review status, append-only history, optimistic concurrency, reviewer identity and the
feature page's review control / conflict notice / history (synthetic database, bench/synth_db.py)."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.schema import USER_TABLES, copy_kept_rows, create_schema
from featuredict.db.store import Store
from tests.helpers import (
    HOSTILE_FEATURE,
    HOSTILE_IMG,
    HOSTILE_SCRIPT,
    SAE_ID,
    assert_clean,
    htmls,
    open_app,
    press,
    run_threads,
    texts,
    widget,
)


def _history(store: Store, feature: int) -> list[dict]:
    return q.history(store, SAE_ID, feature).to_dict("records")


def test_review_status_roundtrip_and_history(store):
    assert q.review(store, SAE_ID, 7) == {
        "status": "unreviewed",
        "reviewer": None,
        "reason": None,
        "version": 0,
        "updated_at": None,
    }
    r = writes.set_review(
        store, SAE_ID, 7, "concerning", reason="fires on scam text", reviewer="ann", expected_version=0
    )
    assert r.conflict is None and r.row["status"] == "concerning" and r.row["version"] == 1
    got = q.review(store, SAE_ID, 7)
    assert (got["status"], got["reviewer"], got["reason"], got["version"]) == (
        "concerning",
        "ann",
        "fires on scam text",
        1,
    )
    assert got["updated_at"] is not None
    writes.set_review(store, SAE_ID, 7, "benign", reviewer="bob", expected_version=1)
    h = _history(store, 7)
    assert [(x["field"], x["action"], x["author"]) for x in h] == [("review", "set", "bob"), ("review", "set", "ann")]
    assert (
        json.loads(h[0]["old_value"])["status"] == "concerning" and json.loads(h[0]["new_value"])["status"] == "benign"
    )
    assert h[1]["old_value"] is None
    with pytest.raises(ValueError, match="review status must be one of"):
        writes.set_review(store, SAE_ID, 7, "fine")
    with pytest.raises(ValueError, match="has no feature"):
        writes.set_review(store, SAE_ID, 10**6, "benign")


def test_review_conflict_is_reported_not_overwritten(store):
    loaded = q.review(store, SAE_ID, 8)["version"]  # two reviewers open the same form
    first = writes.set_review(store, SAE_ID, 8, "concerning", reason="theirs", reviewer="ann", expected_version=loaded)
    second = writes.set_review(store, SAE_ID, 8, "benign", reason="mine", reviewer="bob", expected_version=loaded)
    assert first.conflict is None
    assert second.conflict is not None
    assert second.conflict["theirs"]["status"] == "concerning" and second.conflict["theirs"]["reason"] == "theirs"
    assert second.conflict["mine"] == {"status": "benign", "reviewer": "bob", "reason": "mine"}
    assert q.review(store, SAE_ID, 8)["status"] == "concerning"  # not overwritten silently
    h = _history(store, 8)  # both versions are in the history
    assert [(x["action"], json.loads(x["new_value"])["reason"]) for x in h] == [("conflict", "mine"), ("set", "theirs")]
    # "keep mine": save again against the version now stored
    again = writes.set_review(store, SAE_ID, 8, "benign", reason="mine", reviewer="bob", expected_version=1)
    assert again.conflict is None and q.review(store, SAE_ID, 8)["status"] == "benign"


def test_label_conflict_keeps_theirs_merges_tags_and_logs_both(store):
    before = q.label(store, SAE_ID, 9)  # None: the form is loaded empty
    writes.update_label(store, SAE_ID, 9, label="theirs", add_tags=["a"], author="ann")  # someone saves first
    res = writes.save_label_edit(store, SAE_ID, 9, before, label="mine", tags=["b"], notes="my note", author="bob")
    assert res.conflicts == {"label": {"theirs": "theirs", "mine": "mine"}}
    row = q.label(store, SAE_ID, 9)
    assert row["label"] == "theirs" and row["tags"] == ["a", "b"] and row["notes"] == "my note"
    h = _history(store, 9)
    label_rows = [(x["action"], json.loads(x["new_value"]), x["author"]) for x in h if x["field"] == "label"]
    assert ("conflict", "mine", "bob") in label_rows and ("set", "theirs", "ann") in label_rows
    # keep mine: save against the current row
    res2 = writes.save_label_edit(store, SAE_ID, 9, q.label(store, SAE_ID, 9), "mine", row["tags"], "my note", "bob")
    assert not res2.conflicts and q.label(store, SAE_ID, 9)["label"] == "mine"
    assert json.loads(_history(store, 9)[0]["old_value"]) == "theirs"


def test_same_value_is_no_conflict(store):
    before = q.label(store, SAE_ID, 10)
    writes.update_label(store, SAE_ID, 10, label="same")
    assert not writes.save_label_edit(store, SAE_ID, 10, before, "same", [], None).conflicts


def test_list_membership_history(store):
    writes.add_to_list(store, "watch", SAE_ID, [3, 4], author="ann")
    writes.add_to_list(store, "watch", SAE_ID, [4])  # already there: no history row
    writes.rename_list(store, "watch", "watch2", author="ann")
    writes.remove_from_list(store, "watch2", SAE_ID, 3, author="bob")
    writes.delete_list(store, "watch2", author="bob")
    h3 = [(x["old_value"], x["new_value"]) for x in _history(store, 3) if x["field"] == "list"]
    assert h3 == [('"watch2"', None), ('"watch"', '"watch2"'), (None, '"watch"')]
    h4 = [(x["old_value"], x["new_value"]) for x in _history(store, 4) if x["field"] == "list"]
    assert h4 == [('"watch2"', None), ('"watch"', '"watch2"'), (None, '"watch"')]


def test_threads_lose_no_history_and_report_conflicts(store):
    """8 threads x 10 rounds: each reviews its own feature and all race on one shared feature with the version
    they loaded; every attempt is in the history and each refused one came back as a conflict."""
    n_threads, n_each, shared = 8, 10, 40
    conflicts = [0] * n_threads
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(n_each):
                writes.set_review(store, SAE_ID, 50 + t, "benign", reason=f"{t}-{i}", reviewer=f"w{t}")
                loaded = q.review(store, SAE_ID, shared)["version"]
                r = writes.set_review(
                    store, SAE_ID, shared, "concerning", reason=f"{t}-{i}", reviewer=f"w{t}", expected_version=loaded
                )
                conflicts[t] += r.conflict is not None
                writes.update_label(store, SAE_ID, shared, add_tags=[f"t{t}-{i}"], author=f"w{t}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    run_threads(worker, n_threads)
    assert not errors, errors
    for t in range(n_threads):
        assert len(_history(store, 50 + t)) == n_each
        assert q.review(store, SAE_ID, 50 + t)["version"] == n_each
    h = q.history(store, SAE_ID, shared, limit=10_000)
    reviews = h[h["field"] == "review"]
    assert len(reviews) == n_threads * n_each  # every attempt recorded, applied or refused
    n_conflicts = int((reviews["action"] == "conflict").sum())
    assert n_conflicts == sum(conflicts)
    assert q.review(store, SAE_ID, shared)["version"] == n_threads * n_each - n_conflicts
    assert len(h[h["field"] == "tags"]) == n_threads * n_each
    assert len(q.label(store, SAE_ID, shared)["tags"]) == n_threads * n_each
    ids = store.rows("SELECT count(DISTINCT id), count(*) FROM history")[0]
    assert ids[0] == ids[1]


def test_rebuild_keeps_reviews_and_history(store, synth_db, tmp_path):
    writes.set_review(store, SAE_ID, 5, "needs second look", reviewer="ann")
    store.close()
    new = tmp_path / "new.duckdb"
    con = duckdb.connect(str(new))
    try:
        create_schema(con)
        copy_kept_rows(con, synth_db, "some-other-sae")
        assert {"reviews", "history"} <= set(USER_TABLES)
        assert con.execute("SELECT status FROM reviews WHERE feature = 5").fetchone()[0] == "needs second look"
        assert con.execute("SELECT count(*) FROM history WHERE feature = 5").fetchone()[0] == 1
    finally:
        con.close()


def test_older_file_gets_review_tables_on_read_write_open(synth_db):
    con = duckdb.connect(str(synth_db))
    con.execute("DROP TABLE history")
    con.execute("DROP TABLE reviews")
    con.close()
    s = Store(synth_db)
    try:
        assert writes.set_review(s, SAE_ID, 1, "benign").conflict is None
    finally:
        s.close()


# --------------------------------------------------------------------------------------------- feature page


def test_feature_page_review_control_and_history(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="12")
    assert_clean(at)
    assert widget(at.selectbox, "Review status").value == "unreviewed"
    widget(at.selectbox, "Review status").set_value("concerning")
    widget(at.text_area, "Reason").set_value("fires on phishing emails")
    widget(at.text_input, "Your name (optional)").set_value("ann")
    press(at, "Save review")
    got = q.review(Store(synth_db), SAE_ID, 12)
    assert (got["status"], got["reason"], got["reviewer"]) == ("concerning", "fires on phishing emails", "ann")
    assert "Saved the review of feature 12: concerning." in [s.value for s in at.success]
    assert any(e.label.startswith("History (1 change)") for e in at.expander)


def test_feature_page_review_conflict_lets_user_choose(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="13")
    writes.set_review(Store(synth_db), SAE_ID, 13, "benign", reason="theirs", reviewer="ann")  # meanwhile
    widget(at.selectbox, "Review status").set_value("concerning")
    widget(at.text_area, "Reason").set_value("mine")
    press(at, "Save review")
    assert q.review(Store(synth_db), SAE_ID, 13)["status"] == "benign"  # theirs kept
    assert any("someone else saved this review" in w.value for w in at.warning)
    shown = [d.value for d in at.dataframe if "version" in d.value.columns][0]
    assert shown["reason"].tolist() == ["theirs", "mine"]
    press(at, "Keep mine")
    got = q.review(Store(synth_db), SAE_ID, 13)
    assert (got["status"], got["reason"], got["version"]) == ("concerning", "mine", 2)
    assert [x["action"] for x in _history(Store(synth_db), 13)] == ["set", "conflict", "set"]


def test_feature_page_label_conflict_notice(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="14")
    writes.update_label(Store(synth_db), SAE_ID, 14, label="theirs")
    widget(at.text_input, "Label").set_value("mine")
    press(at, "Save label")
    assert q.label(Store(synth_db), SAE_ID, 14)["label"] == "theirs"
    assert any("Someone else changed label" in w.value for w in at.warning)
    press(at, "Keep theirs")
    assert widget(at.text_input, "Label").value == "theirs"  # the form reloads the stored version
    assert q.label(Store(synth_db), SAE_ID, 14)["label"] == "theirs"


def test_hostile_review_text_renders_as_text(monkeypatch, synth_db):
    s = Store(synth_db)
    writes.set_review(s, SAE_ID, 15, "concerning", reason=HOSTILE_SCRIPT, reviewer=HOSTILE_IMG)
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="15")
    assert_clean(at)
    assert "<script" not in htmls(at) and "<img" not in htmls(at)
    shown = texts(at)
    assert "<img" not in shown and "<script" not in shown
    assert widget(at.text_area, "Reason").value == HOSTILE_SCRIPT  # raw text in a text box, not HTML


class _FakeUser(dict):
    """Stands in for ``st.user`` with OIDC configured: attribute and key access like Streamlit's proxy."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def test_signed_in_user_comes_from_st_user_when_auth_is_configured(monkeypatch):
    import streamlit as st

    from featuredict.dashboard.common import signed_in_user

    monkeypatch.setattr(st, "user", _FakeUser())  # no [auth] section: no is_logged_in attribute
    assert signed_in_user() is None
    monkeypatch.setattr(st, "user", _FakeUser(is_logged_in=False))
    assert signed_in_user() is None
    monkeypatch.setattr(st, "user", _FakeUser(is_logged_in=True, email="ann@example.org", name="Ann"))
    assert signed_in_user() == "ann@example.org"
    monkeypatch.setattr(st, "user", _FakeUser(is_logged_in=True, name="Ann"))
    assert signed_in_user() == "Ann"


# ------------------------------------------------------------------------------------------------ read-only


def test_read_only_store_refuses_every_write(synth_db):

    from featuredict.db.store import ReadOnlyError

    rw = Store(synth_db)
    writes.update_label(rw, SAE_ID, 3, label="kept")
    n_hist = rw.rows("SELECT count(*) FROM history")[0][0]
    rw.close()
    ro = Store(synth_db, read_only=True)
    try:
        attempts = [
            lambda: writes.update_label(ro, SAE_ID, 3, label="changed"),
            lambda: writes.save_label_edit(ro, SAE_ID, 3, None, "x", [], None),
            lambda: writes.set_review(ro, SAE_ID, 3, "concerning"),
            lambda: writes.add_to_list(ro, "l", SAE_ID, [3]),
            lambda: writes.remove_from_list(ro, "l", SAE_ID, 3),
            lambda: writes.rename_list(ro, "l", "m"),
            lambda: writes.delete_list(ro, "l"),
            lambda: writes.add_explanations(ro, [{"sae_id": SAE_ID, "feature": 3, "text": "t", "method": "import"}]),
        ]
        for attempt in attempts:
            with pytest.raises(ReadOnlyError, match="open read-only"):
                attempt()
        with pytest.raises(ReadOnlyError):
            writes.write_preset(ro, "p", SAE_ID, {"prompt": "x"})
        with pytest.raises(duckdb.Error), ro.reading() as cur:  # reads run on a read-only connection
            cur.execute("DELETE FROM labels")
        assert q.label(ro, SAE_ID, 3)["label"] == "kept"
        assert ro.rows("SELECT count(*) FROM history")[0][0] == n_hist
    finally:
        ro.close()


def test_serve_read_only_flag_reaches_the_app():
    import argparse

    from featuredict.dashboard import serve
    from featuredict.pipelines.cli import serve as serve_cli

    ap = argparse.ArgumentParser()
    serve_cli.register(ap.add_subparsers(dest="cmd"))
    argv = serve.streamlit_argv(ap.parse_args(["serve", "--db", "x.duckdb", "--read-only"]))
    assert argv[argv.index("--") + 1 :][-1] == "--read-only"
    assert "--read-only" not in serve.streamlit_argv(ap.parse_args(["serve", "--db", "x.duckdb"]))


def test_read_only_app_disables_edit_widgets(monkeypatch, synth_db):
    s = Store(synth_db)
    writes.add_to_list(s, "watch", SAE_ID, [3])
    s.close()
    monkeypatch.setenv("FEATUREDICT_READ_ONLY", "1")
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="3")
    assert_clean(at)
    for items, label in (
        (at.selectbox, "Review status"),
        (at.text_area, "Reason"),
        (at.text_input, "Label"),
        (at.text_area, "Notes"),
        (at.multiselect, "Tags"),
        (at.selectbox, "Add to list"),
    ):
        assert widget(items, label).disabled, label
    for label in ("Save review", "Save label", "Add to list"):
        assert widget(at.button, label).disabled, label
    assert not [w for w in at.text_input if w.label == "Your name (optional)"]
    assert any("Read-only server" in c.value for c in at.caption)
    at.query_params["list"] = "watch"
    at.switch_page("views/lists.py")
    at.run()
    assert_clean(at)
    assert [b.label for b in at.get("download_button")] == ["Export CSV", "Export JSON"]  # the list is shown
    assert not [w for w in at.button if w.label in ("Create", "Add", "Remove", "Rename", "Delete list")]


# --------------------------------------------------------------------------------------------- review queue


def test_queue_puts_unreviewed_first_then_priority(store):
    writes.set_review(store, SAE_ID, 0, "benign")
    top = store.rows(
        "SELECT feature FROM features WHERE sae_id = ? AND NOT dead ORDER BY max_act DESC, feature LIMIT 3", [SAE_ID]
    )
    writes.set_review(store, SAE_ID, top[0][0], "concerning")
    rows, total = q.review_queue(store, q.QueueRequest(SAE_ID, "max_act", limit=10_000))
    live = store.rows("SELECT count(*) FROM features WHERE sae_id = ? AND NOT dead", [SAE_ID])[0][0]
    assert total == len(rows) == live
    st = rows["status"].tolist()
    n_unrev = st.count("unreviewed")
    assert all(s == "unreviewed" for s in st[:n_unrev]) and n_unrev >= live - 2
    head = rows.iloc[:n_unrev]
    assert head["max_act"].is_monotonic_decreasing
    assert int(head["feature"].iloc[0]) == top[1][0]  # the top feature is reviewed: the next one leads
    dens, _ = q.review_queue(store, q.QueueRequest(SAE_ID, "density", limit=50))
    assert dens["density"].is_monotonic_decreasing
    only, n = q.review_queue(store, q.QueueRequest(SAE_ID, "max_act", statuses=("concerning",)))
    assert n == 1 and only["feature"].tolist() == [top[0][0]] and only["status"].tolist() == ["concerning"]
    page2, _ = q.review_queue(store, q.QueueRequest(SAE_ID, "max_act", limit=5, offset=5))
    assert page2["feature"].tolist() == rows["feature"].tolist()[5:10]


def test_queue_watchlist_and_concept_orders(store):
    writes.add_to_list(store, "watch", SAE_ID, [5, 6, 7])
    writes.set_review(store, SAE_ID, 6, "benign")
    rows, total = q.review_queue(store, q.QueueRequest(SAE_ID, "watchlist", watchlist="watch"))
    assert total == 3 and sorted(rows["feature"].tolist()[:2]) == [5, 7] and rows["feature"].tolist()[2] == 6
    scores = pd.DataFrame({"feature": [9, 4, 11], "score": [0.5, 2.0, 1.0]})
    rows, total = q.review_queue(store, q.QueueRequest(SAE_ID, "concept", scores=scores))
    assert total == 3 and rows["feature"].tolist() == [4, 11, 9] and rows["priority"].tolist() == [2.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="needs a list name"):
        q.QueueRequest(SAE_ID, "watchlist")
    with pytest.raises(ValueError, match="order must be one of"):
        q.QueueRequest(SAE_ID, "random")  # type: ignore[arg-type]


def test_concept_priority_runs_the_builtin_texts(tiny_runtime, tiny_db):
    from featuredict.db.store import Store
    from featuredict.pipelines.search.concept import rank_concept
    from featuredict.pipelines.search.priorities import SAFETY_CONCEPTS, concept_names, concept_priority

    assert concept_names() == ["deception", "scams", "weapons", "self-harm", "sycophancy", "power-seeking"]
    sae = "tiny/model.layers.1/64"
    store = Store(str(tiny_db), read_only=True)
    try:
        got = concept_priority(tiny_runtime, store, sae, "scams")
        fresh = rank_concept(tiny_runtime, store, sae, SAFETY_CONCEPTS["scams"], None, top=1000)
        with pytest.raises(ValueError, match="unknown concept"):
            concept_priority(tiny_runtime, store, sae, "nope")
    finally:
        store.close()
    assert len(got) > 0 and got["feature"].tolist() == fresh["feature"].tolist()
    assert got["score"].tolist() == pytest.approx(fresh["score"].tolist())


def test_review_page_batch_status_and_list(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "review", sae=SAE_ID, priority="density")
    assert_clean(at)
    assert widget(at.selectbox, "Priority").value == "density"
    shown = at.dataframe[0].value
    first = [int(f) for f in shown["feature"].iloc[:3]]
    at.session_state["rq_table"] = {"selection": {"rows": [0, 1, 2], "columns": [], "cells": []}}
    at.run()
    widget(at.selectbox, "Set review status").set_value("needs second look")
    widget(at.text_input, "Reason (optional)").set_value("batch")
    press(at, "Set status of selected")
    s = Store(synth_db)
    for f in first:
        r = q.review(s, SAE_ID, f)
        assert (r["status"], r["reason"]) == ("needs second look", "batch")
    assert any("Set 3 features to needs second look." in x.value for x in at.success)
    shown2 = at.dataframe[0].value  # the reviewed ones dropped below the unreviewed
    assert not set(first) & {int(f) for f in shown2["feature"].iloc[:3]}


def test_review_page_deep_link_and_filters(monkeypatch, synth_db):
    s = Store(synth_db)
    writes.add_to_list(s, "wl", SAE_ID, [20, 21])
    writes.set_review(s, SAE_ID, 21, "concerning")
    s.close()
    at = open_app(monkeypatch, synth_db, "review", sae=SAE_ID, priority="watchlist", list="wl", status="concerning")
    assert_clean(at)
    assert widget(at.selectbox, "Watchlist").value == "wl"
    assert widget(at.multiselect, "Statuses").value == ["concerning"]
    assert at.dataframe[0].value["feature"].tolist() == [21]
    at2 = open_app(monkeypatch, synth_db, "review", sae=SAE_ID, priority="concept")
    assert_clean(at2)  # the synthetic SAE has no loadable model: one line, no traceback
    assert any("Could not run the concept search" in e.value for e in at2.error)


HOSTILE_PHRASE = f"dogs {HOSTILE_SCRIPT} and {HOSTILE_IMG} · fires on: dog"


def test_review_rows_show_explanation_tokens_and_why_as_text(monkeypatch, synth_db):
    """A keyphrase explanation with script / img-onerror text: the queue row shows it as plain text in the grid
    (never as HTML), with the top tokens and why the row is queued."""
    from featuredict.db.writes import insert_explanations
    from featuredict.pipelines.search.priorities import describe_rows

    s = Store(synth_db)
    try:
        row = {"sae_id": SAE_ID, "feature": HOSTILE_FEATURE, "text": HOSTILE_PHRASE, "method": "phrases"}
        assert insert_explanations(s, [{**row, "explainer_model": None, "source": "test"}]) == (1, 0)
        rows, _ = q.review_queue(s, q.QueueRequest(SAE_ID, "watchlist", watchlist=f"list {HOSTILE_SCRIPT}"))
        got = describe_rows(s, SAE_ID, rows, "watchlist", watchlist=f"list {HOSTILE_SCRIPT}")
        scores = pd.DataFrame({"feature": [HOSTILE_FEATURE], "score": [0.42]})
        crow, _ = q.review_queue(s, q.QueueRequest(SAE_ID, "concept", scores=scores))
        by_concept = describe_rows(s, SAE_ID, crow, "concept", concept="deception")
    finally:
        s.close()
    assert got["explanation"].tolist() == [HOSTILE_PHRASE]
    assert HOSTILE_SCRIPT in got["top_tokens"].iloc[0]  # corpus tokens, raw: the grid shows text
    assert got["why"].iloc[0] == f"on watchlist 'list {HOSTILE_SCRIPT}'"
    assert by_concept["why"].tolist() == ["concept 'deception': score 0.42"]

    at = open_app(monkeypatch, synth_db, "review", sae=SAE_ID, priority="watchlist", list=f"list {HOSTILE_SCRIPT}")
    assert_clean(at)
    shown = at.dataframe[0].value
    assert shown["explanation"].tolist() == [HOSTILE_PHRASE] and "why" in shown and "top_tokens" in shown
    page = htmls(at) + texts(at)
    assert HOSTILE_SCRIPT not in page and HOSTILE_IMG not in page
