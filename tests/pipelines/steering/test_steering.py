"""Steering math and generation: exact edits, error term kept, logit effects, no hook leaks, per-thread steering."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch

from featuredict.pipelines.steering import (
    EditPlan,
    FeatureEdit,
    GenerationSettings,
    GenerationStream,
    SteeringConfig,
    SteeringInputError,
    decoder_directions,
    generate,
    prompt_ids,
    side_by_side,
    steer_activations,
    validate_config,
)
from featuredict.pipelines.steering import generation as steering_generation
from tests.helpers import (
    ROOT,
    SAE_KINDS,
    STORIES_MODEL,
    TINY_TEXT,
    TINYSTORIES,
    assert_recorded_acts_are_the_steered_run,
    decode_after_encode,
    make_sae,
    natural_max_acts,
    require_shared,
)


# ---- config parsing and validation ------------------------------------------------------------------------
def test_feature_edit_parse():
    assert FeatureEdit.parse("3=4.5") == FeatureEdit(3, "clamp", 4.5)
    assert FeatureEdit.parse(" 17 = add:-0.5 ") == FeatureEdit(17, "add", -0.5)
    assert FeatureEdit.parse("5=clamp:0") == FeatureEdit(5, "clamp", 0.0)
    assert FeatureEdit.parse("9", FeatureEdit(0, "add", 2.0)) == FeatureEdit(9, "add", 2.0)
    for bad, msg in [
        ("x=1", "not an integer"),
        ("3=mul:2", "unknown mode"),
        ("3=abc", "not a number"),
        ("3", "has no value"),
        ("", "empty"),
    ]:
        with pytest.raises(SteeringInputError, match=msg):
            FeatureEdit.parse(bad)


def test_config_roundtrips_json_and_url():
    cfg = SteeringConfig(
        prompt="Tell me a story, please & thanks",
        edits=(FeatureEdit(3, "clamp", 4.5), FeatureEdit(17, "add", 0.25)),
        positions="generated",
        chat_template=False,
        generation=GenerationSettings(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5),
    )
    assert SteeringConfig.from_mapping(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SteeringConfig.from_mapping(cfg.to_query_params()) == cfg
    # a whole shared link: the parameters that pick the SAE or a preset are not config settings
    assert SteeringConfig.from_mapping({"sae": "x", "preset": "y", **cfg.to_query_params()}) == cfg
    # values that %g would round survive the URL
    exact = replace(cfg, edits=(FeatureEdit(3, "clamp", 1.2345678901),))
    assert SteeringConfig.from_mapping(exact.to_query_params()) == exact
    # a feature page's link: one id or a comma list of ids, which take the default edit
    got = SteeringConfig.from_mapping({"feature": "3,8"}, default_edit=FeatureEdit(0, "add", 1.0))
    assert got.edits == (FeatureEdit(3, "add", 1.0), FeatureEdit(8, "add", 1.0))
    with pytest.raises(SteeringInputError, match="n='many'"):
        SteeringConfig.from_mapping({"n": "many"})


def test_from_mapping_reads_cli_flags_over_a_base():
    base = SteeringConfig(prompt="preset prompt", edits=(FeatureEdit(3, "add", 2.0),), chat_template=False)
    flags = {"prompt": None, "edits": None, "positions": None, "chat_template": None, "max_new_tokens": "9"}
    got = SteeringConfig.from_mapping(flags, base=base)
    assert got == replace(base, generation=GenerationSettings(max_new_tokens=9))
    got = SteeringConfig.from_mapping({"edits": ["5=clamp:1", "6=add:0.5"], "positions": "generated"}, base=base)
    assert got.edits == (FeatureEdit(5, "clamp", 1.0), FeatureEdit(6, "add", 0.5))
    assert got.positions == "generated" and got.prompt == "preset prompt"
    # booleans as URLs write them; nested and flat generation settings
    assert SteeringConfig.from_mapping({"chat": "0"}).chat_template is False
    assert SteeringConfig.from_mapping({"chat_template": "yes"}).chat_template is True
    assert SteeringConfig.from_mapping({"generation": {"seed": 4}, "t": "0.5"}).generation == GenerationSettings(
        temperature=0.5, seed=4
    )


@pytest.mark.parametrize(
    ("settings", "msg"),
    [
        ({"colour": "red"}, "unknown steering setting 'colour'"),
        ({"generation": {"speed": 1}}, "unknown steering setting 'generation.speed'"),
        ({"n": "4", "max_new_tokens": "5"}, "both set max_new_tokens"),
        ({"chat": "maybe"}, "chat='maybe' is not a valid boolean"),
        ({"t": "warm"}, "t='warm' is not a valid number"),
        ({"seed": "1.5"}, "seed='1.5' is not a valid integer"),
        ({"pos": "some"}, "positions must be 'all' or 'generated'"),
        ({"edits": [{"feature": 3, "mode": "scale", "value": 1}]}, "unknown mode 'scale'"),
        ({"edits": [{"feature": 3, "size": 1}]}, "malformed"),
        ({"edits": [3]}, "not a feature edit"),
        ({"feature": "3"}, "has no value"),  # a bare id without a default edit
        ({"prompt": 5}, "prompt must be text"),
        ({"generation": 3}, "generation must be a mapping"),
    ],
)
def test_from_mapping_rejects_bad_settings(settings, msg):
    with pytest.raises(SteeringInputError, match=msg) as ei:
        SteeringConfig.from_mapping(settings)
    assert "\n" not in str(ei.value)


def test_configs_check_their_fields_on_construction():
    """Literal-typed fields and ranges are checked by the dataclasses themselves, not only by the readers."""
    with pytest.raises(SteeringInputError, match="unknown mode 'mul'"):
        FeatureEdit(1, "mul", 1.0)  # type: ignore[arg-type]
    with pytest.raises(SteeringInputError, match="not an integer"):
        FeatureEdit(True, "clamp", 1.0)
    with pytest.raises(SteeringInputError, match="positions"):
        SteeringConfig(prompt="x", positions="everywhere")  # type: ignore[arg-type]
    with pytest.raises(SteeringInputError, match="at most 32"):
        SteeringConfig(prompt="x", edits=tuple(FeatureEdit(i, "clamp", 0.0) for i in range(33)))
    with pytest.raises(SteeringInputError, match="chat_template"):
        SteeringConfig(prompt="x", chat_template="no")  # type: ignore[arg-type]
    # numbers are normalised, so equal configs compare equal however they were written
    assert FeatureEdit(3, "add", 1) == FeatureEdit(3, "add", 1.0) and isinstance(FeatureEdit(3, "add", 1).value, float)
    assert SteeringConfig(prompt="x", edits=[FeatureEdit(3)]).edits == (FeatureEdit(3),)  # type: ignore[arg-type]


GOOD = SteeringConfig(prompt="hello", edits=(FeatureEdit(3, "clamp", 2.0), FeatureEdit(4, "add", 1.0)))
MAX_ACTS = {i: 2.0 for i in range(64)} | {5: 0.0}


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"edits": [(64, "clamp", 1.0)]}, "unknown feature id 64"),
        ({"edits": [(-1, "clamp", 1.0)]}, "unknown feature id -1"),
        ({"edits": [(3, "clamp", float("nan"))]}, "not a finite number"),
        ({"edits": [(3, "add", float("inf"))]}, "not a finite number"),
        ({"edits": [(3, "clamp", 1e6)]}, "absurd"),
        ({"edits": [(3, "clamp", 201.0)]}, "absurd"),  # > 100 x max_act (2.0)
        ({"edits": [(3, "add", -500.0)]}, "absurd"),
        ({"edits": [(5, "add", 1.0)]}, "never fired"),
        ({"edits": [(3, "clamp", 1.0), (3, "add", 1.0)]}, "listed twice"),
        ({"edits": [(3, "scale", 1.0)]}, "unknown mode"),
        ({"positions": "some"}, "positions"),
        ({"generation": {"max_new_tokens": 0}}, "max new tokens"),
        ({"generation": {"max_new_tokens": 2000}}, "max new tokens"),
        ({"generation": {"temperature": -1.0}}, "temperature"),
        ({"generation": {"temperature": float("nan")}}, "temperature"),
        ({"generation": {"temperature": 1e-300}}, "temperature"),  # 1/T would overflow
        ({"generation": {"top_p": 0.0}}, "top-p"),
        ({"generation": {"seed": -3}}, "seed"),
    ],
)
def test_bad_config_is_refused(change, msg):
    """Each bad input is refused with a one-line message, by the constructors or by validate_config."""
    validate_config(GOOD, 64, MAX_ACTS)  # the unchanged config is fine
    with pytest.raises(SteeringInputError, match=msg) as ei:
        kw = dict(change)
        if "edits" in kw:
            kw["edits"] = tuple(FeatureEdit(*e) for e in kw["edits"])
        if "generation" in kw:
            kw["generation"] = GenerationSettings(**kw["generation"])
        validate_config(replace(GOOD, **kw), 64, MAX_ACTS)
    assert "\n" not in str(ei.value)


def test_validate_config_without_feature_table():
    validate_config(SteeringConfig(prompt="x", edits=(FeatureEdit(3, "clamp", 2.0),)), 64, None)
    with pytest.raises(SteeringInputError, match="max activation"):
        validate_config(SteeringConfig(prompt="x", edits=(FeatureEdit(3, "add", 2.0),)), 64, None)
    with pytest.raises(SteeringInputError, match="not in this SAE's feature table"):
        validate_config(SteeringConfig(prompt="x", edits=(FeatureEdit(3, "clamp", 2.0),)), 64, {0: 1.0})


# ---- presets ----------------------------------------------------------------------------------------------
@pytest.fixture()
def preset_store(tmp_path):
    import duckdb

    from featuredict.db.schema import create_schema
    from featuredict.db.store import Store

    con = duckdb.connect(str(tmp_path / "p.duckdb"))
    create_schema(con)
    con.close()
    store = Store(tmp_path / "p.duckdb")
    yield store
    store.close()


def test_presets_are_stored_as_plain_json_and_read_back_as_configs(preset_store):
    from featuredict.db.queries import PresetError, read_preset
    from featuredict.db.writes import write_preset
    from featuredict.pipelines.steering import list_presets, load_preset, save_preset

    cfg = SteeringConfig(prompt="hi", edits=(FeatureEdit(3, "add", 1.5),), positions="generated")
    assert save_preset(preset_store, " boost ", "sae-a", cfg) == "boost"
    assert read_preset(preset_store, "boost") == ("sae-a", cfg.to_dict())  # storage sees a plain dict
    assert load_preset(preset_store, "boost") == ("sae-a", cfg)
    # a stored object that is no longer a valid config: unreadable on load, listed without a config
    write_preset(preset_store, "broken", "sae-a", {**cfg.to_dict(), "positions": "sideways"})
    with pytest.raises(PresetError, match="preset 'broken' is unreadable: positions"):
        load_preset(preset_store, "broken")
    listed = {p.name: p for p in list_presets(preset_store, "sae-a")}
    assert listed["boost"].config == cfg and listed["broken"].config is None
    assert list_presets(preset_store, "sae-b") == []


def test_reading_presets_does_not_import_the_pipelines():
    """The storage layer stays below the pipelines: importing it pulls in neither them nor torch."""
    code = (
        "import sys, featuredict.db.queries\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('featuredict.pipelines')]\n"
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ---- the edit ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SAE_KINDS)
def test_edit_equals_decode_difference(kind):
    """x_new - x == decode(f') - decode(f), f' = f with the edited features set (clamp) / raised (add)."""
    sae = make_sae(kind)
    x = torch.randn(2, 7, 24) * 3 + 1
    with torch.no_grad():
        f = sae.encode(x)
        active = torch.nonzero(f[0, 3]).flatten()
        i, j = int(active[0]), int(active[-1])  # features active at [0, 3]
        k = int((f == 0).all(dim=(0, 1)).nonzero()[0]) if (f == 0).all(dim=(0, 1)).any() else (i + 1) % 48
        edits = [FeatureEdit(i, "clamp", 0.0), FeatureEdit(j, "clamp", 5.0), FeatureEdit(k, "add", 0.5)]
        if kind == "topk_rescale":
            assert len({round(float(n), 2) for n in sae.W_dec.norm(dim=-1)[[i, j, k]]}) > 1
        plan = EditPlan.build(sae, edits, {k: 4.0})
        x_new, f_sel = steer_activations(sae, x, plan)
        f2 = f.clone()
        f2[..., i] = 0.0
        f2[..., j] = 5.0
        f2[..., k] += 0.5 * 4.0
        expected = decode_after_encode(sae, x, f2) - decode_after_encode(sae, x, f)
    torch.testing.assert_close(f_sel, f[..., [i, j, k]])
    torch.testing.assert_close(x_new - x, expected, atol=2e-5, rtol=1e-4)
    assert expected.abs().max() > 0.1  # the edit is not trivially zero


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_clamping_every_feature_to_itself_keeps_the_activation(kind):
    """With every feature clamped to its own value the activation is unchanged: the error term is kept."""
    sae = make_sae(kind)
    x = torch.randn(2, 5, 24) * 3
    with torch.no_grad():
        f = sae.encode(x)
        plan = EditPlan.build(sae, [FeatureEdit(i, "clamp", 0.0) for i in range(48)])
        plan = replace(plan, values=f)  # per-position targets [2, 5, 48]: each feature's own activation
        x_new, _ = steer_activations(sae, x, plan)
        recon = decode_after_encode(sae, x, f)
    assert torch.equal(x_new, x)
    assert (recon - x).abs().max() > 1e-2  # the SAE's error term is far from zero, so keeping it matters


def test_mask_limits_the_edit_to_chosen_positions():
    sae = make_sae("topk_rescale")
    x = torch.randn(1, 6, 24)
    plan = EditPlan.build(sae, [FeatureEdit(2, "clamp", 3.0)])
    mask = torch.tensor([[False, False, False, True, True, True]])
    with torch.no_grad():
        x_new, _ = steer_activations(sae, x, plan, mask)
    assert torch.equal(x_new[0, :3], x[0, :3])
    assert not torch.allclose(x_new[0, 3:], x[0, 3:])


def test_add_needs_a_finite_max_act():
    cfg = SteeringConfig(prompt="x", edits=(FeatureEdit(3, "add", 1.0),))
    with pytest.raises(SteeringInputError, match="not finite"):
        validate_config(cfg, 64, {3: float("inf")})


def test_zero_decoder_row_edits_nothing_and_masked_positions_stay_exact():
    sae = make_sae("topk_rescale")
    with torch.no_grad():
        sae.W_dec[5].zero_()
    assert torch.equal(decoder_directions(sae, torch.tensor([5])), torch.zeros(1, 24))
    x = torch.randn(1, 4, 24)
    plan = EditPlan.build(sae, [FeatureEdit(5, "clamp", 3.0), FeatureEdit(6, "clamp", 2.0)], None)
    mask = torch.tensor([[False, True, True, True]])
    new, _ = steer_activations(sae, x, plan, mask)
    assert torch.isfinite(new).all() and torch.equal(new[0, 0], x[0, 0])


def test_non_finite_logits_stop_generation_with_a_message():
    from featuredict.pipelines.steering.generation import _sample

    g = GenerationSettings(temperature=0.7)
    gen = torch.Generator().manual_seed(0)
    for bad in (torch.full((10,), float("nan")), torch.tensor([0.0, float("inf"), 1.0])):
        with pytest.raises(SteeringInputError, match="NaN/inf logits"):
            _sample(bad, g, gen)
    assert _sample(torch.tensor([0.0, -float("inf"), 5.0]), g, gen) in (0, 2)  # -inf (a banned token) is fine


def test_decoder_directions_follow_rescale():
    sae = make_sae("topk_rescale")
    d = decoder_directions(sae, torch.tensor([0, 47]))
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2))
    sae2 = make_sae("topk")
    torch.testing.assert_close(decoder_directions(sae2, torch.tensor([0, 47])), sae2.W_dec[[0, 47]])


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_fast_encoder_is_sae_encode(kind, tiny_runtime):
    from featuredict.pipelines.steering import fast_encoder

    sae = make_sae(kind)
    x = torch.randn(3, 5, 24) * 2
    enc = fast_encoder(sae)
    with torch.no_grad():
        assert torch.equal(enc(x), sae.encode(x))
        assert torch.equal(enc(x[:, :1]), sae.encode(x[:, :1]))
    inline = kind.startswith("topk")
    assert (getattr(enc, "__self__", None) is not sae) == inline  # inlined only for plain TopK SAEs
    rt = tiny_runtime
    xs = rt.hook_acts(rt.tokenize(TINY_TEXT[0]))
    with torch.no_grad():
        assert torch.equal(fast_encoder(rt.sae)(xs), rt.sae.encode(xs))


# ---- logits ------------------------------------------------------------------------------------------------
def _logits_with(rt, ids, plan):
    return rt.site.logits(ids, fn=lambda a: steer_activations(rt.sae, a, plan)[0])


def test_clamp_to_natural_activation_keeps_logits(tiny_runtime):
    rt = tiny_runtime
    ids = rt.tokenize("The stock market fell sharply")
    base = rt.site.logits(ids)
    f = rt.feature_acts(ids)[0]  # [pos, d_sae]
    i = int(f[-1].argmax())
    plan = EditPlan.build(rt.sae, [FeatureEdit(i, "clamp", 0.0)])
    own = rt.sae.encode(rt.hook_acts(ids))[..., [i]]  # own activation at every position (BOS incl.)
    plan = replace(plan, values=own)
    torch.testing.assert_close(_logits_with(rt, ids, plan), base, atol=1e-5, rtol=1e-5)
    plan = replace(plan, values=own + 1.0)  # control: a different value does move the logits
    assert not torch.allclose(_logits_with(rt, ids, plan), base, atol=1e-3)

    # through the config path: a one-token prompt, clamped (scalar) to its own activation there
    cfg = SteeringConfig(prompt="The", chat_template=False, generation=GenerationSettings(max_new_tokens=1))
    one = prompt_ids(rt, cfg)
    assert one.shape[1] == 2  # BOS + one token; BOS is never edited
    f1 = rt.feature_acts(one)[0, 1]
    j = int(f1.argmax())
    cfg_own = SteeringConfig(**{**cfg.__dict__, "edits": (FeatureEdit(j, "clamp", float(f1[j])),)})
    plan_own = EditPlan.build(rt.sae, cfg_own.edits)
    mask = torch.tensor([[False, True]])
    steered = rt.site.logits(one, fn=lambda a: steer_activations(rt.sae, a, plan_own, mask)[0])
    torch.testing.assert_close(steered, rt.site.logits(one), atol=1e-5, rtol=1e-5)


def test_clamp_to_zero_moves_logits_against_the_decoder_direction(tiny_runtime):
    """Removing a strongly active feature changes the next-token logits along -D[i] @ W_U (through the final
    RMSNorm's gain; the tiny SAE sits on the last layer, so the first-order prediction is nearly exact)."""
    rt = tiny_runtime
    model = rt.backend.model
    for text in TINY_TEXT[:4]:
        ids = rt.tokenize(text)
        f = rt.feature_acts(ids)[0, -1]
        i = int(f.argmax())
        assert f[i] > 1.0  # strongly active
        base = rt.site.logits(ids)[0, -1]
        plan = EditPlan.build(rt.sae, [FeatureEdit(i, "clamp", 0.0)])
        change = _logits_with(rt, ids, plan)[0, -1] - base
        with torch.no_grad():
            predicted = model.lm_head.weight @ (
                model.model.norm.weight * -decoder_directions(rt.sae, torch.tensor([i]))[0]
            )
        cos = torch.nn.functional.cosine_similarity(change, predicted, dim=0)
        assert float(change @ predicted) > 0
        assert cos > 0.9, (text, float(cos))
        # and the opposite edit (boosting it) moves them the other way
        boost = EditPlan.build(rt.sae, [FeatureEdit(i, "clamp", 3 * float(f[i]))])
        assert float((_logits_with(rt, ids, boost)[0, -1] - base) @ predicted) < 0


# ---- generation -------------------------------------------------------------------------------------------
def cfg_for(prompt: str, edits=(), n: int = 12, **kw) -> SteeringConfig:
    return SteeringConfig(
        prompt=prompt, edits=tuple(edits), chat_template=False, generation=GenerationSettings(max_new_tokens=n, **kw)
    )


def test_untouched_steering_generates_the_baseline(tiny_runtime):
    rt = tiny_runtime
    mx = natural_max_acts(rt)
    prompt = "Once upon a time there was"
    base = generate(rt, cfg_for(prompt), steer=False, max_acts=mx, stop_at_eos=False)
    assert len(base.token_ids) == 12
    # edits that touch nothing (add 0, clamp a never-firing feature to 0) still run the hook every step
    dead = [i for i, v in mx.items() if v == 0]
    edits = [FeatureEdit(int(torch.tensor(list(mx.values())).argmax()), "add", 0.0)]
    edits += [FeatureEdit(dead[0], "clamp", 0.0)] if dead else []
    same = generate(rt, cfg_for(prompt, edits), steer=True, max_acts=mx, stop_at_eos=False)
    assert same.token_ids == base.token_ids
    assert same.acts_before is not None and same.acts_before.shape == (12, len(edits))
    # control: a real edit of the same feature changes the continuation
    strong = [FeatureEdit(edits[0].feature, "add", 4.0)]
    moved = generate(rt, cfg_for(prompt, strong), steer=True, max_acts=mx, stop_at_eos=False)
    assert moved.token_ids != base.token_ids


def test_sampling_is_seeded_and_shared(tiny_runtime):
    rt = tiny_runtime
    c = cfg_for("The river", n=10, temperature=1.0, top_p=0.9, seed=7)
    a = generate(rt, c, steer=False, stop_at_eos=False)
    b = generate(rt, c, steer=False, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    other = generate(rt, cfg_for("The river", n=10, temperature=1.0, top_p=0.9, seed=8), steer=False, stop_at_eos=False)
    assert other.token_ids != a.token_ids


def test_generated_only_leaves_the_prompt_alone(tiny_runtime):
    rt = tiny_runtime
    mx = natural_max_acts(rt)
    prompt = "She walked to the river"
    i = int(rt.feature_acts(rt.tokenize(prompt))[0, -1].argmax())  # active at the last prompt token
    edits = [FeatureEdit(i, "clamp", 0.0)]
    ids = rt.tokenize(prompt)
    seen: list[torch.Tensor] = []
    # the tiny SAE sits on the last layer: the final norm's input is the (edited) hook output
    h = rt.backend.model.model.norm.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    try:
        GenerationStream(
            rt, SteeringConfig(**{**cfg_for(prompt, edits, n=1).__dict__, "positions": "generated"}), max_acts=mx
        ).__next__()
    finally:
        h.remove()
    # the hook output at prefill: prompt positions before the last one are untouched, the last one is edited
    natural = rt.hook_acts(ids)
    torch.testing.assert_close(seen[0][0, :-1], natural[0, :-1])
    assert not torch.allclose(seen[0][0, -1], natural[0, -1])


def test_recorded_activations_are_measured_in_the_steered_run(tiny_runtime):
    rt = tiny_runtime
    mx = natural_max_acts(rt)
    i = int(torch.tensor([mx[k] for k in range(rt.d_sae)]).argmax())
    cfg = cfg_for("The cat", [FeatureEdit(i, "add", 2.0)], n=6)
    res = generate(rt, cfg, max_acts=mx, stop_at_eos=False)
    # recompute: run the whole steered sequence once with the same edit and read f_i at generated positions
    assert_recorded_acts_are_the_steered_run(rt, res, cfg.edits, i, mx)


# ---- hooks never leak -------------------------------------------------------------------------------------
def _hook_free(rt, ids, base):
    assert not rt.site.active
    assert len(rt.site.module._forward_hooks) == 0
    assert torch.equal(rt.site.logits(ids), base)


def test_no_hook_after_error_mid_generation(tiny_runtime, monkeypatch):
    rt = tiny_runtime
    ids = rt.tokenize("The river")
    base = rt.site.logits(ids)
    real = rt.sae.encode
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom in the SAE")
        return real(x)

    monkeypatch.setattr(steering_generation, "fast_encoder", lambda sae: flaky)  # the encoder the hook uses
    stream = GenerationStream(rt, cfg_for("The river", [FeatureEdit(1, "clamp", 2.0)], n=10))
    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for piece in stream:
            got.append(piece)
    assert stream.result.finish == "error"
    assert calls["n"] == 4
    _hook_free(rt, ids, base)


def test_no_hook_after_stopping_a_stream_early(tiny_runtime):
    rt = tiny_runtime
    ids = rt.tokenize("The river")
    base = rt.site.logits(ids)
    stream = GenerationStream(rt, cfg_for("The river", [FeatureEdit(1, "clamp", 5.0)], n=30), stop_at_eos=False)
    next(stream)
    next(stream)
    _hook_free(rt, ids, base)  # between tokens no hook is registered, even while the stream is open
    stream.close()
    assert stream.result.finish == "closed"
    assert 2 <= len(stream.result.token_ids) < 30
    _hook_free(rt, ids, base)
    # the side-by-side generator, closed early, closes both streams
    sbs = side_by_side(rt, cfg_for("The river", [FeatureEdit(1, "clamp", 5.0)], n=30))
    next(sbs)
    next(sbs)
    sbs.close()
    _hook_free(rt, ids, base)


def test_interleaved_baseline_and_steered_streams_do_not_mix(tiny_runtime):
    rt = tiny_runtime
    mx = natural_max_acts(rt)
    cfg = cfg_for("Photosynthesis converts", [FeatureEdit(7, "add", 3.0)], n=10)
    base = generate(rt, cfg, steer=False, max_acts=mx)
    steered = generate(rt, cfg, steer=True, max_acts=mx)
    assert base.token_ids != steered.token_ids
    streams = {}
    texts = {"baseline": "", "steered": ""}
    for which, piece, stream in side_by_side(rt, cfg, mx):
        texts[which] += piece
        streams[which] = stream
    assert streams["baseline"].result.token_ids == base.token_ids
    assert streams["steered"].result.token_ids == steered.token_ids
    assert texts["baseline"] == base.text and texts["steered"] == steered.text


def test_two_threads_steer_independently(tiny_runtime, monkeypatch):
    """Two sessions steering the shared model at the same time (forced to overlap inside their hooked forward
    passes) each get their own result, equal to running alone."""
    rt = tiny_runtime
    prompt = "To bake bread, mix"
    cfgs = {
        "a": cfg_for(prompt, [FeatureEdit(3, "clamp", 6.0)], n=8),
        "b": cfg_for(prompt, [FeatureEdit(9, "clamp", 6.0)], n=8),
    }
    alone = {k: generate(rt, c, stop_at_eos=False).token_ids for k, c in cfgs.items()}
    assert alone["a"] != alone["b"]
    real = rt.sae.encode
    barrier = threading.Barrier(2)
    waited: set[int] = set()

    def meeting_encode(x):
        tid = threading.get_ident()
        if tid not in waited:  # first encode of each thread: both are inside a hooked forward pass now
            waited.add(tid)
            barrier.wait(timeout=20)
        return real(x)

    monkeypatch.setattr(steering_generation, "fast_encoder", lambda sae: meeting_encode)
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            results[key] = generate(rt, cfgs[key], stop_at_eos=False).token_ids
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(waited) == 2
    assert results == alone
    assert not rt.site.active


# ---- prompt handling --------------------------------------------------------------------------------------
def test_prompt_too_long_or_empty(tiny_runtime):
    rt = tiny_runtime
    with pytest.raises(SteeringInputError, match="longer than the model's context"):
        GenerationStream(rt, cfg_for("word " * 400, [FeatureEdit(1, "clamp", 1.0)]))
    with pytest.raises(SteeringInputError, match="exceeds the model's context"):
        GenerationStream(rt, cfg_for("word " * 50, [FeatureEdit(1, "clamp", 1.0)], n=250))
    with pytest.raises(SteeringInputError, match="empty"):
        GenerationStream(rt, cfg_for("", [FeatureEdit(1, "clamp", 1.0)]))
    with pytest.raises(SteeringInputError, match="unknown feature id 999"):
        GenerationStream(rt, cfg_for("hi", [FeatureEdit(999, "clamp", 1.0)]))


def test_chat_template_applied_without_doubling_bos(tiny_runtime, monkeypatch):
    rt = tiny_runtime
    tok = rt.tokenizer
    monkeypatch.setattr(
        tok,
        "chat_template",
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}",
        raising=False,
    )
    on = prompt_ids(rt, SteeringConfig(prompt="hello", chat_template=True))[0].tolist()
    off = prompt_ids(rt, SteeringConfig(prompt="hello", chat_template=False))[0].tolist()
    assert on[0] == tok.bos_token_id and on[1] != tok.bos_token_id
    assert "[user] hello" in tok.decode(on) and "[assistant]" in tok.decode(on)
    assert tok.decode(off[1:]) == "hello"


# ---- the real stories260K model with a quickly trained TopK SAE --------------------------------------------
@pytest.fixture(scope="module")
def stories_runtime(tmp_path_factory):
    require_shared(STORIES_MODEL)
    require_shared(TINYSTORIES)
    import importlib.util

    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    spec = importlib.util.spec_from_file_location("bench_steering", ROOT / "bench" / "bench_steering.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    texts = [t.strip() for t in TINYSTORIES.read_text(encoding="utf-8").split("<|endoftext|>")[:600] if t.strip()]
    torch.manual_seed(0)
    folder = bench.train_quick_sae(
        str(STORIES_MODEL),
        "model.layers.2",
        texts,
        tmp_path_factory.mktemp("sae") / "sae",
        d_in=64,
        d_sae=256,
        k=8,
        training_tokens=60_000,
    )
    return load_runtime(str(STORIES_MODEL), SaeSource(kind="folder", path=str(folder)), device="cpu")


@pytest.mark.shared
@pytest.mark.slow
def test_stories260k_trained_topk_sae(stories_runtime):
    rt = stories_runtime
    assert rt.sae.cfg.rescale_acts_by_decoder_norm  # sae-lens' TopK training default
    cfg = cfg_for("Once upon a time", n=20)
    base = generate(rt, cfg, steer=False)
    assert base.text.startswith(", there was a little girl named Lily")  # Karpathy's reference output
    ids = prompt_ids(rt, cfg)
    x = rt.hook_acts(ids)
    with torch.no_grad():
        f = rt.sae.encode(x)
    i = int(f[0, -1].argmax())
    plan = EditPlan.build(rt.sae, [FeatureEdit(i, "clamp", 0.0)])
    with torch.no_grad():
        x_new, _ = steer_activations(rt.sae, x, plan)
        f2 = f.clone()
        f2[..., i] = 0
        torch.testing.assert_close(x_new - x, rt.sae.decode(f2) - rt.sae.decode(f), atol=1e-5, rtol=1e-4)
    # untouched steering reproduces the baseline; clamping the top feature high changes the story
    same = generate(rt, cfg_for("Once upon a time", [FeatureEdit(i, "add", 0.0)], n=20), max_acts={i: 1.0})
    assert same.token_ids == base.token_ids
    moved = generate(
        rt, cfg_for("Once upon a time", [FeatureEdit(i, "add", 20.0)], n=20), max_acts={i: float(f[0, -1, i])}
    )
    assert moved.token_ids != base.token_ids
