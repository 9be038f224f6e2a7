"""Harvest math against brute force on random data, and exact merging of shard states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featuredict.pipelines.harvest.state import (
    ExampleSlots,
    HarvestConfig,
    HarvestState,
    choose_bands,
    content_hash,
    from_state_dict,
    hash_key,
    merge,
    state_dict,
    update,
)

N, T, F, D = 37, 12, 9, 5
CFG = HarvestConfig(top_k=4, samples_per_band=3, band_lo_exp=-3, band_hi_exp=3)


# (copy, original) context pairs for the duplicate-window tests: within one batch, across batches and across
# every shard split used below, with copies both after and before (smaller index than) the original
DUPS = [(1, 0), (2, 0), (9, 3), (12, 27), (20, 5), (33, 8), (36, 30), (15, 16)]


def _data(seed: int = 0, dups: bool | str = False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.relu(torch.randn(N, T, F, generator=g) * 2 - 1.5)
    valid = torch.ones(N, T, dtype=torch.bool)
    valid[:, 0] = False  # BOS
    lengths = torch.randint(3, T + 1, (N,), generator=g)
    valid &= torch.arange(T)[None, :] < lengths[:, None]  # right padding
    feats = feats * valid[..., None]
    tokens = torch.randint(0, 100, (N, T), generator=g)
    x = torch.randn(N, T, D, generator=g)
    recon = x + 0.3 * torch.randn(N, T, D, generator=g)
    if dups:  # the same window twice: same tokens, so the same activations everywhere
        for j, i in DUPS:
            feats[j], tokens[j], valid[j], x[j], recon[j] = feats[i], tokens[i], valid[i], x[i], recon[i]
    ctx = torch.arange(N, dtype=torch.int64) * 7 + 3  # arbitrary unique ids
    if dups == "descending-ids":  # later copies of a window carry smaller ids: the held entry's id must drop
        ctx = ctx.flip(0)
    return feats, tokens, valid, ctx, x, recon


def _windows(tokens: torch.Tensor, ctx: torch.Tensor) -> list[tuple[int, int]]:
    """Brute-force dedupe: (representative index, smallest context id) per distinct token window."""
    groups: dict[tuple, list[int]] = {}
    for i in range(tokens.shape[0]):
        groups.setdefault(tuple(tokens[i].tolist()), []).append(i)
    return [(g[0], min(int(ctx[i]) for i in g)) for g in groups.values()]


def _run(sl: slice, batch: int = 5, data=None) -> HarvestState:
    feats, tokens, valid, ctx, x, recon = data or _data()
    st = HarvestState.empty(CFG, F, T, D)
    idx = torch.arange(N)[sl]
    for i in range(0, len(idx), batch):
        j = idx[i : i + batch]
        update(st, feats[j], tokens[j], valid[j], ctx[j], x[j], recon[j])
    return st


def test_counts_hist_density_fve_against_brute_force():
    feats, tokens, valid, ctx, x, recon = _data()
    st = _run(slice(None))
    assert st.n_tokens == int(valid.sum())
    fire = feats > 0
    assert torch.equal(st.fire_count, fire.sum((0, 1)))
    torch.testing.assert_close(st.act_sum, feats.double().sum((0, 1)))
    torch.testing.assert_close(st.max_act, feats.amax((0, 1)))
    torch.testing.assert_close(st.density(), fire.sum((0, 1)).double() / valid.sum())
    edges = CFG.hist_edges()
    for f in range(F):
        v = feats[..., f][fire[..., f]].numpy()
        b = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)
        assert np.array_equal(st.hist[f].numpy(), np.bincount(b, minlength=len(edges) - 1))
    xv, rv = x[valid].double(), recon[valid].double()
    fve = 1 - ((xv - rv) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()
    assert st.fve() == pytest.approx(float(fve), rel=1e-9)
    assert st.l0() == pytest.approx(float(fire.sum() / valid.sum()))


@pytest.mark.parametrize("dups", [False, True, "descending-ids"])
def test_topk_against_brute_force(dups):
    data = _data(dups=dups)
    feats, tokens, valid, ctx, _, _ = data
    st = _run(slice(None), data=data)
    seq_max, seq_pos = feats.max(1)
    wins = _windows(tokens, ctx)
    assert len(wins) == (N - len(DUPS) if dups else N)
    min_ctx = dict(wins)
    for f in range(F):
        order = [i for i, _ in wins if seq_max[i, f] > 0]
        order = sorted(order, key=lambda i: -float(seq_max[i, f]))[: CFG.top_k]
        got = [int(c) for c in st.top.ctx[f] if c >= 0]
        assert got == [min_ctx[i] for i in order]  # each window once, under its smallest context id
        for r, i in enumerate(order):
            assert float(st.top.val[f, r]) == float(seq_max[i, f])
            assert int(st.top.pos[f, r]) == int(seq_pos[i, f])
            assert torch.equal(st.top.tok[f, r], tokens[i].to(torch.int32))
            assert torch.equal(st.top.act[f, r], feats[i, :, f])


@pytest.mark.parametrize("dups", [False, True, "descending-ids"])
def test_interval_samples_against_brute_force(dups):
    data = _data(dups=dups)
    feats, tokens, valid, ctx, _, _ = data
    st = _run(slice(None), data=data)
    seq_max = feats.max(1).values
    chash = content_hash(tokens)
    for f in range(F):
        for band in range(CFG.n_bands):
            cands = []
            for i, c in _windows(tokens, ctx):
                v = float(seq_max[i, f])
                if v <= 0:
                    continue
                b = min(max(int(np.floor(np.log2(v))) - CFG.band_lo_exp, 0), CFG.n_bands - 1)
                if b == band:
                    cands.append((int(hash_key(chash[i : i + 1], torch.tensor([f]))[0]), c, i))
            want = sorted(cands)[: CFG.samples_per_band]
            got = [int(c) for c in st.smp.ctx[f, band] if c >= 0]
            assert got == [c for _, c, _ in want]
            for r, (_, _, i) in enumerate(want):
                assert torch.equal(st.smp.act[f, band, r], feats[i, :, f])


def test_content_hash_identifies_windows():
    t = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1], [1, 2, 4]])
    h = content_hash(t)
    assert h[0] == h[1] and len({int(x) for x in h}) == 3
    assert bool((h >= 0).all())


def _assert_states_equal(got: HarvestState, want: HarvestState) -> None:
    """Example arrays bit for bit, slot type by slot type; counts exactly; float sums to rounding."""
    for slots in ("top", "smp"):
        g, w = getattr(got, slots).arrays(), getattr(want, slots).arrays()
        assert g.keys() == w.keys(), slots
        for name, a in w.items():
            assert a.dtype == g[name].dtype and torch.equal(a, g[name]), f"{slots}.{name}"
    got_d = state_dict(got)
    for name, a in state_dict(want).items():
        b = got.cfg if name == "cfg" else got_d[name]
        if name == "cfg":
            assert b == want.cfg
            continue
        if isinstance(a, torch.Tensor):
            if a.dtype.is_floating_point:
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-9, msg=name)
            else:
                assert torch.equal(a, b), name
        elif isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-12), name
        else:
            assert a == b, name


@pytest.mark.parametrize("dups", [False, True, "descending-ids"])
@pytest.mark.parametrize("split", [10, 18, 30])
def test_merge_of_shards_equals_single_run(split, dups):
    data = _data(dups=dups)
    whole = _run(slice(None), data=data)
    merged = merge(_run(slice(0, split), batch=3, data=data), _run(slice(split, None), batch=4, data=data))
    assert merged.top.key is None and merged.smp.key is not None  # top-k ranks by value, samples by key
    assert (whole.top.ctx >= 0).sum() > F and (whole.smp.ctx >= 0).sum() > F  # both kinds of slot are filled
    _assert_states_equal(merged, whole)


@pytest.mark.parametrize("dups", [False, True])
def test_merge_of_three_shards_either_way_round_equals_single_run(dups):
    data = _data(dups=dups)
    whole = _run(slice(None), data=data)
    a, b, c = (_run(s, batch=2, data=data) for s in (slice(0, 9), slice(9, 25), slice(25, None)))
    _assert_states_equal(merge(merge(a, b), c), whole)
    _assert_states_equal(merge(a, merge(c, b)), whole)


def _slots(rows: list[list[tuple[float, int, int]]], n: int, keyed: bool) -> ExampleSlots:
    """Lists of (rank value, context id, window id) entries, best first; the window id stands for the content
    (hash and tokens), the rank value for the key or activation; padded with empty slots to ``n``."""
    s = ExampleSlots.empty((len(rows),), n, 2, keyed=keyed)
    for r, entries in enumerate(rows):
        for j, (v, c, w) in enumerate(entries):
            if keyed:
                s.key[r, j] = int(v)
            s.val[r, j], s.ctx[r, j], s.pos[r, j], s.hash[r, j] = v, c, w % 2, w
            s.tok[r, j] = torch.tensor([w, w + 1], dtype=torch.int32)
            s.act[r, j] = torch.tensor([v / 2, v])
    return s


@pytest.mark.parametrize("keyed", [False, True])
def test_example_slots_merge_against_brute_force(keyed):
    # one list per row; windows 5, 6 and 9 are in both lists (b's copy of 6 under a smaller id, of 5 a larger)
    g = np.random.default_rng(1)
    n = 4
    a_rows, b_rows = [], []
    for _ in range(6):
        wins = g.permutation(np.arange(20))
        vals = {int(w): float(v) for w, v in zip(wins, g.permutation(np.arange(1, 21)), strict=True)}
        a_w = [5, 6, 9, *[int(w) for w in wins if w not in (5, 6, 9)][: int(g.integers(0, 2))]]
        b_w = [5, 6, 9, *[int(w) for w in wins if w not in a_w][: int(g.integers(0, n - 2))]]
        a_ids = {w: 100 + w for w in a_w}
        b_ids = {w: (100 + w) + (1 if w == 5 else -50) for w in b_w}
        order = (lambda e: e[0]) if keyed else (lambda e: -e[0])
        a_rows.append(sorted([(vals[w], a_ids[w], w) for w in a_w], key=order))
        b_rows.append(sorted([(vals[w], b_ids[w], w) for w in b_w], key=order))
    a, b = _slots(a_rows, n, keyed), _slots(b_rows, n, keyed)
    a_before = {k: t.clone() for k, t in a.arrays().items()}
    m = a.merge(b)
    assert all(torch.equal(t, a_before[k]) for k, t in a.arrays().items())  # the inputs are left alone
    for r in range(len(a_rows)):
        best: dict[int, tuple[float, int, int]] = {}
        for v, c, w in a_rows[r] + b_rows[r]:
            best[w] = (v, min(c, best[w][1]) if w in best else c, w)
        want = sorted(best.values(), key=(lambda e: e[0]) if keyed else (lambda e: -e[0]))[:n]
        want_slots = _slots([want], n, keyed)
        for name, t in want_slots.arrays().items():
            assert torch.equal(getattr(m, name)[r], t[0]), (r, name)


def test_harvest_seconds_is_a_field_that_sums_over_shards():
    a, b = _run(slice(0, 20)), _run(slice(20, None))
    assert a.harvest_seconds == 0.0
    a.harvest_seconds, b.harvest_seconds = 1.5, 2.25
    m = merge(a, b)
    assert m.harvest_seconds == 3.75 and merge(m, HarvestState.empty(CFG, F, T, D)).harvest_seconds == 3.75
    d = state_dict(m)
    assert d["harvest_seconds"] == 3.75 and from_state_dict(d).harvest_seconds == 3.75
    del d["harvest_seconds"]  # a state saved before the field existed loads with none recorded
    assert from_state_dict(d).harvest_seconds == 0.0


@pytest.mark.parametrize("dups", [False, True])
def test_merge_is_order_independent_and_roundtrips(dups):
    data = _data(dups=dups)
    a, b = _run(slice(0, 20), data=data), _run(slice(20, None), data=data)
    ab, ba = merge(a, b), merge(b, a)
    assert torch.equal(ab.top.ctx, ba.top.ctx)
    assert torch.equal(ab.smp.ctx, ba.smp.ctx)
    assert torch.equal(ab.top.hash, ba.top.hash)
    a_before = state_dict(a)
    merge(a, b)
    for name, v in state_dict(a).items():  # merging leaves its inputs alone
        assert torch.equal(v, a_before[name]) if isinstance(v, torch.Tensor) else v == a_before[name], name
    d = state_dict(ab)
    assert {"top_val", "top_hash", "smp_key", "smp_act"} <= d.keys() and "top_key" not in d  # flat, saved names
    _assert_states_equal(from_state_dict(d), ab)


def test_merge_rejects_mismatched_configs():
    a = HarvestState.empty(CFG, F, T, D)
    b = HarvestState.empty(HarvestConfig(top_k=2), F, T, D)
    with pytest.raises(ValueError):
        merge(a, b)


def test_choose_bands_spreads_across_range():
    assert choose_bands([1, 2], 5) == [2, 1]
    assert choose_bands(list(range(10)), 5) == [9, 7, 4, 2, 0]


def test_held_window_takes_the_smallest_id_of_several_later_copies():
    # a window held under id 10, then two copies in one later batch (ids 3 and 7): one entry, under id 3
    cfg = HarvestConfig(top_k=2, samples_per_band=1)
    tok = torch.tensor([[5, 6, 7]])
    act = torch.tensor([[[0.0], [1.0], [0.5]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    for later in ([3, 7], [7, 3]):
        st = HarvestState.empty(cfg, 1, 3, 2)
        update(st, act, tok, valid, torch.tensor([10]))
        update(st, act.repeat(2, 1, 1), tok.repeat(2, 1), valid.repeat(2, 1), torch.tensor(later))
        assert st.top.ctx.tolist() == [[3, -1]]
        assert sorted(int(c) for c in st.smp.ctx.flatten() if c >= 0) == [3]


def test_no_interval_samples_and_bad_configs():
    cfg = HarvestConfig(top_k=2, samples_per_band=0)
    feats, tokens, valid, ctx, x, recon = _data()
    a, b = HarvestState.empty(cfg, F, T, D), HarvestState.empty(cfg, F, T, D)
    update(a, feats[:10], tokens[:10], valid[:10], ctx[:10])
    update(b, feats[10:], tokens[10:], valid[10:], ctx[10:])
    m = merge(a, b)
    assert m.smp.key.shape == (F, cfg.n_bands, 0) and (m.top.ctx >= 0).any()
    for bad in ({"top_k": 0}, {"top_k": -1}, {"samples_per_band": -1}):
        with pytest.raises(ValueError):
            HarvestConfig(**bad)


@pytest.mark.parametrize("ties", [False, True])
def test_update_from_active_entries_is_the_dense_update_bit_for_bit(ties):
    """The harvest passes the encoder's non-zero entries; counts, maxima and their first positions read from
    them must give the state the dense passes give. ``ties``: activations on a coarse grid, so a feature's max
    occurs at several positions of a context (the first one is the stored position)."""
    from featuredict.pipelines.model.saes import active_entries

    data = list(_data(seed=3, dups=True))
    if ties:
        data[0] = torch.round(data[0] * 2) / 2
    feats, tokens, valid, ctx, x, recon = data
    dense, sparse = HarvestState.empty(CFG, F, T, D), HarvestState.empty(CFG, F, T, D)
    for i in range(0, N, 6):
        j = slice(i, i + 6)
        update(dense, feats[j], tokens[j], valid[j], ctx[j], x[j], recon[j])
        update(sparse, feats[j], tokens[j], valid[j], ctx[j], x[j], recon[j], active_entries(feats[j]))
    if ties:  # the grid does make ties at the max
        assert (feats == feats.amax(1, keepdim=True)).logical_and(feats > 0).sum(1).max() > 1
    a, b = state_dict(dense), state_dict(sparse)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


@pytest.mark.parametrize("dups", [False, True, "descending-ids"])
def test_lists_ordered_once_at_the_end_are_the_lists_ordered_after_every_batch(dups):
    """The harvest loop leaves the example lists in no order between batches (entries keep their slots; new ones
    take the slots of those that go) and orders them once at the end: the state must be the one ordering after
    every batch gives, bit for bit, with ties in value (a coarse grid) ranked by the smaller context id."""
    data = list(_data(seed=5, dups=dups))
    data[0] = torch.round(data[0] * 2) / 2  # ties in a feature's max between contexts
    feats, tokens, valid, ctx, x, recon = data
    each, once = HarvestState.empty(CFG, F, T, D), HarvestState.empty(CFG, F, T, D)
    unordered = False
    for i in range(0, N, 6):
        j = slice(i, i + 6)
        update(each, feats[j], tokens[j], valid[j], ctx[j], x[j], recon[j])
        update(once, feats[j], tokens[j], valid[j], ctx[j], x[j], recon[j], ordered=False)
        v = once.top.val
        unordered |= bool((v[:, 1:] > v[:, :-1]).any())
    assert unordered  # the lists did go out of order in between
    once.order_()
    a, b = state_dict(each), state_dict(once)
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    val, c = each.top.val, each.top.ctx
    tie = (val[:, 1:] == val[:, :-1]) & (c[:, 1:] >= 0)
    assert tie.any() and bool((c[:, 1:][tie] > c[:, :-1][tie]).all())  # equal values: the smaller context id first
    assert bool((val[:, 1:] <= val[:, :-1]).all())  # best first
