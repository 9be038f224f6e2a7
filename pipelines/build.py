"""``featuredict build``: (causal LM, SAE, corpus) -> DuckDB feature dictionary.

Steps: load model + SAE at the SAE's hook; the exact decoder-cosine kNN from the weights (``pipelines.layout``);
stream the corpus as contexts; run the model only up to the hook, encode with the SAE and fold each batch into
a mergeable ``HarvestState``; then logit effects and a UMAP layout on the kNN graph, the rows as Arrow
(``pipelines.rows``), and write everything for this SAE into the database. Each stage is timed
(``pipelines.stages``): the summary's second line and ``saes.stage_seconds``. The write goes to a temporary file (other SAEs and all user tables copied over from the existing
file) that replaces the database only on success, so a failed or interrupted build leaves it intact.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from featuredict.db.filelock import replacing
from featuredict.db.schema import copy_kept_rows, create_schema

from . import __version__
from .corpus import CorpusError, CorpusSpec, batch_contexts, iter_contexts, iter_documents, validate
from .distributed import DistributedError, RayOptions, check_reachable, map_shards, ray_session, require_ray
from .harvest import PAD_SLOT, HarvestConfig, HarvestState, from_state_dict, merge, state_dict, update
from .layout import UMAP_NEIGHBOURS, Knn, cosine_knn, umap_layout
from .models import dtype_name
from .rows import EXAMPLES_SCHEMA, example_batches, feature_table, top_text
from .runtime import Runtime, load_runtime, token_strings
from .saes import SaeSource
from .stages import StageTimes, timed

log = logging.getLogger(__name__)
FVE_WARN = 0.5


@dataclass
class BuildConfig:
    model: str
    sae: SaeSource
    corpus: CorpusSpec
    db: str = "featuredict.duckdb"
    sae_name: str | None = None  # sae_id in the database; default derived from model + hook + d_sae
    hook: str | None = None  # override the SAE's hook_name (rarely right)
    context_size: int = 64
    max_tokens: int = 200_000
    batch_size: int = 16
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    n_interval_bands: int = 5
    n_logits: int = 10
    n_neighbours: int = 10
    umap: bool = True
    outlier_norm_ratio: float = 10.0  # see Runtime.outlier_norm_ratio; 0 disables
    device: str | None = None
    dtype: str | None = None  # model dtype; None: float32 on CPU, bfloat16 (else float16) on CUDA
    corpus_description: str | None = None
    progress: bool = True


@dataclass(kw_only=True)
class BuildResult:
    db: Path
    sae_id: str
    n_tokens: int
    n_contexts: int
    d_sae: int
    fve: float
    l0: float
    dead_fraction: float
    seconds: float
    tokens_per_s: float
    dtype: str  # what the model ran in
    shards: int = 0  # Ray shards the harvest ran in (0: in this process)
    stages: StageTimes = field(default_factory=StageTimes)

    def summary(self) -> str:
        """One line of results, then (when stages were timed) a ``stages: ...`` line."""
        where = f" over {self.shards} Ray shards" if self.shards else ""
        first = (
            f"{self.sae_id}: {self.n_tokens:,} tokens in {self.n_contexts:,} contexts, d_sae={self.d_sae}, "
            f"FVE={self.fve:.3f}, L0={self.l0:.1f}, dead={self.dead_fraction:.1%}, "
            f"{self.seconds:.1f}s ({self.tokens_per_s:,.0f} tok/s harvest{where}, model in {self.dtype}) -> {self.db}"
        )
        line = self.stages.line()
        return f"{first}\nstages: {line}" if line else first


# ---- harvesting -----------------------------------------------------------------------------------------


def harvest_batches(
    rt: Runtime,
    cfg: BuildConfig,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ctx_offset: int = 0,
    max_tokens: int | None = None,
    on_tokens: Callable[[int], None] | None = None,
    stages: StageTimes | None = None,
) -> HarvestState:
    """Fold ``(ids, mask)`` batches through model + SAE into a new HarvestState.

    Context ids run on from ``ctx_offset``; the loop stops after the batch that reaches ``max_tokens`` counted
    tokens (None: after the last batch). ``on_tokens(n)`` gets the tokens counted so far after every batch.
    ``stages`` (when given) gets the time in ``forward``, ``encode`` and ``update``, and the loop's as ``harvest``.
    """
    d_in = int(rt.sae.cfg.d_in)
    state = HarvestState.empty(cfg.harvest, rt.d_sae, cfg.context_size, d_in)
    seen = 0
    ctx_next = ctx_offset
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids, mask in batches:
            x, f, valid = rt.encode(ids, mask, stages)
            with timed(stages, "encode"):
                recon = rt.decode(f)  # FVE reads valid positions only, where f is not zeroed
            ctx_ids = torch.arange(ctx_next, ctx_next + ids.shape[0], dtype=torch.int64)
            ctx_next += ids.shape[0]
            # padding is stored as PAD_SLOT (not a token id), so stored windows end exactly where the text does
            with timed(stages, "update"):
                update(state, f, ids.masked_fill(~mask.bool(), PAD_SLOT), valid, ctx_ids, x, recon)
            seen += int(valid.sum())  # the budget counts the tokens statistics count (no BOS, pad or outliers)
            if on_tokens is not None:
                on_tokens(seen)
            if max_tokens is not None and seen >= max_tokens:
                break
    state.harvest_seconds = time.perf_counter() - t0
    if stages is not None:
        stages.add("harvest", state.harvest_seconds)
    return state


def harvest_corpus(
    rt: Runtime, cfg: BuildConfig, ctx_offset: int = 0, stages: StageTimes | None = None
) -> HarvestState:
    """Stream the corpus through model + SAE into a HarvestState (context ids start at ``ctx_offset``)."""
    contexts = iter_contexts(iter_documents(cfg.corpus), rt.tokenizer, cfg.context_size, rt.prepend_bos)
    batches = batch_contexts(contexts, cfg.batch_size, cfg.context_size, rt.pad_id)
    bar = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress)
    on_tokens = lambda n: bar.update(n - bar.n)  # noqa: E731
    state = harvest_batches(rt, cfg, batches, ctx_offset, cfg.max_tokens, on_tokens, stages)
    bar.total = max(bar.total, bar.n)  # the last batch may overshoot the token budget
    bar.refresh()
    bar.close()
    if state.n_contexts == 0:
        raise ValueError(f"the corpus {cfg.corpus.describe()} gave no tokens")
    return state


# ---- sharded harvest over Ray ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextSpan:
    """A run of consecutive corpus contexts, made of whole batches of the single-process build.

    Where it starts: document ``doc`` (0-based), after ``skip`` contexts of that document. Its contexts keep
    their single-process ids, ``ctx_offset`` onwards. ``bound``: an upper bound on the tokens it counts (BOS and
    padding excluded; norm outliers are only known once the model has run).
    """

    doc: int
    skip: int
    ctx_offset: int
    n_contexts: int
    bound: int

    def __str__(self) -> str:
        return f"contexts {self.ctx_offset}-{self.ctx_offset + self.n_contexts - 1}"


class SpanPlanner:
    """Cuts the corpus, in order, into whole batches, each with its bound on counted tokens (tokenizer only)."""

    def __init__(self, rt: Runtime, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.special = rt.special_ids()
        self.exhausted = False
        self.n_contexts = 0
        self._it = self._contexts(rt, cfg)

    @staticmethod
    def _contexts(rt: Runtime, cfg: BuildConfig) -> Iterator[tuple[int, int, list[int]]]:
        for d, doc in enumerate(iter_documents(cfg.corpus)):
            for k, ids in enumerate(iter_contexts(iter([doc]), rt.tokenizer, cfg.context_size, rt.prepend_bos)):
                yield d, k, ids

    def take(self, budget: int) -> list[ContextSpan]:
        """The next batches, one span each, until their bounds reach ``budget`` or the corpus ends.

        Each bound is at least what its batch counts, so a build that still needs ``budget`` tokens harvests
        every batch returned (only the last can reach the budget).
        """
        out: list[ContextSpan] = []
        total = 0
        while total < budget and not self.exhausted:
            batch = list(islice(self._it, self.cfg.batch_size))
            if len(batch) < self.cfg.batch_size:
                self.exhausted = True
            if not batch:
                break
            bound = sum(sum(1 for t in ids if t not in self.special) for _, _, ids in batch)
            out.append(ContextSpan(batch[0][0], batch[0][1], self.n_contexts, len(batch), bound))
            self.n_contexts += len(batch)
            total += bound
        return out


def join_spans(batches: list[ContextSpan], n: int) -> list[ContextSpan]:
    """Consecutive batch spans joined into at most ``n`` contiguous spans of near-equal batch counts."""
    out = []
    for part in np.array_split(np.arange(len(batches)), min(n, len(batches))):
        first, group = batches[int(part[0])], [batches[int(i)] for i in part]
        n_ctx = sum(b.n_contexts for b in group)
        out.append(ContextSpan(first.doc, first.skip, first.ctx_offset, n_ctx, sum(b.bound for b in group)))
    return out


def span_batches(rt: Runtime, cfg: BuildConfig, span: ContextSpan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The span's batches, exactly as the single-process build cuts them (documents before it are not tokenized)."""
    docs = islice(iter_documents(cfg.corpus), span.doc, None)
    contexts = iter_contexts(docs, rt.tokenizer, cfg.context_size, rt.prepend_bos)
    return batch_contexts(
        islice(contexts, span.skip, span.skip + span.n_contexts), cfg.batch_size, cfg.context_size, rt.pad_id
    )


def harvest_span(
    span: ContextSpan, report: Callable[[int], None], cfg: BuildConfig, threads: int = 1
) -> dict[str, Any]:
    """One Ray task: load model + SAE once, harvest the span, return the state as plain arrays (and the dtype
    the model ran in, under ``model_dtype``)."""
    torch.set_num_threads(max(1, threads))
    rt = load_runtime(cfg.model, cfg.sae, hook_name=cfg.hook, device=cfg.device, dtype=cfg.dtype)
    rt.outlier_norm_ratio = cfg.outlier_norm_ratio
    state = harvest_batches(rt, cfg, span_batches(rt, cfg, span), span.ctx_offset, on_tokens=report)
    if state.n_contexts != span.n_contexts:
        raise CorpusError(
            f"the corpus {cfg.corpus.describe()} changed while building: {span} gave {state.n_contexts} contexts"
        )
    wire = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state_dict(state).items()}
    return wire | {"model_dtype": dtype_name(rt.loaded.dtype)}


def _fold_state(acc: HarvestState | None, wire: dict[str, Any]) -> HarvestState:
    """Merge one shard's arrays into the running state (the first one is copied: Ray hands out read-only buffers)."""
    wire = {k: v for k, v in wire.items() if k != "model_dtype"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.from_numpy on a read-only buffer: merge only reads it
        tensors = {
            k: torch.from_numpy(np.array(v) if acc is None else v) if isinstance(v, np.ndarray) else v
            for k, v in wire.items()
        }
    state = from_state_dict(tensors)
    return state if acc is None else merge(acc, state)


def for_workers(cfg: BuildConfig) -> BuildConfig:
    """``cfg`` with local model and corpus paths made absolute (workers may run in another folder)."""

    def local(spec: str) -> str:
        p = Path(spec).expanduser()
        return str(p.resolve()) if p.exists() else spec

    return replace(cfg, model=local(cfg.model), corpus=replace(cfg.corpus, source=local(cfg.corpus.source)))


def harvest_on_ray(rt: Runtime, cfg: BuildConfig, opts: RayOptions) -> tuple[HarvestState, dict[str, Any]]:
    """The single-process harvest of ``cfg``, split into contiguous shards run as Ray tasks and merged exactly.

    Shards are whole batches of the single-process build with their context ids, so merging their states gives
    the single-process state. The token budget is met in rounds: a round takes the next batches whose token
    bounds (tokenizer only) just reach the tokens still missing, all of which the single-process build would
    harvest, and splits them into shards; a further round runs only when norm outliers left it short.
    Returns the state and what ran (address, shards, resources, rounds, the dtype the shards' model ran in).
    """
    want_gpu = cfg.device is None or str(cfg.device).startswith("cuda")
    with ray_session(opts) as ray:
        n_shards, gpus, cpus = opts.resolve(ray, want_gpu)
        if cfg.device is not None and str(cfg.device).startswith("cuda") and gpus == 0:
            raise DistributedError(f"--device {cfg.device} needs --gpus-per-shard above 0 (the cluster shows no GPU)")
        fn = partial(harvest_span, cfg=for_workers(cfg), threads=int(cpus))
        planner = SpanPlanner(rt, cfg)
        bar = tqdm(
            total=cfg.max_tokens,
            unit="tok",
            unit_scale=True,
            desc=f"harvest on Ray ({n_shards} shards)",
            disable=not cfg.progress,
        )
        state: HarvestState | None = None
        rounds = used = 0
        dtypes: set[str] = set()

        def fold(acc: HarvestState | None, wire: dict[str, Any]) -> HarvestState:
            dtypes.add(wire["model_dtype"])
            return _fold_state(acc, wire)

        while state is None or (state.n_tokens < cfg.max_tokens and not planner.exhausted):
            counted = 0 if state is None else state.n_tokens
            spans = join_spans(planner.take(cfg.max_tokens - counted), n_shards)
            if not spans:
                break
            rounds, used = rounds + 1, max(used, len(spans))
            state = map_shards(
                fn,
                spans,
                fold,
                opts,
                gpus_per_shard=gpus,
                cpus_per_shard=cpus,
                initial=state,
                on_progress=lambda n, c=counted: bar.update(c + n - bar.n),
            )
        bar.total = max(bar.total, bar.n)
        bar.refresh()
        bar.close()
    if state is None or state.n_contexts == 0:
        raise ValueError(f"the corpus {cfg.corpus.describe()} gave no tokens")
    if len(dtypes) > 1:  # e.g. the default dtype of different GPUs: activations would not be comparable
        raise DistributedError(f"shards ran the model in {' and '.join(sorted(dtypes))}: pick one with --dtype")
    ran = {
        "dtype": dtypes.pop(),
        "address": opts.address,
        "shards": used,  # fewer than asked when the budget has fewer batches
        "gpus_per_shard": gpus,
        "cpus_per_shard": cpus,
        "rounds": rounds,
    }
    return state, ran


# ---- weight-based statistics ----------------------------------------------------------------------------


def unembedding(rt: Runtime) -> tuple[torch.Tensor, bool]:
    """``([d_model, vocab] unembedding with the final norm's scale folded in, centre)``.

    ``centre`` is True when the final norm is a LayerNorm, which subtracts the mean over ``d_model`` before
    scaling: decoder directions must then be centred too (RMSNorm does not centre). The norm's 1/rms factor
    is positive and the same for every token, so it does not change which tokens a direction promotes.
    """
    w_u = rt.loaded.unembedding_matrix()
    norm = rt.loaded.final_norm()
    name = type(norm).__name__.lower() if norm is not None else ""
    centre = "layernorm" in name and "rms" not in name
    scale = None
    if norm is not None:
        scale = getattr(norm, "weight", None)
        if scale is None:
            scale = getattr(norm, "w", None)  # TransformerLens LayerNorm / RMSNorm
    if isinstance(scale, torch.Tensor) and scale.shape == (w_u.shape[0],):
        scale = scale.detach().float().to(w_u.device)
        if type(norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm multiplies by (1 + weight)
            scale = 1.0 + scale
        w_u = w_u * scale[:, None]
    return w_u, centre


def logit_effects(
    w_dec: torch.Tensor, w_u: torch.Tensor, n: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-n promoted and suppressed tokens of each decoder direction through the unembedding.

    w_dec: [d_sae, d_model], w_u: [d_model, vocab] -> (pos_val, pos_idx, neg_val, neg_idx), each [d_sae, n];
    neg_* ascending (most suppressed first).
    """
    outs = []
    n = min(n, w_u.shape[1])
    for i in range(0, w_dec.shape[0], chunk):
        logits = w_dec[i : i + chunk].float() @ w_u
        pv, pi = logits.topk(n, dim=1)
        nv, ni = logits.topk(n, dim=1, largest=False)
        outs.append((pv, pi, nv, ni))
    return tuple(torch.cat(t) for t in zip(*outs, strict=True))  # type: ignore[return-value]


# ---- tables ---------------------------------------------------------------------------------------------


def decoder_knn(rt: Runtime, cfg: BuildConfig) -> Knn:
    """Exact cosine kNN of the decoder directions, wide enough for the neighbours table and UMAP's graph."""
    w_dec = rt.sae.W_dec.detach().float().cpu().numpy()
    return cosine_knn(w_dec, max(cfg.n_neighbours, UMAP_NEIGHBOURS - 1))


def feature_frames(
    rt: Runtime,
    state: HarvestState,
    cfg: BuildConfig,
    sae_id: str,
    stages: StageTimes | None = None,
    knn: Knn | None = None,
    layout: np.ndarray | None = None,
) -> tuple[pa.Table, pa.RecordBatchReader]:
    """The ``features`` rows and a stream of the ``examples`` rows of one SAE (``pipelines.rows``; the stream is
    read once, by the write). ``knn`` (``decoder_knn``) and ``layout`` (the UMAP positions) are computed here when
    not given; ``stages`` gets the time of each step."""
    w_dec = rt.sae.W_dec.detach().float().cpu()
    F = w_dec.shape[0]
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"logit effects and decoder-cosine neighbours of {F:,} features...", flush=True)
    with timed(stages, "logit_effects"):
        w_u, centre = unembedding(rt)
        w_dir = w_dec - w_dec.mean(dim=1, keepdim=True) if centre else w_dec  # LayerNorm centres the residual
        pv, pi, nv, ni = logit_effects(w_dir, w_u.cpu(), cfg.n_logits)
    if knn is None:
        with timed(stages, "neighbours"):
            knn = decoder_knn(rt, cfg)
    nc, nidx = knn.neighbours(cfg.n_neighbours)
    if cfg.umap and layout is None:
        say(f"UMAP layout of {F:,} decoder vectors on their exact cosine neighbours...", flush=True)
        with timed(stages, "umap"):
            layout = umap_layout(w_dec.numpy(), knn)
    if not cfg.umap:
        layout = None
    say("writing examples and features...", flush=True)
    with timed(stages, "rows"):
        return _frames(rt, state, cfg, sae_id, w_dec, (pv, pi, nv, ni), (nc, nidx), layout, stages)


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


# ---- atomic database write ------------------------------------------------------------------------------


def write_database(
    path: Path,
    sae_row: dict[str, Any],
    feats: pd.DataFrame | pa.Table,
    ex: pd.DataFrame | pa.Table | pa.RecordBatchReader,
    stages: StageTimes | None = None,
    started: float | None = None,
) -> None:
    """Write one SAE's tables into ``path`` atomically, keeping other SAEs and every user table.

    With ``stages``, the write's time is added as ``write`` and the stored row gets the final ``stage_seconds``
    (and ``build_seconds``, counted from ``started``, a ``time.perf_counter()`` value) before the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    for p in (tmp, Path(str(tmp) + ".wal")):
        p.unlink(missing_ok=True)
    sae_id = sae_row["sae_id"]
    with replacing(path):  # openers and other builds of this file wait out the whole read-write-swap
        _write_and_swap(path, tmp, sae_id, sae_row, feats, ex, stages, started)


def _stamp(con: duckdb.DuckDBPyConnection, sae_id: str, stages: StageTimes, started: float | None) -> None:
    """Store the final stage times in the new file's ``saes`` row (the write's own time included)."""
    con.execute(
        "UPDATE saes SET stage_seconds = ?, build_seconds = coalesce(?, build_seconds) WHERE sae_id = ?",
        [stages.to_json(), None if started is None else time.perf_counter() - started, sae_id],
    )


def _write_and_swap(
    path: Path,
    tmp: Path,
    sae_id: str,
    sae_row: dict[str, Any],
    feats: pd.DataFrame | pa.Table,
    ex: pd.DataFrame | pa.Table | pa.RecordBatchReader,
    stages: StageTimes | None = None,
    started: float | None = None,
) -> None:
    t = time.perf_counter()
    rows_before = stages.get("rows") if stages is not None else 0.0
    try:
        con = duckdb.connect(str(tmp))
        try:
            create_schema(con)
            if path.exists() and path.stat().st_size > 0:
                copy_kept_rows(con, path, sae_id)  # other SAEs and every user table
            con.register("new_saes", pd.DataFrame([sae_row]))
            con.execute("INSERT INTO saes BY NAME SELECT * FROM new_saes")
            con.register("new_features", feats)
            con.execute("INSERT INTO features BY NAME SELECT * FROM new_features")
            con.register("new_examples", ex)
            con.execute("INSERT INTO examples BY NAME SELECT * FROM new_examples")
            con.execute("CHECKPOINT")
            if stages is not None:  # the rows are in: store the write's time too (one small row, one more checkpoint)
                # the examples stream is made while DuckDB reads it: that part is ``rows``, not ``write``
                stages.add("write", time.perf_counter() - t - (stages.get("rows") - rows_before))
                _stamp(con, sae_id, stages, started)
                con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, path)
        # A WAL left by a writer that died (its contents were replayed into `old` and copied above) no longer
        # matches the new file and would stop it from opening.
        Path(str(path) + ".wal").unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)


# ---- entry point ----------------------------------------------------------------------------------------


def default_sae_name(model: str, hook: str, d_sae: int) -> str:
    return f"{Path(model).name or model}/{hook}/{d_sae}"


def build(cfg: BuildConfig, rt: Runtime | None = None, *, ray: RayOptions | None = None) -> BuildResult:
    """Run the whole build; raise on bad input before touching the database.

    With ``ray``, the harvest runs as shards on a Ray cluster (``harvest_on_ray``; each shard loads its own model
    and SAE from ``cfg``) and gives the same tables; everything else (weight statistics, the atomic write under
    the lock) runs here, as without it.
    """
    t0 = time.perf_counter()
    stages = StageTimes()
    validate(cfg.corpus)
    if cfg.context_size < 4:
        raise ValueError("--context-size must be at least 4")
    if cfg.max_tokens < 1:
        raise ValueError("--max-tokens must be positive")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if ray is not None:
        ray.validate()
        require_ray()  # a missing extra or a cluster that does not answer fails before any model is loaded
        check_reachable(ray)
    if rt is None:
        with stages.timed("model_load"):
            rt = load_runtime(cfg.model, cfg.sae, hook_name=cfg.hook, device=cfg.device, dtype=cfg.dtype)
    rt.outlier_norm_ratio = cfg.outlier_norm_ratio
    with stages.timed("neighbours"):  # weights only: before the harvest, so a failure costs no forward pass
        knn = decoder_knn(rt, cfg)
    hook = rt.site.hook_name
    sae_id = cfg.sae_name or default_sae_name(cfg.model, hook, rt.d_sae)
    dtype = dtype_name(rt.loaded.dtype)  # with Ray: replaced below by the dtype the shards ran in
    if cfg.progress:
        print(f"model {rt.loaded.name} runs in {dtype} on {rt.loaded.device}; SAE in {dtype_name(rt.sae.W_dec.dtype)}")
    ran: dict[str, Any] | None = None
    if ray is None:
        state = harvest_corpus(rt, cfg, stages=stages)
        harvest_wall = state.harvest_seconds
    else:
        th = time.perf_counter()
        state, ran = harvest_on_ray(rt, cfg, ray)
        harvest_wall = time.perf_counter() - th  # state.harvest_seconds sums the shards' own loops
        stages.add("harvest", harvest_wall)
        dtype = ran.pop("dtype")
    fve = state.fve()
    if not np.isnan(fve) and fve < FVE_WARN:
        msg = (
            f"WARNING: reconstruction FVE is {fve:.3f} (< {FVE_WARN}): activations are probably not taken where "
            f"the SAE was trained (hook {hook}, model {cfg.model}). Feature statistics may be meaningless."
        )
        warnings.warn(msg, stacklevel=2)
        print("\n" + "!" * 80 + "\n" + msg + "\n" + "!" * 80)
    feats, ex = feature_frames(rt, state, cfg, sae_id, stages, knn)
    seconds = time.perf_counter() - t0
    arch = rt.sae.cfg.architecture() if hasattr(rt.sae.cfg, "architecture") else type(rt.sae).__name__
    config = asdict(cfg)
    config["sae"] = json.loads(cfg.sae.to_json())
    if ran is not None:
        config["ray"] = ran
    row = {
        "sae_id": sae_id,
        "model_spec": cfg.model,
        "model_name": rt.loaded.name,
        "model_kwargs": json.dumps(rt.loaded.kwargs),
        "dtype": dtype,  # what the model ran in (config_json keeps what was asked for: null = the default)
        "sae_source": cfg.sae.to_json(),
        "hook_name": hook,
        "hook_kind": rt.site.kind,
        "architecture": str(arch),
        "d_in": int(rt.sae.cfg.d_in),
        "d_sae": rt.d_sae,
        "context_size": cfg.context_size,
        "prepend_bos": bool(rt.prepend_bos and rt.tokenizer.bos_token_id is not None),  # contexts start with BOS
        "corpus": cfg.corpus_description or cfg.corpus.describe(),
        "n_tokens": state.n_tokens,
        "n_contexts": state.n_contexts,
        "fve": None if np.isnan(fve) else fve,
        "l0": state.l0(),
        "dead_fraction": state.dead_fraction(),
        "hist_edges": list(cfg.harvest.hist_edges()),
        "build_seconds": seconds,  # updated with the write's time once the rows are in (write_database)
        "stage_seconds": stages.to_json(),
        "built_at": datetime.now(UTC).replace(tzinfo=None),
        "tool_version": __version__,
        "config_json": json.dumps(config, default=str),
    }
    write_database(Path(cfg.db), row, feats, ex, stages=stages, started=t0)
    hs = harvest_wall or seconds
    return BuildResult(
        db=Path(cfg.db),
        sae_id=sae_id,
        n_tokens=state.n_tokens,
        n_contexts=state.n_contexts,
        d_sae=rt.d_sae,
        fve=fve,
        l0=state.l0(),
        dead_fraction=state.dead_fraction(),
        seconds=time.perf_counter() - t0,
        tokens_per_s=state.n_tokens / max(hs, 1e-9),
        dtype=dtype,
        shards=ran["shards"] if ran else 0,
        stages=stages,
    )
