"""Every Altair chart of the dashboard: pure functions from data to a chart (no Streamlit, no database).

- ``density_histogram``: log10-density histogram of an SAE's live features (overview);
- ``activation_histogram``: one feature's activation histogram over log-spaced bins (feature page);
- ``plot_frame`` / ``scatter``: the feature map (UMAP of all features), built to carry 65k+ points;
- ``neighbourhood`` / ``neighbourhood_chart``: the features nearest to one on the map (map page);
- ``feature_place``: one feature and its decoder neighbours over a sample of the map (feature page).

Streamlit serialises chart data as Arrow with its own data transformer (no 5,000-row cap); app.py also
calls ``alt.data_transformers.disable_max_rows()`` so the same charts serialise outside Streamlit. The map
frame is kept compact: int32 id, float32 x/y/log-density, categorical colour, short tooltip strings.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import altair as alt
import numpy as np
import pandas as pd

BAR_COLOUR = "#e67e22"
CENTRE_COLOUR, NEIGHBOUR_COLOUR, BACKGROUND_COLOUR = "#c0392b", "#2980b9", "#bbbbbb"
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
ROLES = ("centre", "decoder neighbour", "nearby on map")
PLACE_SAMPLE = 4000  # grey background points behind one feature's place on the map (at most about this many)


# ------------------------------------------------------------------------------------------ histograms


def _bars(df: pd.DataFrame, lo: str, hi: str, x: alt.X, y_title: str, tooltip: Sequence[alt.Tooltip]) -> alt.Chart:
    """Histogram bars from pre-binned rows: one rect per row from ``lo`` to ``hi``, height ``count``."""
    return (
        alt.Chart(df)
        .mark_rect(color=BAR_COLOUR, stroke="white", strokeWidth=0.5)
        .encode(x=x, x2=f"{hi}:Q", y=alt.Y("count:Q", title=y_title), y2=alt.datum(0), tooltip=list(tooltip))
    )


def density_histogram(hist: pd.DataFrame, n_dead: int, height: int = 220) -> alt.Chart:
    """``hist`` is ``q.density_histogram`` output (columns log10_lo, log10_hi, count; at least one row)."""
    domain = [float(hist["log10_lo"].min()), float(hist["log10_hi"].max())]
    x = alt.X("log10_lo:Q", title="log10(feature density)", bin="binned", scale=alt.Scale(domain=domain))
    tooltip = [
        alt.Tooltip("log10_lo:Q", title="log10 density from", format=".2f"),
        alt.Tooltip("log10_hi:Q", title="to", format=".2f"),
        alt.Tooltip("count:Q", title="features"),
    ]
    title = f"Feature density (fraction of tokens a feature fires on); {int(n_dead):,} dead"
    return _bars(hist, "log10_lo", "log10_hi", x, "features", tooltip).properties(height=height, title=title)


def activation_histogram(
    edges: Sequence[float] | np.ndarray | None, counts: Sequence[float] | np.ndarray | None, height: int = 180
) -> alt.Chart | None:
    """Bars of a feature's activation histogram (``edges [B+1]`` of the SAE, ``counts [B]`` of the feature) on a
    log x axis; bins at or below 0 and empty bins are left out. None when there is nothing to draw (a dead
    feature, no bins, or edges and counts that do not match)."""
    e = np.asarray(edges if edges is not None else [], dtype=float)
    c = np.asarray(counts if counts is not None else [], dtype=float)
    if len(e) != len(c) + 1 or not c.sum() > 0:
        return None
    df = pd.DataFrame({"lo": e[:-1], "hi": e[1:], "count": c})
    df = df[(df["lo"] > 0) & (df["count"] > 0)].reset_index(drop=True)
    if df.empty:
        return None
    x = alt.X("lo:Q", scale=alt.Scale(type="log"), title="activation (log-spaced bins)")
    tooltip = [
        alt.Tooltip("lo:Q", format=".3g", title="from"),
        alt.Tooltip("hi:Q", format=".3g", title="to"),
        alt.Tooltip("count:Q", format=",", title="tokens"),
    ]
    return _bars(df, "lo", "hi", x, "tokens", tooltip).properties(height=height)


# ------------------------------------------------------------------------------------------------- map


def plot_frame(df: pd.DataFrame, colour_by: str) -> tuple[pd.DataFrame, alt.Color]:
    """Compact frame for the scatter plus the colour encoding. ``df`` is ``q.map_points`` output; its best
    explanation (when the column is there) goes into the tooltip, as text (Vega's tooltip escapes it).

    Colour by density: log10 density (viridis, clamped to the live range). By tag / label: the first tag
    (or the 12 commonest labels) in colour over grey "(none)" points, which are drawn first (underneath).
    """
    out = df[["feature", "x", "y", "log10_density"]].copy()
    out["label"] = df["label"].fillna("")
    out["top_tokens"] = df["top_tokens"].fillna("")
    out["explanation"] = df["explanation"].fillna("") if "explanation" in df else ""
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


def point_size(n_points: int) -> float:
    """Marker area for a scatter of ``n_points``: small dots for a full 65k map, larger ones for few."""
    return 6 if n_points > 20000 else 14 if n_points > 2000 else 40


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
                alt.Tooltip("explanation:N", title="explanation"),
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


def neighbourhood(frame: pd.DataFrame, centre: int, k: int, decoder_neighbours: Collection[int]) -> pd.DataFrame:
    """The ``k`` features of ``frame`` nearest to feature ``centre`` on the map, with a ``role`` column (one of
    ``ROLES``: the centre, its decoder-cosine neighbours, the rest). Empty when ``centre`` has no position."""
    row = frame[frame["feature"] == centre]
    if row.empty:
        return frame.iloc[:0].assign(role=pd.Series(dtype=str))
    near = nearest(frame, float(row["x"].iloc[0]), float(row["y"].iloc[0]), k)
    dec = {int(i) for i in decoder_neighbours}
    near["role"] = np.where(
        near["feature"] == centre, ROLES[0], np.where(near["feature"].isin(dec), ROLES[1], ROLES[2])
    )
    return near


def neighbourhood_chart(near: pd.DataFrame, name: str, height: int = 460) -> alt.LayerChart:
    """``neighbourhood`` output as a clickable scatter coloured by role, the centre and decoder neighbours
    labelled with their ids (selection parameter ``name``)."""
    role = alt.Color(
        "role:N",
        title="",
        scale=alt.Scale(domain=list(ROLES), range=[CENTRE_COLOUR, NEIGHBOUR_COLOUR, BACKGROUND_COLOUR]),
    )
    ids = (
        alt.Chart(near[near["role"] != ROLES[2]])
        .mark_text(align="left", dx=7, fontSize=11)
        .encode(x="x:Q", y="y:Q", text=alt.Text("feature:Q"))
    )
    return (scatter(near, role, 60, height, name) + ids).properties(height=height)


def feature_place(
    points: pd.DataFrame,
    feature: int,
    x: float,
    y: float,
    decoder_neighbours: Collection[int],
    height: int = 240,
    sample: int = PLACE_SAMPLE,
) -> alt.LayerChart:
    """Where one feature sits on the map: a grey sample of ``points`` (``q.map_points``; every n-th row, about
    ``sample`` of them), its decoder neighbours in blue (with tooltips) and the feature at ``(x, y)`` as a red
    diamond."""
    bg = points.iloc[:: max(1, len(points) // max(1, sample))]
    nb = points[points["feature"].isin({int(i) for i in decoder_neighbours})].assign(role="neighbour")
    me = pd.DataFrame({"x": [x], "y": [y], "feature": [int(feature)], "role": ["this feature"]})
    layer_bg = (
        alt.Chart(bg)
        .mark_circle(size=6, color=BACKGROUND_COLOUR, opacity=0.5)
        .encode(x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None))
    )
    layer_nb = (
        alt.Chart(nb)
        .mark_circle(size=40, color=NEIGHBOUR_COLOUR)
        .encode(x="x:Q", y="y:Q", tooltip=["feature:Q", "label:N", "top_tokens:N"])
    )
    layer_me = (
        alt.Chart(me)
        .mark_point(size=160, color=CENTRE_COLOUR, shape="diamond", filled=True)
        .encode(x="x:Q", y="y:Q", tooltip=["feature:Q", "role:N"])
    )
    return (layer_bg + layer_nb + layer_me).properties(height=height)


# ------------------------------------------------------------------------------------------- steering


def sweep_chart(
    summary: pd.DataFrame,
    baseline_perplexity: float,
    max_ppl_ratio: float,
    recommended: float | None = None,
    height: int = 220,
) -> alt.HConcatChart:
    """A strength sweep (``SweepResult.summary()`` rows: strength, concept, perplexity, divergence, distinct) as two
    panels over a log strength axis: the concept score, and the perplexity under the unsteered model with the
    baseline's (solid) and the allowed ``max_ppl_ratio`` x baseline (dashed) as rules. The recommended
    strength, when given, is a red vertical rule in both."""
    cols = [c for c in ("strength", "concept", "perplexity", "divergence", "distinct") if c in summary]
    df = summary[cols].astype(float).copy()
    x = alt.X("strength:Q", scale=alt.Scale(type="log"), title="strength (x max activation)")
    tips = [
        alt.Tooltip("strength:Q", format=".3g"),
        alt.Tooltip("concept:Q", title="concept score", format=".3f"),
        alt.Tooltip("perplexity:Q", format=".3g"),
        alt.Tooltip("divergence:Q", title="KL (nats/token)", format=".3f"),
    ]
    if "distinct" in df:
        tips.append(alt.Tooltip("distinct:Q", title="distinct tokens", format=".2f"))
    base = alt.Chart(df).encode(x=x, tooltip=tips)
    concept = base.mark_line(point=True, color=BAR_COLOUR).encode(
        y=alt.Y("concept:Q", title="concept score (x max act)")
    )
    ppl = base.mark_line(point=True, color=NEIGHBOUR_COLOUR).encode(
        y=alt.Y("perplexity:Q", scale=alt.Scale(type="log"), title="perplexity (unsteered model)")
    )
    rules = pd.DataFrame(
        {"perplexity": [baseline_perplexity, max_ppl_ratio * baseline_perplexity], "what": ["baseline", "limit"]}
    )
    ppl_rules = (
        alt.Chart(rules)
        .mark_rule(color=BACKGROUND_COLOUR)
        .encode(
            y="perplexity:Q",
            strokeDash=alt.StrokeDash("what:N", scale=alt.Scale(domain=["baseline", "limit"], range=[[1, 0], [5, 4]])),
            tooltip=[alt.Tooltip("what:N"), alt.Tooltip("perplexity:Q", format=".3g")],
        )
    )
    left, right = concept, ppl_rules + ppl
    if recommended is not None:
        rec = alt.Chart(pd.DataFrame({"strength": [float(recommended)]})).mark_rule(color=CENTRE_COLOUR).encode(x=x)
        left, right = left + rec, right + rec
    return alt.hconcat(
        left.properties(height=height, width=300, title="Concept score"),
        right.properties(height=height, width=300, title="Fluency"),
    )
