"""Statistics from the weights alone: each feature's logit effects through the unembedding, and its decoder
neighbours (exact cosine kNN, shared with the UMAP layout)."""

from __future__ import annotations

import torch

from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.layout import UMAP_NEIGHBOURS, Knn, cosine_knn
from featuredict.pipelines.model.runtime import Runtime


def unembedding(rt: Runtime) -> tuple[torch.Tensor, bool]:
    """``([d_model, vocab] unembedding with the final norm's scale folded in, centre)``.

    ``centre`` is True when the final norm is a LayerNorm, which subtracts the mean over ``d_model`` before
    scaling: decoder directions must then be centred too (RMSNorm does not centre). The norm's 1/rms factor
    is positive and the same for every token, so it does not change which tokens a direction promotes.
    """
    w_u = rt.backend.unembedding_matrix()
    norm = rt.backend.final_norm()
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


def decoder_knn(rt: Runtime, cfg: BuildConfig) -> Knn:
    """Exact cosine kNN of the decoder directions, wide enough for the neighbours table and UMAP's graph."""
    w_dec = rt.sae.W_dec.detach().float().cpu().numpy()
    return cosine_knn(w_dec, max(cfg.n_neighbours, UMAP_NEIGHBOURS - 1))
