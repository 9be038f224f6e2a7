"""Explanations in the dashboard (AppTest through dashboard/app.py): the feature page header and list with
scores and stale markers, the lists page and the map tooltip; explanation text is HOSTILE (script / img
onerror) and must render as text everywhere. Databases are SYNTHETIC (bench/synth_db.py)."""

from __future__ import annotations

import html
import json

from streamlit.testing.v1 import AppTest

from featuredict.dashboard import charts, render
from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.store import Store
from tests.helpers import APP, HOSTILE_IMG, HOSTILE_SCRIPT, SAE_ID

EVIL = f"fires on {HOSTILE_SCRIPT} and {HOSTILE_IMG} **bold** [link](http://x)"
F = 5


def open_app(monkeypatch, db, page: str, **params: str) -> AppTest:
    monkeypatch.setenv("FEATUREDICT_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    for k, v in params.items():
        at.query_params[k] = v
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def htmls(at: AppTest) -> str:
    return "\n".join(h.value for h in at.get("html"))


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [t.value for t in at.title]
    return "\n".join(parts + [e.value for e in at.error] + [w.value for w in at.warning])


def _seed(db) -> str:
    """Three explanations of feature F: a scored hostile one (best), a tokens one, a stale one; one failure."""
    s = Store(db)
    fp = q.sae_fingerprint(s, SAE_ID)
    writes.add_explanations(
        s,
        [
            {"sae_id": SAE_ID, "feature": F, "text": EVIL, "method": "openai", "explainer_model": f"gpt {HOSTILE_IMG}",
             "detection": 0.84, "fuzzing": 0.71, "scorer_model": "keyword", "sae_fingerprint": fp,
             "author": HOSTILE_SCRIPT},
            {"sae_id": SAE_ID, "feature": F, "text": '"bread" (40%)', "method": "tokens", "sae_fingerprint": fp},
            {"sae_id": SAE_ID, "feature": F, "text": "old words", "method": "import", "sae_fingerprint": "dec-sha256:0"},
            {"sae_id": SAE_ID, "feature": F, "text": None, "method": "hf", "explainer_model": "smollm2-135m",
             "error": f"empty answer {HOSTILE_IMG}"},
        ],
    )  # fmt: skip
    s.close()
    return fp


def test_feature_page_shows_explanations_escaped(monkeypatch, synth_db):
    _seed(synth_db)
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature=str(F))
    body, shown = htmls(at), texts(at)
    for raw in (HOSTILE_SCRIPT, HOSTILE_IMG):
        assert raw not in body and raw not in shown
    assert "<script" not in body and "<img" not in body and "<script" not in shown and "<img" not in shown
    assert html.escape(EVIL, quote=True) in body  # every explanation, as text
    assert "detection 0.84 · fuzzing 0.71 by keyword" in html.unescape(body)
    assert body.count("stale · ") == 1 and "old words" in body  # the stale one is marked
    # The header shows the best (scored, current) one, markdown-escaped so **bold** and links stay literal.
    header = at.markdown[1].value if at.markdown[0].value.startswith("#") else at.markdown[0].value
    assert header.startswith("**fires on") and "\\*\\*bold\\*\\*" in header and "&lt;script&gt;" in header
    assert any("failed attempt" in e.label for e in at.expander)


def test_feature_page_without_explanations_says_how(monkeypatch, synth_db):
    at = open_app(monkeypatch, synth_db, "feature", sae=SAE_ID, feature="7")
    assert "No explanation yet" in texts(at)
    assert any("--explainer tokens" in c.value and "--features 7" in c.value for c in at.code)


def test_lists_page_and_map_tooltip_show_best_explanation(monkeypatch, synth_db):
    _seed(synth_db)
    s = Store(synth_db)
    writes.add_to_list(s, "evil", SAE_ID, [F, 6])
    s.close()
    at = open_app(monkeypatch, synth_db, "lists", sae=SAE_ID, list="evil")
    grid = at.dataframe[0].value
    assert grid.set_index("feature").loc[F, "explanation"] == EVIL  # a data grid: text, not HTML
    assert "<script" not in htmls(at)

    pts = q.map_points(Store(synth_db), SAE_ID)
    frame, enc = charts.plot_frame(pts, "density")
    tip = frame.set_index("feature").loc[F, "explanation"]
    assert tip.startswith("fires on <script>") and len(tip) <= 90  # raw in the data; Vega's tooltip escapes it
    spec = json.dumps(charts.scatter(frame, enc, 6, 300, "pick").to_dict())
    assert '"title": "explanation"' in spec
    at = open_app(monkeypatch, synth_db, "map", sae=SAE_ID)
    assert "best explanation" in texts(at)


def test_render_explanations_html_escapes_everything():
    rows = [
        {"text": EVIL, "method": HOSTILE_SCRIPT, "explainer_model": HOSTILE_IMG, "detection": 0.5,
         "fuzzing": None, "scorer_model": HOSTILE_SCRIPT, "stale": True, "sae_fingerprint": '"><script>x',
         "source": HOSTILE_IMG, "created_at": None},
        {"text": None, "method": "hf", "error": "boom"},
    ]  # fmt: skip
    out = render.explanations_html(rows)
    assert "<script" not in out and "<img" not in out and out.count("<div") == 2
    assert html.escape(EVIL, quote=True) in out and "stale · " in out and "boom" not in out
    assert render.score_text(None, None) == "unscored" and render.score_text(0.812, None) == "detection 0.81"
