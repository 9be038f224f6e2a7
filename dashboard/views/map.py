"""Map page (``map?sae=ID[&feature=N]``): UMAP of all features (65k+ points) coloured by density, tag or
label, with tooltips (label, best explanation, top tokens); clicking a point opens its feature page. With ``feature=N`` a neighbourhood view
centred on that feature is shown below the full map."""

from __future__ import annotations

import streamlit as st

from featuredict.dashboard import charts
from featuredict.dashboard.common import go_feature, page_context, qp_int, set_param, sync_widget
from featuredict.dashboard.data import cached_map_points
from featuredict.db import queries as q

ctx = page_context()
store, sae_id = ctx.store, ctx.sae_id
st.title("Feature map")

pts = cached_map_points(store, sae_id)
if pts.empty:
    st.info("No feature of this SAE has a UMAP position (the build skipped the map).")
    st.stop()

colour = st.radio(
    "Colour by",
    ["density", "tag", "label"],
    horizontal=True,
    key="map_colour",
    help="density: log10 of the fraction of tokens a feature fires on; tag: first tag; "
    "label: labelled vs not (the most common labels by name)",
)


def handle_pick(event: object, name: str) -> None:
    """Open the feature page of a clicked point (each click handled once)."""
    sel = getattr(event, "selection", None) or {}
    picked = sel.get(name) if isinstance(sel, dict) else getattr(sel, name, None)
    marker = f"_{name}_handled"
    if not picked:
        st.session_state.pop(marker, None)
        return
    fid = picked[0].get("feature") if isinstance(picked[0], dict) else None
    if fid is None:
        return
    if st.session_state.get(marker) == (sae_id, int(fid)):
        return
    st.session_state[marker] = (sae_id, int(fid))
    go_feature(sae_id, int(fid))


frame, enc = charts.plot_frame(pts, colour)
st.caption(
    f"{len(frame):,} features. Hover for label, best explanation and top tokens; click a point to open its "
    "feature page; scroll to zoom, drag to pan."
)
chart = charts.scatter(frame, enc, charts.point_size(len(frame)), 620, "pick").interactive()
event = st.altair_chart(chart, width="stretch", on_select="rerun", selection_mode="pick", key="map_all")
handle_pick(event, "pick")

# ------------------------------------------------------------------------------------ neighbourhood
st.subheader("Neighbourhood")
fid = qp_int("feature")
sync_widget("map_centre", "feature", fid if fid is not None else 0)
centre = int(st.number_input("Centre on feature", min_value=0, step=1, key="map_centre"))
if (fid is None and centre != 0) or (fid is not None and centre != fid):
    set_param("feature", centre, key="map_centre")  # the plain map URL stays clean until a centre is chosen
k = st.slider("Features shown around it", 50, 1000, 300, step=50, key="map_k")
feat = q.feature(store, sae_id, centre) or {}
near = charts.neighbourhood(frame, centre, k, feat.get("neighbours") or [])
if near.empty:
    st.info(f"Feature {centre} has no map position in SAE `{sae_id}`.")
    st.stop()
ev2 = st.altair_chart(
    charts.neighbourhood_chart(near, "pick_near"),
    width="stretch",
    on_select="rerun",
    selection_mode="pick_near",
    key="map_near",
)
st.caption(
    f"The {k} features nearest to feature {centre} in UMAP space; red: the centre, blue: its "
    "decoder-cosine neighbours (they may sit elsewhere on the map). Click one to open it."
)
handle_pick(ev2, "pick_near")
