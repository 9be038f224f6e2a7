"""Edit methods against brute force, quality scores against a direct computation, batched sweeps against the
same settings run one at a time, the recommendation rule, and multi-turn chat conversations."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from featuredict.pipelines.steering import (
    BatchStream,
    EditPlan,
    FeatureEdit,
    GenerationSettings,
    RowSpec,
    SteeringConfig,
    SteeringInputError,
    SweepSettings,
    Turn,
    chat_streams,
    decoder_directions,
    generate,
    geometric_strengths,
    output_scale,
    prompt_ids,
    recommend,
    run_sweep,
    score_rows,
    steer_activations,
    validate_config,
)
from featuredict.pipelines.steering import generation as steering_generation
from tests.helpers import SAE_KINDS, decode_after_encode, make_sae, natural_max_acts

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


# ---- config: methods, sweep settings ---------------------------------------------------------------------
def test_methods_parse_and_roundtrip():
    assert FeatureEdit.parse("5=ablate") == FeatureEdit(5, "ablate", 0.0)
    assert FeatureEdit.parse("5=ablate:0") == FeatureEdit(5, "ablate", 0.0)
    assert FeatureEdit.parse("5=orthogonal:2.5") == FeatureEdit(5, "orthogonal", 2.5)
    assert FeatureEdit.parse("5=CAP:0.5") == FeatureEdit(5, "cap", 0.5)
    edits = (FeatureEdit(5, "ablate"), FeatureEdit(6, "orthogonal", 2.0), FeatureEdit(7, "cap", -1.0))
    cfg = SteeringConfig(prompt="x", edits=edits, multi_turn=True, system="Be brief & kind")
    assert SteeringConfig.from_mapping(cfg.to_query_params()) == cfg
    assert cfg.to_query_params()["feature"] == "5=ablate,6=orthogonal:2,7=cap:-1"
    assert cfg.to_query_params()["conv"] == "1" and "conv" not in SteeringConfig(prompt="x").to_query_params()
    with pytest.raises(SteeringInputError, match="ablate takes no value"):
        FeatureEdit.parse("5=ablate:3")
    with pytest.raises(SteeringInputError, match="use clamp, add, orthogonal, cap or ablate"):
        FeatureEdit.parse("5=scale:3")
    with pytest.raises(SteeringInputError, match="multi-turn chat needs the chat template"):
        SteeringConfig(prompt="x", multi_turn=True, chat_template=False)


@pytest.mark.parametrize(
    ("edit", "msg"),
    [
        (FeatureEdit(3, "orthogonal", 101.0), "orthogonal 101 x max_act is absurd"),
        (FeatureEdit(3, "cap", -200.0), "cap -200 x max_act is absurd"),
        (FeatureEdit(5, "orthogonal", 1.0), "never fired"),
        (FeatureEdit(5, "cap", 1.0), "never fired"),
        (FeatureEdit(64, "ablate"), "unknown feature id 64"),
    ],
)
def test_method_limits(edit, msg):
    mx = {i: 2.0 for i in range(64)} | {5: 0.0}
    validate_config(SteeringConfig(prompt="x", edits=(FeatureEdit(5, "ablate"), FeatureEdit(3, "cap", 1.0))), 64, mx)
    with pytest.raises(SteeringInputError, match=msg) as ei:
        validate_config(SteeringConfig(prompt="x", edits=(edit,)), 64, mx)
    assert "\n" not in str(ei.value)
    with pytest.raises(SteeringInputError, match="unknown here"):
        validate_config(SteeringConfig(prompt="x", edits=(FeatureEdit(3, "orthogonal", 1.0),)), 64, None)


def test_sweep_settings():
    assert geometric_strengths() == (0.5, 0.82, 1.35, 2.21, 3.62, 5.94, 9.75, 16.0)
    s = geometric_strengths(0.5, 16.0, 8)
    assert all(b / a == pytest.approx(32 ** (1 / 7), rel=0.01) for a, b in zip(s, s[1:], strict=False))
    assert SweepSettings(strengths=(4, 1)).strengths == (1.0, 4.0)
    for kw, msg in [
        ({"strengths": ()}, "1..16 strengths"),
        ({"strengths": (0.0,)}, "must be a number in"),
        ({"strengths": (1.0, 1.0)}, "distinct"),
        ({"strengths": (float("nan"),)}, "must be a number in"),
        ({"seeds": ()}, "1..8 seeds"),
        ({"seeds": (-1,)}, "non-negative"),
        ({"max_ppl_ratio": 0.5}, "perplexity factor"),
    ]:
        with pytest.raises(SteeringInputError, match=msg):
            SweepSettings(**kw)
    with pytest.raises(SteeringInputError, match="below the lowest"):
        geometric_strengths(4, 1, 3)
    assert FeatureEdit(3, "clamp", 1.0).with_strength(2.0, 3.0) == FeatureEdit(3, "clamp", 6.0)
    assert FeatureEdit(3, "cap", 1.0).with_strength(2.0, 3.0) == FeatureEdit(3, "cap", 2.0)
    assert FeatureEdit(3, "ablate").with_strength(2.0, 3.0) == FeatureEdit(3, "ablate")


# ---- the direction methods against brute force ------------------------------------------------------------
def brute_direction(x: np.ndarray, d: np.ndarray, target: np.ndarray, cap: bool) -> np.ndarray:
    """float64 reference: replace (or cap) the component of each row of ``x`` along ``d`` by ``target * d``."""
    coord = x @ d / (d @ d)
    excess = coord - target
    if cap:
        excess = np.maximum(excess, 0.0)
    return x - excess[..., None] * d


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("method", ["orthogonal", "cap"])
def test_direction_methods_match_brute_force(kind, method):
    sae = make_sae(kind)
    x = torch.randn(2, 7, 24) * 3 + 1
    i = 11
    mx = {i: 1.7}
    for a in (0.0, 0.4, 2.5, -1.0):
        plan = EditPlan.build(sae, [FeatureEdit(i, method, a)], mx)
        with torch.no_grad():
            new, _ = steer_activations(sae, x, plan)
            d = decoder_directions(sae, torch.tensor([i]))[0].double().numpy()
            s = output_scale(sae, x)
        scale = np.ones(x.shape[:2]) if s is None else s[..., 0].double().numpy()
        want = brute_direction(x.double().numpy(), d, a * 1.7 * scale, cap=method == "cap")
        np.testing.assert_allclose(new.double().numpy(), want, atol=2e-5, rtol=1e-5)
        # what is kept: the part orthogonal to D[i], exactly as it was (error term included)
        perp = lambda v, d=d: v - (v @ d / (d @ d))[..., None] * d  # noqa: E731
        np.testing.assert_allclose(perp(new.double().numpy()), perp(x.double().numpy()), atol=2e-5)
        coord = new.double().numpy() @ d / (d @ d)
        if method == "orthogonal":
            np.testing.assert_allclose(coord, a * 1.7 * scale, atol=2e-5)
        else:
            np.testing.assert_allclose(coord, np.minimum(x.double().numpy() @ d / (d @ d), a * 1.7 * scale), atol=2e-5)
    # control: a cap at 0 binds at some positions (positive projection) and not at others
    x0 = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1)) * 3  # projections of both signs
    plan = EditPlan.build(sae, [FeatureEdit(i, "cap", 0.0)], mx)
    new, _ = steer_activations(sae, x0, plan)
    changed = (new - x0).abs().amax(-1) > 1e-6
    assert changed.any() and not changed.all()


def test_mixed_methods_compose_as_documented():
    """SAE-space edits (clamp, add, ablate) from one encode and one s(x), summed; then orthogonal and cap in
    listed order on the result."""
    sae = make_sae("constant_norm_rescale")
    x = torch.randn(1, 5, 24) * 2
    mx = {k: 1.5 for k in range(48)}
    with torch.no_grad():
        f = sae.encode(x)
        on = torch.nonzero(f[0, 2]).flatten()
        a, b = int(on[0]), int(on[-1])
        c, d1, d2 = (b + 1) % 48, (b + 2) % 48, (b + 3) % 48
        edits = [
            FeatureEdit(a, "ablate"),
            FeatureEdit(d1, "cap", 0.2),
            FeatureEdit(b, "clamp", 3.0),
            FeatureEdit(c, "add", 0.5),
            FeatureEdit(d2, "orthogonal", 1.0),
        ]
        new, f_sel = steer_activations(sae, x, EditPlan.build(sae, edits, mx))
        f2 = f.clone()
        f2[..., a] = 0.0
        f2[..., b] = 3.0
        f2[..., c] += 0.5 * 1.5
        y = (x + decode_after_encode(sae, x, f2) - decode_after_encode(sae, x, f)).double().numpy()
        s = output_scale(sae, x)[..., 0].double().numpy()
        for feat, method, v in ((d1, "cap", 0.2), (d2, "orthogonal", 1.0)):
            dd = decoder_directions(sae, torch.tensor([feat]))[0].double().numpy()
            y = brute_direction(y, dd, v * 1.5 * s, cap=method == "cap")
    np.testing.assert_allclose(new.double().numpy(), y, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(f_sel, f[..., [a, d1, b, c, d2]])


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_ablate_is_clamp_to_zero_and_keeps_the_error_term(kind):
    sae = make_sae(kind)
    x = torch.randn(2, 5, 24) * 3
    with torch.no_grad():
        f = sae.encode(x)
        feats = [int(i) for i in torch.nonzero(f[0, 0]).flatten()[:3]]
        new, _ = steer_activations(sae, x, EditPlan.build(sae, [FeatureEdit(i, "ablate") for i in feats]))
        f2 = f.clone()
        f2[..., feats] = 0.0
        expected = x + decode_after_encode(sae, x, f2) - decode_after_encode(sae, x, f)
        recon = decode_after_encode(sae, x, f)
    torch.testing.assert_close(new, expected, atol=2e-5, rtol=1e-4)
    assert (recon - x).abs().max() > 1e-2  # the error term is real, and kept: new - x is only the decoder change
    assert (new - x).abs().max() > 0.1  # the ablation is not trivially zero


def test_per_row_values_equal_one_plan_per_row():
    sae = make_sae("topk_rescale")
    x = torch.randn(3, 4, 24)
    mx = {2: 1.0, 7: 2.0, 9: 0.5}
    rows = [
        [FeatureEdit(2, "add", 1.0), FeatureEdit(7, "orthogonal", 0.5), FeatureEdit(9, "clamp", 1.0)],
        [FeatureEdit(2, "add", -2.0), FeatureEdit(7, "orthogonal", 3.0), FeatureEdit(9, "clamp", 0.0)],
        [FeatureEdit(2, "add", 0.0), FeatureEdit(7, "orthogonal", -1.0), FeatureEdit(9, "clamp", 4.0)],
    ]
    base = EditPlan.build(sae, rows[0], mx)
    stacked = torch.stack([EditPlan.build(sae, r, mx).values for r in rows]).unsqueeze(1)
    batched, _ = steer_activations(sae, x, replace(base, values=stacked))
    for r, edits in enumerate(rows):
        one, _ = steer_activations(sae, x[r : r + 1], EditPlan.build(sae, edits, mx))
        torch.testing.assert_close(batched[r : r + 1], one, atol=1e-6, rtol=1e-6)


# ---- generation with the new methods ----------------------------------------------------------------------
def cfg_for(prompt: str, edits=(), n: int = 10, **kw) -> SteeringConfig:
    return SteeringConfig(
        prompt=prompt, edits=tuple(edits), chat_template=False, generation=GenerationSettings(max_new_tokens=n, **kw)
    )


@pytest.fixture(scope="module")
def mx(tiny_runtime):
    return natural_max_acts(tiny_runtime)


def top_feature(mx, rank: int = 0) -> int:
    return sorted(mx, key=lambda k: -mx[k])[rank]


@pytest.mark.parametrize("method", ["orthogonal", "cap", "ablate"])
def test_direction_methods_generate_with_recorded_effect(tiny_runtime, mx, method):
    rt = tiny_runtime
    f = top_feature(mx)
    value = {"orthogonal": 3.0, "cap": 0.0, "ablate": 0.0}[method]
    res = generate(rt, cfg_for("Once upon a time", [FeatureEdit(f, method, value)]), max_acts=mx, stop_at_eos=False)
    base = generate(rt, cfg_for("Once upon a time"), steer=False, max_acts=mx, stop_at_eos=False)
    assert len(res.token_ids) == 10
    assert res.acts_before is not None and res.acts_after is not None
    if method == "orthogonal":
        assert res.token_ids != base.token_ids
    else:  # removing the feature's direction / activation lowers what the SAE reads
        assert float(res.acts_after.sum()) <= float(res.acts_before.sum()) + 1e-6


# ---- quality scores against a direct computation -----------------------------------------------------------
def brute_quality(rt, cfg, res, feats, mx):
    """Perplexity, KL and concept score computed directly: full forward passes over the whole sequence,
    unedited and steered (the steered one recomputes the run's logits without the KV cache)."""
    full = torch.tensor([res.prompt_ids + res.token_ids])
    p, n = len(res.prompt_ids), len(res.token_ids)
    with torch.no_grad():
        lu = torch.log_softmax(rt.site.logits(full)[0, p - 1 : p - 1 + n].double(), -1)
        mask = torch.ones_like(full, dtype=torch.bool)
        mask[0, 0] = False  # BOS is never edited
        if cfg.positions == "generated":
            mask[0, : p - 1] = False
        plan = EditPlan.build(rt.sae, cfg.edits, mx)
        steered = rt.site.logits(full, fn=lambda a: steer_activations(rt.sae, a, plan, mask)[0])
        ls = torch.log_softmax(steered[0, p - 1 : p - 1 + n].double(), -1)
        f = rt.sae.encode(rt.hook_acts(full))[0, p : p + n]
    ppl = math.exp(-float(np.mean([float(lu[t, y]) for t, y in enumerate(res.token_ids)])))
    kl = float(np.mean([float((ls[t].exp() * (ls[t] - lu[t])).sum()) for t in range(n)]))
    concept = [float(f[:, i].double().mean()) / mx[i] for i in feats]
    return ppl, kl, concept


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_quality_scores_equal_a_direct_computation(tiny_runtime, mx, positions):
    rt = tiny_runtime
    f, g = top_feature(mx), top_feature(mx, 3)
    cfg = replace(
        cfg_for("The cat sat", [FeatureEdit(f, "add", 3.0), FeatureEdit(g, "orthogonal", 0.5)], n=9),
        positions=positions,
    )
    base = generate(rt, cfg, steer=False, max_acts=mx, stop_at_eos=False, keep_logits=True)
    steered = generate(rt, cfg, steer=True, max_acts=mx, stop_at_eos=False, keep_logits=True)
    qb, qs = score_rows(rt, [base, steered], mx)
    ppl, kl, concept = brute_quality(rt, cfg, steered, [f, g], mx)
    assert qs.perplexity == pytest.approx(ppl, rel=1e-4)
    assert qs.distinct == len(set(steered.token_ids)) / len(steered.token_ids)
    assert qb.distinct == len(set(base.token_ids)) / len(base.token_ids)
    assert qs.divergence == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert qs.concept == pytest.approx(tuple(concept), rel=1e-4, abs=1e-6)
    assert qs.divergence > 0.01 and qs.concept[0] > qb.concept[0]  # the edit moved the text and the feature
    # the baseline needs no extra pass: its own logits and recorded activations are the unsteered ones
    bppl, _, bconcept = brute_quality(rt, cfg, base, [f, g], mx)
    assert qb.perplexity == pytest.approx(bppl, rel=1e-4) and qb.divergence == 0.0
    assert qb.concept == pytest.approx(tuple(bconcept), rel=1e-4, abs=1e-6)
    # the concept score equals the steered run's own 'before edit' reading (nothing upstream of the hook moves)
    assert qs.concept[0] == pytest.approx(float(steered.acts_before[:, 0].mean()) / mx[f], rel=1e-4, abs=1e-6)
    d = qs.to_dict()
    assert d["tokens"] == 9 and set(d["concept"]) == {str(f), str(g)}


def test_quality_needs_logits_and_handles_empty(tiny_runtime, mx):
    rt = tiny_runtime
    cfg = cfg_for("The cat", [FeatureEdit(top_feature(mx), "add", 1.0)], n=3)
    res = generate(rt, cfg, max_acts=mx)
    with pytest.raises(ValueError, match="keep_logits"):
        score_rows(rt, [res], mx)
    res.logits, res.token_ids = torch.zeros(0, 5), []
    (q,) = score_rows(rt, [res], mx)
    assert q.n_tokens == 0 and math.isnan(q.perplexity) and q.to_dict()["perplexity"] is None


# ---- batched sweeps --------------------------------------------------------------------------------------
def one_at_a_time(rt, sweep, mx, **kw):
    out = []
    for row in sweep.rows:
        cfg = sweep.config if row.strength is None else sweep.config_at(row.strength, mx)
        cfg = replace(cfg, generation=replace(cfg.generation, seed=row.seed))
        out.append(generate(rt, cfg, steer=row.strength is not None, max_acts=mx, record=False, keep_logits=True, **kw))
    return out


def test_batched_sweep_equals_one_at_a_time(tiny_runtime, mx):
    rt = tiny_runtime
    f, g = top_feature(mx), top_feature(mx, 1)
    cfg = cfg_for("Once upon a time", [FeatureEdit(f, "add", 1.0), FeatureEdit(g, "clamp", 0.0)], n=10)
    settings = SweepSettings(strengths=geometric_strengths(0.5, 16, 6))
    sweep = run_sweep(rt, cfg, settings, mx, stop_at_eos=False)
    assert len(sweep.rows) == 7 and sweep.rows[0].strength is None
    singles = one_at_a_time(rt, sweep, mx, stop_at_eos=False)
    assert len({tuple(r.result.token_ids) for r in sweep.rows}) > 2  # the strengths really differ
    q_single = score_rows(rt, singles, mx, [f, g])
    for row, single, q in zip(sweep.rows, singles, q_single, strict=True):
        assert row.result.token_ids == single.token_ids, row.strength  # token for token
        assert row.result.text == single.text
        assert row.quality.perplexity == pytest.approx(q.perplexity, rel=1e-4)
        assert row.quality.divergence == pytest.approx(q.divergence, rel=1e-3, abs=1e-6)
        assert row.quality.concept == pytest.approx(q.concept, rel=1e-4, abs=1e-6)
        if row.strength is not None:  # and against the direct computation
            ppl, kl, concept = brute_quality(rt, sweep.config_at(row.strength, mx), row.result, [f, g], mx)
            assert row.quality.perplexity == pytest.approx(ppl, rel=1e-4)
            assert row.quality.divergence == pytest.approx(kl, rel=1e-3, abs=1e-5)
            assert row.quality.concept == pytest.approx(tuple(concept), rel=1e-4, abs=1e-6)
            assert row.concept == pytest.approx(sum(concept) / 2, rel=1e-4, abs=1e-6)  # both are swept (g clamped)
    # the recommendation follows the rule on the summary it reports
    summ = sweep.summary()
    for r in summ:  # one seed: the row's distinct share is its own text's
        (row,) = [x for x in sweep.steered if x.strength == r["strength"]]
        assert r["distinct"] == len(set(row.result.token_ids)) / len(row.result.token_ids)
    ok = [r for r in summ if r["perplexity"] <= 2 * sweep.baseline_perplexity and r["distinct"] >= 0.5]
    assert [r["within"] for r in summ] == [r in ok for r in summ]
    want = max(ok, key=lambda r: (r["concept"], -r["strength"]))["strength"] if ok else None
    assert sweep.recommended == want
    assert not rt.site.active and not rt.backend.model._forward_hooks  # every hook removed


def test_sampled_sweep_rows_equal_one_at_a_time(tiny_runtime, mx):
    rt = tiny_runtime
    cfg = cfg_for("The river", [FeatureEdit(top_feature(mx), "orthogonal", 1.0)], n=8, temperature=0.9, top_p=0.95)
    sweep = run_sweep(rt, cfg, SweepSettings(strengths=(0.5, 4.0), seeds=(3, 4)), mx, stop_at_eos=False)
    assert [(r.strength, r.seed) for r in sweep.rows] == [(None, 3), (None, 4), (0.5, 3), (0.5, 4), (4.0, 3), (4.0, 4)]
    for row, single in zip(sweep.rows, one_at_a_time(rt, sweep, mx, stop_at_eos=False), strict=True):
        assert row.result.token_ids == single.token_ids
    assert sweep.rows[0].result.token_ids != sweep.rows[1].result.token_ids  # seeds differ


def test_sweep_stops_at_eos_per_row(tiny_runtime, mx, monkeypatch):
    """Rows that end early are fed padding; their results stop where they ended; the rest go on."""
    rt = tiny_runtime
    cfg = cfg_for("Once upon a time", [FeatureEdit(top_feature(mx), "add", 1.0)], n=10)
    free = generate(rt, cfg, steer=False, max_acts=mx, stop_at_eos=False, record=False)
    eos = free.token_ids[3]  # make the baseline's 4th token an end of sequence
    monkeypatch.setattr(type(rt.backend), "eos_ids", lambda self: {eos})
    sweep = run_sweep(rt, cfg, SweepSettings(strengths=(0.5, 8.0)), mx)
    singles = one_at_a_time(rt, sweep, mx)
    assert sweep.rows[0].result.finish == "eos" and len(sweep.rows[0].result.token_ids) == 3
    for row, single in zip(sweep.rows, singles, strict=True):
        assert row.result.token_ids == single.token_ids and row.result.finish == single.finish


def test_a_row_with_nan_logits_stops_alone(tiny_runtime, mx, monkeypatch):
    rt = tiny_runtime
    real = steering_generation.plan_values

    def poisoned(edits, max_acts=None):
        vals = real(edits, max_acts)
        return [float("nan") if e.value == 8.0 else v for e, v in zip(edits, vals, strict=True)]

    monkeypatch.setattr(steering_generation, "plan_values", poisoned)
    cfg = cfg_for("Once upon a time", [FeatureEdit(top_feature(mx), "add", 1.0)], n=6)
    sweep = run_sweep(rt, cfg, SweepSettings(strengths=(0.5, 8.0)), mx, stop_at_eos=False)
    bad = [r for r in sweep.rows if r.strength == 8.0][0]
    assert bad.result.finish == "error" and "NaN/inf" in bad.result.error
    assert all(len(r.result.token_ids) == 6 for r in sweep.rows if r.strength != 8.0)
    assert any("strength 8" in n for n in sweep.notes)
    assert sweep.recommended != 8.0
    assert not rt.site.active and not rt.backend.model._forward_hooks


def test_sweep_refuses_bad_input(tiny_runtime, mx):
    rt = tiny_runtime
    f = top_feature(mx)
    dead = next((k for k, v in mx.items() if v == 0), None)
    with pytest.raises(SteeringInputError, match="every feature is ablated"):
        run_sweep(rt, cfg_for("hi", [FeatureEdit(f, "ablate")]), SweepSettings(), mx)
    with pytest.raises(SteeringInputError, match="pick at least one feature"):
        run_sweep(rt, cfg_for("hi"), SweepSettings(), mx)
    if dead is not None:
        with pytest.raises(SteeringInputError, match="scales clamp values"):
            run_sweep(rt, cfg_for("hi", [FeatureEdit(dead, "clamp", 1.0)]), SweepSettings(), mx)
    with pytest.raises(SteeringInputError, match="MiB of logits"):
        run_sweep(rt, cfg_for("hi", [FeatureEdit(f, "add", 1.0)]), SweepSettings(), mx, max_logit_bytes=1000)
    assert not rt.site.active and not rt.backend.model._forward_hooks
    # greedy: one seed only, with a note
    sweep = run_sweep(rt, cfg_for("hi", [FeatureEdit(f, "add", 1.0)], n=3), SweepSettings((1.0,), (0, 1, 2)), mx)
    assert sweep.settings.seeds == (0,) and any("greedy" in n for n in sweep.notes)


def test_recommend_rule():
    rows = [
        {"strength": 0.5, "concept": 0.1, "perplexity": 10.0},
        {"strength": 1.0, "concept": 0.4, "perplexity": 19.0},
        {"strength": 2.0, "concept": 0.4, "perplexity": 15.0},
        {"strength": 4.0, "concept": 0.9, "perplexity": 21.0},
        {"strength": 8.0, "concept": 0.95, "perplexity": float("nan")},
    ]
    assert recommend(rows, 10.0, 2.0) == 1.0  # 4.0 is over 2x; the tie at 0.4 goes to the lower strength
    assert recommend(rows, 10.0, 2.5) == 4.0
    assert recommend(rows, 1.0, 2.0) is None
    assert recommend(rows, float("nan"), 2.0) is None
    # a text collapsed into repeats never qualifies, however low its perplexity (48 repeated spaces: 2.45)
    collapsed = [{**rows[0], "distinct": 0.6}, {"strength": 9.75, "concept": 0.5, "perplexity": 2.45, "distinct": 0.02}]
    assert recommend(collapsed, 10.0, 2.0) == 0.5
    assert recommend([{**collapsed[0], "distinct": float("nan")}], 10.0, 2.0) is None


# ---- batched generation keeps the one-row semantics --------------------------------------------------------
def test_batch_rows_must_match_the_config(tiny_runtime, mx):
    rt = tiny_runtime
    f = top_feature(mx)
    cfg = cfg_for("hi", [FeatureEdit(f, "add", 1.0)])
    ids = prompt_ids(rt, cfg)
    with pytest.raises(ValueError, match="features and methods"):
        BatchStream(rt, cfg, [RowSpec(True, 0, (FeatureEdit(f, "clamp", 1.0),))], ids=ids, max_acts=mx)


# ---- chat ------------------------------------------------------------------------------------------------
def test_chat_keeps_two_conversations(tiny_runtime, mx, monkeypatch):
    rt = tiny_runtime
    monkeypatch.setattr(rt.tokenizer, "chat_template", TEMPLATE, raising=False)
    f = top_feature(mx)
    cfg = SteeringConfig(
        prompt="hello",
        edits=(FeatureEdit(f, "add", 4.0),),
        multi_turn=True,
        system="sys",
        generation=GenerationSettings(max_new_tokens=6),
    )
    first = chat_streams(rt, cfg, (), mx, keep_logits=True)
    b1, s1 = (first[k] for k in ("baseline", "steered"))
    for _ in b1:
        pass
    for _ in s1:
        pass
    assert b1.result.prompt_ids == s1.result.prompt_ids  # the first turn: the same prompt
    turn = Turn("hello", b1.result.text, s1.result.text)
    assert turn.baseline != turn.steered
    second = chat_streams(rt, replace(cfg, prompt="and then?"), [turn], mx)
    tok = rt.tokenizer
    for side, reply in (("baseline", turn.baseline), ("steered", turn.steered)):
        msgs = [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "and then?"},
        ]
        want = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        assert second[side].result.prompt_ids == want["input_ids"], side
        second[side].close()
    # the scores work per turn; chat needs the template and multi-turn mode
    qb, qs = score_rows(rt, [b1.result, s1.result], mx)
    assert math.isfinite(qs.perplexity) and qs.divergence > 0
    with pytest.raises(SteeringInputError, match="multi-turn chat"):
        chat_streams(rt, replace(cfg, multi_turn=False), [turn], mx)
    monkeypatch.setattr(rt.tokenizer, "chat_template", None, raising=False)
    with pytest.raises(SteeringInputError, match="no chat template"):
        chat_streams(rt, cfg, [turn], mx)
    assert not rt.site.active


# ---- TransformerLens: full recompute instead of a KV cache -----------------------------------------------
def test_sweep_and_scores_with_full_recompute(tl_runtime):
    rt = tl_runtime
    mx = {i: 1.0 for i in range(rt.d_sae)}
    cfg = cfg_for("the cat sat", [FeatureEdit(5, "add", 1.0)], n=6)
    sweep = run_sweep(rt, cfg, SweepSettings(strengths=(1.0, 8.0)), mx, stop_at_eos=False)
    singles = one_at_a_time(rt, sweep, mx, stop_at_eos=False)
    for row, single in zip(sweep.rows, singles, strict=True):
        assert row.result.token_ids == single.token_ids
    assert sweep.rows[0].result.token_ids != sweep.rows[-1].result.token_ids
    ppl, kl, concept = brute_quality(rt, sweep.config_at(8.0, mx), sweep.rows[-1].result, [5], mx)
    assert sweep.rows[-1].quality.perplexity == pytest.approx(ppl, rel=1e-4)
    assert sweep.rows[-1].quality.divergence == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert sweep.rows[-1].quality.concept == pytest.approx(tuple(concept), rel=1e-4, abs=1e-6)
    assert not rt.site.active and not rt.backend.model._forward_hooks
