"""The harvest in shards over Ray: the corpus cut into context spans, each harvested by a worker, folded
exactly (``HarvestState`` merges), so the tables equal those of one process."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.corpus import (
    CorpusError,
    batch_contexts,
    iter_contexts,
    iter_documents,
)
from featuredict.pipelines.harvest.loop import harvest_batches
from featuredict.pipelines.harvest.sharding import (
    DistributedError,
    RayOptions,
    map_shards,
    ray_session,
)
from featuredict.pipelines.harvest.state import (
    HarvestState,
    from_state_dict,
    merge,
    state_dict,
)
from featuredict.pipelines.model.loading import dtype_name
from featuredict.pipelines.model.runtime import Runtime, load_runtime


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


def _advance(bar: Any, counted: int, n: int) -> None:
    """Move a progress bar to ``counted + n`` tokens (a round's shards report ``n`` so far)."""
    bar.update(counted + n - bar.n)


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
    return wire | {"model_dtype": dtype_name(rt.backend.dtype)}


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
                on_progress=partial(_advance, bar, counted),
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
