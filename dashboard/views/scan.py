"""Scan page (``scan?sae=ID&list=NAME``): paste text or upload a .txt / .jsonl file and see which features of a
watchlist fire over their thresholds (``pipelines.scan``, the engine of ``featuredict scan``): a results table
linking to the features, the scanned tokens with over-threshold spans highlighted and linked, CSV / JSON export.
Text is untrusted: every token is escaped before HTML."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from featuredict.dashboard import render
from featuredict.dashboard.common import get_runtime, page_context, show_error, url, watchlist_picker
from featuredict.dashboard.export import csv_safe
from featuredict.db import queries as q
from featuredict.pipelines.scan import BadRecord, ScanResult, Watch, read_records, scan_text

ctx = page_context()
store, sae_id = ctx.store, ctx.sae_id
MAX_RECORDS = 200  # per upload on this page; use `featuredict scan` for large files

st.title("Scan text for watched features")
wl_name = watchlist_picker(
    store, "scan_list", empty="No lists yet: add features to a list and use it as a watchlist (see docs/review.md)."
)
wl = q.watchlist(store, wl_name, sae_id)
if wl.empty:
    st.info(f"List '{render.md(wl_name)}' has no features of SAE `{sae_id}`.")
    st.stop()
st.caption(
    f"{len(wl)} watched features; a hit is an activation >= threshold x the feature's max activation. "
    "Thresholds and severities are set per member (writes.set_watch); members without one use "
    f"{q.DEFAULT_THRESHOLD:g} / {q.DEFAULT_SEVERITY}."
)

with st.form("scan_form"):
    pasted = st.text_area("Text to scan (one record)", height=140)
    upload = st.file_uploader("or a .txt (one record per line) / .jsonl file", type=["txt", "jsonl"])
    go = st.form_submit_button("Scan", type="primary")


def _highlight(res: ScanResult) -> str:
    """The record's tokens, escaped; tokens inside a hit span are marked and link to the feature."""
    owner: dict[int, int] = {}
    for h in reversed(res.hits):  # the first (most severe) hit wins a token
        for sp in h["spans"]:
            for i in range(sp["start"], sp["end"]):
                owner[i] = h["feature"]
    parts = []
    for i, tok in enumerate(res.tokens):
        t = html.escape(tok)
        if i in owner:
            href = html.escape(url("feature", sae=sae_id, feature=owner[i]), quote=True)
            t = f"<a href='{href}' target='_self' title='feature {owner[i]}'><mark>{t}</mark></a>"
        parts.append(t)
    return "<div style='white-space:pre-wrap;font-family:monospace'>" + "".join(parts) + "</div>"


if go:
    records: list = []
    if pasted.strip():
        records.append(("pasted", pasted))
    bad: list[BadRecord] = []
    if upload is not None:
        suffix = Path(upload.name).suffix.lower()
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / f"upload{suffix}"
            p.write_bytes(upload.getvalue())
            try:
                for rec in read_records(p):
                    if isinstance(rec, BadRecord):
                        bad.append(rec)
                    elif len(records) < MAX_RECORDS:
                        records.append((rec.line, rec.text))
            except (ValueError, OSError) as e:
                show_error("Could not read the file", e)
    for b in bad:
        st.warning(f"line {b.line}: {render.md(b.reason)}; skipped")
    if not records:
        st.warning("Paste a text or upload a file.")
        st.stop()
    try:
        rt = get_runtime(dict(ctx.sae))
        watch = Watch.from_frame(wl)
        results = [(src, scan_text(rt, text, watch)) for src, text in records]
    except Exception as e:  # noqa: BLE001
        show_error(f"Could not scan with SAE `{sae_id}`", e)
        st.stop()
    st.session_state["scan_results"] = results
    st.session_state["scan_texts"] = {str(src): text[:2000] for src, text in records}  # for "why" links

results = st.session_state.get("scan_results") or []
if results:
    rows = [
        {
            "record": str(src),
            "open": url("feature", sae=sae_id, feature=h["feature"]),
            "why": url("attribution", sae=sae_id, prompt=st.session_state.get("scan_texts", {}).get(str(src))),
            "feature": h["feature"],
            "severity": h["severity"],
            "score": h["score"],
            "max_act": h["max_act"],
            "mean_act": h["mean_act"],
            "spans": " | ".join(sp["text"] for sp in h["spans"]),
        }
        for src, res in results
        for h in res.hits
    ]
    table = pd.DataFrame(
        rows, columns=["record", "open", "why", "feature", "severity", "score", "max_act", "mean_act", "spans"]
    )
    st.subheader(f"{len(table)} hits in {sum(bool(r.hits) for _, r in results)} of {len(results)} records")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            "open": st.column_config.LinkColumn("open", display_text="open"),
            "why": st.column_config.LinkColumn("why", display_text="why", help="attribute the record's last token"),
        },
    )
    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button(
        "Export CSV",
        table.drop(columns=["open", "why"]).map(csv_safe).to_csv(index=False),
        file_name="scan.csv",
        mime="text/csv",
    )
    d2.download_button(
        "Export JSON",
        json.dumps([{"record": str(s), **r.to_json()} for s, r in results], ensure_ascii=False, indent=1),
        file_name="scan.json",
        mime="application/json",
    )
    for src, res in results:
        if res.hits:
            st.markdown(f"**Record {render.md(str(src))}** · severity {res.severity} · score {res.score:.3f}")
            st.html(_highlight(res))
