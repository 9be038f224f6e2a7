"""End-to-end builds into DuckDB: contents, truthfulness, atomic rebuilds, CLI errors, corpus formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch

from featuredict.db import writes as writes_mod
from featuredict.db.schema import SCHEMA_VERSION
from featuredict.pipelines.cli import main
from featuredict.pipelines.harvest import build as build_mod
from featuredict.pipelines.harvest import weights as weights_mod
from featuredict.pipelines.harvest.corpus import CorpusError, CorpusSpec, iter_contexts, iter_documents
from featuredict.pipelines.harvest.state import HarvestConfig
from tests.helpers import (
    ROOT,
    STORIES_MODEL,
    TINYSTORIES,
    build_tiny_db,
    read_only,
    require_shared,
    tiny_build_argv,
    tiny_train_config,
)


def _q(db: Path, sql: str, params=None):
    with read_only(db) as con:
        return con.execute(sql, params or []).df()


def test_tiny_db_contents(tiny_db: Path):
    saes = _q(tiny_db, "SELECT * FROM saes")
    assert len(saes) == 1
    row = saes.iloc[0]
    assert row.hook_name == "model.layers.1" and row.hook_kind == "hf_module" and row.d_sae == 64
    assert row.n_tokens > 100 and 0 < row.l0 <= 4
    assert _q(tiny_db, "SELECT value FROM meta WHERE key='schema_version'").value[0] == str(SCHEMA_VERSION)
    feats = _q(tiny_db, "SELECT * FROM features ORDER BY feature")
    assert len(feats) == 64
    alive = feats[~feats.dead]
    assert len(alive) > 0
    for _, f in alive.iterrows():
        assert sum(f.hist_counts) == f.fire_count  # histogram counts every firing token
        assert 0 < f.density <= 1
        assert len(f.decoder) == 32 and len(f.neighbours) == 10 and len(f.pos_tokens) == 10
    assert feats.umap_x.notna().all()
    ex = _q(tiny_db, "SELECT * FROM examples")
    assert set(ex.kind) == {"top", "interval"}
    assert (ex.groupby(["feature", "kind", "band"]).size() <= 5).all()
    # the tiny corpus repeats every document 3 times: each window is listed once per feature and list
    windows = ex.assign(win=[tuple(t) for t in ex.token_ids]).groupby(["feature", "kind"]).win
    assert (windows.nunique() == windows.size()).all()
    assert (windows.size() > windows.nunique().clip(upper=1)).any()  # and lists still hold several windows


def test_stored_activations_are_truthful(tiny_db: Path, tiny_runtime):
    """Re-running model + SAE on stored contexts reproduces the stored per-token activations (1e-4)."""
    ex = _q(tiny_db, "SELECT feature, token_ids, acts, max_act, max_pos FROM examples")
    assert len(ex) > 20
    for _, r in ex.sample(n=min(60, len(ex)), random_state=0).iterrows():
        ids = torch.tensor([list(r.token_ids)])
        acts = tiny_runtime.feature_acts(ids)[0, :, r.feature]
        torch.testing.assert_close(acts, torch.tensor(list(r.acts), dtype=torch.float32), atol=1e-4, rtol=1e-4)
        assert abs(float(acts.max()) - r.max_act) < 1e-4
        assert int(acts.argmax()) == r.max_pos


def test_logit_effects_and_neighbours_match_brute_force(tiny_db: Path, tiny_runtime):
    feats = _q(
        tiny_db, "SELECT feature, pos_values, neg_values, neighbours, neighbour_cos FROM features ORDER BY feature"
    )
    w_dec = tiny_runtime.sae.W_dec.detach().float()
    model = tiny_runtime.backend.model
    logits = (w_dec * model.model.norm.weight) @ model.lm_head.weight.T  # [d_sae, vocab]
    w = torch.nn.functional.normalize(w_dec, dim=1)
    cos = w @ w.T
    cos.fill_diagonal_(-2)
    for _, f in feats.iterrows():
        torch.testing.assert_close(
            torch.tensor(list(f.pos_values)), logits[f.feature].topk(10).values, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            torch.tensor(list(f.neg_values)), logits[f.feature].topk(10, largest=False).values, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            torch.tensor(list(f.neighbour_cos)), cos[f.feature].topk(10).values, atol=1e-5, rtol=1e-5
        )


def test_rebuild_keeps_labels_and_other_saes_and_failure_leaves_db_intact(
    tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    db = build_tiny_db(tmp_path / "d.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False)
    build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, sae_name="second")
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO labels VALUES ('second', 3, 'scam feature', ['deception'], 'n', 'me', now())")
    con.execute("INSERT INTO lists VALUES ('bio', 'second', 3, NULL, now())")
    con.close()
    build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, sae_name="second", max_tokens=800)
    assert set(_q(db, "SELECT sae_id FROM saes").sae_id) == {"tiny/model.layers.1/64", "second"}
    assert _q(db, "SELECT count(*) AS n FROM features WHERE sae_id='second'").n[0] == 64
    assert _q(db, "SELECT label FROM labels").label.tolist() == ["scam feature"]
    assert len(_q(db, "SELECT * FROM lists")) == 1
    before = db.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("simulated crash mid-build")

    monkeypatch.setattr(build_mod, "feature_frames", boom)  # as build.py calls it
    with pytest.raises(RuntimeError):
        build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, sae_name="second")
    assert db.read_bytes() == before
    # no temp files left behind (the advisory lock files stay, as lock files do)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.duckdb", "d.duckdb.lock", "d.duckdb.lock-queue"]


def test_rebuild_after_a_crashed_writer_leaves_an_openable_file(
    tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    import subprocess
    import sys

    db = build_tiny_db(tmp_path / "w.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False)
    crash = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import duckdb\n"  # a writer that dies before its connection closes: its commit is only in the WAL
        f"con = duckdb.connect({str(db)!r})\n"
        "con.execute(\"INSERT INTO labels VALUES ('tiny/model.layers.1/64', 5, 'saved before a crash', NULL, NULL, \"\n"
        '            "NULL, now())")\n'
        "os._exit(1)\n"
    )
    subprocess.run([sys.executable, "-c", crash], check=False)
    assert Path(str(db) + ".wal").exists()  # the dead writer's WAL
    build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, max_tokens=800)
    assert not Path(str(db) + ".wal").exists()
    assert _q(db, "SELECT label FROM labels WHERE feature = 5").label.tolist() == ["saved before a crash"]


def test_an_opener_waits_out_a_build_swap_and_sees_the_new_file(
    tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    import threading

    from featuredict.db.store import Store

    db = build_tiny_db(tmp_path / "r.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False)
    real_replace, seen, errors = writes_mod.os.replace, [], []

    def dashboard_reads() -> None:
        try:
            seen.append(Store(db).rows("SELECT max(n_tokens) FROM saes")[0][0])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    reader = threading.Thread(target=dashboard_reads)

    def dashboard_opens_mid_swap(src, dst):  # a dashboard starting up between the copy and the swap
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive() and not seen  # it waits for the swap instead of reading the file being replaced
        real_replace(src, dst)

    monkeypatch.setattr(writes_mod.os, "replace", dashboard_opens_mid_swap)
    build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, max_tokens=800)
    reader.join(timeout=30)
    assert not errors, errors
    assert seen == [_q(db, "SELECT max(n_tokens) AS n FROM saes").n[0]]  # what it read is the rebuilt file


def test_cli_bad_inputs_give_one_line_errors(tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, capsys):
    base = ["build", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir), "--db", str(tmp_path / "x.duckdb")]
    cases = [
        (base + ["--corpus", str(tmp_path / "missing.txt")], "does not exist"),
        (
            ["build", "--model", str(tiny_model_dir), "--sae", str(tmp_path / "nosae"), "--corpus", str(tiny_corpus)],
            "neither an existing sae-lens folder",
        ),
        (
            ["build", "--model", str(tmp_path), "--sae", str(tiny_sae_dir), "--corpus", str(tiny_corpus)],
            "no config.json",
        ),
        (base + ["--corpus", str(tiny_corpus), "--context-size", "2"], "context-size"),
        (base + ["--corpus", str(tiny_corpus), "--top-k", "0"], "top-k must be at least 1"),
        (base + ["--corpus", str(tiny_corpus), "--interval-samples", "-1"], "interval samples"),
        (base + ["--corpus", str(tiny_corpus), "--batch-size", "0"], "--batch-size"),
        (base + ["--corpus", str(tiny_corpus), "--device", "bogus"], "unknown device"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "Traceback" not in err, err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "x.duckdb").exists()


def test_cli_build_and_wrong_hook_warns(tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus, capsys):
    db = tmp_path / "cli.duckdb"
    extra = ("--max-tokens", "600", "--context-size", "16", "--no-umap")
    rc = main(tiny_build_argv(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, *extra))
    assert rc == 0
    out = capsys.readouterr().out
    assert "FVE=" in out and "featuredict serve --db" in out
    # the random tiny SAE reconstructs badly: the build must say so loudly
    assert "WARNING: reconstruction FVE" in out


def test_corpus_formats(tmp_path: Path, tiny_runtime):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in ["one doc", "two doc"]) + "\n")
    assert list(iter_documents(CorpusSpec(str(jl), text_field="body"))) == ["one doc", "two doc"]
    with pytest.raises(CorpusError, match="no 'text' field"):
        list(iter_documents(CorpusSpec(str(jl))))
    pq = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["alpha beta", "gamma"]}).to_parquet(pq)
    assert list(iter_documents(CorpusSpec(str(pq)))) == ["alpha beta", "gamma"]
    txt = tmp_path / "c.txt"
    txt.write_text("para one\nstill one\n\n\npara two\n")
    assert list(iter_documents(CorpusSpec(str(txt), separator="blank"))) == ["para one\nstill one", "para two"]
    bad = tmp_path / "c.csv"
    bad.write_text("a,b")
    with pytest.raises(CorpusError, match="unsupported"):
        list(iter_documents(CorpusSpec(str(bad))))
    ctxs = list(iter_contexts(iter(["word " * 50]), tiny_runtime.tokenizer, 16))
    bos = tiny_runtime.tokenizer.bos_token_id
    assert all(c[0] == bos and len(c) <= 16 for c in ctxs) and len(ctxs) >= 3
    # byte-order marks, CRLF, invalid UTF-8 and unusual line separators
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffOnce upon\r\na time\u2028still line two\n".encode())
    assert list(iter_documents(CorpusSpec(str(bom), separator="line"))) == ["Once upon", "a time\u2028still line two"]
    jb = tmp_path / "bom.jsonl"
    jb.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n" + b'{"text": "bad \xff byte"}\n')
    assert list(iter_documents(CorpusSpec(str(jb)))) == ["first", "bad \ufffd byte"]


@pytest.mark.shared
def test_stories260k_end_to_end(tmp_path: Path):
    """Real pretrained model + real TinyStories text: train an SAE with sae-lens, build, check truthfulness."""
    model = require_shared(STORIES_MODEL)
    corpus = require_shared(TINYSTORIES)
    from featuredict.pipelines.harvest.build import build
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource
    from featuredict.pipelines.train.sae import train_sae

    small = tmp_path / "stories.txt"
    small.write_text(corpus.read_text(encoding="utf-8")[:400_000], encoding="utf-8")
    spec = CorpusSpec(str(small))
    cfg = tiny_train_config(
        model, small, tmp_path / "sae", hook="model.layers.2", d_sae=256, k=8, training_tokens=60_000, context_size=128
    )
    tr = train_sae(cfg, progress=False)
    assert tr.fve > 0.3 and tr.l0 == pytest.approx(8, abs=0.01)
    db = tmp_path / "stories.duckdb"
    res = build(
        BuildConfig(
            model=str(model),
            sae=SaeSource(kind="folder", path=str(tr.out)),
            corpus=spec,
            db=str(db),
            max_tokens=20_000,
            umap=False,
            progress=False,
            device="cpu",
        )
    )
    assert res.n_tokens >= 20_000 and res.fve > 0.3
    ex = _q(db, "SELECT feature, token_ids, tokens, acts FROM examples WHERE kind='top' AND rank=0 LIMIT 30")
    rt = load_runtime(str(model), SaeSource(kind="folder", path=str(tr.out)), device="cpu")
    for _, r in ex.iterrows():
        acts = rt.feature_acts(torch.tensor([list(r.token_ids)]))[0, :, r.feature]
        torch.testing.assert_close(acts, torch.tensor(list(r.acts), dtype=torch.float32), atol=1e-4, rtol=1e-4)
    text = "".join(ex.tokens[0])
    assert any(w in text for w in (" the", " a", ".", " to"))  # real English from TinyStories
    shutil.rmtree(tmp_path / "sae")


def test_build_without_interval_samples(tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    db = build_tiny_db(
        tmp_path / "s0.duckdb",
        tiny_model_dir,
        tiny_sae_dir,
        tiny_corpus,
        harvest=HarvestConfig(top_k=3, samples_per_band=0),
    )
    with read_only(db) as con:
        kinds = {k for (k,) in con.execute("SELECT DISTINCT kind FROM examples").fetchall()}
    assert kinds == {"top"}


def test_a_second_build_into_the_same_file_waits_its_turn(tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    import threading

    from featuredict.db.filelock import lock_for

    db = build_tiny_db(tmp_path / "two.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, sae_name="second")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with lock_for(db).exclusive():  # another build is swapping the file
        t = threading.Thread(target=second)
        t.start()
        t.join(timeout=8)  # long enough to harvest; it must then wait at the swap
        assert t.is_alive()
        assert set(_q(db, "SELECT sae_id FROM saes").sae_id) == {"tiny/model.layers.1/64"}  # not swapped yet
    t.join(timeout=120)
    assert not t.is_alive() and not errors, errors
    assert set(_q(db, "SELECT sae_id FROM saes").sae_id) == {"tiny/model.layers.1/64", "second"}


def _real_direction_logits(norm, unembed, d: torch.Tensor) -> torch.Tensor:
    """What a direction adds to the logits through the model's own final norm + unembedding ([n, vocab]):
    f(c·d) - f(0), with c large so the norm's eps does not matter (and a LayerNorm bias cancels)."""
    with torch.no_grad():
        return unembed(norm(1e3 * d)) - unembed(norm(torch.zeros_like(d)))


@pytest.mark.parametrize("arch", ["llama-untied", "llama-tied", "gpt2-layernorm", "tl-layernorm"])
def test_logit_effects_rank_tokens_as_the_model_does(arch):
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from featuredict.pipelines.model.backends import HFBackend, TLBackend

    torch.manual_seed(0)
    d_model, vocab = 32, 300
    if arch.startswith("llama"):
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=d_model,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                tie_word_embeddings=arch == "llama-tied",
            )
        )
        norm, unembed, kind = model.model.norm, model.lm_head, "hf"
    elif arch == "gpt2-layernorm":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=1, n_head=4))
        norm, unembed, kind = model.transformer.ln_f, model.lm_head, "hf"
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(
            HookedTransformerConfig(
                n_layers=1,
                d_model=d_model,
                n_ctx=16,
                d_head=8,
                n_heads=4,
                d_mlp=64,
                d_vocab=vocab,
                act_fn="gelu",
                normalization_type="LN",
            )
        )
        norm, unembed, kind = model.ln_final, model.unembed, "transformer_lens"
    with torch.no_grad():  # non-trivial norm weights (and biases), so a missed fold or centring shows
        for name, p in norm.named_parameters():
            p.copy_(torch.rand_like(p) * 2 + 0.1 if name in ("weight", "w") else torch.randn_like(p))
    backend = TLBackend if kind == "transformer_lens" else HFBackend
    rt = SimpleNamespace(backend=backend(model, None))
    w_u, centre = weights_mod.unembedding(rt)
    assert centre == ("layernorm" in arch)
    d = torch.randn(20, d_model)
    ours = (d - d.mean(1, keepdim=True) if centre else d) @ w_u
    real = _real_direction_logits(norm, unembed, d[:, None, :] if kind == "transformer_lens" else d)
    real = real.reshape(20, vocab)
    for i in range(20):
        assert ours[i].topk(10).indices.tolist() == real[i].topk(10).indices.tolist()
        assert ours[i].topk(10, largest=False).indices.tolist() == real[i].topk(10, largest=False).indices.tolist()


def test_train_sae_reads_only_as_much_corpus_as_it_needs(tmp_path: Path):
    from featuredict.pipelines.train.sae import _dataset

    corpus = tmp_path / "big.txt"
    corpus.write_text("\n<|endoftext|>\n".join(f"document {i} " + "word " * 50 for i in range(2_000)))
    ds = _dataset(CorpusSpec(str(corpus)), None, max_chars=10_000)
    assert 30 < len(ds) < 60  # ~260 characters per document
    assert len(_dataset(CorpusSpec(str(corpus)), 7)) == 7


def test_build_refuses_to_replace_a_file_it_cannot_keep_rows_from(
    tmp_path: Path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    from featuredict.db.schema import DatabaseError

    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE notes (x INTEGER)")
    con.close()
    newer = build_tiny_db(tmp_path / "v.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, max_tokens=300)
    con = duckdb.connect(str(newer))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    for db, needle in ((other, "not a featuredict database"), (newer, "schema version 99")):
        before = db.read_bytes()
        with pytest.raises(DatabaseError, match=needle):
            build_tiny_db(db, tiny_model_dir, tiny_sae_dir, tiny_corpus, umap=False, max_tokens=300)
        assert db.read_bytes() == before


def test_rebuild_of_a_file_without_the_newer_user_tables_keeps_labels(
    tmp_path, tiny_db, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    """A file written before explanations/feature_embeddings existed: a rebuild keeps its labels and the new file
    has every user table; a read-write open of such a file adds the missing ones."""
    import shutil

    import duckdb

    from featuredict.db.schema import USER_TABLES, connect

    def make_old(path: Path) -> Path:
        shutil.copy(tiny_db, path)
        con = duckdb.connect(str(path))
        con.execute("DROP TABLE explanations")
        con.execute("DROP TABLE feature_embeddings")
        con.execute("INSERT INTO labels VALUES ('tiny/model.layers.1/64', 1, 'kept', NULL, NULL, NULL, now())")
        con.close()
        return path

    def tables(path: Path) -> set[str]:
        with read_only(path) as con:
            return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}

    opened = make_old(tmp_path / "opened.duckdb")
    connect(opened).close()
    assert set(USER_TABLES) <= tables(opened)

    rebuilt = make_old(tmp_path / "rebuilt.duckdb")
    build_tiny_db(rebuilt, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    assert set(USER_TABLES) <= tables(rebuilt)
    assert _q(rebuilt, "SELECT label FROM labels WHERE feature = 1").label.tolist() == ["kept"]
