"""The quality figures the field reports for an SAE, through the splice path (``splice.spliced``).

On batches of token ids ``[B, T]`` (no padding), with the SAE spliced at the positions that count (not BOS,
not a norm outlier; elsewhere the activation passes untouched):

- ``ce_clean``: mean next-token cross-entropy of the plain model over positions ``0..T-2``;
- ``ce_sae``: the same with ``decode(encode(x))`` in place of ``x`` (the error dropped);
- ``ce_zero``: the same with ``0`` in place of ``x`` (zero-ablation);
- ``delta_lm_loss = ce_sae - ce_clean``; ``loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``;
- ``kl``: mean ``KL(p_clean || p_sae)`` of the next-token distributions, in nats;
- ``fve = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the positions that count;
- ``l0``: mean number of active features per position that counts.

``store_build_eval`` runs this after a build (``featuredict build`` and ``demo`` call it) on the corpus's first
full-length contexts and stores the row in ``sae_evals`` (method ``splice``); the overview page shows it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from featuredict.pipelines.attribution.splice import Slot, splice_fn, spliced
from featuredict.pipelines.harvest.corpus import CorpusSpec, iter_contexts, iter_documents
from featuredict.pipelines.model.backends import ModelBackend
from featuredict.pipelines.model.runtime import Runtime, cached_runtime_from_row


@dataclass
class SaeEval:
    tokens: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    delta_lm_loss: float
    loss_recovered: float | None
    kl: float
    fve: float
    l0: float

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``[B, T-1, vocab]`` log-probabilities of each position's next-token distribution (the last position has no
    next token)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T-1]`` cross-entropy of each position's prediction of the next token (``log_probs``: those of
    ``logits`` from ``next_token_log_probs``, when the caller has them already)."""
    lp = next_token_log_probs(logits) if log_probs is None else log_probs
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1).to(lp.device)).squeeze(-1)


@torch.no_grad()
def evaluate(loaded: ModelBackend, slot: Slot, batches: Iterable[torch.Tensor], resume: bool = True) -> SaeEval:
    """The figures of the module docstring over ``batches`` of token ids. Where the backend can continue a pass
    from the slot's hook (``ModelBackend.forward_edited``; ``resume``), the model runs up to the hook once per
    batch instead of three times: the same figures, bit for bit (tested)."""
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = 0.0
    n_pred = 0
    sse = 0.0
    sum_x = None
    sum_x2 = 0.0
    n_valid = 0
    l0 = 0.0
    for ids in batches:
        ids = ids.to(loaded.device)
        seen: dict[str, dict[str, torch.Tensor]] = {}
        edits = [splice_fn(slot, ids, seen, keep_error=False), splice_fn(slot, ids, {}, zero=True)]
        passes = loaded.forward_edited(ids, slot.hook, edits) if resume else None
        if passes is not None:  # the model up to the hook once: bit for bit the three passes below
            clean, sae_logits, zero_logits = passes
        else:
            clean = loaded.forward(ids)
            with spliced([slot], ids, keep_error=False) as seen:
                sae_logits = loaded.forward(ids)
            with spliced([slot], ids, zero=True):
                zero_logits = loaded.forward(ids)
        lp_c, lp_s = next_token_log_probs(clean), next_token_log_probs(sae_logits)  # each made once: [B, T-1, vocab]
        ce["clean"] += float(next_token_ce(clean, ids, lp_c).sum())
        ce["sae"] += float(next_token_ce(sae_logits, ids, lp_s).sum())
        ce["zero"] += float(next_token_ce(zero_logits, ids).sum())
        kl += float(torch.nn.functional.kl_div(lp_s, lp_c, reduction="sum", log_target=True))  # sum p_c (lp_c - lp_s)
        n_pred += int(ids.shape[0] * (ids.shape[1] - 1))
        part = seen[slot.name]
        valid, f, err = part["valid"], part["f"], part["error"]
        xv = part["x"][valid].double()
        sse += float(err[valid].double().pow(2).sum())
        sum_x = xv.sum(0) if sum_x is None else sum_x + xv.sum(0)
        sum_x2 += float(xv.pow(2).sum())
        n_valid += int(valid.sum())
        l0 += float((f[valid] != 0).sum())
    if n_pred == 0 or n_valid == 0 or sum_x is None:
        raise ValueError("no tokens to evaluate on")
    sst = sum_x2 - float(sum_x.pow(2).sum()) / n_valid
    c, s, z = (ce[k] / n_pred for k in ("clean", "sae", "zero"))
    return SaeEval(
        tokens=n_valid,
        ce_clean=c,
        ce_sae=s,
        ce_zero=z,
        delta_lm_loss=s - c,
        loss_recovered=(z - s) / (z - c) if z != c else None,
        kl=kl / n_pred,
        fve=1.0 - sse / sst if sst > 0 else float("nan"),
        l0=l0 / n_valid,
    )


DEFAULT_EVAL_CONTEXTS = 32


def corpus_batches(
    tokenizer: Any,
    corpus: CorpusSpec,
    context_size: int,
    n_contexts: int,
    prepend_bos: bool = True,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """The first ``n_contexts`` full-length contexts of the corpus (no padding), in batches ``[b, context_size]``."""
    ctxs: list[list[int]] = []
    for c in iter_contexts(iter_documents(corpus), tokenizer, context_size, prepend_bos):
        if len(c) == context_size:
            ctxs.append(c)
            if len(ctxs) >= n_contexts:
                break
    return [torch.tensor(ctxs[i : i + batch_size], dtype=torch.long) for i in range(0, len(ctxs), batch_size)]


def store_build_eval(
    db: str | Path,
    sae_id: str,
    corpus: CorpusSpec,
    *,
    n_contexts: int = DEFAULT_EVAL_CONTEXTS,
    device: str | None = None,
    rt: Runtime | None = None,
) -> SaeEval | None:
    """After a build: evaluate ``sae_id`` through the splice on the corpus's first ``n_contexts`` full contexts
    (the build's context size) and store the figures as its ``sae_evals`` row, method ``splice``. None (and
    nothing stored) when the corpus has no context that long. ``rt``: the runtime the build ran
    (``BuildResult.runtime``), so the model is not loaded again; None loads the one the ``saes`` row names."""
    from featuredict.db import queries as q
    from featuredict.db import writes
    from featuredict.db.store import Store

    store = Store(db, read_only=True)
    try:
        row = q.sae_info(store, sae_id)
    finally:
        store.close()
    if row is None:
        raise ValueError(f"no SAE {sae_id!r} in {db}")
    if rt is None:
        rt = cached_runtime_from_row(dict(row), device)
    size = int(row["context_size"])
    batches = corpus_batches(rt.tokenizer, corpus, size, n_contexts, bool(row.get("prepend_bos", True)))
    if not batches:
        return None
    slot = Slot(sae_id, rt.sae, rt.site, rt.outlier_norm_ratio)
    ev = evaluate(rt.backend, slot, batches)
    store = Store(db)
    try:
        writes.set_sae_eval(store, sae_id, "splice", ev.to_dict(), sum(int(b.shape[0]) for b in batches), size)
    finally:
        store.close()
    return ev


@torch.no_grad()
def sae_lens_figures(loaded: ModelBackend, slot: Slot, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """The same figures from sae-lens's own evals (``sae_lens.evals.get_recons_loss`` through its
    ``HookedProxyLM`` around our Hugging Face model), on the same tokens, for comparison.

    sae-lens replaces the activation at every position except the ``ignore_tokens`` (we pass BOS and pad): it
    has no norm-outlier rule, so where the splice leaves an outlier position untouched, sae-lens reconstructs
    it. Its zero-ablation zeroes every position, BOS included, where ours zeroes only the positions the SAE
    is spliced at: ``ce_zero`` and ``loss_recovered`` differ by construction. Its KL averages over every position (the last too, whose next token is not in the batch); ``kl`` here
    is over positions ``0..T-2`` like ours, ``kl_all_positions`` is sae-lens's own mean. FVE and L0 need its
    activation store, not compared. The temporary hook sae-lens's proxy adds is removed in ``finally``.
    """
    from sae_lens.evals import get_recons_loss
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.training.activation_scaler import ActivationScaler

    module = loaded.hook_module(slot.hook)
    before = set(module._forward_hooks)
    tok = loaded.tokenizer
    ignore = sorted({int(t) for t in (tok.bos_token_id, tok.pad_token_id) if t is not None})
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_all": 0.0}
    n_pred = n_all = 0
    try:
        proxy = HookedProxyLM(loaded.model, tok, hook_names=[slot.hook])
        for ids in batches:
            ids = ids.to(loaded.device)
            m = get_recons_loss(
                slot.sae, proxy, ActivationScaler(), ids, True, True, ignore_tokens=ignore, hook_name=slot.hook
            )
            sums["ce_clean"] += float(m["ce_loss_without_sae"].sum())
            sums["ce_sae"] += float(m["ce_loss_with_sae"].sum())
            sums["ce_zero"] += float(m["ce_loss_with_ablation"].sum())
            kl = m["kl_div_with_sae"]
            sums["kl"] += float(kl[:, :-1].sum())
            sums["kl_all"] += float(kl.sum())
            n_pred += int(ids.shape[0] * (ids.shape[1] - 1))
            n_all += int(ids.numel())
    finally:
        for key in set(module._forward_hooks) - before:
            del module._forward_hooks[key]
    c, s, z = (sums[k] / n_pred for k in ("ce_clean", "ce_sae", "ce_zero"))
    return {
        "tokens": n_pred,
        "ce_clean": c,
        "ce_sae": s,
        "ce_zero": z,
        "delta_lm_loss": s - c,
        "loss_recovered": (z - s) / (z - c) if z != c else float("nan"),
        "kl": sums["kl"] / n_pred,
        "kl_all_positions": sums["kl_all"] / n_all,
    }
