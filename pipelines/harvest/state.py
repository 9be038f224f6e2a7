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

The top-k lists and the interval bands are both ``ExampleSlots`` (one slot type: one absorb, one merge).

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
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch

from featuredict.pipelines.model.saes import Active

_M31 = (1 << 31) - 1
KEY_EMPTY = torch.iinfo(torch.int64).max
PAD_SLOT = -1  # token id stored for padding positions of a harvested window (pipelines.build writes it)


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
class ExampleSlots:
    """Example windows in fixed-size lists, best first: the top-k lists and every interval band use this type.
    ``absorb`` leaves the lists in no order (entries keep their slots) and ``order_`` puts them best first again
    (by rank, ties by the smaller context id); ``update`` does after each batch unless told not to, the harvest
    loop once at its end.

    Every array shares the leading dims (``[*L, n]``: lists of ``n`` slots; a batch of single candidates has no
    slot dim); ``tok`` and ``act`` add a trailing context dim ``T``. With ``key`` the slots rank by it ascending
    (interval samples: KEY_EMPTY = empty), without it by ``val`` descending (top-k: -inf = empty). Indexing,
    ``slots[idx]`` and ``slots[idx] = other``, acts on the leading dims of every array at once.
    """

    val: torch.Tensor  # float32: the feature's max activation in the window
    ctx: torch.Tensor  # int64 context id; -1 = empty
    pos: torch.Tensor  # int64 token position of that max
    tok: torch.Tensor  # [..., T] int32 the window's token ids
    act: torch.Tensor  # [..., T] float32 the feature's activation on every token
    hash: torch.Tensor  # int64 content hash of the window; -1 = empty
    key: torch.Tensor | None = None  # int64 sampling key, ascending; None: the slots rank by val, descending

    @classmethod
    def empty(cls, lead: tuple[int, ...], n: int, context_size: int, keyed: bool = False) -> ExampleSlots:
        s, t = (*lead, n), (*lead, n, context_size)
        return cls(
            val=torch.zeros(s) if keyed else torch.full(s, -torch.inf),
            ctx=torch.full(s, -1, dtype=torch.int64),
            pos=torch.zeros(s, dtype=torch.int64),
            tok=torch.zeros(t, dtype=torch.int32),
            act=torch.zeros(t, dtype=torch.float32),
            hash=torch.full(s, -1, dtype=torch.int64),
            key=torch.full(s, KEY_EMPTY, dtype=torch.int64) if keyed else None,
        )

    def arrays(self) -> dict[str, torch.Tensor]:
        """The arrays by field name (``key`` only where the slots have one)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExampleSlots:
        return ExampleSlots(**{name: fn(a) for name, a in self.arrays().items()})

    def __getitem__(self, idx: Any) -> ExampleSlots:
        return self._map(lambda a: a[idx])

    def __setitem__(self, idx: Any, other: ExampleSlots) -> None:
        for name, a in self.arrays().items():
            a[idx] = getattr(other, name)

    @property
    def rank(self) -> torch.Tensor:
        """What the slots are ordered by: ``key`` ascending, or else ``val`` descending."""
        return self.val if self.key is None else self.key

    def rows(self) -> ExampleSlots:
        """The lists as rows, [R, n] (``tok``, ``act``: [R, n, T]): views, so writes land in these arrays."""
        n_lead = self.ctx.dim() - 1
        return self._map(lambda a: a.view(-1, *a.shape[n_lead:]))

    def absorb(
        self,
        other: ExampleSlots,
        rows: torch.Tensor | None = None,
        other_rows: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> None:
        """In place: each list ``self[rows]`` comes to hold the best ``n`` entries of itself and
        ``other[other_rows]``, by rank and then by the smaller context id (``order_`` sorts by the same key).

        self: [R, n] rows (views into larger arrays are fine: the writes land there), other: [R', m] rows (only
        the entries that get in are read); rows and other_rows pick N lists of each (all when None), paired in
        order; ``drop`` [N, m] marks entries of ``other`` never to keep. The entries a list keeps stay in their
        slots and the ones that come in take the slots of those that go, so a list is in no order afterwards
        (``order_`` puts it best first): a full list that takes one new entry writes one window, not the ones
        below it.
        """
        n = self.ctx.shape[1]
        ra = torch.arange(self.ctx.shape[0]) if rows is None else rows
        rb = torch.arange(other.ctx.shape[0]) if other_rows is None else other_rows
        rank_b = other.rank[rb]
        if drop is not None:  # the worst rank there is, with a context id above any empty slot's: never kept
            rank_b = rank_b.masked_fill(drop, -torch.inf if self.key is None else KEY_EMPTY)
        best = _best_first(
            torch.cat([self.rank[ra], rank_b], 1), torch.cat([self.ctx[ra], other.ctx[rb]], 1), self.key is None
        )
        keep = torch.zeros(best.shape, dtype=torch.bool).scatter_(1, best[:, :n], True)
        out_i, out_j = (~keep[:, :n]).nonzero(as_tuple=True)  # the slots whose entries go, list by list
        in_i, in_j = keep[:, n:].nonzero(as_tuple=True)  # the entries that come in: as many per list
        if out_i.numel():
            for name, a in self.arrays().items():
                a[ra[out_i], out_j] = getattr(other, name)[rb[in_i], in_j]

    def order_(self) -> None:
        """In place: every list best first (by rank, then by the smaller context id; empty slots last). Only the
        lists out of that order are rewritten."""
        if self.ctx.shape[-1] == 0:  # lists of no slots (no interval samples)
            return
        lists = self.rows()
        perm = _best_first(lists.rank, lists.ctx, self.key is None)
        moved = (perm != torch.arange(perm.shape[1])).any(1).nonzero(as_tuple=True)[0]
        if moved.numel():
            src = perm[moved]
            for a in lists.arrays().values():
                a[moved] = a[moved[:, None], src]

    def merge(self, other: ExampleSlots) -> ExampleSlots:
        """Both sets of lists (same shapes) in one, list by list, as new arrays; neither input changes.

        A window both lists hold is kept once: self's entry, under the smaller context id.
        """
        if self.ctx.shape[-1] == 0:
            return self
        out = self._map(torch.clone)
        a, b = out.rows(), other.rows()
        held = _fold_twins(a.ctx, a.hash, b.hash, b.ctx)
        a.absorb(b, drop=held)
        out.order_()
        return out


def _best_first(rank: torch.Tensor, ctx: torch.Tensor, descending: bool) -> torch.Tensor:
    """Per row, the column order best first: by ``rank`` (descending or not), ties by the smaller ``ctx``."""
    by_ctx = torch.argsort(ctx, dim=1, stable=True)
    return by_ctx.gather(1, torch.argsort(rank.gather(1, by_ctx), dim=1, descending=descending, stable=True))


def _fold_twins(
    ctx: torch.Tensor,
    hash_a: torch.Tensor,
    hash_b: torch.Tensor,
    ctx_b: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Windows that candidate lists b share with held lists a, row by row: a's entry takes the smaller id.

    ctx: [R, Ka] context ids of the held lists, lowered in place (contiguous); hash_a: [N, Ka] the hashes of
    lists ``rows`` of them (all R when None); hash_b, ctx_b: [N, Kb] the candidates (hash -1: none).
    Returns the mask over b of windows a already holds, [N, Kb].
    """
    same = (hash_a[:, :, None] == hash_b[:, None, :]) & (hash_b[:, None, :] >= 0)  # [N, Ka, Kb]
    if same.any():
        i, k, j = same.nonzero(as_tuple=True)
        r = i if rows is None else rows[i]
        ctx.view(-1).scatter_reduce_(0, r * ctx.shape[1] + k, ctx_b[i, j], "amin")
    return same.any(1)


@dataclass
class HarvestState:
    """Mergeable harvest state. Shapes: F = d_sae, K = top_k, NB = bands, S = samples, T = context, D = d_in."""

    cfg: HarvestConfig
    fire_count: torch.Tensor  # [F] int64
    act_sum: torch.Tensor  # [F] float64
    max_act: torch.Tensor  # [F] float32
    hist: torch.Tensor  # [F, n_hist_bins] int64
    top: ExampleSlots  # [F, K] top-k contexts by max activation, descending
    smp: ExampleSlots  # [F, NB, S] interval samples by hash key, ascending
    sum_x: torch.Tensor  # [D] float64
    n_tokens: int = 0
    n_contexts: int = 0
    sum_x2: float = 0.0  # sum of squared norms of x
    sse: float = 0.0  # sum of squared reconstruction errors
    l0_sum: float = 0.0  # sum over tokens of active-feature counts
    harvest_seconds: float = 0.0  # wall time spent harvesting, summed over shards

    @classmethod
    def empty(cls, cfg: HarvestConfig, d_sae: int, context_size: int, d_in: int) -> HarvestState:
        F, T = d_sae, context_size
        nh = len(cfg.hist_edges()) - 1
        return cls(
            cfg=cfg,
            fire_count=torch.zeros(F, dtype=torch.int64),
            act_sum=torch.zeros(F, dtype=torch.float64),
            max_act=torch.zeros(F, dtype=torch.float32),
            hist=torch.zeros(F, nh, dtype=torch.int64),
            top=ExampleSlots.empty((F,), cfg.top_k, T),
            smp=ExampleSlots.empty((F, cfg.n_bands), cfg.samples_per_band, T, keyed=True),
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

    def order_(self) -> None:
        """Every example list best first (``ExampleSlots.order_``), after updates with ``ordered=False``."""
        self.top.order_()
        self.smp.order_()


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
    active: Active | None = None,
    ordered: bool = True,
) -> None:
    """Fold one batch into ``state`` in place.

    feats: [B, T, F] SAE activations (must already be 0 where ``valid`` is False); tokens: [B, T] ids;
    valid: [B, T] bool (False at BOS/pad); ctx_ids: [B] int64 globally unique context ids;
    x, recon: [B, T, D] hook activations and SAE reconstructions (for FVE), optional. ``active``: the
    non-zero entries of ``feats`` (``Runtime.encode_active``), all positive (a TopK SAE's), when the caller
    has them: the counts and per-context maxima are then read from them instead of two passes over ``feats``
    (the same state, bit for bit: tested). ``ordered`` False leaves the example lists in no order (a loop over
    many batches orders them once at the end, ``HarvestState.order_``; the harvest loop does).
    """
    cfg = state.cfg
    feats = feats.detach().float().cpu()
    tokens = tokens.cpu()
    valid = valid.cpu()
    ctx_ids = ctx_ids.cpu().to(torch.int64)
    B, T, F = feats.shape
    if T != state.top.tok.shape[-1]:
        raise ValueError(f"batch context length {T} != state context length {state.top.tok.shape[-1]}")

    n_valid = int(valid.sum())
    state.n_tokens += n_valid
    state.n_contexts += B

    # counts, sums, histogram over firing (token, feature) pairs
    if active is None:
        nz = (feats > 0).nonzero(as_tuple=False)  # [nnz, 3]
        b_idx, t_idx, f_idx = nz.unbind(1)
        vals = feats[b_idx, t_idx, f_idx]
    else:
        token, f_idx, vals = (a.cpu() for a in active)
        vals = vals.float()
        firing = vals > 0  # as the dense path: firing means positive
        if not bool(firing.all()):
            token, f_idx, vals = token[firing], f_idx[firing], vals[firing]
        b_idx, t_idx = token // T, token % T
    state.fire_count += torch.bincount(f_idx, minlength=F)
    state.act_sum += torch.bincount(f_idx, weights=vals.double(), minlength=F)
    state.l0_sum += float(f_idx.shape[0])
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

    # per-context max and its first position
    if active is None:
        seq_max, seq_pos = feats.max(dim=1)  # [B, F]
    else:
        seq_max, seq_pos = _context_max(b_idx * F + f_idx, t_idx, vals, B, T, F)
    state.max_act = torch.maximum(state.max_act, seq_max.max(0).values)

    chash = content_hash(tokens)
    dup = _dup_in_batch(chash, ctx_ids)
    batch = _Batch(feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos)
    _update_top(state, batch)
    _update_samples(state, batch)
    if ordered:
        state.order_()


def _context_max(
    cell: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor, B: int, T: int, F: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``feats.max(dim=1)`` ([B, F] values, first position of each) from the positive entries ``vals`` of
    ``feats`` [B, T, F] at (context, feature) ``cell`` = b * F + f and position ``pos``: 0 and 0 where none."""
    seq_max = torch.zeros(B * F, dtype=vals.dtype).scatter_reduce_(0, cell, vals, "amax")
    at_max = vals == seq_max[cell]
    first = torch.full((B * F,), T, dtype=torch.int64).scatter_reduce_(0, cell[at_max], pos[at_max], "amin")
    return seq_max.view(B, F), first.masked_fill_(first == T, 0).view(B, F)


class _Batch(NamedTuple):
    """One batch as the example updates read it: ``feats`` [B, T, F], ``tokens`` [B, T], ``ctx_ids`` [B], the
    window hashes ``chash`` [B] and in-batch copies ``dup`` [B], per-context max ``seq_max`` [B, F] at ``seq_pos``."""

    feats: torch.Tensor
    tokens: torch.Tensor
    ctx_ids: torch.Tensor
    chash: torch.Tensor
    dup: torch.Tensor
    seq_max: torch.Tensor
    seq_pos: torch.Tensor


def _update_top(state: HarvestState, batch_in: _Batch) -> None:
    feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos = batch_in
    top = state.top  # [F, K]
    B, T, F = feats.shape
    # the batch as one [B] candidate list per feature, all views (no [F, B, T] copy); in-batch copies of a window
    # get no hash and are skipped: the copy with the batch's smallest id stands for them
    batch = ExampleSlots(
        val=seq_max.T,
        ctx=ctx_ids.expand(F, B),
        pos=seq_pos.T,
        tok=tokens.to(torch.int32).expand(F, B, T),
        act=feats.permute(2, 0, 1),
        hash=chash.masked_fill(dup, -1).expand(F, B),
    )
    held = _fold_twins(top.ctx, top.hash, batch.hash, batch.ctx)  # held windows stay, under the smaller id
    better = (batch.val > top.val.amin(1, keepdim=True)) & (batch.val > 0) & ~dup & ~held  # above the worst held
    aff = better.any(1).nonzero(as_tuple=True)[0]  # [A]
    if aff.numel():
        top.absorb(batch, rows=aff, other_rows=aff, drop=~better[aff])


def _update_samples(state: HarvestState, batch_in: _Batch) -> None:
    feats, tokens, ctx_ids, chash, dup, seq_max, seq_pos = batch_in
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
    smp = state.smp.rows()  # [F * NB, S] views
    # each candidate against its slot's list: a held window stays, under the smaller id
    assert smp.hash is not None and smp.key is not None  # interval samples keep their hash keys and hashes
    held = _fold_twins(smp.ctx, smp.hash[slot], chash[b][:, None], ctx_ids[b][:, None], rows=slot)[:, 0]
    keep = (key < smp.key[slot].amax(1)) & ~held  # below the worst key held
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
    new = ExampleSlots.empty((uslot.numel(),), S, tokens.shape[1], keyed=True)
    new[row, rank] = ExampleSlots(
        val=v,
        ctx=ctx_ids[b],
        pos=seq_pos[b, f],
        tok=tokens[b].to(torch.int32),
        act=feats[b, :, f],
        hash=chash[b],
        key=key,
    )
    smp.absorb(new, rows=uslot)


# ---- merging shard states -------------------------------------------------------------------------------


def merge(a: HarvestState, b: HarvestState) -> HarvestState:
    """The state of one run over both shards (contexts must have distinct ids)."""
    if a.cfg != b.cfg or a.top.tok.shape != b.top.tok.shape:
        raise ValueError("cannot merge harvest states with different configs or shapes")
    return HarvestState(
        cfg=a.cfg,
        n_tokens=a.n_tokens + b.n_tokens,
        n_contexts=a.n_contexts + b.n_contexts,
        fire_count=a.fire_count + b.fire_count,
        act_sum=a.act_sum + b.act_sum,
        max_act=torch.maximum(a.max_act, b.max_act),
        hist=a.hist + b.hist,
        top=a.top.merge(b.top),
        smp=a.smp.merge(b.smp),
        sum_x=a.sum_x + b.sum_x,
        sum_x2=a.sum_x2 + b.sum_x2,
        sse=a.sse + b.sse,
        l0_sum=a.l0_sum + b.l0_sum,
        harvest_seconds=a.harvest_seconds + b.harvest_seconds,
    )


_SLOTS = ("top", "smp")


def state_dict(state: HarvestState) -> dict:
    """Plain dict (tensors + numbers) for ``torch.save``, example arrays flat (``top_val``, ``smp_key``, ...);
    ``from_state_dict`` restores it."""
    d: dict = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if f.name in _SLOTS:
            d.update({f"{f.name}_{name}": a for name, a in value.arrays().items()})
        elif f.name != "cfg":
            d[f.name] = value
    d["cfg"] = state.cfg.__dict__.copy()
    return d


def from_state_dict(d: dict[str, Any]) -> HarvestState:
    d = dict(d)
    cfg = HarvestConfig(**d.pop("cfg"))
    slots: dict[str, Any] = {
        s: ExampleSlots(**{k.removeprefix(f"{s}_"): d.pop(k) for k in list(d) if k.startswith(f"{s}_")}) for s in _SLOTS
    }
    return HarvestState(cfg=cfg, **slots, **d)


def choose_bands(populated: list[int], n_show: int) -> list[int]:
    """Pick up to ``n_show`` populated band indices spread evenly from lowest to highest, descending."""
    if len(populated) <= n_show:
        return sorted(populated, reverse=True)
    idx = np.unique(np.round(np.linspace(0, len(populated) - 1, n_show)).astype(int))
    return sorted((populated[i] for i in idx), reverse=True)
