"""Attribution maths on the tiny model: splice, exactness at the last residual stream, finite differences,
quality figures, graphs and their JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featuredict.pipelines.attribution.attribute import (
    AttributionInputError,
    Target,
    attribute,
    linearised,
    make_target,
    prompt_from_text,
)
from featuredict.pipelines.attribution.checks import check
from featuredict.pipelines.attribution.freeze import frozen
from featuredict.pipelines.attribution.graph import (
    REQUIRED_LINK_FIELDS,
    REQUIRED_NODE_FIELDS,
    GraphConfig,
    build_graph,
    influence_on,
)
from featuredict.pipelines.attribution.load import load_graph, save_graph
from featuredict.pipelines.attribution.quality import evaluate, next_token_ce
from featuredict.pipelines.attribution.splice import Slot, slots_in_order, splice_fn, spliced
from featuredict.pipelines.model.hooks import HookSite
from featuredict.pipelines.model.loading import load_model
from featuredict.pipelines.model.saes import SaeSource, load_sae
from featuredict.pipelines.steering.edits import decoder_directions
from tests.helpers import make_tiny_sae

PROMPT = "Once upon a time there was a little cat who liked to play"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attr_saes")
    return {
        hook: make_tiny_sae(root / hook.replace(".", "_"), tiny_model_dir, hook=hook, seed=i + 3, k=6)
        for i, hook in enumerate(("model.layers.0", "model.layers.1"))
    }


def _slot(loaded, sae_dirs, hook: str, dtype: str = "float32") -> Slot:
    sae = load_sae(SaeSource(kind="folder", path=str(sae_dirs[hook])), dtype=dtype)
    return Slot(hook, sae, HookSite(loaded, hook))


def test_spliced_forward_equals_plain(loaded, sae_dirs) -> None:
    slots = [_slot(loaded, sae_dirs, h) for h in sae_dirs]
    p = prompt_from_text(loaded.tokenizer, PROMPT)
    with torch.no_grad():
        plain = loaded.forward(p.ids)
        with spliced(slots, p.ids) as seen:
            sp = loaded.forward(p.ids)
        with spliced(slots, p.ids, keep_error=False):
            recon = loaded.forward(p.ids)
    assert torch.allclose(plain, sp, atol=1e-5)
    assert not torch.allclose(plain, recon, atol=1e-3)  # without the error the SAE does change the output
    assert set(seen) == set(sae_dirs) and all(bool(v["valid"].any()) for v in seen.values())
    assert not any(s.site.active for s in slots)  # every hook removed


def test_frozen_replay_equals_plain_and_restores(loaded) -> None:
    p = prompt_from_text(loaded.tokenizer, PROMPT)
    impl = loaded.model.config._attn_implementation
    with torch.no_grad():
        plain = loaded.forward(p.ids)
        with frozen(loaded) as st:
            rec = loaded.forward(p.ids)
            st.mode = "replay"
            rep = loaded.forward(p.ids.expand(3, -1))
    assert torch.allclose(plain, rec, atol=1e-5)
    assert torch.allclose(plain.expand(3, -1, -1), rep, atol=1e-5)
    assert loaded.model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.allclose(loaded.forward(p.ids), plain)


@pytest.mark.parametrize("contrast", [False, True])
def test_last_residual_direct_mode_is_exact(loaded, sae_dirs, contrast: bool) -> None:
    """Hook at the last residual stream, final norm frozen: the target is linear in the SAE's nodes."""
    slot = _slot(loaded, sae_dirs, "model.layers.1")
    tok = loaded.tokenizer
    p = prompt_from_text(tok, PROMPT)
    with torch.no_grad():
        logits = loaded.forward(p.ids)
    top2 = logits[0, -1].topk(2).indices.tolist()
    with linearised(loaded, "direct", p.ids):
        if contrast:
            target = Target("contrast", p.length - 1, top2[0], top2[1])
        else:
            target = Target("logit", p.length - 1, top2[0])
        a = attribute(loaded, [slot], p, target, "direct")
        c = check(loaded, [slot], a, k=8)
    assert len(c.singles) == 8 and any(abs(s.actual) > 1e-3 for s in c.singles)
    for s in c.singles:
        assert abs(s.predicted - s.actual) < 1e-4, s
    assert c.together is not None and abs(c.together.predicted - c.together.actual) < 1e-4
    (sc,) = c.sums
    assert abs(sc.remainder) < 1e-4 and abs(sc.delta) > 1e-2


def test_full_mode_at_last_layer_is_not_exact(loaded, sae_dirs) -> None:
    """Without the frozen norm the estimate is only linear: the remainder shows it (stated, not hidden)."""
    slot = _slot(loaded, sae_dirs, "model.layers.1")
    p = prompt_from_text(loaded.tokenizer, PROMPT)
    with torch.no_grad():
        t = make_target(loaded.tokenizer, p, loaded.forward(p.ids))
    a = attribute(loaded, [slot], p, t, "full")
    c = check(loaded, [slot], a, k=4)
    assert abs(c.sums[0].remainder) > 1e-3


def test_mid_layer_full_gradient_matches_finite_differences(loaded, sae_dirs) -> None:
    model64 = loaded.model.to(torch.float64)
    try:
        slot = _slot(loaded, sae_dirs, "model.layers.0", dtype="float64")
        p = prompt_from_text(loaded.tokenizer, PROMPT)
        with torch.no_grad():
            t = make_target(loaded.tokenizer, p, loaded.forward(p.ids))
        a = attribute(loaded, [slot], p, t, "full")
        nodes = a.saes[0]
        checked = 0
        for j in nodes.top(6):
            pos, feat, act = int(nodes.positions[j]), int(nodes.features[j]), float(nodes.activation[j])
            d = decoder_directions(slot.sae, torch.tensor([feat]))[0]
            eps = 1e-2  # the model's RMSNorm computes in float32 even in a float64 model: a step this size

            def value(alpha: float, pos=pos, d=d, act=act) -> float:
                def fn(x: torch.Tensor) -> torch.Tensor:
                    x = x.clone()
                    x[:, pos] += (alpha - 1.0) * act * d.to(x.dtype)
                    return x

                with torch.no_grad(), slot.site.intervene(fn):
                    return float(t.value(loaded.forward(p.ids))[0])

            fd = (value(1 + eps) - value(1 - eps)) / (2 * eps)
            assert abs(fd - float(nodes.attribution[j])) < 1e-3, (feat, pos, fd, float(nodes.attribution[j]))
            checked += 1
        assert checked == 6 and float(nodes.attribution.abs().max()) > 1e-3
    finally:
        model64.to(torch.float32)


@pytest.mark.parametrize("hook", ["model.layers.0", "model.layers.1"])
def test_the_eval_run_up_to_the_hook_once_is_the_three_full_passes_bit_for_bit(loaded, sae_dirs, hook) -> None:
    """``evaluate`` runs the model up to the SAE's hook once per batch and only the blocks after it for the SAE
    and zero-ablated passes (``forward_edited``): every figure must equal the three full passes' exactly, and
    the continued logits the full passes' logits."""
    slot = _slot(loaded, sae_dirs, hook)
    tok = loaded.tokenizer
    ids = torch.stack([prompt_from_text(tok, s).ids[0, :12] for s in (PROMPT, "The stock market fell sharply today")])
    seen: dict = {}
    edits = [splice_fn(slot, ids, seen, keep_error=False), splice_fn(slot, ids, {}, zero=True)]
    with torch.no_grad():
        passes = loaded.forward_edited(ids, slot.hook, edits)
        assert passes is not None  # a Llama model hooked on a whole block: the pass continues after the hook
        plain, sae_logits, zero_logits = passes
        assert torch.equal(plain, loaded.forward(ids))
        with spliced([slot], ids, keep_error=False):
            assert torch.equal(sae_logits, loaded.forward(ids))
        with spliced([slot], ids, zero=True):
            assert torch.equal(zero_logits, loaded.forward(ids))
    assert not torch.equal(sae_logits, plain) and not torch.equal(zero_logits, sae_logits)
    assert evaluate(loaded, slot, [ids, ids[:1]]) == evaluate(loaded, slot, [ids, ids[:1]], resume=False)
    assert loaded.forward_edited(ids, "model.layers.0.mlp", edits) is None  # inside a block: full passes


def test_delta_lm_loss_equals_direct_computation(loaded, sae_dirs) -> None:
    slot = _slot(loaded, sae_dirs, "model.layers.0")
    tok = loaded.tokenizer
    ids = torch.stack([prompt_from_text(tok, s).ids[0, :12] for s in (PROMPT, "The stock market fell sharply today")])
    ev = evaluate(loaded, slot, [ids])

    def recon(x: torch.Tensor) -> torch.Tensor:  # by hand: sae.decode(sae.encode(x)) except at BOS
        out = slot.sae.decode(slot.sae.encode(x))
        out[:, 0] = x[:, 0]
        return out

    with torch.no_grad():
        ce_clean = float(next_token_ce(loaded.forward(ids), ids).mean())
        with slot.site.intervene(recon):
            ce_sae = float(next_token_ce(loaded.forward(ids), ids).mean())
        x = slot.site.activations(ids)[:, 1:]
        xh = slot.sae.decode(slot.sae.encode(x))
        fve = 1 - float((x - xh).pow(2).sum()) / float((x - x.reshape(-1, x.shape[-1]).mean(0)).pow(2).sum())
        l0 = float((slot.sae.encode(x) != 0).float().sum(-1).mean())
    assert abs(ev.ce_clean - ce_clean) < 1e-5 and abs(ev.delta_lm_loss - (ce_sae - ce_clean)) < 1e-5
    assert abs(ev.fve - fve) < 1e-4 and abs(ev.l0 - l0) < 1e-6
    assert ev.kl > 0 and ev.loss_recovered is not None


def test_bad_targets_and_positions(loaded) -> None:
    tok = loaded.tokenizer
    p = prompt_from_text(tok, PROMPT)
    logits = torch.zeros(1, p.length, len(tok))
    with pytest.raises(AttributionInputError, match="not one"):
        make_target(tok, p, logits, target=" little cat")
    with pytest.raises(AttributionInputError, match="past the end"):
        make_target(tok, p, logits, position=p.length)
    with pytest.raises(AttributionInputError, match="over the limit"):
        prompt_from_text(tok, PROMPT * 20, limit=32)
    t = make_target(tok, p, logits, position=3)  # not the last: the token that follows
    assert t.kind == "logprob" and t.token == int(p.ids[0, 4])


def test_graph_across_saes_json_and_round_trip(loaded, sae_dirs, tmp_path: Path) -> None:
    slots = slots_in_order(loaded, [_slot(loaded, sae_dirs, h) for h in reversed(list(sae_dirs))])
    assert [s.hook for s in slots] == ["model.layers.0", "model.layers.1"]
    p = prompt_from_text(loaded.tokenizer, PROMPT)
    with torch.no_grad():
        t = make_target(loaded.tokenizer, p, loaded.forward(p.ids))
    with linearised(loaded, "full", p.ids):
        a = attribute(loaded, slots, p, t, "full")
        g = build_graph(loaded, slots, p, a, GraphConfig(max_feature_nodes=40, batch_size=7))
    data = g.to_json()
    assert data["metadata"]["prompt_tokens"] == p.tokens and data["metadata"]["prompt"] == PROMPT
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds == {"embedding", "cross layer transcoder", "mlp reconstruction error", "logit"}
    for n in data["nodes"]:
        assert all(f in n for f in REQUIRED_NODE_FIELDS)
    assert data["links"] and all(all(f in e for f in REQUIRED_LINK_FIELDS) for e in data["links"])
    layers = {n["node_id"]: n["layer"] for n in data["nodes"]}
    # edges go one layer up: tokens -> layer 0 -> layer 1 -> target
    order = {"E": 0, "0": 1, "1": 2, str(loaded.n_layers): 3}
    assert all(order[layers[e["target"]]] == order[layers[e["source"]]] + 1 for e in data["links"])
    out = save_graph(g, tmp_path / "g.json")
    back = load_graph(out)
    assert back.nodes == json.loads(out.read_text())["nodes"] and back.links == g.links
    assert back.to_json() == json.loads(json.dumps(data))


def _whole_graph(loaded, sae_dirs):
    """Both SAEs, full mode, every node and edge kept: (slots, prompt, attribution, graph)."""
    slots = [_slot(loaded, sae_dirs, h) for h in sae_dirs]
    p = prompt_from_text(loaded.tokenizer, PROMPT)
    with torch.no_grad():
        t = make_target(loaded.tokenizer, p, loaded.forward(p.ids))
    a = attribute(loaded, slots, p, t, "full")
    g = build_graph(loaded, slots, p, a, GraphConfig(max_feature_nodes=60, node_threshold=1.0, edge_threshold=1.0))
    return slots, p, a, g


def test_graph_edge_weights_match_ablation_between_layers(loaded, sae_dirs) -> None:
    """An edge SAE0 feature -> SAE1 feature is the linear effect on the later feature's activation."""
    slots, p, a, g = _whole_graph(loaded, sae_dirs)
    links = [
        e
        for e in g.links
        if e["source"].startswith("0_")
        and "error" not in e["source"]
        and e["target"].startswith("1_")
        and "error" not in e["target"]
    ]
    assert links
    e = max(links, key=lambda e: abs(e["weight"]))
    _, f1, p1 = (int(v) for v in e["target"].split("_"))
    fd = _edge_by_finite_differences(slots, a, p, e, lambda x1: float(slots[1].sae.encode(x1)[0, p1, f1]))
    assert abs(fd - e["weight"]) < 1e-3 * max(1.0, abs(fd))


def _edge_by_finite_differences(slots, a, p, edge, measure, eps: float = 1e-3) -> float:
    """d measure(x1) / d alpha at alpha = 1, the edge's source feature (at SAE 0) scaled by alpha, central
    differences: what the edge's weight claims."""
    _, f0, p0 = (int(v) for v in edge["source"].split("_"))
    d = decoder_directions(slots[0].sae, torch.tensor([f0]))[0]
    act0 = [r for r in a.ranked() if r["sae"] == slots[0].name and r["feature"] == f0 and r["position"] == p0][0]

    def value(alpha: float) -> float:
        def fn(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, p0] += (alpha - 1.0) * act0["activation"] * d
            return x

        with torch.no_grad(), slots[0].site.intervene(fn):
            return measure(slots[1].site.activations(p.ids))

    return (value(1 + eps) - value(1 - eps)) / (2 * eps)


def test_error_nodes_have_incoming_edges_equal_to_the_linear_effect(loaded, sae_dirs) -> None:
    """A residual SAE's error depends on the layers before it: an edge SAE0 feature -> SAE1 error node at p is the
    linear effect of the feature on that error node's attribution ``e1[p] . g1[p]`` (``g1`` held fixed)."""
    from featuredict.pipelines.model.saes import to_sae

    slots, p, a, g = _whole_graph(loaded, sae_dirs)
    into_err = [e for e in g.links if e["target"].startswith("1_error_") and e["source"].startswith("0_")]
    into_err = [e for e in into_err if "error" not in e["source"]]
    assert into_err and any(e["target"].startswith("0_error_") for e in g.links)  # errors at SAE 0 too (from tokens)
    e = max(into_err, key=lambda e: abs(e["weight"]))
    p1 = int(e["target"].split("_")[-1])
    g1 = to_sae(slots[1].sae, a.grads[slots[1].hook])[0, p1]
    nodes1 = next(n for n in a.saes if n.name == slots[1].name)

    def err_attr(x1: torch.Tensor) -> float:
        _, _, err = slots[1].parts(x1, nodes1.valid.reshape(1, -1))
        return float((err[0, p1] * g1).sum())

    fd = _edge_by_finite_differences(slots, a, p, e, err_attr)
    assert abs(fd - e["weight"]) < 1e-3 * max(1.0, abs(fd)), (fd, e["weight"])


def test_influence_sums_paths() -> None:
    # 0 -> 1 -> 3 (target), 0 -> 2 -> 3: A[target, source]
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[3, 1], A[3, 2], A[1, 0], A[2, 0] = 3.0, -1.0, 2.0, 5.0
    infl = influence_on(A, 3)
    assert infl.tolist() == pytest.approx([1.0, 0.75, 0.25, 0.0])


def test_chat_target_is_a_token_of_the_assistant_turn(loaded) -> None:
    from featuredict.pipelines.attribution.attribute import prompt_from_chat

    tok = loaded.tokenizer
    old = getattr(tok, "chat_template", None)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    try:
        msgs = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a time"}]
        p = prompt_from_chat(tok, msgs)
        ((start, end),) = p.assistant_spans
        assert "".join(p.tokens[start:end]).startswith("Once")
        logits = torch.zeros(1, p.length, len(tok))
        t = make_target(tok, p, logits)  # default: the reply's first token
        assert t.position == start - 1 and t.token == int(p.ids[0, start]) and t.kind == "logprob"
        t2 = make_target(tok, p, logits, position=start + 1)
        assert t2.token == int(p.ids[0, start + 2])
        with pytest.raises(AttributionInputError, match="not in an assistant turn"):
            make_target(tok, p, logits, position=1)
        a = attribute(loaded, [], p, t)
        assert a.target_value == pytest.approx(float(t.value(loaded.forward(p.ids).detach())[0]), abs=1e-5)
    finally:
        tok.chat_template = old


def test_quality_agrees_with_sae_lens_evals_when_no_position_is_an_outlier(loaded, sae_dirs) -> None:
    from featuredict.pipelines.attribution.quality import sae_lens_figures

    slot = _slot(loaded, sae_dirs, "model.layers.0")
    slot.outlier_norm_ratio = 0.0  # sae-lens has no outlier rule: compare on the same positions
    tok = loaded.tokenizer
    ids = torch.stack([prompt_from_text(tok, s).ids[0, :12] for s in (PROMPT, "The stock market fell sharply today")])
    ours = evaluate(loaded, slot, [ids])
    theirs = sae_lens_figures(loaded, slot, [ids])
    for k in ("ce_clean", "ce_sae", "delta_lm_loss", "kl"):
        assert getattr(ours, k) == pytest.approx(theirs[k], rel=1e-4, abs=1e-5), k
    # sae-lens zero-ablates every position, BOS too (its ignore_tokens apply to the SAE, not to the ablation):
    # the zero-ablation baseline, hence the fraction of loss recovered, differ by construction
    assert ours.ce_zero != pytest.approx(theirs["ce_zero"], rel=1e-3)
    assert not loaded.hook_module("model.layers.0")._forward_hooks  # sae-lens's proxy hook was removed


def test_transformer_lens_direct_mode_at_last_residual_is_exact(tl_runtime) -> None:  # noqa: F811
    """The TransformerLens backend: patterns and LayerNorm scales frozen through hook_pattern / hook_scale."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    loaded = tl_runtime.backend  # the tiny HookedTransformer of the tl_runtime fixture
    tok = loaded.tokenizer
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=4, metadata=SAEMetadata(model_name="tiny-tl", hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.normal_(0, 1.0 / 32**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
        sae.b_enc.zero_()
    slot = Slot("tl", sae, HookSite(loaded, hook))
    p = prompt_from_text(tok, PROMPT)
    with torch.no_grad():
        top = int(loaded.forward(p.ids)[0, -1].argmax())
    target = Target("logit", p.length - 1, top)
    with linearised(loaded, "direct", p.ids):
        a = attribute(loaded, [slot], p, target, "direct")
        c = check(loaded, [slot], a, k=5)
    assert any(abs(s.actual) > 1e-3 for s in c.singles)
    assert all(abs(s.predicted - s.actual) < 1e-4 for s in c.singles)
    assert abs(c.sums[0].remainder) < 1e-4
    full = check(loaded, [slot], attribute(loaded, [slot], p, target, "full"), k=5)
    assert abs(full.sums[0].remainder) > 1e-4  # LayerNorm not frozen: not linear
