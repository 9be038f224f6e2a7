"""`featuredict demo --layers`: SAEs at several layers of SmolLM2 in one database, each with its splice quality,
and the printed attribution command (a graph across them) works as printed."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from featuredict.pipelines.cli import main
from featuredict.pipelines.demo.run import parse_layers
from tests.helpers import read_only

pytestmark = pytest.mark.slow


def test_parse_layers() -> None:
    assert parse_layers("24,6, 15,6") == (6, 15, 24) and parse_layers(None) == ()
    for bad in ("6,x", "30", "-1"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad)


def test_demo_layers_builds_several_saes_and_a_graph(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FEATUREDICT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", [".venv/bin/featuredict", "demo"])
    db = tmp_path / "demo.duckdb"
    args = ["demo", "--db", str(db), "--gen-tokens", "40", "--train-tokens", "4000", "--tokens", "2000"]
    rc = main([*args, "--d-sae", "256", "--k", "8", "--layer", "6", "--layers", "2,6", "--no-steer-hint"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with read_only(db) as con:
        hooks = [r[0] for r in con.execute("SELECT hook_name FROM saes ORDER BY hook_name").fetchall()]
        evals = con.execute("SELECT count(*), count(delta_lm_loss) FROM sae_evals WHERE method = 'splice'").fetchone()
    assert hooks == ["model.layers.2", "model.layers.6"] and evals == (2, 2)
    cmd = next(ln.strip() for ln in out.splitlines() if " attribute --db " in ln)
    argv = shlex.split(cmd)[1:]
    graph = tmp_path / "graph.json"
    argv[argv.index("--graph") + 1] = str(graph)
    # These SAEs are tiny and barely trained (FVE < 0), so their error nodes carry most of the influence and the
    # default pruning may keep no feature at all: keep every node to check the graph's structure across layers.
    assert main([*argv, "--max-feature-nodes", "30", "--top-k", "3", "--node-threshold", "1.0"]) == 0
    data = json.loads(graph.read_text())
    layer_of = {n["node_id"]: n["layer"] for n in data["nodes"]}
    feats = {n["layer"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert feats == {"2", "6"}  # the 30 candidates hold features of both SAEs
    # edges: tokens -> layer 2 -> layer 6 -> the target, errors included
    assert {(layer_of[e["source"]], layer_of[e["target"]]) for e in data["links"]} <= {
        ("E", "2"),
        ("2", "6"),
        ("6", "30"),
    }
    assert any(layer_of[e["source"]] == "2" and layer_of[e["target"]] == "6" for e in data["links"])
