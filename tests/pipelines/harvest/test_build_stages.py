"""Build stage times (summary line, saes.stage_seconds, overview page), the column's migration into older
files, rebuilds into a file named like the attach alias, and the map/neighbours layout from the weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from featuredict.db import queries as q
from featuredict.db.schema import connect
from featuredict.db.store import Store
from featuredict.pipelines.harvest.build import build
from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.layout import cosine_knn, umap_layout
from featuredict.pipelines.harvest.stages import PARTS, STAGES, StageTimes
from tests.helpers import APP, copy_db, read_only, tiny_build_config

SAE = "tiny/model.layers.1/64"


def _cfg(db: Path, model: Path, sae: Path, corpus: Path, **kw) -> BuildConfig:
    return tiny_build_config(db, model, sae, corpus, **{"max_tokens": 2_000, **kw})


def _one(db: Path, sql: str, params=None):
    with read_only(db) as con:
        return con.execute(sql, params or []).fetchone()


def _all(db: Path, sql: str) -> list:
    with read_only(db) as con:
        return con.execute(sql).fetchall()


def test_stage_times_unit():
    st = StageTimes()
    st.add("write", 1.0)
    st.add("forward", 2.0)
    st.add("forward", 0.5)
    st.add("model_load", 3.0)
    assert list(st.ordered()) == ["model_load", "forward", "write"]  # STAGES order, not arrival order
    assert st.line() == "model_load 3.0 s · forward 2.5 s · write 1.0 s"
    assert StageTimes.from_json(st.to_json()).ordered() == st.ordered()
    assert StageTimes.from_json("not json").ordered() == {}
    assert StageTimes.from_json('{"bogus": 1, "umap": "x", "rows": 2}').ordered() == {"rows": 2.0}
    with pytest.raises(ValueError, match="unknown build stage"):
        st.add("warp", 1.0)
    with pytest.raises(RuntimeError), st.timed("umap"):
        raise RuntimeError("the time still counts")
    assert "umap" in st.ordered()


def test_build_summary_and_row_carry_the_stage_times(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    db = tmp_path / "s.duckdb"
    r = build(_cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus))
    first, second = r.summary().splitlines()
    assert first.startswith(f"{SAE}: ") and second.startswith("stages: model_load ")
    ran = r.stages.ordered()
    want = {"model_load", "neighbours", "forward", "encode", "update", "harvest", "logit_effects", "umap", "rows"}
    assert want | {"write"} == set(ran)
    assert all(v >= 0 for v in ran.values())
    # parts of the harvest loop fit inside it; the top-level stages ran one after the other inside the build
    assert ran["forward"] + ran["encode"] + ran["update"] <= ran["harvest"]
    assert sum(v for k, v in ran.items() if k not in PARTS) <= r.seconds
    stored_json, build_seconds = _one(db, "SELECT stage_seconds, build_seconds FROM saes")
    stored = json.loads(stored_json)
    assert list(stored) == [s for s in STAGES if s in stored]  # kept in build order
    assert stored == pytest.approx(ran, abs=1e-3)  # the write's own time included
    assert sum(v for k, v in stored.items() if k not in PARTS) <= build_seconds <= r.seconds
    assert q.stage_seconds(Store(db, read_only=True), SAE) == pytest.approx(ran, abs=1e-3)
    assert q.stage_seconds(Store(db, read_only=True), "no such sae") == {}


def test_an_older_file_without_stage_seconds_opens_reads_and_rebuilds(
    tmp_path, tiny_db, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    old = tmp_path / "before.duckdb"
    shutil.copy(tiny_db, old)
    con = duckdb.connect(str(old))
    con.execute("ALTER TABLE saes DROP COLUMN stage_seconds")
    con.execute("INSERT INTO labels VALUES (?, 2, 'kept', NULL, NULL, NULL, now())", [SAE])
    con.close()

    def columns(path: Path) -> set[str]:
        with read_only(path) as c:
            return {r[0] for r in c.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'saes'").fetchall()}  # fmt: skip

    assert "stage_seconds" not in columns(old)
    ro = Store(old, read_only=True)
    assert q.stage_seconds(ro, SAE) == {} and len(q.sae_overview(ro)) == 1  # read-only: tolerated as is
    ro.close()
    rebuilt = tmp_path / "rebuilt.duckdb"
    shutil.copy(old, rebuilt)
    connect(old).close()  # a read-write open adds the column (NULL in the old row)
    assert "stage_seconds" in columns(old)
    assert _one(old, "SELECT stage_seconds FROM saes") == (None,)
    # a build of another SAE into the old file keeps its row by column name and adds its own with stage times
    build(_cfg(rebuilt, tiny_model_dir, tiny_sae_dir, tiny_corpus, sae_name="second"))
    rows = dict(_all(rebuilt, "SELECT sae_id, stage_seconds FROM saes"))
    assert rows[SAE] is None and "forward" in json.loads(rows["second"])
    assert _one(rebuilt, "SELECT label FROM labels WHERE feature = 2") == ("kept",)


def test_rebuild_into_a_file_named_like_the_attach_alias(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """The temporary file of old.duckdb is catalog "old" in DuckDB: the previous file must attach under another name."""
    for name in ("old.duckdb", "featuredict.duckdb"):
        db = tmp_path / name
        build(_cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False))
        build(_cfg(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, sae_name="second"))
        ids = _all(db, "SELECT sae_id FROM saes ORDER BY 1")
        assert [i[0] for i in ids] == ["second", SAE]


def test_cosine_knn_is_exact_and_puts_each_row_first():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 12)).astype(np.float32)
    w[7] = w[3] * 2.0  # same direction as 3: cosine 1, but each row must still rank itself first
    knn = cosine_knn(w, 10, block=64)
    assert (knn.idx[:, 0] == np.arange(300)).all()
    assert knn.idx[3, 1] == 7 and knn.idx[7, 1] == 3
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    cos, idx = knn.neighbours(10)
    np.testing.assert_allclose(cos, -np.sort(-sims, axis=1)[:, :10], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, idx, axis=1), cos, atol=1e-5)
    assert cosine_knn(w[:4], 10).idx.shape == (4, 4)  # k capped at the other rows


def test_the_map_is_deterministic_and_laid_out_on_the_neighbours_the_pages_show(tiny_db, tiny_runtime, tmp_path):
    """The stored map is what the weights give (same coordinates every run), on the kNN graph whose first columns
    are the stored decoder neighbours."""
    with read_only(tiny_db) as con:
        stored = con.execute("SELECT umap_x, umap_y, neighbours FROM features ORDER BY feature").df()
    w = tiny_runtime.sae.W_dec.detach().float().numpy()
    knn = cosine_knn(w, 14)
    assert [list(n) for n in stored.neighbours] == knn.idx[:, 1:11].tolist()
    a = umap_layout(w, knn)
    np.testing.assert_array_equal(a, umap_layout(w))  # the kNN made inside is the same graph
    np.testing.assert_array_equal(a, stored[["umap_x", "umap_y"]].to_numpy())


def test_a_map_laid_out_in_its_own_process_is_this_processs_bit_for_bit(tiny_runtime):
    """Builds of 2,048 features or more lay the map out in a process of their own (``UmapJob``), beside the
    writing of the examples: the coordinates they store must be the ones ``umap_layout`` gives here."""
    from featuredict.pipelines.harvest.layout import UmapJob

    w = tiny_runtime.sae.W_dec.detach().float().numpy()
    knn = cosine_knn(w, 14)
    job = UmapJob(w, knn, own_process=True)
    assert job._proc is not None  # it did start a process
    np.testing.assert_array_equal(job.result(), umap_layout(w, knn))
    assert job._proc is None and job._dir is None  # the process is gone and its folder removed


def test_a_map_whose_own_process_fails_is_laid_out_here(tiny_runtime, monkeypatch, tmp_path):
    """``UmapJob`` falls back to this process, with a warning, when its child fails or cannot start; and
    ``close()`` stops a child still running."""
    from featuredict.pipelines.harvest import layout

    w = tiny_runtime.sae.W_dec.detach().float().numpy()
    want = umap_layout(w)
    monkeypatch.setattr(layout.sys, "executable", shutil.which("false") or "/bin/false")  # the child exits 1
    job = layout.UmapJob(w, own_process=True)
    with pytest.warns(UserWarning, match="failed"):
        np.testing.assert_array_equal(job.result(), want)
    monkeypatch.setattr(layout.sys, "executable", "/no/such/python")
    with pytest.warns(UserWarning, match="could not start"):
        job = layout.UmapJob(w, own_process=True)
    np.testing.assert_array_equal(job.result(), want)
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    monkeypatch.setattr(layout.sys, "executable", str(slow))  # a child that would run a minute
    job = layout.UmapJob(w, own_process=True)
    proc = job._proc
    assert proc is not None and proc.poll() is None
    job.close()  # a failed build does not wait for its map
    assert proc.poll() is not None
    job.close()  # twice is fine
    assert layout.UmapJob(w[:3], own_process=True).result() is None  # too few features for a map: nothing starts


@pytest.mark.slow
def test_umap_kernels_are_cached_on_disk(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    code = "from featuredict.pipelines.harvest.layout import import_umap; import_umap()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    cached = {p.parent.name.split("_")[0] for p in (tmp_path / "numba").rglob("*.nbi")}
    assert "umap" in cached


def test_overview_shows_the_build_and_its_stages(monkeypatch, tiny_db, tmp_path):
    from streamlit.testing.v1 import AppTest

    db = copy_db(tiny_db, tmp_path / "o.duckdb")
    monkeypatch.setenv("FEATUREDICT_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    assert not at.exception
    caps = [c.value for c in at.caption if c.value.startswith("Build: ")]
    assert len(caps) == 1 and "forward" in caps[0] and "write" in caps[0]


def test_sparse_topk_decode_is_the_saes_own_decode(tiny_runtime):
    import torch

    from featuredict.pipelines.model.runtime import _sparse_decode

    assert _sparse_decode(tiny_runtime.sae)  # the tiny test SAE is a TopK SAE: the sparse path runs
    _, f, _ = tiny_runtime.encode(torch.randint(5, 200, (3, 12)))
    f[:, 0] = 0  # tokens with no active feature (as at BOS): empty bags must still give b_dec
    assert (f[:, 1:] != 0).sum(-1).min() > 0
    torch.testing.assert_close(tiny_runtime.decode(f), tiny_runtime.sae.decode(f), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["topk", "topk_rescale"])
def test_sparse_decode_of_a_decoder_norm_rescaled_topk_sae(kind):
    """Decoder rows with norms 0.1 .. 3 (``make_sae``): a missed or doubled rescale would be far off."""
    import torch

    from featuredict.pipelines.model.runtime import _sparse_decode, decode
    from tests.helpers import make_sae

    sae = make_sae(kind)
    assert _sparse_decode(sae) and bool(sae.cfg.rescale_acts_by_decoder_norm) == (kind == "topk_rescale")
    with torch.no_grad():
        f = sae.encode(torch.randn(2, 7, 24) * 3)
        f[:, 0] = 0
        torch.testing.assert_close(decode(sae, f), sae.decode(f), atol=1e-5, rtol=1e-5)


def test_the_encoders_top_k_gives_the_non_zero_entries_of_f(tiny_runtime):
    """``encode_active``: the top-k's entries, sorted and masked as ``nonzero`` finds them in ``f`` (rows zeroed
    at BOS and padding included); the sparse decode from them is the decode from ``f``."""
    import torch

    from featuredict.pipelines.model.saes import active_entries, topk_encoder

    assert topk_encoder(tiny_runtime.sae) is not None  # the tiny SAE takes the top-k path
    ids = torch.randint(5, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    x, f, valid, active = tiny_runtime.encode_active(ids, mask)
    x2, f2, valid2 = tiny_runtime.encode(ids, mask)
    assert torch.equal(f, f2) and torch.equal(valid, valid2) and torch.equal(x, x2)
    assert not valid.all()  # some rows are zeroed after the encode
    for got, want in zip(active, active_entries(f), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(tiny_runtime.decode(f, active), tiny_runtime.decode(f))


def test_a_layout_never_runs_the_nn_descent_kernels_declared_without_their_signatures(tmp_path):
    """``import_umap`` drops pynndescent's explicit signatures, so its kernels compile when first called instead
    of at import. That cannot change a map only while no layout calls them: in a fresh interpreter, after a
    layout, no pynndescent kernel has a compiled signature, while umap-learn's own kernels keep theirs."""
    code = """
import json, sys
import numpy as np
from numba.core.registry import CPUDispatcher
from featuredict.pipelines.harvest.layout import DEFERRED, cosine_knn, umap_layout
w = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
assert umap_layout(w, cosine_knn(w, 14)).shape == (40, 2)
seen = {}
for name, mod in list(sys.modules.items()):
    if name.startswith(("pynndescent", "umap")):
        for attr, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == name:
                seen[f"{name}.{obj.py_func.__qualname__}"] = len(obj.signatures)
print(json.dumps({"seen": seen, "deferred": sorted(DEFERRED)}))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    seen, deferred = got["seen"], got["deferred"]
    assert len(deferred) >= 30 and set(deferred) <= set(seen)  # rp_trees, distances, utils, ... were declared lazily
    assert not {k: seen[k] for k in deferred if seen[k]}, "a layout called a kernel that lost its signature"
    assert any(v for k, v in seen.items() if k.startswith("umap"))  # umap-learn's eager kernels kept their signatures


def test_umap_warm_up_runs_in_the_background_once_per_cache(tmp_path, monkeypatch, tiny_runtime):
    """``warm_umap`` compiles the map's kernels into an empty numba cache in a process at the lowest priority,
    leaves a marker, and does not start again for that cache (nor while one runs); ``UmapJob`` stops a running
    one."""
    from featuredict.pipelines.harvest import layout

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert layout.warm_umap()
    proc = layout._WARMING[0]
    assert not layout.warm_umap()  # one at a time
    lowered = False
    while proc.poll() is None and not lowered:
        try:
            lowered = os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
        except OSError:  # it just ended
            break
    assert lowered  # an empty cache takes it seconds: long enough to see it at nice 19
    assert proc.wait(timeout=600) == 0
    assert layout._warm_marker().exists()
    assert any((tmp_path / "numba").rglob("*.nbi"))  # compiled kernels on disk
    assert not layout.warm_umap()  # this cache is warm: nothing starts
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba2"))
    assert layout.warm_umap()
    running = layout._WARMING[0]
    w = tiny_runtime.sae.W_dec.detach().float().numpy()
    layout.UmapJob(w).result()  # the map is due: the warm-up stops
    assert running.poll() is not None and not layout._WARMING
