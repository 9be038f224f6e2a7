"""``build --ray``: a harvest sharded over Ray tasks gives the single-process tables; faults are retried or fail
cleanly; a missing extra is one line. One local Ray (2 CPUs) serves the whole module."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from featuredict.pipelines.cli import main
from featuredict.pipelines.harvest.build import build
from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.corpus import batch_contexts, iter_contexts, iter_documents
from featuredict.pipelines.harvest.sharding import RayMissingError, RayOptions, ShardFailedError, map_shards
from featuredict.pipelines.harvest.spans import SpanPlanner, join_spans, span_batches
from tests.helpers import build_tiny_db, read_only, tiny_build_argv, tiny_build_config

try:  # imported while collecting: Ray binds its log handler to the stderr of the moment it is imported
    import ray
except ImportError:
    ray = None

NAME = "tiny/model.layers.1/64"


def _cfg(db: Path, model: Path, sae: Path, corpus: Path, **kw) -> BuildConfig:
    """The settings of helpers.build_tiny_db, with UMAP off (its layout is not part of the harvest)."""
    return tiny_build_config(db, model, sae, corpus, **{"umap": False, **kw})


def _norm(v: object) -> object:
    if isinstance(v, np.ndarray | list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


APPROX = {"fve", "mean_act"}  # float sums, merged in another order: equal to rounding
SAES_COLS = "sae_id, d_sae, d_in, context_size, n_tokens, n_contexts, fve, l0, dead_fraction, hist_edges, dtype"


def _frame(db: Path, table: str):
    query = {
        "saes": f"SELECT {SAES_COLS} FROM saes",
        "features": "SELECT * FROM features ORDER BY feature",
        "examples": "SELECT * FROM examples ORDER BY feature, kind, band, rank",
    }[table]
    with read_only(db) as con:
        return con.execute(query).df()


def assert_same_tables(got: Path, want: Path) -> None:
    """saes statistics, features (counts, histograms, max, density, logit effects...) and examples, cell by cell."""
    for table in ("saes", "features", "examples"):
        g, w = _frame(got, table), _frame(want, table)
        assert list(g.columns) == list(w.columns) and len(g) == len(w) > 0, table
        for col in w.columns:
            for i, (a, b) in enumerate(zip(g[col], w[col], strict=True)):
                if col in APPROX and b is not None and not (isinstance(b, float) and math.isnan(b)):
                    assert a == pytest.approx(b, rel=1e-12, abs=1e-12), (table, col, i)
                else:
                    assert _norm(a) == _norm(b), (table, col, i)


def _config(db: Path) -> dict:
    with read_only(db) as con:
        return json.loads(con.execute("SELECT config_json FROM saes").fetchone()[0])


# ---- without Ray ----------------------------------------------------------------------------------------


def test_missing_ray_extra_gives_a_one_line_error(
    tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    db = tmp_path / "x.duckdb"
    argv = ["build", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir), "--corpus", str(tiny_corpus)]
    assert main([*argv, "--db", str(db), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'featuredict[ray]'" in err and len(err.splitlines()) == 1, err
    with pytest.raises(RayMissingError, match=r"featuredict\[ray\]"):
        build(_cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus), ray=RayOptions())
    assert not db.exists()
    assert main([*argv, "--db", str(db), "--ray", "--shards", "0"]) == 2  # bad options are one line too
    assert "--shards must be at least 1" in capsys.readouterr().err


def test_a_cluster_that_does_not_answer_gives_a_one_line_error_at_once(
    tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, capsys
):
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[dev]')")
    db = tmp_path / "x.duckdb"
    argv = ["build", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir), "--corpus", str(tiny_corpus)]
    argv += ["--db", str(db)]
    assert main([*argv, "--ray", "127.0.0.1:1"]) == 2  # nothing listens on port 1; checked before any model loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1") and len(err.splitlines()) == 1, err
    assert main([*argv, "--ray", "nohost"]) == 2
    assert "give auto, local, HOST:PORT or ray://HOST:PORT" in capsys.readouterr().err
    assert not db.exists()


@pytest.mark.parametrize("budget", [150, 400, 10**9])
def test_spans_cut_the_corpus_exactly_as_one_process_does(tiny_runtime, tiny_corpus, budget):
    cfg = _cfg(Path("unused"), Path("m"), Path("s"), tiny_corpus)
    rt = tiny_runtime
    whole = list(
        batch_contexts(iter_contexts(iter_documents(cfg.corpus), rt.tokenizer, 16, rt.prepend_bos), 4, 16, rt.pad_id)
    )
    planner = SpanPlanner(rt, cfg)
    batches = planner.take(budget)
    # whole batches of the single-process build, in order, until their bounds reach the budget
    assert [b.ctx_offset for b in batches] == [4 * i for i in range(len(batches))]
    assert (
        sum(b.bound for b in batches[:-1]) < budget and (sum(b.bound for b in batches) >= budget) != planner.exhausted
    )
    for n_shards in (1, 2, 3, 7):
        spans = join_spans(batches, n_shards)
        assert len(spans) == min(n_shards, len(batches))
        got = [b for s in spans for b in span_batches(rt, cfg, s)]
        assert len(got) == len(batches)
        for (ids, mask), (want_ids, want_mask), b in zip(got, whole, batches, strict=False):
            assert ids.equal(want_ids) and mask.equal(want_mask)
            assert b.bound == int(rt.valid_mask(ids, mask).sum()) >= int(rt.encode(ids, mask)[2].sum())
    rest = planner.take(10**9)  # the next round goes on where this one stopped
    assert len(batches) + len(rest) == len(whole) and planner.exhausted
    if rest:
        assert rest[0].ctx_offset == batches[-1].ctx_offset + batches[-1].n_contexts


# ---- on a local Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[dev]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single_db(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus) -> Path:
    """The whole tiny corpus, built in this process: what every Ray build of it must give."""
    db = tmp_path_factory.mktemp("single") / "single.duckdb"
    return build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False)


def test_map_shards_folds_every_shard_and_reports_progress(ray_local):
    def square(shard: int, report) -> int:
        report(shard)
        return shard * shard

    seen: list[int] = []
    total = map_shards(square, [1, 2, 3, 4], lambda acc, r: (acc or 0) + r, RayOptions(), on_progress=seen.append)
    assert total == 30 and seen[-1] == 10
    assert map_shards(square, [], lambda acc, r: r, RayOptions(), initial=-1) == -1


def test_ray_build_with_three_shards_equals_the_single_process_build(
    ray_local, tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, single_db, capsys
):
    db = tmp_path / "ray.duckdb"
    argv = tiny_build_argv(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, "--name", NAME)
    argv += ["--context-size", "16", "--max-tokens", "5000", "--batch-size", "4"]
    argv += ["--top-k", "5", "--interval-samples", "3", "--no-umap", "--ray", "--shards", "3"]
    assert main(argv) == 0
    assert "over 3 Ray shards" in capsys.readouterr().out
    assert _config(db)["ray"]["shards"] == 3
    assert_same_tables(db, single_db)


def test_a_budget_short_of_the_corpus_is_met_in_rounds_exactly(
    ray_local, tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    # a low outlier ratio excludes many tokens, so the first round's token bounds fall short and a second runs
    kw = {"max_tokens": 500, "outlier_norm_ratio": 1.2}
    want = build_tiny_db(tmp_path / "single.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, **kw)
    db = tmp_path / "ray.duckdb"
    r = build(_cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, **kw), ray=RayOptions(shards=3))
    assert r.shards == 3 and _config(db)["ray"]["rounds"] >= 2
    assert r.n_tokens >= 500
    assert_same_tables(db, want)


def test_a_worker_killed_mid_shard_is_retried_and_the_result_is_exact(
    ray_local, tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, single_db
):
    marker = tmp_path / "killed"

    def kill_once(shard: int, done: int) -> None:
        if shard == 1 and done > 0 and not marker.exists():  # after its first batch, on the first attempt only
            marker.touch()
            os._exit(9)

    db = tmp_path / "ray.duckdb"
    build(_cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus), ray=RayOptions(shards=3, worker_hook=kill_once))
    assert marker.exists()
    assert_same_tables(db, single_db)


def test_a_shard_that_keeps_failing_fails_the_build_and_leaves_the_db_intact(
    ray_local, tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    db = build_tiny_db(tmp_path / "d.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False)
    before = db.read_bytes()
    attempts = tmp_path / "attempts"

    def always_fail(shard: int, done: int) -> None:
        if shard == 2 and done == 0:
            with attempts.open("a") as fh:
                fh.write("x\n")
            raise RuntimeError("injected fault")

    cfg = _cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, max_tokens=300)
    with pytest.raises(ShardFailedError) as e:
        build(cfg, ray=RayOptions(shards=3, max_retries=1, worker_hook=always_fail))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith("shard 3/3 (contexts ") and "after 2 attempts" in msg and "injected fault" in msg, msg
    assert attempts.read_text().count("x") == 2  # the first attempt and one retry
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attempts",
        "d.duckdb",
        "d.duckdb.lock",
        "d.duckdb.lock-queue",
    ]
