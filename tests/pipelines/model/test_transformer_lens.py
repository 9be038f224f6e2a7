"""The TransformerLens path (SAEs trained on ``blocks.L.hook_*`` names), on a tiny HookedTransformer built here.

Real TL models come from the hub (``HookedTransformer.from_pretrained_no_processing``), which is not reachable
offline; everything after loading (hook resolution, early stop, interventions, harvest, steering with full
recompute) is the same code and is tested on a randomly initialised model of the same class.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.corpus import CorpusSpec
from featuredict.pipelines.harvest.loop import harvest_corpus
from featuredict.pipelines.harvest.state import PAD_SLOT, HarvestConfig
from featuredict.pipelines.model.backends import BACKENDS, HFBackend, TLBackend, backend_for_hook
from featuredict.pipelines.model.hooks import HookSite
from featuredict.pipelines.model.runtime import Runtime
from featuredict.pipelines.model.saes import SaeSource
from featuredict.pipelines.steering import (
    FeatureEdit,
    GenerationSettings,
    SteeringConfig,
    generate,
)
from tests.helpers import TL_HOOK, assert_recorded_acts_are_the_steered_run


def _ids(rt: Runtime, text: str = "the cat sat on the mat") -> torch.Tensor:
    return rt.tokenize(text)


def test_hook_names_choose_the_backend():
    assert backend_for_hook(TL_HOOK) is TLBackend and backend_for_hook("blocks.8.hook_resid_post") is TLBackend
    assert backend_for_hook("model.layers.15") is HFBackend and backend_for_hook("transformer.h.3") is HFBackend
    assert BACKENDS == {"hf_module": HFBackend, "transformer_lens": TLBackend}


def test_tl_adapter_facts(tl_runtime: Runtime):
    loaded = tl_runtime.backend
    model = loaded.model
    assert loaded.hook_kind == tl_runtime.site.kind == "transformer_lens" and not loaded.incremental
    assert loaded.context_length == 64 and loaded.n_layers == 2
    assert loaded.final_norm() is model.ln_final
    torch.testing.assert_close(loaded.unembedding_matrix(), model.W_U.float())
    assert loaded.eos_ids() == {loaded.tokenizer.eos_token_id}
    ids = _ids(tl_runtime)
    logits, cache = loaded.step(ids, None)  # no incremental cache: the whole sequence, last position
    assert cache is None
    torch.testing.assert_close(logits, model(ids, return_type="logits")[0, -1])


def test_activations_match_run_with_cache_and_stop_at_the_hook(tl_runtime: Runtime):
    model = tl_runtime.backend.model
    ids = _ids(tl_runtime)
    _, cache = model.run_with_cache(ids)
    ran_last_block = []
    handle = model.blocks[1].register_forward_hook(lambda *a: ran_last_block.append(1))
    try:
        got = tl_runtime.site.activations(ids)
    finally:
        handle.remove()
    torch.testing.assert_close(got, cache[TL_HOOK])
    assert not ran_last_block  # the forward pass stopped at blocks.1's input
    assert not tl_runtime.site.active and not tl_runtime.site.module._forward_hooks


def test_unknown_tl_hook_is_a_clear_error(tl_runtime: Runtime):
    with pytest.raises(ValueError, match="not a TransformerLens hook point"):
        HookSite(tl_runtime.backend, "blocks.9.hook_resid_pre")


def test_edit_at_the_hook_changes_logits_like_run_with_hooks(tl_runtime: Runtime):
    model = tl_runtime.backend.model
    ids = _ids(tl_runtime)
    direction = tl_runtime.W_dec[3].detach()

    def push(act: torch.Tensor) -> torch.Tensor:
        return act + 5.0 * direction

    got = tl_runtime.site.logits(ids, fn=push)
    want = model.run_with_hooks(ids, return_type="logits", fwd_hooks=[(TL_HOOK, lambda act, hook: push(act))])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tl_runtime.site.logits(ids), model(ids, return_type="logits"))  # hook-free again
    assert not (got - model(ids, return_type="logits")).abs().max() < 1e-3  # the edit did something


def test_harvest_on_a_tl_model_stores_truthful_activations(tl_runtime: Runtime, tiny_corpus: Path):
    cfg = BuildConfig(
        model="tiny-tl",
        sae=SaeSource(kind="folder", path="-"),
        corpus=CorpusSpec(str(tiny_corpus)),
        db="-",
        context_size=16,
        max_tokens=2_000,
        batch_size=4,
        harvest=HarvestConfig(top_k=3, samples_per_band=2),
        device="cpu",
        progress=False,
    )
    state = harvest_corpus(tl_runtime, cfg)
    assert state.n_tokens > 0 and 0 < state.l0() <= 4
    live = (state.top.ctx[:, 0] >= 0).nonzero().flatten()
    assert live.numel() > 0
    for f in live[:5].tolist():
        n = int((state.top.tok[f, 0] != PAD_SLOT).sum())  # padding is stored as PAD_SLOT, at the end
        toks = state.top.tok[f, 0, :n].long()[None]
        again = tl_runtime.feature_acts(toks)[0, :, f]
        torch.testing.assert_close(again, state.top.act[f, 0, :n], atol=1e-4, rtol=1e-4)


def test_steering_with_full_recompute(tl_runtime: Runtime):
    g = GenerationSettings(max_new_tokens=6)
    base = generate(tl_runtime, SteeringConfig(prompt="the cat", chat_template=False, generation=g), steer=False)
    same = generate(tl_runtime, SteeringConfig(prompt="the cat", chat_template=False, generation=g), steer=True)
    assert same.token_ids == base.token_ids  # no feature touched: the baseline, token for token
    f = int(tl_runtime.feature_acts(_ids(tl_runtime, "the cat"))[0].sum(0).argmax())
    cfg = SteeringConfig(prompt="the cat", edits=(FeatureEdit(f, "clamp", 40.0),), chat_template=False, generation=g)
    res = generate(tl_runtime, cfg, steer=True, stop_at_eos=False)
    assert res.token_ids != base.token_ids  # a clamp at 40 changes this random model's greedy text
    # the recorded activations are those of the steered run: recompute the whole steered sequence once
    assert_recorded_acts_are_the_steered_run(tl_runtime, res, cfg.edits, f)
    assert not tl_runtime.site.active and not tl_runtime.site.module._forward_hooks
