"""Review queue (``review?sae=ID&priority=max_act|density|watchlist|concept&list=NAME&concept=NAME&status=S,S``):
features to review, unreviewed first, ordered by the priority the reviewer picks (max activation, density,
membership of a watchlist, or the score of a built-in concept search: deception, scams, weapons, self-harm,
sycophancy, power-seeking; ``pipelines.review``). Select rows for batch actions: set a review status, add to a
list. Every view is a shareable URL."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from featuredict.dashboard import render
from featuredict.dashboard.common import (
    get_runtime,
    page_context,
    qp_int,
    qp_str,
    reviewer_name,
    set_param,
    show_error,
    sync_widget,
    url,
    watchlist_picker,
)
from featuredict.dashboard.data import clear_label_caches
from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.schema import REVIEW_STATUSES
from featuredict.pipelines.search.priorities import concept_names, concept_priority, describe_rows

ctx = page_context()
store, sae_id, d_sae = ctx.store, ctx.sae_id, ctx.d_sae
PRIORITIES = {
    "max_act": "Max activation",
    "density": "Density",
    "watchlist": "Watchlist",
    "concept": "Concept search hits",
}
PAGE_SIZE = 100

st.title("Review queue")
flash = st.session_state.pop("_review_flash", None)
if flash:
    st.success(flash)

pr = qp_str("priority", "max_act")
sync_widget("rq_priority", "priority", pr if pr in PRIORITIES else "max_act")
c = st.columns([2, 2, 3])
priority = c[0].selectbox("Priority", list(PRIORITIES), format_func=PRIORITIES.__getitem__, key="rq_priority")
set_param("priority", priority, key="rq_priority")

raw_status = [s for s in qp_str("status", "").split(",") if s in REVIEW_STATUSES]
sync_widget("rq_status", "status", raw_status)
statuses = c[2].multiselect(
    "Statuses", REVIEW_STATUSES, key="rq_status", placeholder="all", help="Unreviewed features always come first"
)
set_param("status", ",".join(statuses), key="rq_status")

watchlist: str | None = None
scores: pd.DataFrame | None = None
if priority == "watchlist":
    watchlist = watchlist_picker(store, "rq_list", c[1])
elif priority == "concept":
    concepts = concept_names()
    want = qp_str("concept", concepts[0])
    sync_widget("rq_concept", "concept", want if want in concepts else concepts[0])
    concept = c[1].selectbox("Concept", concepts, key="rq_concept")
    set_param("concept", concept, key="rq_concept")

    @st.cache_data(max_entries=32, show_spinner=False)
    def _concept_scores(_row: dict, _store: object, key: tuple, name: str) -> pd.DataFrame:
        return concept_priority(get_runtime(_row), _store, key[0], name)

    try:
        with st.spinner(f"Running the '{concept}' example texts through the model and SAE…"):
            scores = _concept_scores(dict(ctx.sae), store, (sae_id, ctx.db_key), concept)
    except Exception as e:  # noqa: BLE001
        show_error(f"Could not run the concept search with SAE `{sae_id}`", e)
        st.stop()

page = max(0, qp_int("page") or 0)
try:
    req = q.QueueRequest(
        sae_id,
        priority,  # type: ignore[arg-type]
        statuses=tuple(statuses) or None,
        watchlist=watchlist,
        scores=scores,
        limit=PAGE_SIZE,
        offset=page * PAGE_SIZE,
    )
    rows, total = q.review_queue(store, req)
except Exception as e:  # noqa: BLE001
    show_error("Could not load the review queue", e)
    st.stop()

n_unrev = int((rows["status"] == "unreviewed").sum()) if len(rows) else 0
st.caption(
    f"{total:,} features match · page {page + 1} of {max(1, -(-total // PAGE_SIZE))} · "
    f"{n_unrev} unreviewed on this page · priority: {PRIORITIES[priority].lower()}"
)
if rows.empty:
    st.info("Nothing to review with these settings.")
    st.stop()

table = describe_rows(
    store, sae_id, rows, priority, concept if priority == "concept" else None, watchlist
)  # explanation, top tokens, why
order = ["feature", "status", "explanation", "top_tokens", "why", "label", "reviewer", "reason", "density"]
table = table[[*order, *(c for c in table.columns if c not in order)]]
table.insert(0, "open", [url("feature", sae=sae_id, feature=int(f)) for f in table["feature"]])
for col in ("label", "reviewer", "reason"):
    table[col] = table[col].astype(object).where(table[col].notna(), "")
event = st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    key="rq_table",
    on_select="rerun",
    selection_mode="multi-row",
    column_config={
        "open": st.column_config.LinkColumn("open", display_text="open"),
        "feature": st.column_config.NumberColumn(format="%d", width="small"),
        "density": st.column_config.NumberColumn(format="%.2e"),
        "max_act": st.column_config.NumberColumn(format="%.3f"),
        "priority": st.column_config.NumberColumn(format="%.3g"),
        "explanation": st.column_config.TextColumn("explanation", width="large"),
        "top_tokens": st.column_config.TextColumn("top tokens", width="medium"),
        "why": st.column_config.TextColumn("why in the queue", width="medium"),
    },
    height=min(36 + 35 * len(table), 740),
)
picked = [int(table["feature"].iloc[i]) for i in (event.selection.rows if event is not None else [])]

nav = st.columns([1, 1, 6])
if nav[0].button("◀ previous page", disabled=page == 0):
    set_param("page", page - 1 or None)
    st.rerun()
if nav[1].button("next page ▶", disabled=(page + 1) * PAGE_SIZE >= total):
    set_param("page", page + 1)
    st.rerun()

st.subheader(f"Batch actions ({len(picked)} selected)")
if store.read_only:
    st.caption("Read-only server: reviews and lists cannot be changed here.")
    st.stop()
editor = reviewer_name(key="author")
b = st.columns(2)
with b[0].form("rq_batch_status"):
    new_status = st.selectbox("Set review status", REVIEW_STATUSES, index=1)
    reason = st.text_input("Reason (optional)")
    do_status = st.form_submit_button("Set status of selected", disabled=not picked)
if do_status and picked:
    try:
        for f in picked:
            writes.set_review(store, sae_id, f, new_status, reason or None, editor)
        st.session_state["_review_flash"] = f"Set {len(picked)} features to {new_status}."
        st.rerun()
    except Exception as e:  # noqa: BLE001
        show_error("Could not set the review status", e)
with b[1].form("rq_batch_list"):
    names = q.list_names(store)["list_name"].tolist()
    target = st.selectbox(
        "Add to list", names, index=None, placeholder="choose a list, or type a new name", accept_new_options=True
    )
    do_list = st.form_submit_button("Add selected to list", disabled=not picked)
if do_list and picked:
    try:
        if not target:
            st.warning("Choose a list or type a new list name.")
        else:
            n_new = writes.add_to_list(store, target, sae_id, picked, author=editor)
            clear_label_caches()
            st.session_state["_review_flash"] = f"Added {n_new} new features to '{render.md(target)}'."
            st.rerun()
    except Exception as e:  # noqa: BLE001
        show_error("Could not add to the list", e)
