"""Charts of the attribution page: pure functions from data to an Altair chart (no Streamlit, no database).

- ``ranked_bars``: the top features' attributions as horizontal bars (positive pushes the target up);
- ``token_feature_heatmap``: attribution per (prompt token, feature) for the top features;
- ``layered_graph``: the pruned graph, tokens at the bottom, one row per SAE, the target on top; each feature
  node is a link (``href``) to its feature page.

Altair escapes the text it draws (it is SVG text, not HTML): labels carry corpus and LLM text as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import altair as alt
import pandas as pd

POS, NEG = "#2980b9", "#c0392b"


def ranked_bars(rows: Sequence[dict[str, Any]]) -> alt.Chart:
    df = pd.DataFrame(
        [
            {
                "node": f"{r['sae'].split('/')[-2] if r['sae'].count('/') >= 2 else r['sae']} #{r['feature']} @"
                f"{r['position']}",
                "attribution": float(r["attribution"]),
                "words": str(r.get("words") or "")[:80],
                "token": str(r["token"]),
                "sign": "raises the target" if r["attribution"] >= 0 else "lowers the target",
            }
            for r in rows
        ]
    )
    if df.empty:
        df = pd.DataFrame({"node": [], "attribution": [], "words": [], "token": [], "sign": []})
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("attribution:Q", title="attribution (activation x gradient)"),
            y=alt.Y("node:N", sort=None, title=None),
            color=alt.Color(
                "sign:N",
                scale=alt.Scale(domain=["raises the target", "lowers the target"], range=[POS, NEG]),
                legend=alt.Legend(title=None),
            ),
            tooltip=["node", "token", alt.Tooltip("attribution:Q", format=".4f"), "words"],
        )
        .properties(height=max(120, 22 * len(df)))
    )


def token_feature_heatmap(
    tokens: Sequence[str], rows: Sequence[dict[str, Any]], features: Sequence[tuple[str, int]]
) -> alt.Chart:
    """Attribution of each (position, feature) for ``features`` (pairs of SAE and feature), 0 where inactive."""
    cell = {(r["sae"], r["feature"], r["position"]): float(r["attribution"]) for r in rows}
    data = []
    for sae, f in features:
        for p, tok in enumerate(tokens):
            data.append(
                {
                    "feature": f"{sae.split('/')[-2] if sae.count('/') >= 2 else sae} #{f}",
                    "position": p,
                    "token": f"{p}: {tok!r}",
                    "attribution": cell.get((sae, f, p), 0.0),
                }
            )
    df = pd.DataFrame(data or [{"feature": "", "position": 0, "token": "", "attribution": 0.0}])
    m = max(1e-9, float(df["attribution"].abs().max()))
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("token:N", sort=alt.SortField("position"), title="prompt token"),
            y=alt.Y("feature:N", sort=None, title=None),
            color=alt.Color("attribution:Q", scale=alt.Scale(scheme="redblue", domain=[-m, m], reverse=True)),
            tooltip=["feature", "token", alt.Tooltip("attribution:Q", format=".4f")],
        )
        .properties(height=max(120, 20 * len(features)))
    )


def layered_graph(graph: dict[str, Any], link_of: Callable[[dict[str, Any]], str | None]) -> alt.LayerChart:
    """The graph JSON drawn in layers (x: prompt position, y: layer); feature nodes link to their pages."""
    nodes = graph["nodes"]
    order: dict[str, int] = {"E": 0}
    for n in nodes:
        if n["layer"] != "E" and n["layer"] not in order:
            order[n["layer"]] = 0
    for i, lay in enumerate(sorted((k for k in order if k != "E"), key=lambda v: int(v))):
        order[lay] = i + 1
    rows = []
    for n in nodes:
        rows.append(
            {
                "id": n["node_id"],
                "x": int(n["ctx_idx"]),
                "y": order[n["layer"]],
                "kind": n["feature_type"],
                "label": str(n.get("clerp") or "")[:80],
                "influence": float(n.get("influence") or 0.0),
                "href": link_of(n) or "",
            }
        )
    nd = pd.DataFrame(rows)
    pos = {r["id"]: (r["x"], r["y"]) for r in rows}
    edges = []
    for i, e in enumerate(graph["links"]):
        if e["source"] in pos and e["target"] in pos:
            (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
            sign = "positive" if e["weight"] >= 0 else "negative"
            edges.append({"edge": i, "x": x1, "y": y1, "x2": x2, "y2": y2, "w": abs(float(e["weight"])), "sign": sign})
    ed = pd.DataFrame(edges or [{"edge": 0, "x": 0, "y": 0, "x2": 0, "y2": 0, "w": 0.0, "sign": "positive"}])
    lines = (
        alt.Chart(ed)
        .mark_rule(opacity=0.45)
        .encode(
            x="x:Q",
            y="y:Q",
            x2="x2:Q",
            y2="y2:Q",
            strokeWidth=alt.StrokeWidth("w:Q", scale=alt.Scale(range=[0.3, 4]), legend=None),
            color=alt.Color(
                "sign:N",
                scale=alt.Scale(domain=["positive", "negative"], range=[POS, NEG]),
                legend=alt.Legend(title="edge"),
            ),
        )
    )
    points = (
        alt.Chart(nd)
        .mark_point(filled=True, size=90)
        .encode(
            x=alt.X("x:Q", title="prompt position"),
            y=alt.Y(
                "y:Q", title="layer (tokens, SAEs, target)", scale=alt.Scale(domain=[-0.3, max(order.values()) + 0.3])
            ),
            shape=alt.Shape("kind:N", legend=alt.Legend(title="node")),
            href="href:N",
            tooltip=["id", "kind", "label", alt.Tooltip("influence:Q", format=".3f")],
        )
    )
    return (lines + points).properties(height=120 + 90 * max(order.values()))
