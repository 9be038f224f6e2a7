"""Steering presets (DuckDB), the ``featuredict steer`` CLI and the Streamlit steer page, on a small database
built here from the tiny model + SAE (feature statistics computed by running them on a few sentences)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import duckdb
import pytest

from featuredict.db.queries import PresetError, SearchFilters, feature_max_acts, features_by_ids, search
from featuredict.db.store import Store
from featuredict.db.writes import delete_preset
from featuredict.pipelines.cli.steer import register
from featuredict.pipelines.steering import (
    FeatureEdit,
    GenerationSettings,
    SteeringConfig,
    list_presets,
    load_preset,
    save_preset,
)
from tests.helpers import ROOT, STEER_SAE_ID, build_steer_db, live_feature, page_maker, read_only

PAGE = ROOT / "dashboard" / "views" / "steer.py"


@pytest.fixture(scope="module")
def steer_db(tmp_path_factory, tiny_runtime, tiny_model_dir, tiny_sae_dir) -> Path:
    return build_steer_db(tmp_path_factory.mktemp("db") / "steer.duckdb", tiny_runtime, tiny_model_dir, tiny_sae_dir)


@pytest.fixture()
def db_copy(steer_db, tmp_path) -> Path:
    """A fresh copy per test (the page's Store holds its file open)."""
    p = tmp_path / "steer.duckdb"
    p.write_bytes(steer_db.read_bytes())
    return p


# ---- presets --------------------------------------------------------------------------------------------
def test_presets_roundtrip(db_copy):
    store = Store(db_copy)
    try:
        cfg = SteeringConfig(
            prompt="hi",
            edits=(FeatureEdit(3, "add", 1.5),),
            positions="generated",
            generation=GenerationSettings(max_new_tokens=9, temperature=0.5, seed=3),
        )
        assert save_preset(store, "  bread boost ", STEER_SAE_ID, cfg) == "bread boost"
        assert load_preset(store, "bread boost") == (STEER_SAE_ID, cfg)
        with pytest.raises(PresetError, match="already exists"):
            save_preset(store, "bread boost", STEER_SAE_ID, cfg)
        cfg2 = SteeringConfig(prompt="hi", edits=(FeatureEdit(4, "clamp", 0.0),))
        save_preset(store, "bread boost", STEER_SAE_ID, cfg2, overwrite=True)
        assert load_preset(store, "bread boost")[1] == cfg2
        assert [p.name for p in list_presets(store, STEER_SAE_ID)] == ["bread boost"]
        assert list_presets(store, "other") == []
        for bad in ["", "   ", "a/b", "x" * 81, "'; DROP TABLE saes; --"]:
            with pytest.raises(PresetError, match="not allowed"):
                save_preset(store, bad, STEER_SAE_ID, cfg)
        with pytest.raises(PresetError, match="no steering preset"):
            load_preset(store, "missing")
        assert delete_preset(store, "bread boost") and not delete_preset(store, "bread boost")
    finally:
        store.close()


def test_feature_queries(db_copy):
    store = Store(db_copy, read_only=True)
    try:
        mx = feature_max_acts(store, STEER_SAE_ID)
        assert len(mx) == 64 and max(mx.values()) > 0
        assert features_by_ids(store, STEER_SAE_ID, [3, 5, 999])["feature"].tolist() == [3, 5]
        assert search(store, STEER_SAE_ID, "BREAD", SearchFilters(include_dead=True))["feature"].tolist() == [
            3
        ]  # label
    finally:
        store.close()


# ---- CLI ------------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="featuredict")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_baseline_and_steered(db_copy, capsys):
    f = live_feature(db_copy)
    rc = cli(
        [
            "steer",
            "--db",
            str(db_copy),
            "--sae",
            STEER_SAE_ID,
            "--prompt",
            "Once upon a time",
            "--feature",
            f"{f}=add:4",
            "--max-new-tokens",
            "8",
            "--no-chat-template",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "=== baseline ===" in out and f"=== steered: {f}=add:4" in out
    base = out.split("=== baseline ===\n")[1].split("\n")[0]
    steered = out.split(f"=== steered: {f}=add:4 (prompt and generated tokens) ===\n")[1].split("\n")[0]
    assert base != steered
    assert "activations on the generated tokens" in out


def test_cli_saves_and_replays_a_preset(db_copy, capsys):
    f = live_feature(db_copy, 1)
    args = [
        "steer",
        "--db",
        str(db_copy),
        "--prompt",
        "The river",
        "--feature",
        f"{f}=clamp:3",
        "--max-new-tokens",
        "6",
        "--generated-only",
        "--no-chat-template",
        "--no-activations",
    ]
    assert cli([*args, "--save-preset", "river"]) == 0
    first = capsys.readouterr()
    assert "saved preset 'river'" in first.err
    assert cli(["steer", "--db", str(db_copy), "--preset", "river", "--no-activations"]) == 0
    assert capsys.readouterr().out == first.out


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--feature", "9999=1"], "unknown feature id 9999"),
        (["--feature", "3=nan"], "not a finite number"),
        (["--feature", "3=inf"], "not a finite number"),
        (["--feature", "3=clamp:1e9"], "absurd"),
        (["--feature", "3=add:1e4"], "absurd"),
        (["--feature", "3=mul:2"], "unknown mode"),
        (["--feature", "three=2"], "not an integer"),
        (["--feature", "3=1", "--prompt", "  "], "prompt is empty"),
        (["--feature", "3=1", "--prompt", "word " * 300], "longer than the model's context"),
        (["--feature", "3=1", "--max-new-tokens", "0"], "max new tokens"),
        (["--feature", "3=1", "--temperature", "abc"], "not a valid number"),
        (["--feature", "3=1", "--top-p", "1.5"], "top-p"),
        (["--feature", "3=1", "--sae", "nope"], "no SAE 'nope'"),
        (["--feature", "3=1", "--preset", "nope"], "no steering preset"),
        ([], "at least one --feature"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(db_copy, capsys, extra, msg):
    argv = ["steer", "--db", str(db_copy), "--prompt", "hello", *extra]
    if "--sae" not in extra:
        argv += ["--sae", STEER_SAE_ID] if "--preset" not in extra else []
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_json_has_texts_settings_and_scores(db_copy, capsys):
    f = live_feature(db_copy)
    argv = ["steer", "--db", str(db_copy), "--prompt", "Once upon a time", "--no-chat-template"]
    argv += ["--feature", f"{f}=add:4", "--feature", f"{live_feature(db_copy, 2)}=ablate", "--max-new-tokens", "8"]
    assert cli([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    obj = json.loads(captured.out)  # one JSON object, nothing else on stdout
    assert obj["sae"] == STEER_SAE_ID
    assert SteeringConfig.from_mapping(obj["settings"]).edits[1] == FeatureEdit(live_feature(db_copy, 2), "ablate")
    assert obj["baseline"]["text"] != obj["steered"]["text"] and obj["steered"]["tokens"] > 0
    sb, ss = obj["scores"]["baseline"], obj["scores"]["steered"]
    assert sb["divergence_kl"] == 0.0 and ss["divergence_kl"] > 0
    assert sb["perplexity"] > 1 and ss["perplexity"] > 1
    assert set(ss["concept"]) == {str(f), str(live_feature(db_copy, 2))}
    assert len(obj["activations"]) == obj["steered"]["tokens"]
    # the text output shows the same scores
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert f"baseline {sb['perplexity']:.3g} | steered {ss['perplexity']:.3g}" in out
    assert f"mean KL(steered || unsteered) {ss['divergence_kl']:.3g}" in out
    assert cli([*argv, "--no-scores", "--json"]) == 0
    assert "scores" not in json.loads(capsys.readouterr().out)


def test_cli_multi_turn_chat(db_copy, capsys):
    from featuredict.db.queries import sae_info
    from featuredict.pipelines.model.runtime import cached_runtime_from_row

    store = Store(db_copy, read_only=True)
    row = sae_info(store, STEER_SAE_ID)
    store.close()
    rt = cached_runtime_from_row(row)  # the runtime the CLI will reuse
    f = live_feature(db_copy)
    argv = ["steer", "--db", str(db_copy), "--prompt", "hi", "--turn", "tell me more", "--feature", f"{f}=add:4"]
    argv += ["--max-new-tokens", "5", "--system", "be brief", "--json"]
    assert cli(argv) == 2
    assert "no chat template" in capsys.readouterr().err
    rt.tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    try:
        assert cli(argv) == 0
    finally:
        rt.tokenizer.chat_template = None
    obj = json.loads(capsys.readouterr().out)
    assert [t["user"] for t in obj["turns"]] == ["hi", "tell me more"]
    assert obj["settings"]["multi_turn"] is True and obj["settings"]["system"] == "be brief"
    assert all("scores" in t for t in obj["turns"])


def test_cli_sweep(db_copy, capsys):
    f = live_feature(db_copy)
    argv = ["sweep", "--db", str(db_copy), "--prompt", "Once upon a time", "--no-chat-template"]
    argv += ["--feature", f"{f}=add:1", "--max-new-tokens", "6", "--steps", "4"]
    assert cli([*argv, "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["sweep"]["strengths"] == [0.5, 1.59, 5.04, 16.0]
    assert len(obj["rows"]) == 4 and len(obj["baseline"]) == 1
    assert [r["strength"] for r in obj["summary"]] == obj["sweep"]["strengths"]
    rec = obj["recommended_strength"]
    ok = [r for r in obj["summary"] if r["within"]]
    assert rec == (max(ok, key=lambda r: (r["concept"], -r["strength"]))["strength"] if ok else None)
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "strength  concept perplexity" in out
    if rec is not None:
        assert f"recommended strength: {rec:g}" in out and f"--feature {f}=add:{rec:g}" in out
    else:
        assert "no strength keeps perplexity within 2x" in out


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--steps", "0"], "1..16 strengths"),
        (["--strengths", "1,x"], "--strengths 'x' is not a number"),
        (["--strengths", "1,200"], "sweep strength 200.0 must be"),
        (["--seeds", "20"], "--seeds must be 1..8"),
        (["--max-ppl-ratio", "0.5"], "perplexity factor"),
        (["--feature", "3=ablate"], "every feature is ablated"),
    ],
)
def test_cli_sweep_bad_input(db_copy, capsys, extra, msg):
    argv = ["sweep", "--db", str(db_copy), "--prompt", "hi", "--sae", STEER_SAE_ID]
    if "--feature" not in extra:
        argv += ["--feature", f"{live_feature(db_copy)}=add:1"]
    assert cli([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_database(tmp_path, capsys):
    assert cli(["steer", "--db", str(tmp_path / "none.duckdb"), "--feature", "1=1", "--prompt", "x"]) == 2
    assert "No database" in capsys.readouterr().err


# ---- the page -------------------------------------------------------------------------------------------
@pytest.fixture()
def app(db_copy, monkeypatch):
    return page_maker(PAGE, db_copy, monkeypatch, timeout=120)


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def html_texts(at) -> list[str]:
    return [m.value for m in at.markdown if "<div" in m.value]


def test_page_renders(app):
    at = app().run()
    assert not at.exception, at.exception
    assert not errors(at)
    assert at.title[0].value == "Steer"
    assert at.multiselect(key="steer_features").value == []


def test_page_preselects_feature_from_url_and_runs(app, db_copy):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=str(f)).run()
    assert not at.exception, at.exception
    assert at.multiselect(key="steer_features").value == [f]
    assert at.selectbox(key=f"steer_mode_{f}").value == "add"
    at.text_area(key="steer_prompt").set_value("Once upon a time")
    at.checkbox(key="steer_chat").uncheck()
    at.number_input(key="steer_n").set_value(8)
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    boxes = html_texts(at)
    assert len(boxes) == 2
    res = at.session_state["steer_result"]
    assert res["baseline"] and res["steered"] and res["baseline"] != res["steered"]
    import html as _html

    assert _html.escape(res["baseline"]) in boxes[0] and _html.escape(res["steered"]) in boxes[1]
    assert len(res["acts_before"]) == len(res["steered_tokens"]) > 0
    assert len(at.dataframe) == 2  # summary + per-token activations


def test_page_preselects_a_comma_list(app):
    at = app(sae=STEER_SAE_ID, feature="3,5").run()
    assert at.multiselect(key="steer_features").value == [3, 5]


def test_page_bad_value_shows_error(app, db_copy):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=str(f)).run()
    at.number_input(key=f"steer_value_{f}").set_value(1e6)
    at.button(key="steer_run").click().run()
    assert not at.exception
    assert any("absurd" in e for e in errors(at)), errors(at)
    assert "steer_result" not in at.session_state
    # empty prompt
    at.number_input(key=f"steer_value_{f}").set_value(1.0)
    at.text_area(key="steer_prompt").set_value("   ")
    at.button(key="steer_run").click().run()
    assert any("prompt is empty" in e for e in errors(at)), errors(at)


@pytest.mark.parametrize(
    ("feature", "msg"),
    [
        ("999", "unknown feature id 999"),
        ("3=add:nan", "not a finite number"),
        ("3=clamp:1e12", "absurd"),
        ("x", "not an integer"),
    ],
)
def test_page_bad_url_shows_error(app, feature, msg):
    at = app(sae=STEER_SAE_ID, feature=feature).run()
    assert not at.exception, at.exception
    assert any(msg in e for e in errors(at)), errors(at)


def test_page_loads_a_preset_from_the_url(app, db_copy):
    f = live_feature(db_copy)
    cfg = SteeringConfig(
        prompt="She walked to the river",
        edits=(FeatureEdit(f, "clamp", 2.5),),
        positions="generated",
        chat_template=False,
        generation=GenerationSettings(max_new_tokens=5),
    )
    store = Store(db_copy)
    save_preset(store, "walk", STEER_SAE_ID, cfg)
    store.close()
    at = app(preset="walk").run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    assert at.text_area(key="steer_prompt").value == cfg.prompt
    assert at.multiselect(key="steer_features").value == [f]
    assert at.selectbox(key=f"steer_mode_{f}").value == "clamp"
    assert at.number_input(key=f"steer_value_{f}").value == 2.5
    assert at.radio(key="steer_positions").value == "generated"
    # the share link encodes the same configuration
    link = [c.value for c in at.code if c.value.startswith("steer?")][0]
    from urllib.parse import parse_qsl

    params = dict(parse_qsl(link.split("?", 1)[1]))
    assert SteeringConfig.from_mapping(params) == cfg
    shown = re.sub(r"\\(.)", r"\1", app(preset="missing").run().error[0].value)  # as markdown renders it
    assert shown.startswith("Cannot use this link: no steering preset")


def test_page_saves_a_preset(app, db_copy):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=f"{f}=clamp:1.5").run()
    at.text_input(key="steer_preset_name").set_value("from page")
    at.button(key="steer_preset_save").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    assert any("steer?preset=from+page" in c.value for c in at.code)
    store = Store(db_copy)  # same process as the page's Store: DuckDB shares the open database
    try:
        rows = store.rows("SELECT sae_id, config_json FROM steering_presets WHERE name = 'from page'")
    finally:
        store.close()
    assert rows and rows[0][0] == STEER_SAE_ID
    assert json.loads(rows[0][1])["edits"] == [{"feature": f, "mode": "clamp", "value": 1.5}]


def test_page_preset_switches_to_its_sae(app, db_copy):
    """A preset saved for another SAE in the file opens on that SAE."""
    con = duckdb.connect(str(db_copy))
    con.execute("INSERT INTO saes SELECT * REPLACE ('a-first' AS sae_id) FROM saes WHERE sae_id = ?", [STEER_SAE_ID])
    con.execute(
        "INSERT INTO features SELECT * REPLACE ('a-first' AS sae_id) FROM features WHERE sae_id = ?", [STEER_SAE_ID]
    )
    con.close()
    store = Store(db_copy)
    save_preset(store, "on-tiny", STEER_SAE_ID, SteeringConfig(prompt="The cat", edits=(FeatureEdit(5, "clamp", 1.0),)))
    store.close()
    at = app().run()
    assert at.selectbox(key="sae").value == "a-first"  # the first SAE by default
    at = app(preset="on-tiny").run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    assert at.selectbox(key="sae").value == STEER_SAE_ID
    assert at.multiselect(key="steer_features").value == [5]
    assert at.text_area(key="steer_prompt").value == "The cat"


# ---- the database the real build pipeline writes (lead's tiny_db fixture) ---------------------------------
@pytest.fixture()
def pipeline_db(tiny_db, tmp_path) -> tuple[Path, str, int]:
    """A private copy of ``tiny_db`` (presets get written), its SAE id and its strongest live feature."""
    p = tmp_path / "pipeline.duckdb"
    p.write_bytes(Path(tiny_db).read_bytes())
    with read_only(p) as con:
        sae_id = con.execute("SELECT sae_id FROM saes ORDER BY sae_id").fetchall()[0][0]
        f = con.execute(
            "SELECT feature FROM features WHERE sae_id = ? AND NOT dead ORDER BY max_act DESC", [sae_id]
        ).fetchall()[0][0]
    return p, str(sae_id), int(f)


def test_cli_on_a_pipeline_built_database(pipeline_db, capsys):
    db, sae_id, f = pipeline_db
    rc = cli(
        [
            "steer",
            "--db",
            str(db),
            "--sae",
            sae_id,
            "--prompt",
            "The cat",
            "--feature",
            f"{f}=add:4",
            "--feature",
            f"{(f + 1) % 64}=clamp:0",
            "--max-new-tokens",
            "6",
            "--save-preset",
            "pipe",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "=== baseline ===" in captured.out and "=== steered:" in captured.out
    store = Store(db, read_only=True)
    try:
        assert load_preset(store, "pipe")[0] == sae_id
    finally:
        store.close()


def test_page_on_a_pipeline_built_database(pipeline_db, monkeypatch):
    from streamlit.testing.v1 import AppTest

    db, sae_id, f = pipeline_db
    monkeypatch.setenv("FEATUREDICT_DB", str(db))
    at = AppTest.from_file(str(PAGE), default_timeout=120)
    at.query_params["sae"] = sae_id
    at.query_params["feature"] = str(f)
    at.run()
    assert not at.exception, at.exception
    assert at.multiselect(key="steer_features").value == [f]
    at.number_input(key="steer_n").set_value(6)
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    res = at.session_state["steer_result"]
    assert res["steered"] and len(res["acts_before"]) == len(res["steered_tokens"])


def test_page_search_box_finds_ids_and_labels(app):
    at = app(sae=STEER_SAE_ID).run()
    at.text_input(key="steer_search").set_value("3, 5, 999").run()
    assert not at.exception, at.exception
    opts = at.multiselect(key="steer_features").options
    assert [o.split(" ·")[0] for o in opts] == ["#3", "#5"]
    assert "bread and baking" in opts[0]  # the label from the labels table
    at.text_input(key="steer_search").set_value("BREAD").run()
    assert [o.split(" ·")[0] for o in at.multiselect(key="steer_features").options] == ["#3"]


# ---- quality, methods, sweeps, chat on the page -----------------------------------------------------------
def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_page_shows_quality_scores(app, db_copy):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=f"{f}=add:4", prompt="Once upon a time", chat="0", n="8").run()
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    scores = at.session_state["steer_result"]["scores"]
    b, s = scores["baseline"], scores["steered"]
    m = metrics(at)
    assert m["Fluency: baseline perplexity"] == f"{b['perplexity']:.3g}"
    assert m["Fluency: steered perplexity"] == f"{s['perplexity']:.3g}"
    assert m["Divergence (KL, nats/token)"] == f"{s['divergence_kl']:.3g}" and s["divergence_kl"] > 0
    assert m[f"Concept #{f}"] == f"{s['concept'][str(f)]:.3f}"
    at.run()  # a rerun shows the stored result and its scores again, without generating
    assert metrics(at) == m
    collapsed = s["distinct_tokens"] < 0.5
    assert any("collapsed into repeats" in w.value for w in at.warning) == collapsed


def test_page_warns_when_the_steered_text_collapses(app, db_copy):
    """A strong add drives the tiny model into one repeated token; perplexity may not show it, the page says so."""
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=f"{f}=add:16", prompt="Once upon a time", chat="0", n="16").run()
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    s = at.session_state["steer_result"]["scores"]["steered"]
    assert s["distinct_tokens"] < 0.5, s
    assert any("collapsed into repeats" in w.value for w in at.warning), [w.value for w in at.warning]


def test_page_reads_every_method_from_the_url(app, db_copy):
    f, g, h = live_feature(db_copy), live_feature(db_copy, 1), live_feature(db_copy, 2)
    at = app(
        sae=STEER_SAE_ID, feature=f"{f}=orthogonal:2,{g}=ablate,{h}=cap:0.5", prompt="The cat", chat="0", n="5"
    ).run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    assert [at.selectbox(key=f"steer_mode_{x}").value for x in (f, g, h)] == ["orthogonal", "ablate", "cap"]
    assert at.number_input(key=f"steer_value_{g}").disabled and not at.number_input(key=f"steer_value_{f}").disabled
    link = [c.value for c in at.code if c.value.startswith("steer?")][0]
    assert f"{f}%3Dorthogonal%3A2%2C{g}%3Dablate%2C{h}%3Dcap%3A0.5" in link
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    assert at.session_state["steer_result"]["edits"] == [f"{f}=orthogonal:2", f"{g}=ablate", f"{h}=cap:0.5"]


def test_page_sweep_chart_and_recommended_strength(app, db_copy):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=f"{f}=add:1", prompt="Once upon a time", chat="0", n="5").run()
    at.number_input(key="steer_sw_n").set_value(3)
    at.number_input(key="steer_sw_ratio").set_value(1000.0)  # any perplexity qualifies; collapsed text does not
    at.button(key="steer_sweep_run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    sw = at.session_state["steer_sweep"]
    assert sw["sweep"]["strengths"] == [0.5, 2.83, 16.0] and len(sw["rows"]) == 3
    ok = [r for r in sw["summary"] if r["within"]]
    assert ok and all(r["distinct"] >= 0.5 for r in ok)
    best = max(ok, key=lambda r: (r["concept"], -r["strength"]))["strength"]
    assert sw["recommended_strength"] == best
    assert len(at.get("vega_lite_chart")) == 1 and "Concept score" in at.get("vega_lite_chart")[0].proto.spec
    at.button(key="steer_sweep_use").click().run()
    assert not at.exception, at.exception
    assert at.number_input(key=f"steer_value_{f}").value == best
    assert at.selectbox(key=f"steer_mode_{f}").value == "add"


def test_page_sweep_error_is_one_line(app, db_copy):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=f"{f}=ablate", prompt="hi", chat="0").run()
    at.button(key="steer_sweep_run").click().run()
    assert not at.exception, at.exception
    assert any("every feature is ablated" in e for e in errors(at)), errors(at)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture()
def chat_tokenizer(db_copy):
    """The page's (process-wide, cached) runtime with a chat template on its tokenizer for the test."""
    from featuredict.db.queries import sae_info
    from featuredict.pipelines.model.runtime import cached_runtime_from_row

    store = Store(db_copy, read_only=True)
    row = sae_info(store, STEER_SAE_ID)
    store.close()
    tok = cached_runtime_from_row(row).tokenizer
    tok.chat_template = CHAT_TEMPLATE
    yield tok
    tok.chat_template = None


def test_page_multi_turn_chat(app, db_copy, chat_tokenizer):
    f = live_feature(db_copy)
    at = app(sae=STEER_SAE_ID, feature=f"{f}=add:4", conv="1", system="be brief", n="5").run()
    assert not at.exception, at.exception
    assert at.toggle(key="steer_conv").value is True and at.text_input(key="steer_system").value == "be brief"
    assert at.text_area(key="steer_prompt").label == "Your message"
    at.text_area(key="steer_prompt").set_value("hello there")
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    conv = at.session_state["steer_conversation"]
    assert [t["user"] for t in conv] == ["hello there"] and conv[0]["baseline"] != conv[0]["steered"]
    assert at.text_area(key="steer_prompt").value == ""  # emptied for the next message
    at.text_area(key="steer_prompt").set_value("and then?")
    at.button(key="steer_run").click().run()
    assert not at.exception, at.exception
    conv = at.session_state["steer_conversation"]
    assert [t["user"] for t in conv] == ["hello there", "and then?"]
    boxes = html_texts(at)
    assert len(boxes) == 4  # two turns, each side's reply
    assert "Fluency: steered perplexity" in metrics(at)
    link = [c.value for c in at.code if c.value.startswith("steer?")][0]
    assert "conv=1" in link and "system=be+brief" in link
    at.button(key="steer_reset").click().run()
    assert at.session_state["steer_conversation"] == []
    # chat mode without the chat template is refused with one line
    at.checkbox(key="steer_chat").uncheck().run()
    assert any("multi-turn chat needs the chat template" in e for e in errors(at)), errors(at)


# ---- steering from a concept search ------------------------------------------------------------------------
def test_steer_links_build_the_steering_set():
    import pandas as pd

    from featuredict.dashboard.steer_links import concept_steering_set, edits_from_table, steer_url
    from featuredict.pipelines.steering import SteeringInputError

    assert steer_url("sae a", {3: 4.0, 7: 1.5}) == "steer?sae=sae+a&feature=3%3Dadd%3A4%2C7%3Dadd%3A1.5"
    url = steer_url("s", [FeatureEdit(3, "orthogonal", 2.0), FeatureEdit(5, "ablate")], prompt="a & b")
    assert url == "steer?sae=s&feature=3%3Dorthogonal%3A2%2C5%3Dablate&prompt=a+%26+b"
    from urllib.parse import parse_qsl

    assert SteeringConfig.from_mapping(dict(parse_qsl(url.split("?")[1]))).edits[1] == FeatureEdit(5, "ablate")
    for bad, msg in [
        ({3: float("nan")}, "not a finite number"),
        ([(3, 1.0), (3, 2.0)], "listed twice"),
        ({}, "no features"),
    ]:
        with pytest.raises(SteeringInputError, match=msg):
            steer_url("s", bad)
    ranked = pd.DataFrame({"feature": [9, 3, 7, 11], "score": [1.0, 4.0, 2.0, 0.1], "label": [None, "x", "y", "z"]})
    got = concept_steering_set(ranked, top=3)
    assert got["feature"].tolist() == [3, 7, 9] and got["strength"].tolist() == [4.0, 2.0, 1.0]
    assert got["method"].tolist() == ["add"] * 3 and got["label"].tolist() == ["x", "y", ""]
    assert concept_steering_set(ranked, top=4)["strength"].tolist()[-1] == 0.5  # never below 0.5
    edited = got.assign(method=["add", "ablate", "cap"], strength=[2.0, None, 0.5])
    assert edits_from_table(edited) == (
        FeatureEdit(3, "add", 2.0),
        FeatureEdit(7, "ablate"),
        FeatureEdit(9, "cap", 0.5),
    )
    with pytest.raises(SteeringInputError, match="give a strength"):
        edits_from_table(got.assign(strength=[None, 1.0, 1.0]))


def test_steer_button_links_to_the_steer_page(tmp_path):
    """The concept search's button, in an app whose navigation holds the steer page: the link carries the set."""
    from urllib.parse import parse_qsl

    from streamlit.testing.v1 import AppTest

    (tmp_path / "views").mkdir()
    (tmp_path / "views" / "steer.py").write_text("import streamlit as st\nst.write('steer')\n")
    (tmp_path / "app.py").write_text(
        "import pandas as pd\nimport streamlit as st\n"
        "from featuredict.dashboard.common import PageContext\n"
        "from featuredict.dashboard.steer_links import steer_button\n\n"
        "def concept():\n"
        "    ctx = PageContext(store=None, sae_id='s1', sae={'d_sae': 64}, db_key='k')\n"
        "    df = pd.DataFrame({'feature': [3, 7, 9, 11], 'score': [4.0, 2.0, 1.0, 0.5], 'label': ['a', None, 'c', 'd']})\n"
        "    steer_button(ctx, df, prompt='hello')\n\n"
        "st.navigation([st.Page(concept, title='Search', url_path='search'), st.Page('views/steer.py')]).run()\n"
    )
    at = AppTest.from_file(str(tmp_path / "app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    (link,) = at.get("page_link")
    assert link.proto.page == "steer" and link.proto.label == "Steer with these features"
    params = dict(parse_qsl(link.proto.query_string))
    assert params == {"sae": "s1", "feature": "3=add:4,7=add:2,9=add:1", "prompt": "hello"}
    at.number_input(key="concept_steer_top").set_value(1).run()
    params = dict(parse_qsl(at.get("page_link")[0].proto.query_string))
    assert params["feature"] == "3=add:4"
