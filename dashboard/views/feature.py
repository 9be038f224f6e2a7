"""Feature page (``feature?sae=ID&feature=N``): the best explanation under the title and every explanation
(method, model, scores, date, stale marker), statistics, activation histogram, top contexts with
per-token highlighting, interval samples by band, logit effects, decoder-cosine neighbours, place on the
map, safety review (status, reason, reviewer) and label / tags / notes editors with conflict notices, the change
history, add-to-list, and a link to steer with the feature."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from featuredict.dashboard import charts, render
from featuredict.dashboard.common import (
    feature_link,
    fmt_density,
    page_context,
    page_file,
    qp_int,
    reviewer_name,
    set_param,
    show_error,
    sync_widget,
    url,
)
from featuredict.dashboard.data import cached_map_points, clear_label_caches
from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.schema import REVIEW_STATUSES


def keep_mine_or_theirs(what: str, save_mine: Callable[[], object], snapshot_key: str) -> None:
    """After a conflicting save of ``what`` (review or label): "Keep mine" saves this form's version, "Keep
    theirs" drops it; either way the conflict and the form's snapshot are cleared and the page reruns. Both
    versions are in the history already."""
    conflict_key = f"_{what}_conflict_{sae_id}_{fid}"
    ch = st.columns(2)
    if ch[0].button("Keep mine", key=f"{what}_mine_{sae_id}_{fid}"):
        try:
            save_mine()
        except Exception as e:  # noqa: BLE001
            show_error(f"Could not save the {what}", e)
            return
    elif not ch[1].button("Keep theirs", key=f"{what}_theirs_{sae_id}_{fid}"):
        return
    st.session_state.pop(conflict_key, None)
    st.session_state.pop(snapshot_key, None)
    st.rerun()


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
page_feature: int = fid  # the feature this page shows (for the callbacks below)

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
fingerprint = q.sae_fingerprint(store, sae_id)
expl = q.explanations(store, sae_id, fid, fingerprint)
expl_rows = expl.to_dict("records")
best = next((r for r in expl_rows if isinstance(r["text"], str)), None)
if best is not None:  # the best explanation (LLM or imported text: escaped, shown as written)
    st.markdown(f"**{render.md(best['text'])}**")
    st.caption(
        ("stale (made for other SAE weights) · " if best["stale"] else "") + render.md(render.explanation_meta(best))
    )
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
links[0].page_link(
    page_file("steer"),
    label="Steer with this feature",
    icon=":material/tune:",
    query_params={"sae": sae_id, "feature": str(fid)},
)
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
    st.subheader("Explanations")
    shown = [r for r in expl_rows if isinstance(r["text"], str)]
    failed = [r for r in expl_rows if not isinstance(r["text"], str)]
    if shown:
        st.html(render.explanations_html(shown))
        if any(r["stale"] for r in shown):
            st.caption("Stale: made for other SAE weights than this database holds now (the SAE was rebuilt).")
    else:
        st.caption("No explanation yet. Write one (no LLM needed) with:")
        cmd = ["featuredict", "explain", "--db", str(store.path), "--sae", sae_id, "--features", str(fid)]
        st.code(shlex.join([*cmd, "--explainer", "tokens"]), language="bash")
    if failed:
        with st.expander(f"{len(failed)} failed attempt{'s' if len(failed) != 1 else ''}"):
            for r in failed:
                st.caption(f"{render.md(r['method'])}: {render.md(r['error'] or 'no text')}")

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

    # ------------------------------------------------------------------------------------ review + label
    # Optimistic concurrency: each form keeps the version it was loaded with (a snapshot in session state) and
    # the write compares it under the lock; a save over someone else's newer save comes back as a conflict.
    st.subheader("Safety review")
    ro = store.read_only  # featuredict serve --read-only: edit widgets disabled (Store.write refuses anyway)
    if ro:
        st.caption("Read-only server: reviews, labels and lists cannot be changed here.")
    editor = None if ro else reviewer_name(key="author")
    review_snap = f"_review_loaded_{sae_id}_{fid}"
    review_now = q.review(store, sae_id, fid)
    loaded_review = st.session_state.setdefault(review_snap, review_now)
    if review_now["version"] != loaded_review["version"] and f"_review_conflict_{sae_id}_{fid}" not in st.session_state:
        st.info(
            f"Someone changed this review since you loaded it (now: {render.md(review_now['status'])}"
            + (f" by {render.md(review_now['reviewer'])}" if review_now["reviewer"] else "")
            + ")."
        )
        if st.button("Load the current review"):
            st.session_state[review_snap] = review_now
            st.rerun()
    with st.form(f"review_form_{sae_id}_{fid}"):
        status = st.selectbox(
            "Review status",
            REVIEW_STATUSES,
            index=REVIEW_STATUSES.index(loaded_review["status"]),
            disabled=ro,
        )
        reason = st.text_area("Reason", value=loaded_review["reason"] or "", height=70, disabled=ro)
        save_review = st.form_submit_button("Save review", type="primary", disabled=ro)
    if save_review:
        try:
            res = writes.set_review(
                store, sae_id, fid, status, reason, editor, expected_version=loaded_review["version"]
            )
            if res.conflict is None:
                st.session_state.pop(review_snap, None)
                st.session_state["_flash"] = f"Saved the review of feature {fid}: {status}."
                st.rerun()
            st.session_state[f"_review_conflict_{sae_id}_{fid}"] = res.conflict
        except Exception as e:  # noqa: BLE001
            show_error("Could not save the review", e)
    rconf = st.session_state.get(f"_review_conflict_{sae_id}_{fid}")
    if rconf:
        theirs, mine = rconf["theirs"], rconf["mine"]
        st.warning("Not saved: someone else saved this review after you loaded it. Both versions are in the history.")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "version": "theirs (stored)",
                        "status": theirs["status"],
                        "reviewer": theirs["reviewer"],
                        "reason": theirs["reason"],
                    },
                    {
                        "version": "mine",
                        "status": mine["status"],
                        "reviewer": mine["reviewer"],
                        "reason": mine["reason"],
                    },
                ]
            ),
            hide_index=True,
        )
        keep_mine_or_theirs(
            "review",
            lambda: writes.set_review(
                store, sae_id, page_feature, mine["status"], mine["reason"], editor, expected_version=theirs["version"]
            ),
            review_snap,
        )
    if review_now["version"]:
        st.caption(
            f"Reviewed {pd.Timestamp(review_now['updated_at']):%Y-%m-%d %H:%M}"
            + (f" by {render.md(review_now['reviewer'])}" if review_now["reviewer"] else "")
        )

    st.subheader("Label")
    label_snap = f"_label_loaded_{sae_id}_{fid}"
    current = q.label(store, sae_id, fid)
    loaded = st.session_state.setdefault(label_snap, current)
    if (current or {}).get("updated_at") != (loaded or {}).get("updated_at") and not st.session_state.get(
        f"_label_conflict_{sae_id}_{fid}"
    ):
        st.info("Someone saved this label since you loaded the form; your save will not overwrite their changes.")
        if st.button("Load the current label"):
            st.session_state[label_snap] = current
            st.rerun()
    all_tags = sorted(
        set(q.all_tags(store)) | set((current or {}).get("tags") or []) | set((loaded or {}).get("tags") or [])
    )
    with st.form(f"label_form_{sae_id}_{fid}"):
        new_label = st.text_input("Label", value=(loaded or {}).get("label") or "", max_chars=500, disabled=ro)
        new_tags = st.multiselect(
            "Tags",
            options=all_tags,
            default=(loaded or {}).get("tags") or [],
            accept_new_options=True,
            help="Pick or type a new tag and press Enter",
            disabled=ro,
        )
        new_notes = st.text_area("Notes", value=(loaded or {}).get("notes") or "", height=90, disabled=ro)
        saved = st.form_submit_button("Save label", type="primary", disabled=ro)
    if saved:
        try:
            lres = writes.save_label_edit(store, sae_id, fid, loaded, new_label, new_tags, new_notes, editor)
            clear_label_caches()
            st.session_state.pop(label_snap, None)
            after = lres.row
            if lres.conflicts:
                st.session_state[f"_label_conflict_{sae_id}_{fid}"] = lres.conflicts
            else:
                cleared = after["label"] is None and after["notes"] is None and not len(after["tags"] or [])
                st.session_state["_flash"] = (
                    f"Cleared the label of feature {fid}." if cleared else f"Saved the label of feature {fid}."
                )
            st.rerun()
        except Exception as e:  # noqa: BLE001
            show_error("Could not save the label", e)
    lconf = st.session_state.get(f"_label_conflict_{sae_id}_{fid}")
    if lconf:
        st.warning(
            "Someone else changed "
            + " and ".join(lconf)
            + " after you loaded the form, so yours was not saved (tags were merged; other changes saved). "
            "Both versions are in the history."
        )
        st.dataframe(
            pd.DataFrame([{"field": k, "theirs (stored)": v["theirs"], "mine": v["mine"]} for k, v in lconf.items()]),
            hide_index=True,
        )

        label_conflicts: dict[str, Any] = lconf

        def save_label() -> None:
            writes.update_label(
                store, sae_id, page_feature, author=editor, **{k: v["mine"] for k, v in label_conflicts.items()}
            )
            clear_label_caches()

        keep_mine_or_theirs("label", save_label, label_snap)
    if current:
        st.caption(
            f"Last edited {pd.Timestamp(current['updated_at']):%Y-%m-%d %H:%M}"
            + (f" by {render.md(current['author'])}" if current.get("author") else "")
        )

    hist = q.history(store, sae_id, fid)
    with st.expander(f"History ({len(hist)} change{'s' if len(hist) != 1 else ''})"):
        if hist.empty:
            st.caption("No changes recorded yet.")
        else:  # a dataframe shows values as text (never HTML)
            st.dataframe(hist, hide_index=True, column_config={"changed_at": st.column_config.DatetimeColumn("when")})

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
            disabled=ro,
        )
        list_note = st.text_input("Note for this list entry (optional)", disabled=ro)
        add = st.form_submit_button("Add to list", disabled=ro)
    if add:
        try:
            if not choice:
                st.warning("Choose a list or type a new list name.")
            else:
                n_new = writes.add_to_list(store, choice, sae_id, fid, note=list_note or None, author=editor)
                st.session_state["_flash"] = (
                    f"Added feature {fid} to list '{render.md(choice)}'."
                    if n_new
                    else f"Feature {fid} was already in list '{render.md(choice)}'."
                )
                st.rerun()
        except Exception as e:  # noqa: BLE001
            show_error("Could not add to the list", e)
