"""Neuronpedia import / export (``pipelines/neuronpedia.py``, ``db/queries.py``, ``db/writes.py``, ``featuredict neuronpedia``) on copies
of the tiny database the real build writes (conftest.py)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.store import Store
from featuredict.db.writes import insert_explanations
from featuredict.pipelines import neuronpedia as interop
from featuredict.pipelines.cli import main

SAE = "tiny/model.layers.1/64"
SOURCE = "tiny-llama/1-res-fd"


def read_batches(folder: Path) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(folder.glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0])):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def write_batch(path: Path, lines: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for x in lines:
            fh.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return path


def explanation_set(store: Store) -> set[tuple[int, str, str | None]]:
    rows = store.rows(
        "SELECT feature, text, explainer_model FROM explanations WHERE sae_id = ? AND text IS NOT NULL", [SAE]
    )
    return {(int(f), t, m) for f, t, m in rows}


@pytest.fixture
def db_a(tiny_db: Path, tmp_path: Path) -> Path:
    """The tiny database with two LLM-style explanations, one imported Neuronpedia row and two labels."""
    path = Path(shutil.copyfile(tiny_db, tmp_path / "a.duckdb"))
    store = Store(path)
    try:
        insert_explanations(
            store,
            [
                {
                    "sae_id": SAE,
                    "feature": 3,
                    "text": "deception and lying",
                    "method": "openai",
                    "explainer_model": "gpt-x",
                },
                {"sae_id": SAE, "feature": 3, "text": "lies <b>told</b>", "method": "tokens", "explainer_model": None},
                {
                    "sae_id": SAE,
                    "feature": 12,
                    "text": "bread recipes",
                    "method": "import",
                    "explainer_model": "claude-x",
                    "source": interop.source_tag(
                        "tiny-llama", "1-res-fd", "oai_token-act-pair", "np0000000000000000000001"
                    ),
                },
            ],
        )
        writes.update_label(store, SAE, 5, label="baking", author="alice")
        writes.update_label(store, SAE, 3, label="deception and lying")  # same words as an explanation
    finally:
        store.close()
    return path


def test_export_writes_neuronpedia_batches_with_our_data(db_a: Path, tmp_path: Path):
    out = tmp_path / "np"
    store = Store(db_a, read_only=True)
    try:
        rep = interop.export_neuronpedia(store, SAE, SOURCE, out, batch_size=20, progress=False)
        feats = {
            int(r["feature"]): r for r in store.df("SELECT * FROM features WHERE sae_id = ?", [SAE]).to_dict("records")
        }
        n_examples = store.rows("SELECT count(*) FROM examples WHERE sae_id = ?", [SAE])[0][0]
        ex = q.examples(store, SAE, 7, "interval")
    finally:
        store.close()
    root = out / "tiny-llama" / "1-res-fd"
    assert rep.out == root and rep.features == 64 and rep.activations == n_examples
    assert sorted(p.name for p in (root / "features").iterdir()) == [f"batch-{i}.jsonl.gz" for i in range(4)]

    features = read_batches(root / "features")
    assert [r["index"] for r in features] == [str(i) for i in range(64)]
    assert set(features[0]) >= {"modelId", "layer", "index", "maxActApprox", "frac_nonzero", "pos_str", "neg_str"}
    for r in features:
        f = feats[int(r["index"])]
        assert (r["modelId"], r["layer"], r["sourceSetName"]) == ("tiny-llama", "1-res-fd", "res-fd")
        assert r["maxActApprox"] == pytest.approx(f["max_act"], rel=1e-6)
        assert r["frac_nonzero"] == pytest.approx(f["density"], rel=1e-6)
        assert r["pos_str"] == list(f["pos_tokens"]) and r["neg_str"] == list(f["neg_tokens"])
        assert np.allclose(r["pos_values"], f["pos_values"], rtol=1e-6)
        assert r["topkCosSimIndices"] == [int(i) for i in f["neighbours"]]
        assert r["freq_hist_data_bar_heights"] == [float(c) for c in f["hist_counts"]]

    acts = read_batches(root / "activations")
    assert len(acts) == n_examples and len({a["id"] for a in acts}) == n_examples
    mine = [a for a in acts if a["index"] == "7" and a["binMin"] is not None]
    assert len(mine) == len(ex)
    for a, (_, e) in zip(mine, ex.iterrows(), strict=True):  # same order: band descending, then rank
        assert a["tokens"] == list(e["tokens"]) and np.allclose(a["values"], e["acts"], rtol=1e-6, atol=1e-7)
        assert a["maxValueTokenIndex"] == int(e["max_pos"]) and a["maxValue"] == pytest.approx(e["max_act"], rel=1e-6)
        assert (a["binMin"], a["binMax"]) == (pytest.approx(e["band_lo"]), pytest.approx(e["band_hi"]))

    expl = read_batches(root / "explanations")
    by = {(r["index"], r["description"]): r for r in expl}
    assert len(expl) == 5
    assert by[("3", "deception and lying")]["typeName"] in ("featuredict-openai", "featuredict-label")
    assert by[("5", "baking")]["typeName"] == "featuredict-label" and by[("5", "baking")]["authorId"] == "alice"
    assert by[("12", "bread recipes")]["id"] == "np0000000000000000000001"  # an imported row keeps its id and type
    assert by[("12", "bread recipes")]["typeName"] == "oai_token-act-pair"
    assert by[("12", "bread recipes")]["explanationModelName"] == "claude-x"
    assert [r["index"] for r in expl] == sorted((r["index"] for r in expl), key=int)
    manifest = json.loads((root / "featuredict-export.json").read_text())
    assert manifest["sae_id"] == SAE and manifest["explanations"] == 5

    with pytest.raises(interop.InteropError, match="already holds"):
        store = Store(db_a, read_only=True)
        try:
            interop.export_neuronpedia(store, SAE, SOURCE, out, progress=False)
        finally:
            store.close()


def test_round_trip_export_import_export(db_a: Path, tiny_db: Path, tmp_path: Path):
    store = Store(db_a, read_only=True)
    try:
        interop.export_neuronpedia(store, SAE, SOURCE, tmp_path / "one", progress=False)
        want = explanation_set(store) | {
            (int(f), lab, None) for f, lab in store.rows("SELECT feature, label FROM labels")
        }
    finally:
        store.close()
    b = Path(shutil.copyfile(tiny_db, tmp_path / "b.duckdb"))
    store = Store(b)
    try:
        rep = interop.import_neuronpedia(
            store, SAE, SOURCE, [tmp_path / "one" / "tiny-llama" / "1-res-fd"], progress=False
        )
        assert (rep.rows, rep.imported, rep.duplicates, rep.unmatched) == (5, 5, 0, 0)
        # same words for the same features; the label that equals an explanation's text is kept apart by model
        got = explanation_set(store)
        assert {(f, t) for f, t, _ in got} == {(f, t) for f, t, _ in want}
        assert ("gpt-x" in {m for _, _, m in got}) and ("claude-x" in {m for _, _, m in got})
        methods = {r[0] for r in store.rows("SELECT DISTINCT method FROM explanations")}
        assert methods == {"import"}
        srcs = [r[0] for r in store.rows("SELECT source FROM explanations ORDER BY feature, id")]
        assert all(s.startswith("neuronpedia:tiny-llama/1-res-fd type=") for s in srcs)
        again = interop.import_neuronpedia(
            store, SAE, SOURCE, [tmp_path / "one" / "tiny-llama" / "1-res-fd"], progress=False
        )
        assert (again.imported, again.duplicates) == (0, 5)
        interop.export_neuronpedia(store, SAE, SOURCE, tmp_path / "two", progress=False)
    finally:
        store.close()

    def strip(rows: list[dict]) -> list[dict]:
        return sorted(
            ({k: v for k, v in r.items() if k != "authorId"} for r in rows), key=lambda r: (r["index"], r["id"])
        )

    one = read_batches(tmp_path / "one" / "tiny-llama" / "1-res-fd" / "explanations")
    two = read_batches(tmp_path / "two" / "tiny-llama" / "1-res-fd" / "explanations")
    assert strip(one) == strip(two)  # ids, types, models and words survive the round trip
    for folder in ("features", "activations"):
        assert read_batches(tmp_path / "one" / "tiny-llama" / "1-res-fd" / folder) == read_batches(
            tmp_path / "two" / "tiny-llama" / "1-res-fd" / folder
        )


def test_import_reports_rows_that_do_not_match(tiny_db: Path, tmp_path: Path):
    path = Path(shutil.copyfile(tiny_db, tmp_path / "t.duckdb"))
    base = {
        "modelId": "gpt2-small",
        "layer": "6-res-jb",
        "typeName": "oai_token-act-pair",
        "explanationModelName": "gpt-4o-mini",
    }
    write_batch(
        tmp_path / "explanations" / "batch-0.jsonl.gz",
        [
            {**base, "id": "e1", "index": "4", "description": " words for four "},
            {**base, "id": "e2", "index": 5, "description": "<script>alert(1)</script>"},
            {**base, "id": "e3", "index": "4", "description": " words for four "},  # repeated in the file
            {**base, "modelId": "gpt2-small", "layer": "7-res-jb", "index": "4", "description": "other layer"},
            {**base, "modelId": "gemma-2-2b", "index": "4", "description": "other model"},
            {**base, "index": "abc", "description": "bad index"},
            {**base, "index": "64", "description": "no such feature"},
            {**base, "index": "6", "description": "   "},
            "not json",
            "[1, 2]",
        ],
    )
    write_batch(tmp_path / "explanations" / "batch-1.jsonl.gz", [{**base, "index": "6", "description": "six"}])
    store = Store(path)
    try:
        rep = interop.import_neuronpedia(store, SAE, "gpt2-small/6-res-jb", [tmp_path], author="bob", progress=False)
        rows = store.df("SELECT * FROM explanations ORDER BY id")
    finally:
        store.close()
    assert [Path(p).name for p in rep.files] == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    assert (rep.rows, rep.imported, rep.duplicates) == (11, 3, 1)
    assert rep.other_source == {("gpt2-small", "7-res-jb"): 1, ("gemma-2-2b", "6-res-jb"): 1}
    assert (rep.bad_index, rep.unknown_feature, rep.no_text, rep.bad_lines, rep.unmatched) == (1, 1, 1, 2, 7)
    text = rep.summary()
    assert "not imported: 7 rows" in text and "1 rows of another source: gemma-2-2b/6-res-jb" in text
    assert "index is not a feature of the SAE" in text and "line is not a JSON object" in text
    assert rows["text"].tolist() == ["words for four", "<script>alert(1)</script>", "six"]  # stored as written
    assert set(rows["method"]) == {"import"} and set(rows["explainer_model"]) == {"gpt-4o-mini"}
    assert set(rows["author"]) == {"bob"} and rows["sae_fingerprint"].isna().all()
    assert rows["source"].iloc[0] == "neuronpedia:gpt2-small/6-res-jb type=oai_token-act-pair id=e1"
    assert rows["id"].tolist() == [1, 2, 3]


def test_parse_source_and_bad_paths(tmp_path: Path):
    assert interop.parse_source("gpt2-small/6-res-jb") == ("gpt2-small", "6-res-jb")
    for bad in ("gpt2-small", "a/b/c", "a b/c", "/x", ""):
        with pytest.raises(interop.InteropError, match="MODEL/LAYER"):
            interop.parse_source(bad)
    with pytest.raises(FileNotFoundError):
        interop.batch_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no batch-N"):
        interop.batch_files([tmp_path / "empty"])
    plain = tmp_path / "plain" / "batch-0.jsonl"
    plain.parent.mkdir()
    plain.write_text(json.dumps({"modelId": "m", "layer": "l", "index": "1", "description": "x"}) + "\n")
    assert list(interop.read_jsonl(plain)) == [{"modelId": "m", "layer": "l", "index": "1", "description": "x"}]
    assert interop.parse_source_tag(interop.source_tag("m", "1-x", "t y", "i")) == {
        "model": "m",
        "layer": "1-x",
        "type": "t_y",
        "id": "i",
    }
    assert interop.parse_source_tag("my file.csv") == {}


def test_cli_import_export(db_a: Path, tiny_db: Path, tmp_path: Path, capsys):
    rc = main(
        ["neuronpedia", "export", "--db", str(db_a), "--sae", SAE, "--source", SOURCE, "--out", str(tmp_path / "o")]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "wrote 64 features" in out and "5 explanations" in out
    b = shutil.copyfile(tiny_db, tmp_path / "b.duckdb")
    folder = str(tmp_path / "o" / "tiny-llama" / "1-res-fd" / "explanations")
    rc = main(["neuronpedia", "import", "--db", str(b), "--sae", SAE, "--source", "gpt2-small/6-res-jb", folder])
    out = capsys.readouterr().out
    assert rc == 0 and "imported 0 explanations" in out and "5 rows of another source: tiny-llama/1-res-fd" in out
    for argv, msg in (
        (["import", "--db", str(b), "--sae", SAE, "--source", "bad", folder], "MODEL/LAYER"),
        (["import", "--db", str(b), "--sae", "nope", "--source", SOURCE, folder], "no SAE 'nope'"),
        (["import", "--db", str(b), "--sae", SAE, "--source", SOURCE, str(tmp_path / "none")], "no file or folder"),
        (["export", "--db", str(db_a), "--sae", SAE, "--source", SOURCE, "--out", str(tmp_path / "o")], "--force"),
    ):
        rc = main(["neuronpedia", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    rc = main(
        [
            "neuronpedia",
            "export",
            "--db",
            str(db_a),
            "--sae",
            SAE,
            "--source",
            SOURCE,
            "--out",
            str(tmp_path / "o"),
            "--force",
            "--no-labels",
        ]
    )
    assert rc == 0 and "3 explanations" in capsys.readouterr().out
