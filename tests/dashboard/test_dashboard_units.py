"""Pure dashboard helpers: concept scoring, HTML rendering (escaping), prompt runs on the tiny model, the
charts (map payload size, histograms, neighbourhoods), the page table and page context, serve command line."""

from __future__ import annotations

import argparse
import html

import numpy as np
import pandas as pd
import pytest

from featuredict.dashboard import charts, common, render, serve
from featuredict.db.records import FeatureBaselines
from featuredict.pipelines.cli import serve as serve_cli
from featuredict.pipelines.search import by_prompt as prompt
from featuredict.pipelines.search import concept

D = 6  # features in the toy concept problems


def acts(n_pos: int, fire: dict[int, float]) -> np.ndarray:
    """``[n_pos, D]`` activations with ``fire[f]`` on every token for the given features."""
    a = np.zeros((n_pos, D))
    for f, v in fire.items():
        a[:, f] = v
    return a


def _rank(ex, ce=None, *, density=1e-3, mean_act=1.0, max_act=1.0):
    """``concept_scores`` against corpus baselines given per feature, or as one value for every feature."""
    arrays = (np.broadcast_to(np.asarray(v, dtype=float), (D,)).copy() for v in (density, mean_act, max_act))
    return concept.concept_scores(ex, ce, FeatureBaselines(*arrays))


def test_concept_prefers_feature_specific_to_examples():
    # f0: fires only on examples; f1: fires everywhere equally; f2: only on counter-examples;
    # f3: on examples but also strongly on counter-examples; f4: on one of three examples.
    ex = [
        acts(5, {0: 2.0, 1: 1.0, 3: 1.0}),
        acts(7, {0: 1.5, 1: 1.0, 3: 1.0, 4: 3.0}),
        acts(4, {0: 1.0, 1: 1.0, 3: 1.0}),
    ]
    ce = [acts(6, {1: 1.0, 2: 2.0, 3: 1.0}), acts(5, {1: 1.0, 3: 0.9})]
    df = _rank(ex, ce, density=0.01, max_act=2.0)
    assert df["feature"].iloc[0] == 0
    assert set(df["feature"]) <= {0, 3, 4}  # f1 (as strong on counters) and f2 (only there) score <= 0
    score = dict(zip(df["feature"], df["score"], strict=True))
    assert score.get(3, 0.0) < 0.1 * score[0]  # barely above its counter-example peaks
    row0 = df.iloc[0]
    assert row0["coverage"] == 1.0 and row0["neg_coverage"] == 0.0
    assert df.loc[df["feature"] == 4, "coverage"].iloc[0] == pytest.approx(1 / 3)


def test_concept_corpus_baseline_penalises_dense_features():
    # Both f0 and f1 fire on every example token with the same normalised strength,
    # but f1 is dense in the corpus (density 0.5) and f0 is rare (1e-4).
    ex = [acts(10, {0: 1.0, 1: 1.0})]
    density = np.array([1e-4, 0.5, 0, 0, 0, 0])
    df = _rank(ex, density=density)
    assert df["feature"].tolist()[:2] == [0, 1]
    assert df["score"].iloc[0] > 5 * df["score"].iloc[1]
    assert df["neg_coverage"].isna().all()


def test_concept_normalises_by_feature_max():
    # f0 fires at 1.0 of a max of 1 (saturated); f1 fires at 1.0 of a max of 100 (barely): f0 must win.
    ex = [acts(3, {0: 1.0, 1: 1.0})]
    df = _rank(ex, mean_act=0.5, max_act=[1.0, 100.0, 1, 1, 1, 1])
    assert df["feature"].iloc[0] == 0


def test_concept_input_checks():
    with pytest.raises(ValueError):
        concept.concept_scores([], None, FeatureBaselines.zeros(D))
    with pytest.raises(ValueError):
        concept.concept_scores([acts(2, {})], None, FeatureBaselines.zeros(D + 1))
    with pytest.raises(ValueError):  # the three arrays must agree
        FeatureBaselines(np.zeros(D), np.zeros(D + 1), np.zeros(D))
    assert concept.concept_scores([acts(2, {})], None, FeatureBaselines.zeros(D)).empty


def test_split_texts():
    assert concept.split_texts("a\nb\n\n") == ["a", "b"]
    assert concept.split_texts("one line\nsame text\n\nsecond") == ["one line\nsame text", "second"]
    assert concept.split_texts("  ") == []


def test_context_html_escapes_and_highlights():
    toks = ["<s>", " a", "<script>alert(1)</script>", '" onmouseover="x', "\n"]
    a = [0.0, 0.5, 2.0, 1.0, 0.0]
    out = render.context_html(toks, a, scale=2.0, max_pos=2)
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert '" onmouseover' not in out and "&quot; onmouseover=&quot;x" in out
    assert "rgba(255,140,0,1.000)" in out and "rgba(255,140,0,0.250)" in out
    assert 'title="&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;  act 2.000"' in out
    assert "↵" in out and "&lt;s&gt;" not in out  # BOS skipped, newline visible
    with pytest.raises(ValueError):
        render.context_html(["a"], [1.0, 2.0], 1.0)


def test_context_window():
    toks = [f" t{i}" for i in range(40)]
    out = render.context_html(toks, np.ones(40), 1.0, max_pos=20, window=(3, 2), skip_first=False)
    assert out.count('<span style="background') == 6 and " t17" in out and " t16" not in out
    assert out.count("…") == 2


def test_prompt_run_and_tables(tiny_runtime):
    res = prompt.run_prompt(tiny_runtime, "The cat sat on the mat. The cat ran.")
    assert res.tokens[0] == tiny_runtime.tokenizer.decode([tiny_runtime.tokenizer.bos_token_id])
    assert not res.valid[0] and res.valid[1:].all()
    assert (res.pos > 0).all()  # BOS zeroed
    dense = tiny_runtime.feature_acts(tiny_runtime.tokenize("The cat sat on the mat. The cat ran."))[0].numpy()
    whole = prompt.whole_text_features(res, max_act=np.ones(res.d_sae), rank_by="max", top=100)
    assert whole["max_here"].iloc[0] == pytest.approx(dense.max(), rel=1e-5)
    f = int(whole["feature"].iloc[0])
    assert np.allclose(prompt.feature_over_tokens(res, f), dense[:, f], atol=1e-6)
    per = prompt.token_features(res, 2, top=100)
    assert per["act"].tolist() == sorted(per["act"], reverse=True)
    assert set(per["feature"]) == set(np.flatnonzero(dense[2]))
    assert prompt.dense_valid_acts(tiny_runtime, "The cat sat.").shape[1] == res.d_sae


def test_map_chart_carries_all_65536_points():
    import altair as alt
    import pyarrow as pa

    n = 65536
    rng = np.random.default_rng(0)
    pts = pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "x": rng.normal(size=n).astype(np.float32),
            "y": rng.normal(size=n).astype(np.float32),
            "log10_density": rng.uniform(-6, -1, n).astype(np.float32),
            "label": [None] * n,
            "tag": [None] * n,
            "top_tokens": ["a · b"] * n,
        }
    )
    for colour in ("density", "tag", "label"):
        frame, enc = charts.plot_frame(pts, colour)
        chart = charts.scatter(frame, enc, charts.point_size(len(frame)), 600, "pick")
        assert chart.data is frame and len(frame) == n  # every point goes to the browser, none sampled away
        sink = pa.BufferOutputStream()  # Streamlit ships chart data as an Arrow stream like this one
        table = pa.Table.from_pandas(frame, preserve_index=False)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        payload = sink.getvalue()
        assert pa.ipc.open_stream(payload).read_all().num_rows == n
        assert payload.size < 64 * n  # compact: < 64 bytes a point
    # and outside Streamlit, with altair's own guard lifted as app.py does
    alt.data_transformers.disable_max_rows()
    frame, enc = charts.plot_frame(pts, "density")
    assert len(charts.scatter(frame, enc, 6, 600, "pick").to_dict()["datasets"].popitem()[1]) == n


def test_point_size_shrinks_with_the_number_of_points():
    assert charts.point_size(65536) == 6 and charts.point_size(20001) == 6
    assert charts.point_size(20000) == 14 and charts.point_size(2001) == 14
    assert charts.point_size(2000) == 40 and charts.point_size(1) == 40


def test_density_histogram_chart():
    hist = pd.DataFrame({"log10_lo": [-4.0, -3.75, -2.0], "log10_hi": [-3.75, -3.5, -1.75], "count": [3, 5, 1]})
    chart = charts.density_histogram(hist, 1234)
    assert chart.data is hist
    spec = chart.to_dict()
    assert spec["mark"]["type"] == "rect" and spec["title"].endswith("; 1,234 dead")
    x = spec["encoding"]["x"]
    assert x["field"] == "log10_lo" and x["bin"] == "binned" and x["scale"]["domain"] == [-4.0, -1.75]
    assert spec["encoding"]["x2"]["field"] == "log10_hi" and spec["encoding"]["y"]["field"] == "count"
    assert [t["field"] for t in spec["encoding"]["tooltip"]] == ["log10_lo", "log10_hi", "count"]


def test_activation_histogram_chart():
    chart = charts.activation_histogram([0.0, 0.1, 1.0, 10.0, 100.0], [5, 0, 3, 2])
    assert chart is not None
    # the bin starting at 0 (no place on a log axis) and the empty bin are left out
    assert chart.data[["lo", "hi", "count"]].values.tolist() == [[1.0, 10.0, 3.0], [10.0, 100.0, 2.0]]
    spec = chart.to_dict()
    assert spec["encoding"]["x"]["scale"]["type"] == "log" and spec["encoding"]["x2"]["field"] == "hi"
    assert spec["height"] == 180
    assert charts.activation_histogram([0.0, 1.0, 2.0], [0, 0]) is None  # dead feature
    assert charts.activation_histogram([0.0, 1.0, 2.0], [1, 2, 3]) is None  # edges and counts do not match
    assert charts.activation_histogram(None, None) is None
    assert charts.activation_histogram([0.0, 1.0], [4]) is None  # only a bin at 0: nothing on a log axis


def line_points(n: int) -> pd.DataFrame:
    """``q.map_points``-shaped frame: feature i at (i, 0)."""
    return pd.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "x": np.arange(n, dtype=np.float32),
            "y": np.zeros(n, dtype=np.float32),
            "log10_density": np.full(n, -2.0, dtype=np.float32),
            "label": [f"label {i}" for i in range(n)],
            "tag": [None] * n,
            "top_tokens": [""] * n,
        }
    )


def test_neighbourhood_roles_and_chart():
    frame, _ = charts.plot_frame(line_points(8), "density")
    near = charts.neighbourhood(frame, 4, 3, decoder_neighbours=[5, 7])
    assert near["feature"].tolist() == [4, 3, 5]  # nearest first; ties in frame order
    assert near["role"].tolist() == ["centre", "nearby on map", "decoder neighbour"]  # 7 is not among the 3
    chart = charts.neighbourhood_chart(near, "pick_near")
    spec = chart.to_dict()
    assert spec["height"] == 460 and len(spec["layer"]) == 2
    (pick,) = spec["params"]  # clicking a point selects its feature (the page opens it)
    assert pick["name"] == "pick_near" and pick["select"]["fields"] == ["feature"]
    assert chart.layer[1].data["feature"].tolist() == [4, 5]  # ids written next to the centre and decoder nbs
    assert charts.neighbourhood(frame, 99, 3, [1]).empty  # a feature without a map position


def test_feature_place_chart():
    pts = line_points(10000)
    chart = charts.feature_place(pts, 7, 7.0, 0.0, decoder_neighbours=[3, 9, 123456])
    bg, nb, me = (layer.data for layer in chart.layer)
    assert len(bg) == 5000 and bg["feature"].tolist()[:3] == [0, 2, 4]  # every 2nd point: about 4,000
    assert nb["feature"].tolist() == [3, 9] and set(nb["role"]) == {"neighbour"}  # 123456 is not on the map
    assert me.to_dict("records") == [{"x": 7.0, "y": 0.0, "feature": 7, "role": "this feature"}]
    spec = chart.to_dict()
    assert spec["height"] == 240
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["circle", "circle", "point"]
    assert len(charts.feature_place(line_points(50), 1, 1.0, 0.0, []).layer[0].data) == 50  # small maps: all points


def test_page_table():
    assert list(common.PAGES)[0] == "overview" and "steer" in common.PAGES and "attribution" in common.PAGES
    assert common.page_file("map") == "views/map.py"
    assert common.url("feature", sae="a b", feature=3, empty="", none=None) == "feature?sae=a+b&feature=3"
    assert common.url("lists") == "lists"
    for name in common.PAGES:  # every page in the table has its file
        assert (common.VIEWS_DIR / f"{name}.py").exists()
    with pytest.raises(KeyError):
        common.page_file("nope")
    with pytest.raises(KeyError):
        common.url("nope", sae="x")


def test_page_context_is_the_frame_of_the_running_page():
    from typing import cast

    from featuredict.db.store import Store

    a = common.PageContext(cast(Store, object()), "a", {"d_sae": 300, "prepend_bos": False}, "k1")
    b = common.PageContext(cast(Store, object()), "b", {"d_sae": 64}, "k2")
    assert a.d_sae == 300 and not a.has_bos and b.has_bos  # BOS unless the SAE row says otherwise
    with pytest.raises(AttributeError):
        a.sae_id = "c"  # frozen: a page cannot change the frame
    with common.use_context(a):
        assert common.page_context() is a
        with common.use_context(b):
            assert common.page_context() is b
        assert common.page_context() is a
    assert common._CONTEXT.get() is None  # nothing leaks into the next run on this thread


def test_serve_argv(tmp_path):
    ap = argparse.ArgumentParser()
    serve_cli.register(ap.add_subparsers(dest="cmd"))
    db = tmp_path / "x.duckdb"
    args = ap.parse_args(["serve", "--db", str(db), "--port", "8600", "--headless"])
    assert args.func is serve.run
    argv = serve.streamlit_argv(args)
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("dashboard/app.py")
    assert argv[-3:] == ["--", "--db", str(db.resolve())] and "8600" in argv
    assert serve.run(args) == 2  # missing file: message, no exec


def test_escape_text():
    assert render.escape_text(None) == "" and render.escape_text("<b>") == html.escape("<b>")


def test_concept_feature_dead_in_corpus_uses_its_own_peak():
    # f0 never fired in the corpus (max_act 0) but fires weakly here; f1 is rare and fires at its corpus max.
    ex = [acts(4, {0: 0.5, 1: 2.0})]
    df = _rank(ex, density=[0, 1e-4, 0, 0, 0, 0], mean_act=[0, 1.0, 0, 0, 0, 0], max_act=[0, 2.0, 0, 0, 0, 0])
    assert df["feature"].tolist() == [0, 1]
    assert df["mass_pos"].tolist() == pytest.approx([1.0, 1.0])  # both normalised to their own scale


def test_md_escapes_markdown_and_html():
    assert render.md("evil <script>alert(1)</script>") == "evil &lt;script&gt;alert(1)&lt;/script&gt;"
    assert render.md("[x](javascript:alert(1)) *b* :red[r] $x$") == (
        "\\[x\\](javascript\\:alert(1)) \\*b\\* \\:red\\[r\\] \\$x\\$"
    )
    assert render.md("# h\n1. i\n- j") == "\\# h\n1\\. i\n\\- j"
    assert render.md("/tmp/a_b.duckdb") == "/tmp/a\\_b.duckdb" and render.md(None) == ""


def test_text_block_keeps_model_output_literal():
    from featuredict.dashboard.render import text_block

    out = text_block(
        "Intro\n\n**bold** [x](http://e.test) ![i](http://e.test/i.png)\r\n<script>alert(1)</script>", "c: 1"
    )
    assert "\n" not in out and "\r" not in out  # no blank line that would end the HTML block
    assert out.count("<br>") == 3 and "<script>" not in out and "&lt;script&gt;" in out
    assert out.startswith('<div style="c: 1">') and out.endswith("</div>")


def test_csv_export_defuses_spreadsheet_formulas():
    import io
    import json

    import pandas as pd

    from featuredict.dashboard.export import export_list

    members = pd.DataFrame(
        {
            "sae_id": ["s"],
            "feature": [3],
            "label": ['=HYPERLINK("http://evil","x")'],
            "tags": [["+cmd", "ok"]],
            "note": ["@SUM(A1)"],
            "added_at": [pd.Timestamp("2026-01-01")],
            "density": [-0.5],
            "max_act": [1.0],
            "top_tokens": ["-1 · x"],
        }
    )
    csv_text, json_text = export_list(members, "-=1+1")
    row = pd.read_csv(io.StringIO(csv_text)).iloc[0]
    assert row["label"] == '\'=HYPERLINK("http://evil","x")' and row["note"] == "'@SUM(A1)"
    assert row["tags"] == "'+cmd;ok" and row["list_name"] == "'-=1+1" and row["top_tokens"] == "'-1 · x"
    assert row["density"] == -0.5 and row["feature"] == 3  # numbers untouched
    data = json.loads(json_text)  # JSON keeps the text exactly
    assert data["list_name"] == "-=1+1" and data["features"][0]["label"].startswith("=HYPERLINK")


@pytest.mark.parametrize("colour_by", ["density", "tag", "label"])
def test_map_neighbourhood_is_nearest_in_any_colouring(colour_by):
    df = pd.DataFrame(
        {
            "feature": range(6),
            "x": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            "y": [0.0] * 6,
            "log10_density": [-2.0] * 6,
            "label": ["centre", None, None, None, None, None],
            "tag": ["bio", None, None, None, None, None],  # the tagged point is re-sorted to the end
            "top_tokens": [""] * 6,
        }
    )
    frame, _ = charts.plot_frame(df, colour_by)
    assert charts.nearest(frame, 0.0, 0.0, 2)["feature"].tolist() == [0, 1]


def test_first_token_is_hidden_only_when_it_is_bos():
    from featuredict.dashboard.render import contexts_html

    rows = [(["The", " cat", " sat"], [0.0, 2.0, 0.0], 1, 2.0)]
    assert ">The<" not in contexts_html(rows, 2.0, skip_first=True)  # position 0 is BOS here
    assert ">The<" in contexts_html(rows, 2.0, skip_first=False)  # an SAE without BOS: a real word
