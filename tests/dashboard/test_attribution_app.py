"""The Attribution page (AppTest): deep link runs it, every section renders, a hostile prompt stays text,
bad input is one line; the Scan page's "why" link points here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import L0, L1, ROOT, make_two_sae_db, page_maker

PAGE = ROOT / "dashboard" / "views" / "attribution.py"
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)> **bold** [x](javascript:alert(3))"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_corpus: Path) -> Path:
    return make_two_sae_db(tmp_path_factory.mktemp("attr_app"), tiny_model_dir, tiny_corpus)


@pytest.fixture()
def app(db, monkeypatch):
    return page_maker(PAGE, db, monkeypatch, timeout=180)


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def test_page_renders_empty(app) -> None:
    at = app(sae=L1).run()
    assert not at.exception and not _errors(at)
    assert at.title[0].value == "Why did the model say that?"


def test_deep_link_runs_two_saes_with_graph(app) -> None:
    at = app(sae=L1, saes=L0, prompt="Once upon a time there was", mode="direct").run()
    assert not at.exception, at.exception
    assert not _errors(at), _errors(at)
    data, graph = at.session_state["attr_result"]
    assert data["mode"] == "direct" and set(data["saes"]) == {L0, L1}
    assert graph is not None and {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "logit"}
    heads = [h.value for h in at.subheader]
    assert heads == ["Target", "Features that drove it", "Token x feature", "Graph", "Checked by intervention"]
    assert any("Sum check" in m.value for m in at.markdown)
    assert at.query_params["mode"] == ["direct"] if isinstance(at.query_params["mode"], list) else "direct"


def test_form_contrast_and_bad_target(app) -> None:
    at = app(sae=L1).run()
    at.text_area(key="attr_prompt").set_value("Once upon a time there was")
    at.text_input(key="attr_ca").set_value(" a")
    at.text_input(key="attr_cb").set_value(" the")
    at.checkbox(key="attr_graph").uncheck()
    at.button[0].click().run()
    assert not at.exception and not _errors(at), _errors(at)
    assert at.session_state["attr_result"][0]["target"]["kind"] == "contrast"
    at.text_input(key="attr_ca").set_value(" little cat")
    at.button[0].click().run()
    errs = _errors(at)
    assert len(errs) == 1 and "not one" in errs[0] and "Traceback" not in errs[0]


def test_hostile_prompt_is_text(app) -> None:
    at = app(sae=L1, prompt=HOSTILE).run()
    assert not at.exception and not _errors(at), _errors(at)
    data, _ = at.session_state["attr_result"]
    assert "".join(data["prompt_tokens"][1:]).startswith("<script>")
    for m in [*at.markdown, *at.caption]:
        assert "<script" not in m.value and "<img" not in m.value and "](javascript" not in m.value


def test_scan_page_links_why_here() -> None:
    src = (PAGE.parent / "scan.py").read_text(encoding="utf-8")
    assert 'url("attribution"' in src


def test_clicking_a_token_explains_that_position(app) -> None:
    at = app(sae=L1, prompt="Once upon a time there was", graph="0").run()
    assert not at.exception and not _errors(at)
    data, _ = at.session_state["attr_result"]
    last = data["target"]["position"]
    pills = [w for w in at.get("button_group")]
    assert pills, "no token pills"
    pills[0].set_value(2).run()
    assert not at.exception and not _errors(at), _errors(at)
    data2, _ = at.session_state["attr_result"]
    assert data2["target"]["position"] == 2 != last
    assert data2["target"]["kind"] == "logprob" and "the next token" in data2["target"]["label"]  # the prompt's own
