"""Altair charts of the feature map (UMAP of all features), built to carry 65k+ points.

Streamlit serialises chart data as Arrow with its own data transformer (no 5,000-row cap); app.py also
calls ``alt.data_transformers.disable_max_rows()`` so the same charts serialise outside Streamlit. The
frame is kept compact: int32 id, float32 x/y/log-density, categorical colour, short tooltip strings.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


def plot_frame(df: pd.DataFrame, colour_by: str) -> tuple[pd.DataFrame, alt.Color]:
    """Compact frame for the scatter plus the colour encoding. ``df`` is ``q.map_points`` output."""
    out = df[["feature", "x", "y", "log10_density"]].copy()
    out["label"] = df["label"].fillna("")
    out["top_tokens"] = df["top_tokens"].fillna("")
    if colour_by == "tag":
        out["tag"] = df["tag"].fillna("(none)").astype("category")
        enc = alt.Color("tag:N", title="tag", scale=alt.Scale(scheme="tableau20"),
                        sort=alt.EncodingSortField("tag"))
    elif colour_by == "label":
        lab = df["label"].fillna("")
        common = lab[lab != ""].value_counts().head(12).index
        out["label_group"] = np.where(lab == "", "(unlabelled)",
                                      np.where(lab.isin(common), lab, "(other label)"))
        out["label_group"] = out["label_group"].astype("category")
        enc = alt.Color("label_group:N", title="label", scale=alt.Scale(scheme="tableau20"))
    else:
        live = df.loc[df["log10_density"] > -9, "log10_density"]
        dom = [float(live.min()), float(live.max())] if len(live) else [-9.0, 0.0]
        enc = alt.Color("log10_density:Q", title="log10 density",
                        scale=alt.Scale(scheme="viridis", domain=dom, clamp=True))
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
            tooltip=[alt.Tooltip("feature:Q", title="feature"), alt.Tooltip("label:N", title="label"),
                     alt.Tooltip("top_tokens:N", title="top tokens"),
                     alt.Tooltip("log10_density:Q", title="log10 density", format=".2f")],
        )
        .add_params(pick)
        .properties(height=height)
    )
