"""Streaming, mergeable per-feature statistics over a corpus.

``HarvestState`` holds everything the build needs, in memory bounded by the dictionary, not the corpus
(O(d_sae x (k + bins x samples) x context) for the example windows):

- counts: valid tokens, contexts, per-feature firing counts and activation sums, max activation;
- a per-token activation histogram per feature over fixed log-spaced bin edges;
- top-k contexts per feature, ranked by the feature's max activation within the context, with the context's
  tokens and the feature's activation on every token;
- interval samples: per feature and fixed octave band of the context's max activation, a deterministic
  bottom-s sample by a hash key of (context content, feature) — a "bottom-k sketch";
- reconstruction sums for FVE and L0.

Example lists hold each distinct context window once. Corpora repeat text (boilerplate, licences, documents
quoted twice), and a top-20 list showing the same window five times wastes most of its rows. Windows are
identified by a 63-bit hash of their token ids. When two copies meet, in one batch, across batches or in
``merge``, one entry is kept under the smaller context id. Counts, sums and histograms still count every
copy: they describe the corpus as it is.

Every part is exactly mergeable: ``merge(update(A), update(B)) == update(A then B)`` for disjoint shards with
distinct context ids (ties in activation aside), because each part is a sum, a max, or a selection by a total
order on (value or key) that does not depend on arrival order, over distinct windows (a duplicate window is
kept once, under its smallest context id, whichever shard saw it). Sharding across machines is a wrapper that
runs ``update`` per shard (context ids offset per shard) and folds the states with ``merge``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import numpy as np
import torch

_M31 = (1 << 31) - 1
KEY_EMPTY = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class HarvestConfig:
    top_k: int = 20
    samples_per_band: int = 5
    band_lo_exp: int = -7  # interval bands are octaves [2^e, 2^(e+1)) for e in [band_lo_exp, band_hi_exp)
    band_hi_exp: int = 9
    hist_lo_exp: float = -10.0  # histogram: log2-spaced edges from 2^hist_lo_exp to 2^hist_hi_exp
    hist_hi_exp: float = 10.0
    hist_bins_per_octave: int = 4

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top-k must be at least 1 (got {self.top_k})")
        if self.samples_per_band < 0:
            raise ValueError(f"interval samples per band must be 0 or more (got {self.samples_per_band})")
        if (
            self.band_hi_exp <= self.band_lo_exp
            or self.hist_hi_exp <= self.hist_lo_exp
            or self.hist_bins_per_octave < 1
        ):
            raise ValueError("harvest bands and histogram need hi > lo and at least 1 bin per octave")

    @property
    def n_bands(self) -> int:
        return self.band_hi_exp - self.band_lo_exp

    def hist_edges(self) -> np.ndarray:
        n = int(round((self.hist_hi_exp - self.hist_lo_exp) * self.hist_bins_per_octave))
        return 2.0 ** np.linspace(self.hist_lo_exp, self.hist_hi_exp, n + 1)

    def band_edges(self) -> np.ndarray:
        return 2.0 ** np.arange(self.band_lo_exp, self.band_hi_exp + 1, dtype=np.float64)


def hash_key(ctx: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random int64 key in [0, 2^31) for (non-negative id, feature); broadcasts.

    The harvest keys interval samples by (window content hash, feature), so copies of a window share a key.
    """
    ctx = ctx.to(torch.int64)
    f = feature.to(torch.int64)
    h = ((ctx & _M31) * 0x9E3779B1 + (ctx >> 31) * 0x7FEB352D + f * 0x85EBCA6B + 0x632BE5AB) & _M31
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _M31
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _M31
    return h ^ (h >> 15)


def content_hash(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] token ids -> [B] int64 in [0, 2^63): equal windows get equal hashes (blake2b of the ids)."""
    rows = np.ascontiguousarray(tokens.detach().cpu().numpy().astype(np.int64))
    out = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") >> 1 for r in rows]
    return torch.tensor(out, dtype=torch.int64).reshape(tokens.shape[0])


def _dup_in_batch(chash: torch.Tensor, ctx_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: the window also occurs in the batch under a smaller context id (that copy is kept)."""
    return ((chash[:, None] == chash[None, :]) & (ctx_ids[None, :] < ctx_ids[:, None])).any(1)


@dataclass
class HarvestState:
    """Mergeable harvest state. Shapes: F = d_sae, K = top_k, NB = bands, S = samples, T = context, D = d_in."""

    cfg: HarvestConfig
    n_tokens: int = 0
    n_contexts: int = 0
    fire_count: torch.Tensor = field(default=None)  # [F] int64
    act_sum: torch.Tensor = field(default=None)  # [F] float64
    max_act: torch.Tensor = field(default=None)  # [F] float32
    hist: torch.Tensor = field(default=None)  # [F, n_hist_bins] int64
    top_val: torch.Tensor = field(default=None)  # [F, K] float32, descending; -inf = empty
    top_ctx: torch.Tensor = field(default=None)  # [F, K] int64; -1 = empty
    top_pos: torch.Tensor = field(default=None)  # [F, K] int64
    top_tok: torch.Tensor = field(default=None)  # [F, K, T] int32
    top_act: torch.Tensor = field(default=None)  # [F, K, T] float32
    top_hash: torch.Tensor = field(default=None)  # [F, K] int64 content hash of the window; -1 = empty
    smp_key: torch.Tensor = field(default=None)  # [F, NB, S] int64, ascending; KEY_EMPTY = empty
    smp_val: torch.Tensor = field(default=None)  # [F, NB, S] float32
    smp_ctx: torch.Tensor = field(default=None)  # [F, NB, S] int64
    smp_pos: torch.Tensor = field(default=None)  # [F, NB, S] int64
    smp_tok: torch.Tensor = field(default=None)  # [F, NB, S, T] int32
    smp_act: torch.Tensor = field(default=None)  # [F, NB, S, T] float32
    smp_hash: torch.Tensor = field(default=None)  # [F, NB, S] int64 content hash; -1 = empty
    sum_x: torch.Tensor = field(default=None)  # [D] float64
    sum_x2: float = 0.0  # sum of squared norms of x
    sse: float = 0.0  # sum of squared reconstruction errors
    l0_sum: float = 0.0  # sum over tokens of active-feature counts

    @classmethod
    def empty(cls, cfg: HarvestConfig, d_sae: int, context_size: int, d_in: int) -> HarvestState:
        F, K, T, NB, S = d_sae, cfg.top_k, context_size, cfg.n_bands, cfg.samples_per_band
        nh = len(cfg.hist_edges()) - 1
        return cls(
            cfg=cfg,
            fire_count=torch.zeros(F, dtype=torch.int64),
            act_sum=torch.zeros(F, dtype=torch.float64),
            max_act=torch.zeros(F, dtype=torch.float32),
            hist=torch.zeros(F, nh, dtype=torch.int64),
            top_val=torch.full((F, K), -torch.inf),
            top_ctx=torch.full((F, K), -1, dtype=torch.int64),
            top_pos=torch.zeros(F, K, dtype=torch.int64),
            top_tok=torch.zeros(F, K, T, dtype=torch.int32),
            top_act=torch.zeros(F, K, T, dtype=torch.float32),
            top_hash=torch.full((F, K), -1, dtype=torch.int64),
            smp_key=torch.full((F, NB, S), KEY_EMPTY, dtype=torch.int64),
            smp_val=torch.zeros(F, NB, S, dtype=torch.float32),
            smp_ctx=torch.full((F, NB, S), -1, dtype=torch.int64),
            smp_pos=torch.zeros(F, NB, S, dtype=torch.int64),
            smp_tok=torch.zeros(F, NB, S, T, dtype=torch.int32),
            smp_act=torch.zeros(F, NB, S, T, dtype=torch.float32),
            smp_hash=torch.full((F, NB, S), -1, dtype=torch.int64),
            sum_x=torch.zeros(d_in, dtype=torch.float64),
        )

    @property
    def d_sae(self) -> int:
        return int(self.fire_count.shape[0])

    # ---- derived quantities -----------------------------------------------------------------------------
    def density(self) -> torch.Tensor:
        return self.fire_count.double() / max(self.n_tokens, 1)

    def mean_act(self) -> torch.Tensor:
        """Mean activation over firing tokens, [F]; NaN where the feature never fired."""
        return torch.where(self.fire_count > 0, self.act_sum / self.fire_count.clamp(min=1).double(), torch.nan)

    def fve(self) -> float:
        n = max(self.n_tokens, 1)
        sst = self.sum_x2 - float((self.sum_x**2).sum()) / n
        return float("nan") if sst <= 0 else 1.0 - self.sse / sst

    def l0(self) -> float:
        return self.l0_sum / max(self.n_tokens, 1)

    def dead_fraction(self) -> float:
        return float((self.fire_count == 0).double().mean())


# ---- pure selection helpers -----------------------------------------------------------------------------


def _pick(a: torch.Tensor, b: torch.Tensor, from_a: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1: ``a[r, ia]`` where ``from_a`` else ``b[r, ib]``. a: [N, Ka, ...], b: [N, Kb, ...]."""
    extra = a.shape[2:]
    shape = (*ia.shape, *extra)

    def g(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return src.gather(1, idx.reshape(*idx.shape, *([1] * len(extra))).expand(shape))

    m = from_a.reshape(*from_a.shape, *([1] * len(extra)))
    return torch.where(m, g(a, ia), g(b, ib))


def _merge_rows(
    keys_a: torch.Tensor,
    keys_b: torch.Tensor,
    payload_a: list[torch.Tensor],
    payload_b: list[torch.Tensor],
    descending: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per row, keep the best ``Ka`` of the union of two candidate lists.

    keys_a: [N, Ka] (the kept size), keys_b: [N, Kb]. Ties are broken by list position (a first) with a
    stable sort, which is deterministic for a given arrival order.
    """
    ka = keys_a.shape[1]
    cat = torch.cat([keys_a, keys_b], dim=1)
    order = torch.sort(cat, dim=1, descending=descending, stable=True).indices[:, :ka]
    from_a = order < ka
    ia = order.clamp(max=ka - 1)
    ib = (order - ka).clamp(min=0)
    keys = cat.gather(1, order)
    return keys, [_pick(pa, pb, from_a, ia, ib) for pa, pb in zip(payload_a, payload_b, strict=True)]


# ---- streaming update -----------------------------------------------------------------------------------


@torch.no_grad()
def update(
    state: HarvestState,
    feats: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    ctx_ids: torch.Tensor,
    x: torch.Tensor | None = None,
    recon: torch.Tensor | None = None,
) -> None:
    """Fold one batch into ``state`` in place.

    feats: [B, T, F] SAE activations (must already be 0 where ``valid`` is False); tokens: [B, T] ids;
    valid: [B, T] bool (False at BOS/pad); ctx_ids: [B] int64 globally unique context ids;
    x, recon: [B, T, D] hook activations and SAE reconstructions (for FVE), optional.
    """
    cfg = state.cfg
    feats = feats.detach().float().cpu()
    tokens = tokens.cpu()
    valid = valid.cpu()
    ctx_ids = ctx_ids.cpu().to(torch.int64)
    B, T, F = feats.shape
    if T != state.top_tok.shape[2]:
        raise ValueError(f"batch context length {T} != state context length {state.top_tok.shape[2]}")

    n_valid = int(valid.sum())
    state.n_tokens += n_valid
    state.n_contexts += B

    # counts, sums, histogram over firing (token, feature) pairs
    nz = (feats > 0).nonzero(as_tuple=False)  # [nnz, 3]
    f_idx = nz[:, 2]
    vals = feats[nz[:, 0], nz[:, 1], f_idx]
    state.fire_count += torch.bincount(f_idx, minlength=F)
    state.act_sum += torch.bincount(f_idx, weights=vals.double(), minlength=F)
    state.l0_sum += float(nz.shape[0])
    edges = torch.as_tensor(cfg.hist_edges(), dtype=torch.float32)
    nh = edges.numel() - 1
    hb = (torch.bucketize(vals, edges, right=True) - 1).clamp(0, nh - 1)
    state.hist += torch.bincount(f_idx * nh + hb, minlength=F * nh).view(F, nh)

    if x is not None and recon is not None:
        xv = x.detach().double().cpu()[valid]
        rv = recon.detach().double().cpu()[valid]
        state.sum_x += xv.sum(0)
        state.sum_x2 += float((xv**2).sum())
        state.sse += float(((xv - rv) ** 2).sum())

    # per-context max
    seq_max, seq_pos = feats.max(dim=1)  # [B, F]
    state.max_act = torch.maximum(state.max_act, seq_max.max(0).values)

    chash = content_hash(tokens)
    dup = _dup_in_batch(chash, ctx_ids)
    _update_top(state, feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos)
    _update_samples(state, feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos)


def _select(
    keys_a: torch.Tensor, keys_b: torch.Tensor, descending: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the best ``Ka`` keys of the union of two lists, on keys only (payload is gathered lazily).

    keys_a: [N, Ka], keys_b: [N, Kb] -> (keys [N, Ka], from_a [N, Ka] bool, ia, ib): slot j holds
    ``a[ia[j]]`` where ``from_a[j]`` else ``b[ib[j]]``. Stable sort: ties keep list position (a first).
    """
    ka = keys_a.shape[1]
    cat = torch.cat([keys_a, keys_b], dim=1)
    order = torch.sort(cat, dim=1, descending=descending, stable=True).indices[:, :ka]
    return cat.gather(1, order), order < ka, order.clamp(max=ka - 1), (order - ka).clamp(min=0)


def _where(from_a: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = from_a.reshape(*from_a.shape, *([1] * (a.dim() - from_a.dim())))
    return torch.where(m, a, b)


def _update_top(state, feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos) -> None:
    K = state.top_val.shape[1]
    cand = seq_max.T  # [F, B]
    better = (cand > state.top_val[:, K - 1 : K]) & (cand > 0) & ~dup[None, :]
    # [F, K, B]: the row already holds the window; in-batch copies are skipped (the copy with the batch's
    # smallest id stands for them, so one write per held cell)
    held = (state.top_hash[:, :, None] == chash[None, None, :]) & ~dup[None, None, :]
    if held.any():  # keep the held entry, under the smaller context id
        f_i, k_i, b_i = held.nonzero(as_tuple=True)
        state.top_ctx[f_i, k_i] = torch.minimum(state.top_ctx[f_i, k_i], ctx_ids[b_i])
        better &= ~held.any(1)
    aff = better.any(1).nonzero(as_tuple=True)[0]  # [A]
    if aff.numel() == 0:
        return
    new_val = torch.where(better[aff], cand[aff], -torch.inf)  # [A, B]: column = batch index
    keys, from_a, ia, ib = _select(state.top_val[aff], new_val, descending=True)
    rows = aff[:, None]
    state.top_ctx[aff] = _where(from_a, state.top_ctx[rows, ia], ctx_ids[ib])
    state.top_pos[aff] = _where(from_a, state.top_pos[rows, ia], seq_pos[ib, rows])
    state.top_tok[aff] = _where(from_a, state.top_tok[rows, ia], tokens[ib].to(torch.int32))
    state.top_act[aff] = _where(from_a, state.top_act[rows, ia], feats[ib, :, rows])
    state.top_hash[aff] = _where(from_a, state.top_hash[rows, ia], chash[ib])
    state.top_val[aff] = keys


def _update_samples(state, feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos) -> None:
    cfg = state.cfg
    NB, S = cfg.n_bands, cfg.samples_per_band
    if S == 0:
        return
    b, f = ((seq_max > 0) & ~dup[:, None]).nonzero(as_tuple=True)  # candidates (context, feature)
    if b.numel() == 0:
        return
    v = seq_max[b, f]
    band = (torch.floor(torch.log2(v)).to(torch.int64) - cfg.band_lo_exp).clamp(0, NB - 1)
    key = hash_key(chash[b], f)
    slot = f * NB + band
    flat_key, flat_hash, flat_ctx = state.smp_key.view(-1, S), state.smp_hash.view(-1, S), state.smp_ctx.view(-1, S)
    held = flat_hash[slot] == chash[b][:, None]  # [n, S]: the slot already holds this window
    if held.any():
        c_i, s_i = held.nonzero(as_tuple=True)
        flat_ctx[slot[c_i], s_i] = torch.minimum(flat_ctx[slot[c_i], s_i], ctx_ids[b[c_i]])
    keep = (key < flat_key[slot, S - 1]) & ~held.any(1)
    if not keep.any():
        return
    b, f, v, key, slot = b[keep], f[keep], v[keep], key[keep], slot[keep]
    # rank candidates within their slot by key; keep at most S per slot
    order = torch.argsort(slot * (1 << 31) + key)
    b, f, v, key, slot = b[order], f[order], v[order], key[order], slot[order]
    uslot, counts = torch.unique_consecutive(slot, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(slot.numel()) - torch.repeat_interleave(starts, counts)
    ok = rank < S
    b, f, v, key, rank = b[ok], f[ok], v[ok], key[ok], rank[ok]
    row = torch.repeat_interleave(torch.arange(uslot.numel()), counts)[ok]
    U, T = uslot.numel(), tokens.shape[1]
    nk = torch.full((U, S), KEY_EMPTY, dtype=torch.int64)
    nv = torch.zeros(U, S)
    nc = torch.full((U, S), -1, dtype=torch.int64)
    npos = torch.zeros(U, S, dtype=torch.int64)
    ntok = torch.zeros(U, S, T, dtype=torch.int32)
    nact = torch.zeros(U, S, T)
    nh = torch.full((U, S), -1, dtype=torch.int64)
    nk[row, rank], nv[row, rank], nc[row, rank], nh[row, rank] = key, v, ctx_ids[b], chash[b]
    npos[row, rank] = seq_pos[b, f]
    ntok[row, rank] = tokens[b].to(torch.int32)
    nact[row, rank] = feats[b, :, f]
    fk, fv, fc, fp, fh = (
        t.view(-1, S) for t in (state.smp_key, state.smp_val, state.smp_ctx, state.smp_pos, state.smp_hash)
    )
    ftok, fact = state.smp_tok.view(-1, S, T), state.smp_act.view(-1, S, T)
    keys, from_a, ia, ib = _select(fk[uslot], nk, descending=False)
    rows, nrows = uslot[:, None], torch.arange(U)[:, None]
    fv[uslot] = _where(from_a, fv[rows, ia], nv[nrows, ib])
    fc[uslot] = _where(from_a, fc[rows, ia], nc[nrows, ib])
    fp[uslot] = _where(from_a, fp[rows, ia], npos[nrows, ib])
    ftok[uslot] = _where(from_a, ftok[rows, ia], ntok[nrows, ib])
    fact[uslot] = _where(from_a, fact[rows, ia], nact[nrows, ib])
    fh[uslot] = _where(from_a, fh[rows, ia], nh[nrows, ib])
    fk[uslot] = keys


# ---- merging shard states -------------------------------------------------------------------------------


def _fold_duplicates(
    hash_a: torch.Tensor, ctx_a: torch.Tensor, hash_b: torch.Tensor, ctx_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of two example lists, [N, Ka] and [N, Kb]: the windows b holds that a's row holds too.

    Returns (a's context ids, each lowered to its b twin's id where that is smaller, [N, Ka];
    mask over b's entries to drop, [N, Kb]).
    """
    same = (hash_a[:, :, None] == hash_b[:, None, :]) & (hash_b[:, None, :] >= 0)  # [N, Ka, Kb]
    twin = torch.where(same, ctx_b[:, None, :], torch.iinfo(torch.int64).max).amin(2)  # [N, Ka]
    return torch.minimum(ctx_a, twin), same.any(1)


def merge(a: HarvestState, b: HarvestState) -> HarvestState:
    """The state of one run over both shards (contexts must have distinct ids)."""
    if a.cfg != b.cfg or a.top_tok.shape != b.top_tok.shape:
        raise ValueError("cannot merge harvest states with different configs or shapes")
    F, NB, S, T = a.d_sae, a.cfg.n_bands, a.cfg.samples_per_band, a.top_tok.shape[2]
    # a window both shards hold is kept once (a's entry, under the smaller context id); b's copy is dropped
    a_top_ctx, b_dup = _fold_duplicates(a.top_hash, a.top_ctx, b.top_hash, b.top_ctx)
    top_val, (top_ctx, top_pos, top_tok, top_act, top_hash) = _merge_rows(
        a.top_val,
        b.top_val.masked_fill(b_dup, -torch.inf),
        [a_top_ctx, a.top_pos, a.top_tok, a.top_act, a.top_hash],
        [b.top_ctx, b.top_pos, b.top_tok, b.top_act, b.top_hash],
        descending=True,
    )
    if S == 0:  # no interval samples kept: the (empty) sample tensors stay as they are
        smp_key, smp = a.smp_key, [a.smp_val, a.smp_ctx, a.smp_pos, a.smp_tok, a.smp_act, a.smp_hash]
    else:
        smp_key, smp = _merge_samples(a, b)
    return HarvestState(
        cfg=a.cfg,
        n_tokens=a.n_tokens + b.n_tokens,
        n_contexts=a.n_contexts + b.n_contexts,
        fire_count=a.fire_count + b.fire_count,
        act_sum=a.act_sum + b.act_sum,
        max_act=torch.maximum(a.max_act, b.max_act),
        hist=a.hist + b.hist,
        top_val=top_val,
        top_ctx=top_ctx,
        top_pos=top_pos,
        top_tok=top_tok,
        top_act=top_act,
        top_hash=top_hash,
        smp_key=smp_key.view(F, NB, S),
        smp_val=smp[0].view(F, NB, S),
        smp_ctx=smp[1].view(F, NB, S),
        smp_pos=smp[2].view(F, NB, S),
        smp_tok=smp[3].view(F, NB, S, T),
        smp_act=smp[4].view(F, NB, S, T),
        smp_hash=smp[5].view(F, NB, S),
        sum_x=a.sum_x + b.sum_x,
        sum_x2=a.sum_x2 + b.sum_x2,
        sse=a.sse + b.sse,
        l0_sum=a.l0_sum + b.l0_sum,
    )


def _merge_samples(a: HarvestState, b: HarvestState) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Interval samples of both states, per (feature, band) row: flat key [F*NB, S] and payloads."""
    S, T = a.cfg.samples_per_band, a.top_tok.shape[2]
    a_smp_ctx, b_dup = _fold_duplicates(
        a.smp_hash.view(-1, S), a.smp_ctx.view(-1, S), b.smp_hash.view(-1, S), b.smp_ctx.view(-1, S)
    )
    return _merge_rows(
        a.smp_key.view(-1, S),
        b.smp_key.view(-1, S).masked_fill(b_dup, KEY_EMPTY),
        [
            a.smp_val.view(-1, S),
            a_smp_ctx,
            a.smp_pos.view(-1, S),
            a.smp_tok.view(-1, S, T),
            a.smp_act.view(-1, S, T),
            a.smp_hash.view(-1, S),
        ],
        [
            b.smp_val.view(-1, S),
            b.smp_ctx.view(-1, S),
            b.smp_pos.view(-1, S),
            b.smp_tok.view(-1, S, T),
            b.smp_act.view(-1, S, T),
            b.smp_hash.view(-1, S),
        ],
        descending=False,
    )


def state_dict(state: HarvestState) -> dict:
    """Plain dict (tensors + numbers) for ``torch.save``; ``from_state_dict`` restores it."""
    d = {f.name: getattr(state, f.name) for f in fields(state) if f.name != "cfg"}
    d["cfg"] = state.cfg.__dict__.copy()
    return d


def from_state_dict(d: dict) -> HarvestState:
    d = dict(d)
    cfg = HarvestConfig(**d.pop("cfg"))
    return HarvestState(cfg=cfg, **d)


def choose_bands(populated: list[int], n_show: int) -> list[int]:
    """Pick up to ``n_show`` populated band indices spread evenly from lowest to highest, descending."""
    if len(populated) <= n_show:
        return sorted(populated, reverse=True)
    idx = np.unique(np.round(np.linspace(0, len(populated) - 1, n_show)).astype(int))
    return sorted((populated[i] for i in idx), reverse=True)
