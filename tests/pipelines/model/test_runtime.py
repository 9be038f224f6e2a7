"""The runtime reads activations at the SAE's hook exactly, stops early, and never leaks hooks."""

from __future__ import annotations

import os
import threading

import pytest
import torch


def test_hook_acts_match_full_forward(tiny_runtime):
    """The early-stopped capture equals the layer output seen during a full forward pass."""
    ids = tiny_runtime.tokenize("Once upon a time there was a cat")
    acts = tiny_runtime.hook_acts(ids)
    seen = []
    layer = tiny_runtime.backend.model.model.layers[1]
    h = layer.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        tiny_runtime.backend.model(input_ids=ids)
    finally:
        h.remove()
    assert acts.shape == (1, ids.shape[1], 32)
    torch.testing.assert_close(acts, seen[0])
    assert tiny_runtime.site.active is False


def test_feature_acts_zero_on_bos(tiny_runtime):
    ids = tiny_runtime.tokenize("The cat sat")
    f = tiny_runtime.feature_acts(ids)
    assert f.shape == (1, ids.shape[1], tiny_runtime.d_sae)
    assert torch.all(f[0, 0] == 0)  # BOS
    assert (f[0, 1:] > 0).sum(-1).max() <= 4  # TopK k=4


def test_intervention_removed_after_error(tiny_runtime):
    site = tiny_runtime.site
    ids = tiny_runtime.tokenize("hello")
    base = site.logits(ids)
    hooks_before = dict(site.module._forward_hooks)

    def boom(a):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        site.logits(ids, fn=boom)
    assert not site.active
    assert dict(site.module._forward_hooks) == hooks_before
    assert torch.equal(site.logits(ids), base)


def test_interventions_are_per_thread(tiny_runtime):
    site = tiny_runtime.site
    ids = tiny_runtime.tokenize("The river")
    base = site.logits(ids)
    results: dict[str, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def run(name: str, scale: float):
        def fn(a):
            barrier.wait(timeout=10)  # both threads are inside their hooked forward at once
            return a * scale

        results[name] = site.logits(ids, fn=fn)

    threads = [threading.Thread(target=run, args=("a", 0.0)), threading.Thread(target=run, args=("b", 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(results["b"], base, atol=1e-5)
    assert not torch.allclose(results["a"], base, atol=1e-3)
    assert not site.active


def test_norm_outliers_are_per_context_and_excluded():
    from featuredict.pipelines.model.runtime import norm_outliers

    x = torch.ones(2, 6, 4)
    x[0, 1] *= 50  # a "massive activation" in context 0
    x[1] *= 100  # context 1 is uniformly large: nothing is an outlier relative to itself
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[:, 0] = False  # BOS
    out = norm_outliers(x, valid, 10.0)
    assert out.tolist() == [[False, True, False, False, False, False], [False] * 6]
    assert not norm_outliers(x, valid, 100.0).any()


def test_feature_acts_zero_at_norm_outliers(tiny_runtime, monkeypatch):
    ids = tiny_runtime.tokenize("The cat sat on the mat")
    real = tiny_runtime.site.activations

    def boosted(input_ids, attention_mask=None):
        a = real(input_ids, attention_mask).clone()
        a[:, 2] *= 1000
        return a

    monkeypatch.setattr(tiny_runtime.site, "activations", boosted)
    f = tiny_runtime.feature_acts(ids)
    assert torch.all(f[0, 2] == 0) and (f[0, 3:] > 0).any()
    monkeypatch.setattr(tiny_runtime, "outlier_norm_ratio", 0.0)
    assert (tiny_runtime.feature_acts(ids)[0, 2] > 0).any()


def test_runtime_cache_follows_settings_and_retrained_weights(tmp_path, monkeypatch, tiny_model_dir, tiny_sae_dir):
    import json
    import shutil

    from featuredict.pipelines.model import runtime as rtm

    sae_dir = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae_dir)
    loads = []
    monkeypatch.setattr(rtm, "runtime_from_row", lambda row, device=None: loads.append(row) or object())
    monkeypatch.setattr(rtm, "_CACHE", {})
    row = {
        "sae_id": "tiny",
        "d_in": 32,
        "d_sae": 64,
        "model_spec": str(tiny_model_dir),
        "sae_source": json.dumps({"kind": "folder", "release": None, "sae_id": None, "path": str(sae_dir)}),
        "hook_name": "model.layers.1",
        "dtype": "float32",
        "model_kwargs": "{}",
        "prepend_bos": True,
        "context_size": 32,
        "config_json": json.dumps({"outlier_norm_ratio": 10.0}),
    }
    a = rtm.cached_runtime_from_row(row)
    assert rtm.cached_runtime_from_row(dict(row)) is a and len(loads) == 1  # loaded once
    b = rtm.cached_runtime_from_row({**row, "hook_name": "model.layers.0"})
    assert b is not a and len(loads) == 2  # another hook is another runtime
    for f in sae_dir.iterdir():  # the folder is retrained in place
        f.touch()
        os.utime(f, ns=(f.stat().st_mtime_ns + 10**9, f.stat().st_mtime_ns + 10**9))
    c = rtm.cached_runtime_from_row({**row, "hook_name": "model.layers.0"})
    assert c is not b and len(loads) == 3 and len(rtm._CACHE) == 1  # reloaded; stale copies dropped


def test_hf_adapter_facts_and_cached_step(tiny_runtime):
    """The HF adapter's one-step KV-cached forward continues exactly where a full forward pass would be."""
    from featuredict.pipelines.model.backends import HFBackend

    loaded = tiny_runtime.backend
    model = loaded.model
    assert isinstance(loaded, HFBackend) and loaded.incremental
    assert loaded.hook_kind == tiny_runtime.site.kind == "hf_module"
    assert loaded.context_length == 256 and loaded.n_layers == 2
    assert loaded.final_norm() is model.model.norm
    torch.testing.assert_close(loaded.unembedding_matrix(), model.lm_head.weight.float().T)
    assert loaded.eos_ids() == {tiny_runtime.tokenizer.eos_token_id}
    ids = tiny_runtime.tokenize("Once upon a time there was")
    full = loaded.forward(ids)
    n = ids.shape[1]
    with torch.no_grad():
        logits, cache = loaded.step(ids[:, : n - 2], None)
        torch.testing.assert_close(logits, full[0, n - 3], atol=1e-5, rtol=1e-5)
        for i in (n - 2, n - 1):  # one token at a time, continuing from the cache
            logits, cache = loaded.step(ids[:, i : i + 1], cache)
            torch.testing.assert_close(logits, full[0, i], atol=1e-5, rtol=1e-5)


def test_forward_after_prefix_equals_full_forward_per_row(tiny_runtime):
    """The prefix runs once and its KV cache serves every row: each row's logits (right-padded rows included)
    equal a full forward pass over that row alone, for the HF adapter and for the base class's recompute."""
    from featuredict.pipelines.model.backends import ModelBackend

    loaded = tiny_runtime.backend
    prefix = tiny_runtime.tokenize("Once upon a time")
    tok = tiny_runtime.tokenizer
    texts = (" there was a big dog", " a cat", " it rained all day long")
    conts = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    width = max(len(c) for c in conts)
    rest = torch.full((len(conts), width), tiny_runtime.pad_id, dtype=torch.long)
    for k, c in enumerate(conts):
        rest[k, : len(c)] = c
    p = prefix.shape[1]
    with torch.no_grad():
        for got in (loaded.forward_after_prefix(prefix, rest), ModelBackend.forward_after_prefix(loaded, prefix, rest)):
            assert got.shape[:2] == (len(conts), width + 1)
            for k, c in enumerate(conts):
                full = loaded.forward(torch.cat([prefix[0], c]).unsqueeze(0))[0, p - 1 :]
                torch.testing.assert_close(got[k, : len(c) + 1], full, atol=1e-5, rtol=1e-5)
        one = loaded.forward_after_prefix(prefix, conts[0].unsqueeze(0))  # one row: one pass, no cache
        full = loaded.forward(torch.cat([prefix[0], conts[0]]).unsqueeze(0))[:, p - 1 :]
        torch.testing.assert_close(one, full, atol=1e-5, rtol=1e-5)


def test_encode_is_the_one_activation_path(tiny_runtime):
    """``encode`` gives hook activations in the SAE's dtype and device, features zeroed where not valid."""
    ids = torch.cat([tiny_runtime.tokenize("The cat sat on the mat"), torch.full((1, 3), tiny_runtime.pad_id)], 1)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    x, f, valid = tiny_runtime.encode(ids, mask)
    w = tiny_runtime.sae.W_dec
    assert x.dtype == f.dtype == w.dtype and x.device == f.device == valid.device == w.device
    assert valid[0].tolist() == [False] + [True] * (ids.shape[1] - 4) + [False] * 3  # BOS and padding
    torch.testing.assert_close(x, tiny_runtime.hook_acts(ids, mask))
    raw = tiny_runtime.sae.encode(x)
    torch.testing.assert_close(f, raw * valid.unsqueeze(-1))
    assert (raw[0, 0] > 0).any() and not f[0, 0].any()  # BOS fires before masking, not after
    torch.testing.assert_close(tiny_runtime.feature_acts(ids, mask), f)


def test_pad_id_rule():
    from types import SimpleNamespace

    from featuredict.pipelines.model.runtime import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=2, eos_token_id=1)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=1)) == 1
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
