"""Feature page (``feature?sae=ID&feature=N``): statistics, activation histogram, top contexts with
per-token highlighting, interval samples by band, logit effects, decoder-cosine neighbours, place on the
map, label / tags / notes editor, add-to-list, and a link to steer with the feature."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from featuredict.dashboard import charts, render
from featuredict.dashboard.common import (
    feature_link,
    fmt_density,
    page_context,
    page_file,
    qp_int,
    set_param,
    show_error,
    steer_available,
    sync_widget,
    url,
)
from featuredict.dashboard.data import cached_map_points, clear_label_caches
from featuredict.db import queries as q
from featuredict.db import writes

ctx = page_context()
store, sae_id, d_sae = ctx.store, ctx.sae_id, ctx.d_sae

fid = qp_int("feature")
if st.query_params.get("feature") is not None and fid is None:
    st.error(render.md(f"feature={st.query_params.get('feature')} in the URL is not a feature id (an integer)."))

if fid is not None and not 0 <= fid < d_sae:
    st.error(f"Feature {fid} is not in SAE `{sae_id}` (it has features 0 to {d_sae - 1}).")
    feature_link(sae_id, 0, label="Open feature 0")
    st.stop()

# Feature picker, bound to ?feature= (a followed link wins over what the box remembered).
sync_widget("feature_pick", "feature", fid if fid is not None else 0)


def _step(delta: int) -> None:
    st.session_state["feature_pick"] = max(0, min(d_sae - 1, int(st.session_state["feature_pick"]) + delta))


nav = st.columns([2, 1, 1, 6], vertical_alignment="bottom")
picked = int(nav[0].number_input("Feature id", min_value=0, max_value=max(d_sae - 1, 0), step=1, key="feature_pick"))
nav[1].button("◀ prev", on_click=_step, args=(-1,), disabled=picked <= 0)
nav[2].button("next ▶", on_click=_step, args=(1,), disabled=picked >= d_sae - 1)
if fid is None or picked != fid:
    set_param("feature", picked, key="feature_pick")
    fid = picked

feat = q.feature(store, sae_id, fid)
if feat is None:
    st.error(f"Feature {fid} is not in SAE `{sae_id}` (it has features 0 to {d_sae - 1}).")
    st.stop()

flash = st.session_state.pop("_flash", None)
if flash:
    st.success(flash)

# ------------------------------------------------------------------------------------------------ header
title = f"Feature {fid}"
st.title(title)
if feat["label"]:
    st.markdown(f"### {render.md(feat['label'])}")
tags = list(feat["tags"]) if feat["tags"] is not None else []
if tags:
    st.markdown(" ".join(f":violet-badge[{render.md(t)}]" for t in tags))
if feat["dead"]:
    st.warning("This feature never fired on the corpus (dead).")

m = st.columns(5)
m[0].metric("Density", fmt_density(feat["density"]), help="Fraction of corpus tokens where it fires")
m[1].metric("Max activation", f"{feat['max_act']:.3f}")
m[2].metric("Mean when firing", "–" if feat["mean_act"] is None else f"{feat['mean_act']:.3f}")
m[3].metric("Firing tokens", f"{int(feat['fire_count']):,}")
m[4].metric("Decoder norm", f"{feat['decoder_norm']:.3f}")

links = st.columns(4)
if steer_available():
    links[0].page_link(
        page_file("steer"),
        label="Steer with this feature",
        icon=":material/tune:",
        query_params={"sae": sae_id, "feature": str(fid)},
    )
else:
    links[0].caption("Steering page not installed")
links[1].page_link(
    page_file("map"),
    label="Neighbourhood on the map",
    icon=":material/scatter_plot:",
    query_params={"sae": sae_id, "feature": str(fid)},
)
links[2].page_link(page_file("search"), label="Search", icon=":material/search:", query_params={"sae": sae_id})
links[3].markdown(f"[Link to this feature]({url('feature', sae=sae_id, feature=fid)})", help="Shareable URL")

left, right = st.columns([3, 2], gap="large")

# ------------------------------------------------------------------------------------------ contexts
with left:
    scale = float(feat["max_act"]) or 1.0
    st.subheader("Top activations")
    full = st.toggle("Show whole contexts", value=False, help="Otherwise a window around the max token")
    window = None if full else (24, 10)
    try:
        top = q.examples(store, sae_id, fid, "top")
        if top.empty:
            st.info("No activating contexts stored for this feature.")
        else:
            rows = list(zip(top["tokens"], top["acts"], top["max_pos"], top["max_act"], strict=True))
            st.html(render.contexts_html(rows, scale, window=window, skip_first=ctx.has_bos))
            st.caption(
                "Colour intensity = activation / feature max; hover a token for its activation; "
                "the underlined token is the context's max."
            )
    except Exception as e:  # noqa: BLE001
        show_error("Could not load top contexts", e)

    st.subheader("Interval samples")
    try:
        inter = q.examples(store, sae_id, fid, "interval")
        if inter.empty:
            st.caption("No interval samples stored.")
        for band, grp in inter.groupby("band", sort=False):
            lo, hi = grp["band_lo"].iloc[0], grp["band_hi"].iloc[0]
            rng = f"[{lo:.3g}, {hi:.3g})" if pd.notna(lo) and pd.notna(hi) else ""
            with st.expander(
                f"Band {int(band)}  activation {rng}  · {len(grp)} samples", expanded=band == inter["band"].max()
            ):
                rows = list(zip(grp["tokens"], grp["acts"], grp["max_pos"], grp["max_act"], strict=True))
                st.html(render.contexts_html(rows, scale, window=window, skip_first=ctx.has_bos))
    except Exception as e:  # noqa: BLE001
        show_error("Could not load interval samples", e)

# ------------------------------------------------------------------------------------- right column
with right:
    st.subheader("Activation histogram")
    hist = charts.activation_histogram(ctx.sae.get("hist_edges"), feat["hist_counts"])
    if hist is not None:
        st.altair_chart(hist, width="stretch")
    else:
        st.caption("No histogram (dead feature or no bins).")

    st.subheader("Logit effects")
    lc = st.columns(2)
    for col, toks_key, vals_key, name in (
        (lc[0], "pos_tokens", "pos_values", "promoted"),
        (lc[1], "neg_tokens", "neg_values", "suppressed"),
    ):
        toks = feat[toks_key] or []
        vals = feat[vals_key] or []
        col.caption(name.capitalize())
        if toks:
            col.dataframe(
                pd.DataFrame({"token": [render.visible_token(t, mark_spaces=True) for t in toks], "logit": vals}),
                hide_index=True,
                height=min(38 + 35 * len(toks), 300),
                column_config={"logit": st.column_config.NumberColumn(format="%.3f")},
            )

    st.subheader("Decoder neighbours")
    nb = q.neighbours(store, sae_id, fid)
    if nb.empty:
        st.caption("No neighbours stored.")
    for _, r in nb.iterrows():
        name = next((v for v in (r["label"], r["top_tokens"]) if isinstance(v, str) and v), "")
        feature_link(
            sae_id, int(r["feature"]), label=f"#{int(r['feature'])} · cos {r['cos']:.2f} · {render.md(name[:60])}"
        )

    st.subheader("On the map")
    if feat["umap_x"] is None or feat["umap_y"] is None:
        st.caption("No map position.")
    else:
        place = charts.feature_place(
            cached_map_points(store, sae_id), fid, feat["umap_x"], feat["umap_y"], feat["neighbours"] or []
        )
        st.altair_chart(place, width="stretch")
        st.caption("Red: this feature; blue: its decoder neighbours; grey: a sample of all features.")

    # ------------------------------------------------------------------------------------ label editor
    st.subheader("Label")
    current = q.label(store, sae_id, fid)
    all_tags = sorted(set(q.all_tags(store)) | set(current["tags"] if current else []))
    with st.form(f"label_form_{sae_id}_{fid}"):
        new_label = st.text_input("Label", value=(current or {}).get("label") or "", max_chars=500)
        new_tags = st.multiselect(
            "Tags",
            options=all_tags,
            default=(current or {}).get("tags") or [],
            accept_new_options=True,
            help="Pick or type a new tag and press Enter",
        )
        new_notes = st.text_area("Notes", value=(current or {}).get("notes") or "", height=90)
        author = st.text_input("Your name (optional)", value=st.session_state.get("author", ""))
        saved = st.form_submit_button("Save label", type="primary")
    if saved:
        try:
            st.session_state["author"] = author
            after = writes.save_label_edit(store, sae_id, fid, current, new_label, new_tags, new_notes, author or None)
            clear_label_caches()
            cleared = after["label"] is None and after["notes"] is None and not len(after["tags"] or [])
            st.session_state["_flash"] = (
                f"Cleared the label of feature {fid}." if cleared else f"Saved the label of feature {fid}."
            )
            st.rerun()
        except Exception as e:  # noqa: BLE001
            show_error("Could not save the label", e)
    if current:
        st.caption(
            f"Last edited {pd.Timestamp(current['updated_at']):%Y-%m-%d %H:%M}"
            + (f" by {render.md(current['author'])}" if current.get("author") else "")
        )

    # ------------------------------------------------------------------------------------- add to list
    st.subheader("Lists")
    member_of = q.lists_of_feature(store, sae_id, fid)
    if member_of:
        st.caption("In: " + ", ".join(render.md(n) for n in member_of))
    names = q.list_names(store)["list_name"].tolist()
    with st.form(f"list_form_{sae_id}_{fid}", clear_on_submit=True):
        choice = st.selectbox(
            "Add to list",
            options=names,
            index=None,
            placeholder="choose a list, or type a new name",
            accept_new_options=True,
        )
        list_note = st.text_input("Note for this list entry (optional)")
        add = st.form_submit_button("Add to list")
    if add:
        try:
            if not choice:
                st.warning("Choose a list or type a new list name.")
            else:
                n_new = writes.add_to_list(store, choice, sae_id, fid, note=list_note or None)
                st.session_state["_flash"] = (
                    f"Added feature {fid} to list '{render.md(choice)}'."
                    if n_new
                    else f"Feature {fid} was already in list '{render.md(choice)}'."
                )
                st.rerun()
        except Exception as e:  # noqa: BLE001
            show_error("Could not add to the list", e)
