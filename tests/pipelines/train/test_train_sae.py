"""train-sae's two activation sources: sae-lens's streaming runner and the in-memory activation cache."""

from __future__ import annotations

import json

import pytest
import torch

from featuredict.pipelines.harvest.corpus import CorpusSpec, batch_contexts, iter_contexts, iter_documents
from featuredict.pipelines.train.sae import TrainConfig, cache_activations, shuffled_batches, train_sae
from tests.helpers import tiny_train_config


def test_config_is_checked_and_auto_picks_by_memory(tmp_path):
    spec = CorpusSpec(str(tmp_path / "c.txt"))
    for bad, msg in (
        ({"activations": "disk"}, "activations must be one of"),
        ({"k": 0}, "1 <= k <= d_sae"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"lr_decay": 1.5}, "fraction of the steps"),
        ({"batch_tokens": 0}, "batch_tokens"),
    ):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(model="m", corpus=spec, out="o", **bad)
    cfg = TrainConfig(model="m", corpus=spec, out="o", training_tokens=1000, cache_bytes=1000 * 576 * 4)
    assert cfg.mode(576) == "cache" and cfg.mode(577) == "stream"
    assert cfg.settings(576) == (512, 2e-3, 0.2) and cfg.settings(577) == (256, 3e-3, 0.0)
    small = tmp_path / "small.txt"
    small.write_text("x" * 500)  # at most 500 tokens, whatever the training budget
    cfg = TrainConfig(model="m", corpus=CorpusSpec(str(small)), out="o", training_tokens=10**9, cache_bytes=500 * 8 * 4)
    assert cfg.mode(8) == "cache" and cfg.mode(9) == "stream"
    mine = TrainConfig(model="m", corpus=spec, out="o", activations="stream", batch_tokens=64, lr=1e-3, lr_decay=0.5)
    assert mine.mode(8) == "stream" and mine.settings(8) == (64, 1e-3, 0.5)


def test_shuffled_batches_give_every_row_once_per_epoch():
    acts = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    it = shuffled_batches(acts, 4, seed=1)
    rows = torch.cat([next(it) for _ in range(5)]).squeeze(1).tolist()  # 20 rows = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # a fresh shuffle each epoch
    again = shuffled_batches(acts, 4, seed=1)
    assert torch.cat([next(again) for _ in range(5)]).squeeze(1).tolist() == rows  # seeded


def test_cached_activations_are_the_builds_valid_tokens(tiny_runtime, tiny_model_dir, tiny_corpus, tmp_path):
    """The cache holds exactly what Runtime.encode would count: the hook's activations at valid tokens (no BOS,
    no padding, no norm outliers), in corpus order."""
    rt = tiny_runtime
    cfg = tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "sae", training_tokens=10**9)
    got = cache_activations(cfg, "float32", progress=False)
    want = []
    for ids, mask in batch_contexts(iter_contexts(iter_documents(cfg.corpus), rt.tokenizer, 32), 8, 32, rt.pad_id):
        x, _, valid = rt.encode(ids, mask)
        want.append(x[valid])
    want = torch.cat(want)
    assert got.shape == want.shape and len(got) > 500
    torch.testing.assert_close(got, want)
    capped = cache_activations(
        tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path, training_tokens=300), "float32", False
    )
    torch.testing.assert_close(capped, want[:300])


def test_both_modes_train_an_sae_that_loads_with_the_same_metadata(tiny_model_dir, tiny_corpus, tmp_path):
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    metas = {}
    for mode in ("cache", "stream"):
        cfg = tiny_train_config(
            tiny_model_dir, tiny_corpus, tmp_path / mode, activations=mode, training_tokens=20_000, batch_tokens=64
        )
        res = train_sae(cfg, progress=False)
        summary = json.loads((res.out / "featuredict_train.json").read_text())
        assert res.mode == summary["activations"] == mode
        assert (summary["cached_tokens"] or 0) > 0 if mode == "cache" else summary["cached_tokens"] is None
        assert res.fve > 0.3 and res.l0 == pytest.approx(4, abs=0.01)
        rt = load_runtime(str(tiny_model_dir), SaeSource(kind="folder", path=str(res.out)), device="cpu")
        assert rt.site.hook_name == "model.layers.1" and rt.prepend_bos
        meta = json.loads((res.out / "cfg.json").read_text())["metadata"]
        metas[mode] = {k: v for k, v in meta.items() if k not in ("sae_lens_training_version", "num_dead_features")}
    assert metas["cache"] == metas["stream"]
