"""Overview page: every SAE in the database (model, hook, corpus, size, reconstruction quality) and a
log10-density histogram of all its features."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from featuredict.dashboard import charts
from featuredict.dashboard.common import fmt_density, page_context, page_file
from featuredict.dashboard.render import md
from featuredict.db import queries as q

ctx = page_context()
store, current = ctx.store, ctx.sae_id
st.title("featuredict")
st.caption(
    "Browse an SAE feature dictionary: search features, read their top contexts, label them, "
    "and collect them into lists."
)

saes = q.sae_overview(store)


def _pct(v: float | None) -> str:
    return "–" if v is None or pd.isna(v) else f"{100 * float(v):.1f}%"


def _compact(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def build_line(total: float | None, stages: dict[str, float]) -> str:
    """``Build: 41.2 s (model_load 4.9 s · forward 31.9 s · ...)``; empty when the build's time is unknown."""
    if total is None or pd.isna(total):
        return ""
    parts = " · ".join(f"{md(k)} {v:.1f} s" for k, v in stages.items())
    return f"Build: {float(total):.1f} s" + (f" ({parts})" if parts else "")


def _num(v: float | None, fmt: str = "{:,.2f}") -> str:
    return "–" if v is None or pd.isna(v) else fmt.format(float(v))


table = pd.DataFrame(
    {
        "SAE": saes["sae_id"],
        "model": saes["model_name"].fillna(saes["model_spec"]),
        "hook": saes["hook_name"],
        "corpus": saes["corpus"],
        "tokens": saes["n_tokens"],
        "d_sae": saes["d_sae"],
        "FVE": saes["fve"],
        "L0": saes["l0"],
        "dead": saes["dead_fraction"],
        "labelled": saes["n_labelled"],
    }
)
st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    column_config={
        "tokens": st.column_config.NumberColumn(format="localized"),
        "FVE": st.column_config.NumberColumn(format="percent"),
        "dead": st.column_config.NumberColumn("dead fraction", format="percent"),
        "L0": st.column_config.NumberColumn(format="%.1f"),
    },
)

evals = q.sae_evals(store)
if not evals.empty:  # written after each build (pipelines/attribution/quality.py; docs/attribution.md)
    st.caption("Quality with the SAE spliced into the model, on the corpus contexts counted (method 'splice'):")
    st.dataframe(
        evals[["sae_id", "method", "n_tokens", "delta_lm_loss", "loss_recovered", "kl", "fve", "l0"]],
        hide_index=True,
        width="stretch",
        column_config={
            "delta_lm_loss": st.column_config.NumberColumn("ΔLM loss (nats)", format="%.4f"),
            "loss_recovered": st.column_config.NumberColumn("loss recovered", format="percent"),
            "kl": st.column_config.NumberColumn("KL (nats)", format="%.4f"),
            "fve": st.column_config.NumberColumn("FVE", format="percent"),
            "l0": st.column_config.NumberColumn("L0", format="%.1f"),
        },
    )

for _, s in saes.iterrows():
    sae_id = str(s["sae_id"])
    st.subheader(f"{sae_id}" + ("  (selected)" if sae_id == current and len(saes) > 1 else ""))
    st.caption(
        f"Model **{md(s['model_name'] or s['model_spec'])}** · hook `{s['hook_name']}` · corpus {md(s['corpus'] or '–')} · "
        f"{md(s['architecture'] or 'SAE')} d_in {s['d_in']} · context {s['context_size']} tokens"
        + (f" · built {pd.Timestamp(s['built_at']):%Y-%m-%d %H:%M}" if pd.notna(s["built_at"]) else "")
    )
    if timing := build_line(s["build_seconds"], q.stage_seconds(store, sae_id)):
        st.caption(timing)
    cols = st.columns(6)
    cols[0].metric("Features (d_sae)", f"{int(s['d_sae']):,}")
    cols[1].metric("Tokens", _compact(int(s["n_tokens"])), help=f"{int(s['n_tokens']):,} tokens in the statistics")
    cols[2].metric("FVE", _pct(s["fve"]), help="Fraction of variance of the activations explained by the SAE")
    cols[3].metric("L0", _num(s["l0"], "{:,.1f}"), help="Mean number of active features per token")
    cols[4].metric("Dead", _pct(s["dead_fraction"]), help="Features that never fired on the corpus")
    cols[5].metric("Labelled", f"{int(s['n_labelled']):,}")

    hist, n_dead = q.density_histogram(store, sae_id)
    if hist.empty:
        st.info("No live features: nothing fired on the corpus.")
        continue
    st.altair_chart(charts.density_histogram(hist, n_dead), width="stretch")
    lo, hi = q.density_range(store, sae_id)
    st.caption(f"Densities range from {fmt_density(10**lo)} to {fmt_density(10**hi)}.")

st.divider()
c1, c2, c3 = st.columns(3)
c1.page_link(page_file("search"), label="Search features", icon=":material/search:", query_params={"sae": current})
c2.page_link(page_file("map"), label="Feature map", icon=":material/scatter_plot:", query_params={"sae": current})
c3.page_link(page_file("lists"), label="Saved lists", icon=":material/list:", query_params={"sae": current})
