"""Running the model + SAE on pasted text for search "by prompt" and "by concept" (no Streamlit here).

Shared by the dashboard's search page and ``featuredict search``.

``run_prompt`` keeps only the non-zero activations as (position, feature, value) triplets, so a result
for a 65k-feature SAE stays small enough to cache per text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

    from featuredict.pipelines.model.runtime import Runtime

MAX_TOKENS = 1024


@dataclass(frozen=True)
class PromptResult:
    """Sparse SAE activations on one text.

    tokens ``[n_pos]`` display strings (BOS included when the SAE prepends it); ``valid [n_pos]`` bool
    (False at BOS/pad); ``pos``, ``feat``, ``val`` ``[nnz]``: the non-zero activations; d_sae.
    """

    tokens: list[str]
    valid: np.ndarray
    pos: np.ndarray
    feat: np.ndarray
    val: np.ndarray
    d_sae: int
    truncated: bool

    @property
    def n_pos(self) -> int:
        return len(self.tokens)


def run_prompt(runtime: Runtime, text: str, max_len: int = MAX_TOKENS) -> PromptResult:
    """Tokenize ``text`` (BOS per the SAE), run to the hook and encode: a sparse ``PromptResult``."""

    full = runtime.tokenize(text)
    ids = full[:, :max_len]
    acts, valid = _acts_and_valid(runtime, ids)
    p, f = np.nonzero(acts)
    return PromptResult(
        tokens=runtime.token_strings(ids[0].tolist()),
        valid=valid,
        pos=p.astype(np.int32),
        feat=f.astype(np.int32),
        val=acts[p, f].astype(np.float32),
        d_sae=int(acts.shape[1]),
        truncated=full.shape[1] > max_len,
    )


def dense_valid_acts(runtime: Runtime, text: str, max_len: int = MAX_TOKENS) -> np.ndarray:
    """Activations on the valid (non-BOS/pad) tokens of ``text``: ``[n_valid, d_sae]`` float32."""

    ids = runtime.tokenize(text)[:, :max_len]
    acts, valid = _acts_and_valid(runtime, ids)
    return acts[valid]


def whole_text_features(
    res: PromptResult,
    max_act: np.ndarray | None = None,
    rank_by: Literal["max", "relative", "total"] = "max",
    top: int = 50,
) -> pd.DataFrame:
    """Features most active over the whole text: columns feature, max_here, relative (max_here / the
    feature's corpus max_act, NaN without it), total, n_tokens, argmax_pos. ``[<=top]`` rows."""
    cols = ["feature", "max_here", "relative", "total", "n_tokens", "argmax_pos"]
    if len(res.val) == 0:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame({"feature": res.feat, "val": res.val, "pos": res.pos})
    g = df.groupby("feature")
    out = pd.DataFrame(
        {
            "max_here": g["val"].max(),
            "total": g["val"].sum(),
            "n_tokens": g["val"].size(),
            "argmax_pos": df.loc[g["val"].idxmax(), ["feature", "pos"]].set_index("feature")["pos"],
        }
    ).reset_index()
    if max_act is not None:
        m = np.asarray(max_act, dtype=np.float64)[out["feature"].to_numpy()]
        out["relative"] = np.where(m > 0, out["max_here"] / np.where(m > 0, m, 1.0), np.nan)
    else:
        out["relative"] = np.nan
    key = {"max": "max_here", "relative": "relative", "total": "total"}[rank_by]
    out = out.sort_values([key, "max_here"], ascending=False, na_position="last")
    return out[cols].head(top).reset_index(drop=True)


def token_features(res: PromptResult, position: int, top: int = 20) -> pd.DataFrame:
    """Features active at one position, strongest first: columns feature, act."""
    m = res.pos == int(position)
    df = pd.DataFrame({"feature": res.feat[m], "act": res.val[m]})
    return df.sort_values("act", ascending=False).head(top).reset_index(drop=True)


def feature_over_tokens(res: PromptResult, feature: int) -> np.ndarray:
    """One feature's activation at every position: ``[n_pos]`` float32."""
    out = np.zeros(res.n_pos, dtype=np.float32)
    m = res.feat == int(feature)
    out[res.pos[m]] = res.val[m]
    return out


def _acts_and_valid(runtime: Runtime, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[pos, d_sae]`` activations and ``[pos]`` valid mask from one pass (``Runtime.encode``, the path the
    build takes), so they agree with each other and with the stored statistics: BOS/pad and attention-sink
    norm outliers excluded."""
    _, f, valid = runtime.encode(ids)
    return f[0].float().cpu().numpy(), valid[0].cpu().numpy().astype(bool)
