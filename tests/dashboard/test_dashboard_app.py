"""Streamlit AppTests of every dashboard page, run through dashboard/app.py (st.navigation), with the database
passed as $FEATUREDICT_DB and the view as query parameters. Databases are SYNTHETIC (bench/synth_db.py) unless
noted; prompt/concept search use a database whose SAE row reloads the real tiny test model + SAE, and the
``tiny_db`` tests use the database the real build pipeline writes (conftest.py)."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from featuredict.dashboard.common import open_store
from featuredict.dashboard.export import export_list
from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.store import Store
from tests.helpers import (
    HOSTILE_FEATURE,
    HOSTILE_IMG,
    HOSTILE_SCRIPT,
    SAE_ID,
    assert_clean,
    copy_db,
    frame,
    htmls,
    open_app,
    press,
    raw_connection,
    texts,
    widget,
)

# ---------------------------------------------------------------------------------------------- overview


def test_overview(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db)
    assert_clean(at)
    assert at.title[0].value == "featuredict"
    table = at.dataframe[0].value
    assert table["SAE"].tolist() == [SAE_ID] and int(table["d_sae"].iloc[0]) == 300
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Features (d_sae)"] == "300"
    assert len(at.get("vega_lite_chart")) == 1  # the log-density histogram
    n_dead = Store(synth_db).rows("SELECT count(*) FROM features WHERE dead")[0][0]
    assert f"{n_dead:,} dead" in at.get("vega_lite_chart")[0].proto.spec


# ----------------------------------------------------------------------------------------------- feature


def test_feature_page_content(monkeypatch, synth_db):
    s = Store(synth_db)
    top = q.examples(s, SAE_ID, 5, "top")
    f = q.feature(s, SAE_ID, 5)
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="5")
    assert_clean(at)
    assert at.title[0].value == "Feature 5"
    body = htmls(at)
    tok = top["tokens"].iloc[0][int(top["max_pos"].iloc[0])]
    assert html.escape(tok) in body  # the top context's max token, highlighted
    assert f"act {float(top['acts'].iloc[0][int(top['max_pos'].iloc[0])]):.3f}" in body  # hover title
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Max activation"] == f"{f['max_act']:.3f}"
    assert [e.label for e in at.expander if e.label.startswith("Band")], "interval bands"
    links = [p.value for p in at.get("page_link")]
    assert any(lab.startswith(f"#{f['neighbours'][0]} · cos") for lab in links)
    assert "Steer with this feature" in links
    assert "Neighbourhood on the map" in links
    assert len(at.get("vega_lite_chart")) == 2  # activation histogram + place on the map
    promoted = at.dataframe[0].value
    assert promoted["token"].tolist()[:3] == [t for t in f["pos_tokens"][:3]]


def test_feature_page_escapes_corpus_and_labels(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature=str(HOSTILE_FEATURE))
    assert_clean(at)
    body = htmls(at)
    assert html.escape(HOSTILE_SCRIPT) in body and html.escape(HOSTILE_IMG) in body
    assert "<script" not in body and "<img" not in body
    shown = texts(at)
    assert "<script" not in shown and "<img" not in shown
    assert html.escape(HOSTILE_SCRIPT) in shown  # the label, shown as text
    lab = widget(at.text_input, "Label")
    assert lab.value == f"evil {HOSTILE_SCRIPT}"  # the editor holds the raw text (a text box, not HTML)


def test_feature_label_editor_persists(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="8")
    widget(at.text_input, "Label").set_value("bakery words")
    widget(at.multiselect, "Tags").set_value(["food", "bio"])
    widget(at.text_area, "Notes").set_value("fires on bread")
    widget(at.text_input, "Your name (optional)").set_value("tester")
    press(at, "Save label")
    row = q.label(Store(synth_db), SAE_ID, 8)
    assert row["label"] == "bakery words" and row["tags"] == ["food", "bio"] and row["notes"] == "fires on bread"
    assert row["author"] == "tester"
    assert "Saved the label of feature 8." in [s.value for s in at.success]
    assert any("bakery words" in m.value for m in at.markdown)


def test_feature_add_to_list(monkeypatch, synth_db):
    writes.add_to_list(Store(synth_db), "bio", SAE_ID, 100)  # AppTest cannot type a new option; pick a list
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="9")
    widget(at.selectbox, "Add to list").set_value("bio")
    press(at, "Add to list")
    assert q.lists_of_feature(Store(synth_db), SAE_ID, 9) == ["bio"]
    assert any("Added feature 9 to list 'bio'" in s.value for s in at.success)


def test_feature_navigation_and_bad_ids(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="99999")
    assert_clean(at)
    assert "Feature 99999 is not in SAE" in at.error[0].value
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="abc")
    assert_clean(at)
    assert "not a feature id" in at.error[0].value
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="10")
    widget(at.button, "next ▶").click()
    at.run()
    assert at.title[0].value == "Feature 11" and at.query_params["feature"] == "11"


# ------------------------------------------------------------------------------------------------ search


def test_search_finds_feature_by_context_word(monkeypatch, synth_db):
    s = Store(synth_db)
    word = min(
        (t.strip() for t in q.feature(s, SAE_ID, 7)["max_tokens"]),
        key=lambda w: s.rows("SELECT count(*) FROM features WHERE contains(search_text, ?)", [w])[0][0],
    )
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID, query=word)
    assert_clean(at)
    res = frame(at, "search_results")
    assert 7 in res["feature"].tolist()
    assert res.loc[res["feature"] == 7, "open"].iloc[0] == f"feature?sae={SAE_ID}&feature=7"
    # typing a new query updates the URL (shareable)
    widget(at.text_input, "Search features").set_value("#42").run()
    assert frame(at, "search_results")["feature"].iloc[0] == 42
    assert at.query_params["query"] == "#42"


def test_search_filters(monkeypatch, synth_db):
    writes.update_label(Store(synth_db), SAE_ID, 3, label="tagged one", add_tags=["deception"])
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID)
    assert_clean(at)
    widget(at.selectbox, "Tag").set_value("deception").run()
    res = frame(at, "search_results")
    assert res["feature"].tolist() == [3]
    widget(at.radio, "Labels").set_value("unlabelled").run()
    assert "No feature matches" in texts(at)


def test_search_sql_injection_and_hostile_text(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID, query="'; DROP TABLE features; --")
    assert_clean(at)
    assert not at.error
    assert Store(synth_db).rows("SELECT count(*) FROM features")[0][0] == 300
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID, query="<script>alert(1)")
    assert_clean(at)
    res = frame(at, "search_results")
    assert res["feature"].iloc[0] == HOSTILE_FEATURE  # shown in a data grid: text, never HTML
    assert "<script" not in htmls(at)


def test_search_by_prompt_without_loadable_model(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "search", sae=SAE_ID, mode="prompt", query="hello world")
    assert_clean(at)
    assert at.error and "Could not run the model of SAE" in at.error[0].value


def test_search_by_prompt_runs_model(monkeypatch, model_db):
    text = "The assistant said it would never lie to the user."
    at = open_app(monkeypatch, model_db, "search", sae=SAE_ID, mode="prompt", query=text)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    whole = frame(at, "prompt_whole")
    assert len(whole) > 0 and whole["max_here"].is_monotonic_decreasing
    shown = html.unescape(re.sub(r"<[^>]+>", "", htmls(at)))
    assert "would never lie to the user" in shown  # the text, highlighted by the top feature
    pills = at.get("button_group")[0]
    assert "".join(pills.options).startswith("The assistant said")  # one pill per token (BOS skipped)
    pills.set_value(pills.options and 3).run()  # position 3 (options are positions, shown as tokens)
    assert_clean(at)
    per = frame(at, "prompt_token_table")
    assert len(per) > 0 and per["act"].is_monotonic_decreasing


def test_search_by_concept(monkeypatch, model_db):
    at = open_app(monkeypatch, model_db, "search", sae=SAE_ID, mode="concept")
    widget(at.text_area, "Examples of the concept (blank line between texts, or one per line)").set_value(
        "Never share your password with anyone.\nSend your bank login to verify your account urgently."
    )
    widget(at.text_area, "Counter-examples (optional)").set_value("The cat played in the garden.")
    press(at, "Find features")
    assert not at.error, [e.value for e in at.error]
    res = frame(at, "concept_results")
    assert len(res) > 0 and res["score"].is_monotonic_decreasing and (res["score"] > 0).all()


# --------------------------------------------------------------------------------------------------- map


def chart_rows(chart) -> list[int]:
    return [pa.ipc.open_stream(d.data.data).read_all().num_rows for d in chart.proto.datasets]


def test_map_draws_65536_features(monkeypatch, big_map_db, tmp_path):
    db = copy_db(big_map_db, tmp_path / "big.duckdb")
    at = open_app(monkeypatch, db, "map", sae=SAE_ID, feature="123")
    assert_clean(at)
    charts = at.get("vega_lite_chart")
    assert chart_rows(charts[0]) == [65536]
    assert '"pick"' in charts[0].proto.spec and "top_tokens" in charts[0].proto.spec  # selection + tooltips
    near = chart_rows(charts[1])
    assert near[0] == 300
    widget(at.radio, "Colour by").set_value("tag").run()
    assert_clean(at)
    assert chart_rows(at.get("vega_lite_chart")[0]) == [65536]
    spec = at.get("vega_lite_chart")[0].proto.spec
    assert '"(none)"' in spec and '"title": "tag"' in spec.replace('":"', '": "')


# ------------------------------------------------------------------------------------------------- lists


def test_lists_page(monkeypatch, synth_db):
    s = Store(synth_db)
    writes.add_to_list(s, "deception", SAE_ID, [4, 2], note="check")
    at = open_app(monkeypatch, synth_db, "lists", sae=SAE_ID, list="deception")
    assert_clean(at)
    shown = at.dataframe[0].value
    assert shown["feature"].tolist() == [2, 4]  # same transaction: same added_at, then by id
    assert [b.label for b in at.get("download_button")] == ["Export CSV", "Export JSON"]
    csv_text, json_text = export_list(q.list_members(s, "deception"), "deception")
    assert csv_text.splitlines()[0].startswith("list_name,sae_id,feature,label,tags,note")
    import json

    data = json.loads(json_text)
    assert [r["feature"] for r in data["features"]] == [2, 4] and data["features"][0]["note"] == "check"
    widget(at.text_input, "Add feature ids of SAE synthetic").set_value("7, 8")
    press(at, "Add")
    assert q.list_members(s, "deception")["feature"].tolist() == [2, 4, 7, 8]


def test_lists_page_opens_the_list_it_created_and_explains_bad_ids(monkeypatch, synth_db):
    s = Store(synth_db)
    writes.add_to_list(s, "aaa first", SAE_ID, [1])
    at = open_app(monkeypatch, synth_db, "lists", sae=SAE_ID)
    widget(at.sidebar.text_input, "List name").set_value("  my   new list ")
    widget(at.sidebar.text_input, f"Feature ids of SAE {SAE_ID}").set_value("3, 4")
    at.sidebar.button[0].click()
    at.run()
    assert_clean(at)
    assert at.selectbox(key="list_pick").value == "my new list"  # the stored (cleaned) name, not the first list
    widget(at.text_input, f"Add feature ids of SAE {SAE_ID}").set_value("999999")
    press(at, "Add")
    assert "has no feature 999999" in at.error[0].value.replace("\\", "")
    assert q.list_members(s, "my new list")["feature"].tolist() == [3, 4]


def test_lists_empty(monkeypatch, synth_db):
    Store(synth_db).write(lambda c: c.execute("DELETE FROM lists"))
    at = open_app(monkeypatch, synth_db, "lists", sae=SAE_ID)
    assert_clean(at)
    assert "No saved lists yet" in texts(at)


# --------------------------------------------------------------------------------------- broken databases


PAGES = [None, "search", "feature", "map", "lists", "review", "scan", "attribution", "steer"]


@pytest.mark.parametrize("page", PAGES)
def test_missing_database_message(monkeypatch, tmp_path, page):
    at = open_app(monkeypatch, tmp_path / "nope.duckdb", page, feature="1")
    assert_clean(at)
    assert "No database at" in at.error[0].value


def test_bad_database_messages(monkeypatch, tmp_path):
    empty = tmp_path / "empty.duckdb"
    empty.write_bytes(b"")
    at = open_app(monkeypatch, empty)
    assert_clean(at)
    assert "is empty" in at.error[0].value

    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    at = open_app(monkeypatch, other)
    assert_clean(at)
    assert "not a featuredict database" in at.error[0].value

    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"this is not a duckdb file at all" * 100)
    at = open_app(monkeypatch, garbage)
    assert_clean(at)
    assert at.error and "garbage.duckdb" in at.error[0].value


def test_wrong_version_message(monkeypatch, synth_db):
    with raw_connection(synth_db) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    at = open_app(monkeypatch, synth_db, "feature", feature="1")
    assert_clean(at)
    assert "schema version 99" in at.error[0].value


def test_locked_database_message(monkeypatch, tmp_path, synth_db_master):
    db = copy_db(synth_db_master, tmp_path / "locked.duckdb")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ok', flush=True); time.sleep(60)",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        at = open_app(monkeypatch, db, "search", query="x")
        assert_clean(at)
        assert "locked" in at.error[0].value
    finally:
        holder.kill()
        holder.wait()


def test_database_without_sae(monkeypatch, tmp_path):
    from featuredict.db.schema import create_schema

    p = tmp_path / "nosae.duckdb"
    con = duckdb.connect(str(p))
    create_schema(con)
    con.close()
    at = open_app(monkeypatch, p, "feature", feature="1")
    assert_clean(at)
    assert "holds no SAE" in at.warning[0].value


def test_page_failure_is_one_line_not_traceback(monkeypatch, synth_db):
    with raw_connection(synth_db) as con:
        con.execute("DROP TABLE examples")
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="3")
    assert_clean(at)
    assert any("Could not load top contexts" in e.value for e in at.error)
    with raw_connection(synth_db) as con:
        con.execute("DROP TABLE features")
    monkeypatch.setenv("FEATUREDICT_DB", str(synth_db))
    at = open_app(monkeypatch, synth_db)  # overview queries features: the app-level guard catches it
    assert_clean(at)
    assert any("page failed" in e.value for e in at.error)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_runs_in_the_one_frame(monkeypatch, synth_db, page):
    """app.py draws the SAE picker and the database line once; no page draws its own."""
    at = open_app(monkeypatch, synth_db, page, sae=SAE_ID, feature="5")
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert [s.label for s in at.sidebar.selectbox] == ["SAE"] and at.sidebar.selectbox[0].value == SAE_ID
    assert [c.value for c in at.sidebar.caption if c.value.startswith("Database:")] == [f"Database: `{synth_db}`"]
    assert at.query_params["sae"] == SAE_ID


def test_steer_max_acts_follow_a_rebuild(monkeypatch, synth_db):
    """The steer page's max-activation cache is keyed like the others: a rebuild (new built_at) refreshes it,
    even where the new file would reuse the old inode."""

    def shown(at: AppTest) -> str:
        """The caption beside the feature's value box: '<unit>; max observed activation <max_act>'."""
        (cap,) = [c.value for c in at.caption if re.search(r"; max observed activation [\d.]+$", c.value)]
        return cap

    at = open_app(monkeypatch, synth_db, "steer", sae=SAE_ID, feature="5")
    assert_clean(at)
    store = open_store(synth_db)  # the app's own process-wide store
    before = q.feature(store, SAE_ID, 5)["max_act"]
    assert shown(at).endswith(f"max observed activation {before:.3f}")
    store.write(lambda c: c.execute("UPDATE features SET max_act = 123.5 WHERE sae_id = ? AND feature = 5", [SAE_ID]))
    at.run()
    assert shown(at).endswith(f"max observed activation {before:.3f}")  # same build: still cached
    store.write(lambda c: c.execute("UPDATE saes SET built_at = built_at + INTERVAL 1 SECOND"))
    at.run()
    assert_clean(at)
    assert shown(at).endswith("max observed activation 123.500")


# ------------------------------------------------------------------------------ the pipeline-built database


@pytest.fixture
def real_db(tiny_db, tmp_path):
    """A copy of the database the real pipeline built from the tiny model (conftest.tiny_db)."""
    return copy_db(tiny_db, tmp_path / "real.duckdb")


def test_real_db_pages(monkeypatch, real_db):
    s = Store(real_db)
    sae_id = s.rows("SELECT sae_id FROM saes")[0][0]
    fid = s.rows("SELECT feature FROM features WHERE NOT dead ORDER BY fire_count DESC LIMIT 1")[0][0]
    top = q.examples(s, sae_id, fid, "top")
    at = open_app(monkeypatch, real_db)
    assert_clean(at)
    assert not at.error
    at = open_app(monkeypatch, real_db, "feature", sae=sae_id, feature=str(fid))
    assert_clean(at)
    assert at.title[0].value == f"Feature {fid}"
    assert not top.empty  # the most-firing live feature has top contexts
    assert html.escape(top["tokens"].iloc[0][int(top["max_pos"].iloc[0])]) in htmls(at)
    word = next((t.strip() for t in (q.feature(s, sae_id, fid)["max_tokens"] or []) if t.strip().isalpha()), None)
    if word:
        at = open_app(monkeypatch, real_db, "search", sae=sae_id, query=word)
        assert_clean(at)
        assert fid in frame(at, "search_results")["feature"].tolist()
    at = open_app(
        monkeypatch, real_db, "search", sae=sae_id, mode="prompt", query="Once upon a time there was a little cat."
    )
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert len(frame(at, "prompt_whole")) > 0
    at = open_app(monkeypatch, real_db, "map", sae=sae_id, feature=str(fid))
    assert_clean(at)
    at = open_app(monkeypatch, real_db, "lists", sae=sae_id)
    assert_clean(at)


def test_two_saes_in_one_file(monkeypatch, synth_db):
    with raw_connection(synth_db) as con:
        con.execute("INSERT INTO saes SELECT * REPLACE ('other' AS sae_id) FROM saes")
        con.execute("INSERT INTO features SELECT * REPLACE ('other' AS sae_id) FROM features WHERE feature < 50")
    at = open_app(monkeypatch, synth_db)
    assert_clean(at)
    assert at.dataframe[0].value["SAE"].tolist() == ["other", SAE_ID]
    at = open_app(monkeypatch, synth_db, "feature", sae="other", feature="3")
    assert_clean(at)
    assert at.sidebar.selectbox[0].value == "other" and at.title[0].value == "Feature 3"
    assert any("No activating contexts stored" in i.value for i in at.info)  # examples only for 'synthetic'
    at.sidebar.selectbox[0].set_value(SAE_ID).run()
    assert_clean(at)
    assert at.query_params["sae"] == SAE_ID and at.get("html")  # now the synthetic SAE's contexts


def test_cache_key_changes_with_a_rebuild_not_with_label_writes(synth_db):
    from featuredict.dashboard.data import db_key

    s = Store(synth_db)
    k1 = db_key(s)
    writes.update_label(s, SAE_ID, 5, label="a label")
    assert db_key(s) == k1  # label writes keep model-run caches
    s.write(lambda c: c.execute("UPDATE saes SET built_at = built_at + INTERVAL 1 SECOND"))
    assert db_key(s) != k1  # a rebuild (new built_at) does not, even if the inode were reused
