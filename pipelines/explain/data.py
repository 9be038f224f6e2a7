"""What explainers and scorers read about a feature, and how contexts are shown to an LLM.

Per feature (``FeatureData``), read in bulk for a chunk of features (one query on ``examples``, one on
``features``):
- ``shown``: the contexts the explainer sees: top contexts of even rank (0, 2, 4, ...) and interval samples of
  even rank in each band, strongest first;
- ``held_out``: the activating contexts it never sees (odd ranks), for detection and fuzzing scoring;
- ``negatives``: contexts to contrast with, drawn from other features' stored top contexts (a pool sampled once
  per run), never one of this feature's stored contexts. They are *not verified* to be free of this feature:
  the database keeps only the contexts where a feature fires most, not where it is silent, so for a dense
  feature a few may in truth fire. Scores are therefore a slight underestimate for dense features.

Contexts are shown as a window around the max token (``WINDOW`` tokens before, after), BOS dropped, newlines
as '↵'. Activating tokens (activation >= ``MARK_FRAC`` x the context's max) are marked ``<<like this>>``,
consecutive ones merged into one mark.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from featuredict.db import queries as q
from featuredict.db.queries import Reader

WINDOW = (24, 8)  # tokens shown before and after the max token
MARK_FRAC = 0.3  # a token is "activating" at >= this fraction of its context's max activation
OPEN, CLOSE = "<<", ">>"


@dataclass(frozen=True)
class Context:
    """One stored context: ``tokens [pos]`` (raw strings), ``acts [pos]`` (this feature's activation; zeros for
    a negative), the position of the max and its activation."""

    tokens: tuple[str, ...]
    acts: np.ndarray
    max_pos: int
    max_act: float
    kind: str  # 'top' | 'interval' | 'negative'
    context_id: int


@dataclass
class FeatureData:
    feature: int
    max_act: float
    pos_tokens: list[str]
    shown: list[Context] = field(default_factory=list)
    held_out: list[Context] = field(default_factory=list)
    negatives: list[Context] = field(default_factory=list)


def visible(tok: str) -> str:
    """Token text for a prompt: newlines as '↵', tabs as '⇥', carriage returns dropped."""
    return tok.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def window(ctx: Context, skip_first: bool, size: tuple[int, int] = WINDOW) -> tuple[int, int]:
    """``[lo, hi)`` of the tokens shown: ``size`` around the max, never position 0 when it is BOS."""
    lo = max(1 if skip_first else 0, ctx.max_pos - size[0])
    hi = min(len(ctx.tokens), ctx.max_pos + size[1] + 1)
    return lo, max(lo, hi)


def activating(ctx: Context, frac: float = MARK_FRAC) -> np.ndarray:
    """Boolean ``[pos]``: tokens firing at >= ``frac`` of the context's max (never when it does not fire)."""
    a = np.asarray(ctx.acts, dtype=np.float64)
    peak = float(a.max()) if len(a) else 0.0
    return (a > 0) & (a >= frac * peak) if peak > 0 else np.zeros(len(a), dtype=bool)


def render(ctx: Context, lo: int, hi: int, marks: np.ndarray | None = None) -> str:
    """Tokens ``[lo, hi)`` as one line; with ``marks [pos]``, runs of marked tokens wrapped in << >>."""
    out: list[str] = []
    inside = False
    for i in range(lo, hi):
        m = bool(marks[i]) if marks is not None else False
        if m and not inside:
            out.append(OPEN)
        elif not m and inside:
            out.append(CLOSE)
        inside = m
        out.append(visible(ctx.tokens[i]))
    if inside:
        out.append(CLOSE)
    return "".join(out).strip() or "∅"


def _context(row: dict, kind: str) -> Context:
    toks = tuple(str(t) if t is not None else "" for t in row["tokens"])
    acts = row.get("acts")
    return Context(
        tokens=toks,
        acts=np.asarray(acts, dtype=np.float32) if acts is not None else np.zeros(len(toks), dtype=np.float32),
        max_pos=int(row["max_pos"]),
        max_act=float(row.get("max_act") or 0.0),
        kind=kind,
        context_id=int(row["context_id"]),
    )


def negative_pool(db: Reader, sae_id: str, size: int, seed: int) -> pd.DataFrame:
    """The run's pool of candidate non-activating contexts (see the module docstring)."""
    return q.context_sample(db, sae_id, size, seed)


def load_features(
    db: Reader,
    sae_id: str,
    features: Sequence[int],
    pool: pd.DataFrame,
    n_top: int,
    n_interval: int,
    n_score: int,
    seed: int,
) -> dict[int, FeatureData]:
    """``FeatureData`` for ``features`` (two queries): ``n_top`` top and ``n_interval`` interval contexts shown,
    up to ``n_score`` held-out activating contexts and as many negatives from ``pool``."""
    ids = [int(f) for f in features]
    by_feature: dict[int, list[dict]] = defaultdict(list)
    for r in q.examples_for_features(db, sae_id, ids).to_dict("records"):
        by_feature[int(r["feature"])].append(r)
    pool_rows = pool.to_dict("records")
    pool_ids = np.array([(int(p["feature"]), int(p["context_id"])) for p in pool_rows], dtype=np.int64).reshape(-1, 2)
    out: dict[int, FeatureData] = {}
    for r in q.feature_logit_tokens(db, sae_id, ids).to_dict("records"):
        f = int(r["feature"])
        pos = [str(t) for t in (r["pos_tokens"] if r["pos_tokens"] is not None else [])]
        fd = FeatureData(feature=f, max_act=float(r["max_act"] or 0.0), pos_tokens=pos)
        rows = by_feature.get(f, [])
        if rows:
            top = sorted((x for x in rows if x["kind"] == "top"), key=lambda x: int(x["rank"]))
            inter = sorted((x for x in rows if x["kind"] != "top"), key=lambda x: (-int(x["band"]), int(x["rank"])))
            fd.shown = [_context(x, "top") for x in top if int(x["rank"]) % 2 == 0][:n_top]
            fd.shown += [
                _context(x, "interval") for x in _spread([x for x in inter if int(x["rank"]) % 2 == 0], n_interval)
            ]
            held_top = [_context(x, "top") for x in top if int(x["rank"]) % 2 == 1]
            held_int = [_context(x, "interval") for x in inter if int(x["rank"]) % 2 == 1]
            fd.held_out = _interleave(held_top, held_int)[:n_score]
            mine = np.array(sorted({int(x["context_id"]) for x in rows}), dtype=np.int64)
            ok = np.flatnonzero((pool_ids[:, 0] != f) & ~np.isin(pool_ids[:, 1], mine))
            rng = np.random.default_rng([seed, f])
            pick = ok[rng.permutation(len(ok))[: len(fd.held_out) or n_score]]
            fd.negatives = [_context(pool_rows[i], "negative") for i in pick]
        out[f] = fd
    return out


def _spread(rows: list[dict], n: int) -> list[dict]:
    """Up to ``n`` of ``rows`` (ordered strongest band first) spread over the bands, round robin."""
    bands: dict[int, list[dict]] = {}
    for x in rows:
        bands.setdefault(int(x["band"]), []).append(x)
    groups = list(bands.values())
    picked: list[dict] = []
    i = 0
    while len(picked) < n and any(i < len(g) for g in groups):
        picked += [g[i] for g in groups if i < len(g)][: n - len(picked)]
        i += 1
    return picked


def _interleave(a: list[Context], b: list[Context]) -> list[Context]:
    out: list[Context] = []
    for i in range(max(len(a), len(b))):
        out += [x[i] for x in (a, b) if i < len(x)]
    return out
