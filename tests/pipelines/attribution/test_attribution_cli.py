"""``featuredict attribute`` end to end on a real tiny database: text, JSON, graph file, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featuredict.pipelines.cli import main
from tests.helpers import L0, L1, make_two_sae_db


@pytest.fixture(scope="module")
def two_sae_db(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_corpus: Path) -> Path:
    return make_two_sae_db(tmp_path_factory.mktemp("attr_cli"), tiny_model_dir, tiny_corpus)


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["attribute", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _story(db: Path) -> list[str]:
    """``--db DB --sae L1 --prompt 'Once upon a time there was'``."""
    return ["--db", str(db), "--sae", L1, "--prompt", "Once upon a time there was"]


def test_text_output_names_mode_target_and_check(two_sae_db: Path, capsys) -> None:
    rc, out, err = _run(capsys, *_story(two_sae_db))
    assert rc == 0, err
    assert "mode: full" in out and "target: log p(" in out and "the model's prediction" in out
    assert "intervention check" in out and "nonlinear remainder" in out and "feature?sae=" in out


def test_json_two_saes_direct_and_graph(two_sae_db: Path, tmp_path: Path, capsys) -> None:
    g = tmp_path / "graph.json"
    rest = ["--sae", L0, "--contrast", " a", " the", "--mode", "direct", "--json", "--graph", str(g), "--top-k", "3"]
    rc, out, err = _run(capsys, *_story(two_sae_db), *rest)
    assert rc == 0, err
    data = json.loads(out)
    assert data["mode"] == "direct" and "frozen" in data["mode_note"]
    assert data["saes"] == [L0, L1]  # hook order, whatever the order given
    assert data["target"]["kind"] == "contrast"
    f = data["features"][0]
    assert {"activation", "gradient", "attribution", "words", "density", "link"} <= set(f)
    assert abs(f["attribution"] - f["activation"] * f["gradient"]) < 1e-5
    assert len(data["check"]["single"]) == 3 and data["check"]["together"] is not None
    assert {s["sae"] for s in data["check"]["sum_check"]} == {L0, L1}
    graph = json.loads(g.read_text())
    assert data["graph"]["nodes"] == len(graph["nodes"]) and graph["metadata"]["prompt"] == "Once upon a time there was"
    assert {n["layer"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"} <= {"0", "1"}


def test_chat_target_in_assistant_turn(two_sae_db: Path, tmp_path: Path, capsys) -> None:
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]))
    rc, out, err = _run(capsys, "--db", str(two_sae_db), "--sae", L1, "--chat", str(chat), "--json")
    # the tiny tokenizer has no chat template: one line, exit 2
    assert rc == 2 and "chat template" in err and out == "" and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", " little cat"], "not one"),
        (["--position", "99"], "past the end"),
        (["--sae", "other/model.layers.1/64"], "different models"),
        (["--max-tokens", "4"], "over the limit"),
        (["--sae", "nope"], "no SAE 'nope'"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(two_sae_db: Path, tmp_path: Path, capsys, extra, message) -> None:
    g = tmp_path / "g.json"
    rc, out, err = _run(capsys, *_story(two_sae_db), "--graph", str(g), *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == "" and not g.exists() and not list(tmp_path.iterdir())
