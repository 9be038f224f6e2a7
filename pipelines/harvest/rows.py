"""The build's ``features`` and ``examples`` rows as Arrow data, made from the harvest state's arrays at once.

A per-example Python loop (trim, decode, append, per row) costs seconds per ten thousand rows; here each block of
features becomes one Arrow record batch with numpy gathers: the kept slots of every list are found with masks,
the windows trimmed of trailing padding by one length computation, and their token ids flattened into a
``LargeList`` by offsets. Token strings are decoded once per distinct id (a ``DictionaryArray`` over the block's
distinct ids, decoded to plain strings). DuckDB reads the batches directly (no pandas in between), one block at a
time, so memory holds one block of windows, not every example of the dictionary.

Rows and their order are those of the plain loop: per feature, its top examples by rank, then the interval
bands ``choose_bands`` picks, strongest band first, each by rank (``tests/pipelines/harvest/test_rows.py`` checks it row by row).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.layout import Knn, UmapJob
from featuredict.pipelines.harvest.stages import StageTimes, timed
from featuredict.pipelines.harvest.state import PAD_SLOT, HarvestState, choose_bands
from featuredict.pipelines.harvest.weights import decoder_knn, logit_effects, unembedding
from featuredict.pipelines.model.runtime import Runtime, token_strings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BLOCK_FEATURES = 2048  # features per examples record batch

EXAMPLES_SCHEMA = pa.schema(
    [
        ("sae_id", pa.string()),
        ("feature", pa.int32()),
        ("kind", pa.string()),
        ("band", pa.int32()),
        ("band_lo", pa.float32()),
        ("band_hi", pa.float32()),
        ("rank", pa.int32()),
        ("context_id", pa.int64()),
        ("max_act", pa.float32()),
        ("max_pos", pa.int32()),
        ("token_ids", pa.large_list(pa.int32())),
        ("tokens", pa.large_list(pa.string())),
        ("acts", pa.large_list(pa.float32())),
    ]
)


def _kept(ctx: np.ndarray) -> np.ndarray:
    """Bool mask of the slots shown: every slot of a list up to its first empty one (ctx -1), on the last axis."""
    return np.cumprod(ctx >= 0, axis=-1, dtype=np.int8).astype(bool)


def band_choice(n_bands: int, n_show: int) -> np.ndarray:
    """``[n_bands + 1, n_bands]`` bool: row p marks which of p populated bands (by rank, lowest first)
    ``choose_bands`` shows."""
    table = np.zeros((n_bands + 1, n_bands), dtype=bool)
    for p in range(n_bands + 1):
        table[p, choose_bands(list(range(p)), n_show)] = True
    return table


def _lengths(tok: np.ndarray) -> np.ndarray:
    """Length of each stored window without its trailing padding, at least 1 (``tok`` ``[N, T]``)."""
    T = tok.shape[1]
    nonpad = tok != PAD_SLOT
    last = T - 1 - np.argmax(nonpad[:, ::-1], axis=1)
    return np.where(nonpad.any(axis=1), last + 1, 1).astype(np.int64)


def _large_list(flat: pa.Array, lengths: np.ndarray) -> pa.LargeListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat)


def _token_texts(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> np.ndarray:
    """Display strings of ``ids`` (flat) as an object array, decoded once per distinct id."""
    uniq, inv = np.unique(ids, return_inverse=True)
    return np.array(token_strings(tokenizer, uniq.tolist()), dtype=object)[inv]


def _strings(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> pa.Array:
    """Display strings of ``ids`` (flat), decoded once per distinct id."""
    if ids.size == 0:
        return pa.array([], pa.string())
    uniq, inv = np.unique(ids, return_inverse=True)
    dictionary = pa.array(token_strings(tokenizer, uniq.tolist()), pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(inv.astype(np.int32)), dictionary).dictionary_decode()


def list_column(a: np.ndarray, kind: pa.DataType) -> pa.LargeListArray:
    """A 2-D array as one list per row."""
    n, w = a.shape
    return _large_list(pa.array(np.ascontiguousarray(a).reshape(-1), kind), np.full(n, w, dtype=np.int64))


class _Slots:
    """The shown slots of one block of features, gathered: feature, kind, band, rank and the slot arrays."""

    def __init__(self, state: HarvestState, f0: int, f1: int, choice: np.ndarray) -> None:
        cfg = state.cfg
        NB = cfg.n_bands
        top_ctx = state.top.ctx[f0:f1].numpy()
        tf, tr = np.nonzero(_kept(top_ctx))
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, Any, tuple[np.ndarray, ...]]] = [
            (tf, np.zeros_like(tf), tr, 0, state.top, (tf + f0, tr))
        ]
        smp_ctx = state.smp.ctx[f0:f1].numpy()
        if smp_ctx.shape[-1] > 0:
            populated = smp_ctx[:, :, 0] >= 0
            rank_in = np.cumsum(populated, axis=1) - 1
            show = populated & choice[populated.sum(axis=1)[:, None], np.clip(rank_in, 0, NB - 1)]
            ok = show[:, ::-1, None] & _kept(smp_ctx[:, ::-1, :])  # strongest band first
            sf, sb_rev, sr = np.nonzero(ok)
            sb = NB - 1 - sb_rev
            parts.append((sf, sb, sr, 1, state.smp, (sf + f0, sb, sr)))
        lists: tuple[list[Any], ...] = tuple([] for _ in range(9))
        feature, band, rank, kind, val, ctx, pos, tok, act = lists
        for f, b, r, k, slots, where in parts:
            feature.append(f + f0)
            band.append(b)
            rank.append(r)
            kind.append(np.full(len(f), k, dtype=np.int8))
            for out, a in ((val, slots.val), (ctx, slots.ctx), (pos, slots.pos), (tok, slots.tok), (act, slots.act)):
                out.append(a.numpy()[where])
        order = np.argsort(np.concatenate(feature), kind="stable")  # per feature: top rows, then interval rows
        self.feature, self.band, self.rank, self.kind = (np.concatenate(a)[order] for a in (feature, band, rank, kind))
        self.val, self.ctx, self.pos, self.tok, self.act = (np.concatenate(a)[order] for a in (val, ctx, pos, tok, act))
        self.n = _lengths(self.tok) if len(self.tok) else np.zeros(0, dtype=np.int64)


def example_batches(
    sae_id: str,
    tokenizer: PreTrainedTokenizerBase,
    state: HarvestState,
    n_bands_show: int,
    block: int = BLOCK_FEATURES,
) -> Iterator[pa.RecordBatch]:
    """The ``examples`` rows of every feature, ``block`` features per record batch (``EXAMPLES_SCHEMA``)."""
    cfg = state.cfg
    edges = cfg.band_edges().astype(np.float64)
    NB = cfg.n_bands
    lo_of = np.where(np.arange(NB) == 0, 0.0, edges[:NB])
    hi_of = np.where(np.arange(NB) == NB - 1, np.inf, edges[1 : NB + 1])
    choice = band_choice(NB, n_bands_show)
    for f0 in range(0, state.d_sae, block):
        s = _Slots(state, f0, min(f0 + block, state.d_sae), choice)
        top = s.kind == 0
        T = s.tok.shape[1] if s.tok.ndim == 2 else 0
        keep = np.arange(T)[None, :] < s.n[:, None]
        flat_ids = s.tok[keep]
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(np.full(len(s.feature), sae_id, dtype=object), pa.string()),
                pa.array(s.feature.astype(np.int32)),
                pa.array(np.where(top, "top", "interval").astype(object), pa.string()),
                pa.array(s.band.astype(np.int32)),
                pa.array(lo_of[s.band].astype(np.float32), mask=top),
                pa.array(hi_of[s.band].astype(np.float32), mask=top),
                pa.array(s.rank.astype(np.int32)),
                pa.array(s.ctx.astype(np.int64)),
                pa.array(s.val.astype(np.float32)),
                pa.array(s.pos.astype(np.int32)),
                _large_list(pa.array(flat_ids.astype(np.int32)), s.n),
                _large_list(_strings(tokenizer, flat_ids), s.n),
                _large_list(pa.array(s.act[keep].astype(np.float32)), s.n),
            ],
            schema=EXAMPLES_SCHEMA,
        )


def example_reader(
    sae_id: str, tokenizer: PreTrainedTokenizerBase, state: HarvestState, n_bands_show: int
) -> pa.RecordBatchReader:
    """``example_batches`` as a stream DuckDB can insert from (read once)."""
    return pa.RecordBatchReader.from_batches(EXAMPLES_SCHEMA, example_batches(sae_id, tokenizer, state, n_bands_show))


def top_text(
    tokenizer: PreTrainedTokenizerBase, state: HarvestState, pos_tokens: list[list[str]]
) -> tuple[list[list[str]], list[str]]:
    """Per feature: the token at the max position of each top example (``max_tokens``), and the search text:
    the text around those positions (6 tokens before, 2 after), then the promoted logit tokens."""
    F = state.d_sae
    ctx = state.top.ctx.numpy()
    f, r = np.nonzero(_kept(ctx))
    tok = state.top.tok.numpy()[f, r]  # [N, T]
    pos = state.top.pos.numpy()[f, r]
    n = _lengths(tok) if len(tok) else np.zeros(0, dtype=np.int64)
    T = tok.shape[1]
    max_tokens: list[list[str]] = [[] for _ in range(F)]
    parts: list[list[str]] = [[] for _ in range(F)]
    cols = np.arange(T)[None, :]
    lo = np.maximum(pos - 6, 0)[:, None]
    hi = np.minimum(pos + 3, n)[:, None]
    window = (cols >= lo) & (cols < hi)
    strs = _token_texts(tokenizer, tok[window]).tolist()
    ends = np.cumsum(window.sum(axis=1)).tolist()
    at = np.full(len(tok), "", dtype=object)
    inside = pos < n
    at[inside] = _token_texts(tokenizer, tok[np.arange(len(tok)), np.clip(pos, 0, T - 1)][inside])
    k = 0
    for fi, end, a in zip(f.tolist(), ends, at.tolist(), strict=True):
        parts[fi].append("".join(strs[k:end]).strip())
        max_tokens[fi].append(a)
        k = end
    text = [" | ".join(p + [" ".join(t.strip() for t in pos_tokens[fi])]) for fi, p in enumerate(parts)]
    return max_tokens, text


def feature_table(
    sae_id: str,
    state: HarvestState,
    w_dec: torch.Tensor,
    logits: tuple[np.ndarray, list[list[str]], np.ndarray, list[list[str]]],
    nbrs: tuple[np.ndarray, np.ndarray],
    layout: np.ndarray | None,
    max_tokens: list[list[str]],
    search_text: list[str],
) -> pa.Table:
    """The ``features`` rows. ``logits``: (pos_values, pos_tokens, neg_values, neg_tokens); ``nbrs``: (cos, idx)."""
    F = int(w_dec.shape[0])
    pv, pos_tokens, nv, neg_tokens = logits
    nc, nidx = nbrs
    mean = state.mean_act().numpy().astype(np.float32)
    w = w_dec.numpy().astype(np.float32)
    no_map = pa.nulls(F, pa.float32())
    return pa.table(
        {
            "sae_id": pa.array(np.full(F, sae_id, dtype=object), pa.string()),
            "feature": pa.array(np.arange(F, dtype=np.int32)),
            "max_act": pa.array(state.max_act.numpy().astype(np.float32)),
            "fire_count": pa.array(state.fire_count.numpy().astype(np.int64)),
            "density": pa.array(state.density().numpy().astype(np.float64)),
            "mean_act": pa.array(mean, mask=np.isnan(mean)),
            "dead": pa.array((state.fire_count == 0).numpy()),
            "hist_counts": list_column(state.hist.numpy().astype(np.int64), pa.int64()),
            "pos_tokens": pa.array(pos_tokens, pa.large_list(pa.string())),
            "pos_values": list_column(pv.astype(np.float32), pa.float32()),
            "neg_tokens": pa.array(neg_tokens, pa.large_list(pa.string())),
            "neg_values": list_column(nv.astype(np.float32), pa.float32()),
            "decoder": list_column(w, pa.float32()),
            "decoder_norm": pa.array(w_dec.norm(dim=1).numpy().astype(np.float32)),
            "neighbours": list_column(nidx.astype(np.int32), pa.int32()),
            "neighbour_cos": list_column(nc.astype(np.float32), pa.float32()),
            "umap_x": pa.array(layout[:, 0].astype(np.float32)) if layout is not None else no_map,
            "umap_y": pa.array(layout[:, 1].astype(np.float32)) if layout is not None else no_map,
            "max_tokens": pa.array(max_tokens, pa.large_list(pa.string())),
            "search_text": pa.array(search_text, pa.string()),
        }
    )


# ---- the tables of one build: features as Arrow, examples streamed ------------------------------------


class FeatureRows:
    """The ``features`` table of one build, finished when called: where the UMAP layout still runs in its own
    process (``UmapJob``), the call waits for it (the wait counts as the ``umap`` stage) and fills in
    ``umap_x`` / ``umap_y``. ``write_sae_tables`` calls it after it has written the examples, so the layout and
    the examples are made at the same time. ``close()`` stops a layout no longer wanted."""

    def __init__(self, table: pa.Table, job: UmapJob | None = None, stages: StageTimes | None = None) -> None:
        self.table, self.job, self.stages = table, job, stages

    def __call__(self) -> pa.Table:
        if self.job is not None:
            with timed(self.stages, "umap"):
                layout = self.job.result()
            self.job = None
            if layout is not None:
                for name, col in (("umap_x", layout[:, 0]), ("umap_y", layout[:, 1])):
                    at = self.table.schema.get_field_index(name)
                    self.table = self.table.set_column(at, name, pa.array(col.astype(np.float32)))
        return self.table

    def close(self) -> None:
        if self.job is not None:
            self.job.close()
            self.job = None


def feature_frames(
    rt: Runtime,
    state: HarvestState,
    cfg: BuildConfig,
    sae_id: str,
    stages: StageTimes | None = None,
    knn: Knn | None = None,
    layout: np.ndarray | None = None,
) -> tuple[FeatureRows, pa.RecordBatchReader]:
    """The ``features`` rows and a stream of the ``examples`` rows of one SAE (``pipelines.rows``; the stream is
    read once, by the write). ``knn`` (``decoder_knn``) and ``layout`` (the UMAP positions) are computed here when
    not given: the layout by a ``UmapJob`` (for large maps a process of its own) started once the logit effects
    are done, collected by the features (``FeatureRows``); ``stages`` gets the time of each step. Call
    ``close()`` on the features when the write does not happen."""
    w_dec = rt.sae.W_dec.detach().float().cpu()
    F = w_dec.shape[0]
    say = print if cfg.progress else (lambda *a, **k: None)
    if knn is None:
        with timed(stages, "neighbours"):
            knn = decoder_knn(rt, cfg)
    say(f"logit effects of {F:,} features...", flush=True)
    with timed(stages, "logit_effects"):  # both cores: before the layout starts
        w_u, centre = unembedding(rt)
        w_dir = w_dec - w_dec.mean(dim=1, keepdim=True) if centre else w_dec  # LayerNorm centres the residual
        pv, pi, nv, ni = logit_effects(w_dir, w_u.cpu(), cfg.n_logits)
    job = None
    if cfg.umap and layout is None:
        say(f"UMAP layout of {F:,} decoder vectors on their exact cosine neighbours...", flush=True)
        with timed(stages, "umap"):
            job = UmapJob(w_dec.numpy(), knn)
    if not cfg.umap:
        layout = None
    try:
        say("writing examples and features...", flush=True)
        with timed(stages, "rows"):
            feats, ex = _frames(
                rt, state, cfg, sae_id, w_dec, (pv, pi, nv, ni), knn.neighbours(cfg.n_neighbours), layout, stages
            )
    except BaseException:
        if job is not None:
            job.close()
        raise
    return FeatureRows(feats, job, stages), ex


def _frames(
    rt: Runtime,
    state: HarvestState,
    cfg: BuildConfig,
    sae_id: str,
    w_dec: torch.Tensor,
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    nbrs: tuple[np.ndarray, np.ndarray],
    layout: np.ndarray | None,
    stages: StageTimes | None,
) -> tuple[pa.Table, pa.RecordBatchReader]:
    pv, pi, nv, ni = logits
    tok = rt.tokenizer
    pos_tokens = [token_strings(tok, r) for r in pi.tolist()]
    neg_tokens = [token_strings(tok, r) for r in ni.tolist()]
    max_tokens, search_text = top_text(tok, state, pos_tokens)
    feats = feature_table(
        sae_id, state, w_dec, (pv.numpy(), pos_tokens, nv.numpy(), neg_tokens), nbrs, layout, max_tokens, search_text
    )
    # examples stream into the write a block of features at a time; their making still counts as ``rows``
    batches = _timed_batches(example_batches(sae_id, tok, state, cfg.n_interval_bands), stages)
    return feats, pa.RecordBatchReader.from_batches(EXAMPLES_SCHEMA, batches)


def _timed_batches(batches: Iterator[pa.RecordBatch], stages: StageTimes | None) -> Iterator[pa.RecordBatch]:
    while True:
        with timed(stages, "rows"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch
