"""Lists page (``lists?sae=ID&list=NAME``): saved lists of features (e.g. "deception", "bio"), their
members with labels and best explanations, add / remove / rename / delete, and export to CSV or JSON."""

from __future__ import annotations

import streamlit as st

from featuredict.dashboard.common import page_context, qp_str, set_param, show_error, sync_widget, url
from featuredict.dashboard.export import as_list, export_list
from featuredict.dashboard.render import md
from featuredict.db import queries as q
from featuredict.db import writes

ctx = page_context()
store, sae_id = ctx.store, ctx.sae_id
st.title("Saved lists")

flash = st.session_state.pop("_lists_flash", None)
if flash:
    st.success(flash)


lists = q.list_names(store)
if store.read_only:
    st.sidebar.caption("Read-only server: lists cannot be created or edited.")
else:
    with st.sidebar.expander("New list", expanded=lists.empty):
        with st.form("new_list", clear_on_submit=True):
            new_name = st.text_input("List name", placeholder="e.g. deception")
            new_ids = st.text_input(f"Feature ids of SAE {sae_id}", placeholder="e.g. 12, 40, 977")
            if st.form_submit_button("Create"):
                try:
                    ids = [int(x) for x in new_ids.replace(",", " ").split()]
                    if not ids:
                        st.warning("A list needs at least one feature id.")
                    else:
                        writes.add_to_list(store, new_name, sae_id, ids)
                        st.session_state["_lists_flash"] = (
                            f"Created list '{md(new_name.strip())}' with {len(ids)} features."
                        )
                        set_param("list", writes.clean_list_name(new_name))
                        st.rerun()
                except ValueError as e:
                    why = "feature ids are integers separated by commas or spaces" if "invalid literal" in str(e) else e
                    st.error(f"Could not create the list: {md(why)}")
                except Exception as e:  # noqa: BLE001
                    show_error("Could not create the list", e)

if lists.empty:
    st.info(
        "No saved lists yet. Add features to a list from a feature page ('Add to list'), or create one in the sidebar."
    )
    st.stop()

names = lists["list_name"].tolist()
wanted = qp_str("list")
sync_widget("list_pick", "list", wanted if wanted in names else names[0])
if st.session_state.get("list_pick") not in names:
    st.session_state["list_pick"] = names[0]
counts = dict(zip(lists["list_name"], lists["n"], strict=True))
name = st.selectbox("List", names, key="list_pick", format_func=lambda n: f"{n} ({counts[n]})")
set_param("list", name, key="list_pick")

members = q.list_members(store, name)
other = members[members["sae_id"] != sae_id]
if not other.empty:
    st.caption(
        f"{len(other)} of its features belong to other SAEs ({md(', '.join(sorted(other['sae_id'].unique())))})."
    )

view = members.copy()
view.insert(
    0, "open", [url("feature", sae=s, feature=int(f)) for s, f in zip(view["sae_id"], view["feature"], strict=True)]
)
view["tags"] = [", ".join(as_list(t)) for t in view["tags"]]
view["label"] = view["label"].fillna("")
view["explanation"] = view["explanation"].fillna("")  # best explanation (LLM text: a data grid shows it as text)
st.dataframe(
    view[
        [
            "open",
            "sae_id",
            "feature",
            "label",
            "explanation",
            "tags",
            "note",
            "density",
            "max_act",
            "top_tokens",
            "added_at",
        ]
    ],
    hide_index=True,
    width="stretch",
    column_config={
        "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
        "feature": st.column_config.NumberColumn(format="%d"),
        "density": st.column_config.NumberColumn(format="%.2e"),
        "max_act": st.column_config.NumberColumn("max act", format="%.2f"),
        "added_at": st.column_config.DatetimeColumn("added", format="YYYY-MM-DD HH:mm"),
    },
)

csv_text, json_text = export_list(members, name)
d1, d2, _ = st.columns([1, 1, 4])
safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "list"
d1.download_button("Export CSV", csv_text, file_name=f"{safe}.csv", mime="text/csv", key="dl_csv")
d2.download_button("Export JSON", json_text, file_name=f"{safe}.json", mime="application/json", key="dl_json")

if store.read_only:  # featuredict serve --read-only: no edit widgets (Store.write would refuse anyway)
    st.stop()
st.subheader("Edit")
e1, e2 = st.columns(2)
with e1:
    with st.form("add_members", clear_on_submit=True):
        ids_text = st.text_input(f"Add feature ids of SAE {sae_id}", placeholder="e.g. 5, 17")
        if st.form_submit_button("Add"):
            try:
                ids = [int(x) for x in ids_text.replace(",", " ").split()]
                n_new = writes.add_to_list(store, name, sae_id, ids) if ids else 0
                st.session_state["_lists_flash"] = f"Added {n_new} features to '{md(name)}'."
                st.rerun()
            except ValueError as e:
                bad_syntax = "invalid literal" in str(e)
                st.error("Feature ids are integers separated by commas or spaces." if bad_syntax else md(e))
            except Exception as e:  # noqa: BLE001
                show_error("Could not add to the list", e)
    with st.form("remove_members"):
        opts = [f"{s}:{int(f)}" for s, f in zip(members["sae_id"], members["feature"], strict=True)]
        drop = st.multiselect("Remove features", opts)
        if st.form_submit_button("Remove") and drop:
            try:
                for o in drop:
                    s, f = o.rsplit(":", 1)
                    writes.remove_from_list(store, name, s, int(f))
                st.session_state["_lists_flash"] = f"Removed {len(drop)} features from '{md(name)}'."
                st.rerun()
            except Exception as e:  # noqa: BLE001
                show_error("Could not remove", e)
with e2:
    with st.form("rename_list"):
        new = st.text_input("Rename to", value=name)
        if st.form_submit_button("Rename") and new.strip() and new.strip() != name:
            try:
                writes.rename_list(store, name, new)
                set_param("list", writes.clean_list_name(new))  # no key: the next run's sync updates the selector
                st.rerun()
            except Exception as e:  # noqa: BLE001
                show_error("Could not rename", e)
    with st.form("delete_list"):
        sure = st.checkbox(f"Yes, delete the list '{md(name)}' ({len(members)} features)")
        if st.form_submit_button("Delete list") and sure:
            try:
                writes.delete_list(store, name)
                set_param("list", None)
                st.session_state["_lists_flash"] = f"Deleted list '{md(name)}'."
                st.rerun()
            except Exception as e:  # noqa: BLE001
                show_error("Could not delete", e)
