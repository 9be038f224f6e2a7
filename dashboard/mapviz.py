"""Altair charts of the feature map (UMAP of all features), built to carry 65k+ points.

Streamlit serialises chart data as Arrow with its own data transformer (no 5,000-row cap); app.py also
calls ``alt.data_transformers.disable_max_rows()`` so the same charts serialise outside Streamlit. The
frame is kept compact: int32 id, float32 x/y/log-density, categorical colour, short tooltip strings.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

NONE, OTHER = "(none)", "(other label)"
GREY = "#d9d9d9"
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#17becf",
    "#bcbd22",
    "#8c564b",
)


def plot_frame(df: pd.DataFrame, colour_by: str) -> tuple[pd.DataFrame, alt.Color]:
    """Compact frame for the scatter plus the colour encoding. ``df`` is ``q.map_points`` output.

    Colour by density: log10 density (viridis, clamped to the live range). By tag / label: the first tag
    (or the 12 commonest labels) in colour over grey "(none)" points, which are drawn first (underneath).
    """
    out = df[["feature", "x", "y", "log10_density"]].copy()
    out["label"] = df["label"].fillna("")
    out["top_tokens"] = df["top_tokens"].fillna("")
    if colour_by in ("tag", "label"):
        if colour_by == "tag":
            group = df["tag"].fillna(NONE).astype(str)
            others = sorted(set(group) - {NONE})
        else:
            lab = df["label"].fillna("")
            common = lab[lab != ""].value_counts().head(12).index
            group = pd.Series(np.where(lab == "", NONE, np.where(lab.isin(common), lab, OTHER)), index=df.index)
            others = sorted(set(group) - {NONE, OTHER}) + ([OTHER] if (group == OTHER).any() else [])
        domain = [NONE, *others]
        out["group"] = pd.Categorical(group, categories=domain)
        out = out.sort_values("group", kind="stable")  # untagged drawn first, underneath the rest
        enc = alt.Color(
            "group:N",
            title=colour_by,
            scale=alt.Scale(domain=domain, range=[GREY, *[PALETTE[i % len(PALETTE)] for i in range(len(others))]]),
        )
    else:
        live = df.loc[df["log10_density"] > -9, "log10_density"]
        dom = [float(live.min()), float(live.max())] if len(live) else [-9.0, 0.0]
        enc = alt.Color(
            "log10_density:Q", title="log10 density", scale=alt.Scale(scheme="viridis", domain=dom, clamp=True)
        )
    return out, enc


def scatter(df: pd.DataFrame, enc: alt.Color, size: float, height: int, name: str) -> alt.Chart:
    """A point-selectable scatter: clicking selects one feature (selection parameter ``name``)."""
    pick = alt.selection_point(name=name, fields=["feature"], on="click", toggle=False)
    return (
        alt.Chart(df)
        .mark_circle(size=size, opacity=0.75)
        .encode(
            x=alt.X("x:Q", axis=None, scale=alt.Scale(zero=False)),
            y=alt.Y("y:Q", axis=None, scale=alt.Scale(zero=False)),
            color=enc,
            tooltip=[
                alt.Tooltip("feature:Q", title="feature"),
                alt.Tooltip("label:N", title="label"),
                alt.Tooltip("top_tokens:N", title="top tokens"),
                alt.Tooltip("log10_density:Q", title="log10 density", format=".2f"),
            ],
        )
        .add_params(pick)
        .properties(height=height)
    )


def nearest(frame: pd.DataFrame, cx: float, cy: float, k: int) -> pd.DataFrame:
    """The ``k`` rows of ``frame`` (any row order, e.g. ``plot_frame``'s) closest to ``(cx, cy)`` on the map."""
    d2 = (frame["x"].to_numpy(np.float64) - cx) ** 2 + (frame["y"].to_numpy(np.float64) - cy) ** 2
    return frame.iloc[np.argsort(d2, kind="stable")[:k]].copy()
