"""The harvest loop: ``(ids, mask)`` batches through model + SAE, folded into one ``HarvestState``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.corpus import (
    batch_contexts,
    iter_contexts,
    iter_documents,
)
from featuredict.pipelines.harvest.stages import StageTimes, timed
from featuredict.pipelines.harvest.state import (
    PAD_SLOT,
    HarvestState,
    update,
)
from featuredict.pipelines.model.runtime import Runtime


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
            x, f, valid, active = rt.encode_active(ids, mask, stages)
            with timed(stages, "encode"):
                recon = rt.decode(f, active)  # FVE reads valid positions only, where f is not zeroed
            ctx_ids = torch.arange(ctx_next, ctx_next + ids.shape[0], dtype=torch.int64)
            ctx_next += ids.shape[0]
            # padding is stored as PAD_SLOT (not a token id), so stored windows end exactly where the text does
            with timed(stages, "update"):
                update(state, f, ids.masked_fill(~mask.bool(), PAD_SLOT), valid, ctx_ids, x, recon, active, False)
            seen += int(valid.sum())  # the budget counts the tokens statistics count (no BOS, pad or outliers)
            if on_tokens is not None:
                on_tokens(seen)
            if max_tokens is not None and seen >= max_tokens:
                break
    with timed(stages, "update"):
        state.order_()  # the example lists best first, once (each batch left them in no order)
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
