"""Search page (``search?sae=ID&mode=text|meaning|prompt|concept&query=TEXT``).

- text: by feature id or ranked text search over labels, tags, notes, top-context text and logit tokens,
  with density / max-activation / labelled / tag filters;
- meaning: free text -> features ranked by cosine between its sentence embedding and each feature's stored
  vector (the tokens its strongest contexts peak on, plus its label, tags, notes and LLM explanations;
  ``pipelines.search.meaning``), with the same filters, showing the words each result was found by;
- prompt: run the model + SAE on pasted text; features most active on the whole text and per token;
- concept: example texts (and optional counter-examples) -> features that fire more on them than on the
  counter-examples or the corpus baseline (``pipelines.concept``).

Every result table has the feature's best explanation (``db.queries.best_explanations``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import streamlit as st

from featuredict.dashboard import render
from featuredict.dashboard.common import (
    get_runtime,
    go_feature,
    page_context,
    qp_str,
    set_param,
    show_error,
    sync_widget,
    url,
)
from featuredict.dashboard.data import cached_baselines
from featuredict.dashboard.steer_links import steer_button
from featuredict.db import queries as q
from featuredict.pipelines.search import by_prompt as prompt
from featuredict.pipelines.search import concept, meaning

ctx = page_context()
store, sae_id, info, d_sae = ctx.store, ctx.sae_id, ctx.sae, ctx.d_sae

st.title("Search")
MODES = {"text": "Text / id", "meaning": "By meaning", "prompt": "By prompt", "concept": "By concept"}
# By meaning when the dictionary has a meaning index (build and demo make one), else by text.
DEFAULT_MODE = "meaning" if not q.embedding_models(store, sae_id).empty else "text"
mode_qp = qp_str("mode", DEFAULT_MODE)
sync_widget("search_mode", "mode", mode_qp if mode_qp in MODES else DEFAULT_MODE)
mode = st.radio(
    "Search", list(MODES), format_func=MODES.get, horizontal=True, key="search_mode", label_visibility="collapsed"
)
set_param("mode", None if mode == DEFAULT_MODE else mode, key="search_mode")


def _progress(bar: Any, done: int, total: int) -> None:
    bar.progress(done / total, text=f"{done:,} / {total:,} features")


def link_column() -> Any:
    return st.column_config.LinkColumn(
        "open", display_text="open ↗", width="small", help="Shareable link to the feature page"
    )


def result_table(df: pd.DataFrame, key: str, extra_config: dict | None = None) -> None:
    """Show features (must have a ``feature`` column) with a link column; selecting a row opens it."""
    df = df.copy()
    df.insert(0, "open", [url("feature", sae=sae_id, feature=int(f)) for f in df["feature"]])
    config = {"open": link_column(), "feature": st.column_config.NumberColumn(format="%d", width="small")}
    if "density" in df:
        config["density"] = st.column_config.NumberColumn(format="%.2e")
    if "tags" in df:
        df["tags"] = [", ".join(t) if isinstance(t, list | np.ndarray) else "" for t in df["tags"]]
    for col in ("label", "top_tokens", "explanation"):
        if col in df:
            df[col] = df[col].fillna("")
    if "stale" in df and "explanation" in df:  # made for other SAE weights: say so in the cell
        df["explanation"] = [
            ("[stale] " + e if s and e else e) for e, s in zip(df["explanation"], df["stale"], strict=True)
        ]
        df = df.drop(columns="stale")
    config.setdefault("explanation", st.column_config.TextColumn("explanation", width="large"))
    config.update(extra_config or {})
    event = st.dataframe(
        df,
        hide_index=True,
        width="stretch",
        column_config=config,
        key=key,
        on_select="rerun",
        selection_mode="single-row",
        height=min(36 + 35 * len(df), 740),
    )
    rows = event.selection.rows if event is not None else []
    if rows:
        go_feature(sae_id, int(df["feature"].iloc[rows[0]]))


def labels_for(ids: list[int]) -> pd.DataFrame:
    """Label, best explanation (and stale flag), top tokens, density and max_act of ``ids``."""
    rows = q.features_by_ids(store, sae_id, ids)[["feature", "label", "top_tokens", "density", "max_act"]]
    return meaning.attach_explanations(store, sae_id, rows)


def filters_ui() -> tuple[q.SearchFilters, int]:
    """The filters expander shared by text and meaning search: (filters, max results)."""
    lo, hi = q.density_range(store, sae_id)
    with st.expander("Filters", expanded=False):
        c = st.columns(4)
        lo_f, hi_f = float(np.floor(lo * 4) / 4), float(np.ceil(hi * 4) / 4)
        if hi_f <= lo_f:
            hi_f = lo_f + 0.25
        dens = c[0].slider("log10 density", lo_f, hi_f, (lo_f, hi_f), step=0.25, key="f_density")
        min_max_act = c[1].number_input("Min max activation", min_value=0.0, value=0.0, step=0.5, key="f_maxact")
        labelled = c[2].radio("Labels", ["any", "labelled", "unlabelled"], horizontal=True, key="f_labelled")
        tags = q.all_tags(store, sae_id)
        tag = c[3].selectbox("Tag", tags, index=None, placeholder="any tag", key="f_tag")
        include_dead = c[0].checkbox("Include dead features", value=False, key="f_dead")
        limit = c[1].number_input("Max results", 10, 1000, 50, step=10, key="f_limit")
    filters = q.SearchFilters(
        min_log10_density=None if dens[0] <= lo_f else dens[0],
        max_log10_density=None if dens[1] >= hi_f else dens[1],
        min_max_act=min_max_act or None,
        labelled=cast(Literal["any", "labelled", "unlabelled"], labelled),  # one of the radio's options
        tag=tag,
        include_dead=include_dead,
    )
    return filters, int(limit)


def query_input(label: str, key: str, placeholder: str) -> str:
    """A text box bound to the ``query`` URL parameter (a link fills it; typing updates the URL)."""
    sync_widget(key, "query", qp_str("query"))
    query = str(st.text_input(label, key=key, placeholder=placeholder))
    set_param("query", query.strip() or None, key=key)
    return query


# --------------------------------------------------------------------------------------------- text
def text_mode() -> None:
    query = query_input(
        "Search features",
        "search_query",
        "a feature id (123) or words from labels, tags, notes, contexts, logit tokens",
    )
    filters, limit = filters_ui()
    if not query.strip() and filters == q.SearchFilters():
        st.caption(
            "Type words to search, or set filters to list features. Examples: a token seen in contexts "
            "(`bread`), a label word, a tag, `#123` for a feature id."
        )
        return
    t0 = time.perf_counter()
    try:
        res = q.search(store, sae_id, query, filters, limit=int(limit))
    except Exception as e:  # noqa: BLE001
        show_error("Search failed", e)
        return
    ms = (time.perf_counter() - t0) * 1000
    fid = q.feature_id_in_query(query)
    if fid is not None and (res.empty or int(res["feature"].iloc[0]) != fid):
        st.warning(f"No feature {fid} in SAE `{sae_id}` (it has features 0 to {d_sae - 1}).")
    if res.empty:
        st.info(f"No feature matches {render.md(repr(query))} with these filters.")
        return
    st.caption(
        f"{len(res)} features{' (limit reached)' if len(res) >= limit else ''} in {ms:.0f} ms. "
        "Select a row (or use 'open') to see a feature."
    )
    res = meaning.attach_explanations(store, sae_id, res)
    cols = ["feature", "label", "explanation", "stale", "tags", "top_tokens", "snippet", "matched", "score"]
    res = res[[*cols, "density", "max_act"]]
    result_table(
        res,
        "search_results",
        {
            "score": st.column_config.NumberColumn(format="%.1f", width="small"),
            "max_act": st.column_config.NumberColumn("max act", format="%.2f"),
            "snippet": st.column_config.TextColumn("context", width="large"),
            "top_tokens": st.column_config.TextColumn("top tokens", width="medium"),
            "matched": st.column_config.TextColumn("matched in", width="small"),
        },
    )


# ------------------------------------------------------------------------------------------ meaning
_WORD = re.compile(r"(\w+)")


def matched_html(text: str, query: str) -> str:
    """The words a feature was found by, one line per part (explanations, label, tags, notes; its contexts in
    grey), with the words it shares with the query marked. Every piece of text is HTML-escaped."""
    asked = {w.lower() for w in _WORD.findall(query or "") if len(w) > 2}
    lines = []
    for line in (text or "").split("\n"):
        pieces = _WORD.split(line)
        body = "".join(
            f"<mark>{render.escape_text(p)}</mark>" if i % 2 and p.lower() in asked else render.escape_text(p)
            for i, p in enumerate(pieces)
        )
        grey = line.startswith(meaning.CONTEXTS_PREFIX)
        lines.append(f'<div style="color:{"#888" if grey else "#222"}">{body}</div>')
    return "".join(lines)


def meaning_mode() -> None:
    models = q.embedding_models(store, sae_id)
    if models.empty:
        st.info(
            f"Search by meaning needs each feature's words embedded once: "
            f"{render.md(meaning.no_embeddings_message(store, sae_id, None))}. "
            "Only changed texts are re-embedded later; labels and explanations edited here are picked up at "
            "search time."
        )
        if store.read_only:
            st.caption("Read-only server: run `featuredict embed` on the database instead.")
        if st.button(f"Embed the {d_sae:,} features now", key="meaning_embed", disabled=store.read_only):
            bar = st.progress(0.0, text="Loading the embedding model…")
            try:
                report = meaning.embed_features(
                    store,
                    sae_id,
                    progress=False,
                    on_progress=lambda done, total: _progress(bar, done, total),
                )
            except Exception as e:  # noqa: BLE001
                show_error("Embedding failed", e)
                return
            st.success(render.md(report.summary()))
            st.rerun()
        return
    names = models["model"].tolist()
    model = meaning.default_model(store, sae_id) or names[0]
    if len(names) > 1:
        model = st.selectbox("Embedding model", names, index=names.index(model), key="meaning_model")
    query = query_input(
        "Search by meaning", "meaning_query", "what the features should be about, e.g. telling people untrue things"
    )
    filters, limit = filters_ui()
    if not query.strip():
        st.caption(
            "Type what you are looking for in your own words: features are ranked by how close their words "
            "(the tokens their strongest contexts peak on; labels, tags, notes and LLM explanations) are in meaning, "
            f"by cosine similarity of {render.md(model)} sentence embeddings, and the best of them also by how close "
            "their strongest contexts are."
        )
        return
    t0 = time.perf_counter()
    try:
        with st.spinner("Searching…"):
            res = meaning.meaning_search(
                store, sae_id, query, filters, limit=limit, model_id=model, cache_key=ctx.db_key
            )
    except Exception as e:  # noqa: BLE001
        show_error("Search by meaning failed", e)
        return
    ms = (time.perf_counter() - t0) * 1000
    old = q.not_checked_since_build(store, sae_id, model)
    if old:
        st.warning(
            f"{old:,} of the stored vectors were made before the last build of this SAE, so their context "
            f"summaries may be out of date: {render.md(f'featuredict embed --db {store.path} --sae {sae_id}')} "
            "re-checks them (only changed texts are re-embedded)."
        )
    if res.empty:
        st.info(f"No feature passes these filters for {render.md(repr(query))}.")
        return
    st.caption(
        f"{len(res)} features{' (limit reached)' if len(res) >= limit else ''} by meaning in {ms:.0f} ms "
        f"({render.md(model)}). The best {meaning.RERANK_POOL} by cosine are re-ranked by how close their "
        "strongest contexts are to the query too ('contexts': the mean cosine to their 10 strongest contexts); "
        "'found by' is the text each one's vector was made from."
    )
    result_table(
        res[[c for c in meaning.RESULT_COLUMNS if c not in ("tags", "text")]],  # text: in the expander below
        "meaning_results",
        {
            "score": st.column_config.NumberColumn("score", format="%.3f", width="small"),
            "cosine": st.column_config.NumberColumn("cosine", format="%.3f", width="small"),
            "contexts": st.column_config.NumberColumn("contexts", format="%.3f", width="small"),
            "matched": st.column_config.TextColumn("found by", width="large"),
            "top_tokens": st.column_config.TextColumn("top tokens", width="medium"),
            "max_act": st.column_config.NumberColumn("max act", format="%.2f"),
        },
    )
    with st.expander("What the best matches were compared with", expanded=False):
        st.html(
            "".join(
                f'<div style="margin:0 0 0.6rem 0"><b>#{int(r.feature)}</b> · cosine {float(r.cosine):.3f}'
                f"{matched_html(r.text, query)}</div>"
                for r in res.head(5).itertuples()
            )
        )


# ------------------------------------------------------------------------------------------- prompt
@st.cache_data(max_entries=32, show_spinner=False)
def _prompt_result(_row: Mapping[str, Any], key: tuple, text: str) -> prompt.PromptResult:
    return prompt.run_prompt(get_runtime(_row), text)


def prompt_mode() -> None:
    sync_widget("prompt_text", "query", qp_str("query"))
    text = st.text_area(
        "Text to run through the model",
        key="prompt_text",
        height=110,
        placeholder="Paste text; the model + SAE run on it (Ctrl+Enter to run).",
    )
    set_param("query", text.strip() or None, key="prompt_text")
    st.button("Run", type="primary", key="prompt_run")
    if not text.strip():
        st.caption(
            f"Runs {render.md(info.get('model_name') or info.get('model_spec'))} up to `{info.get('hook_name')}` "
            "and encodes with the SAE, then lists the features most active on the text and per token."
        )
        return
    try:
        with st.spinner("Running the model…"):
            res = _prompt_result(info, (sae_id, ctx.db_key), text)
    except Exception as e:  # noqa: BLE001
        show_error(f"Could not run the model of SAE `{sae_id}`", e)
        return
    if res.truncated:
        st.warning(f"Only the first {prompt.MAX_TOKENS} tokens were used.")
    base = cached_baselines(store, sae_id, res.d_sae)
    positions = [i for i in range(res.n_pos) if res.valid[i]]
    tok = st.pills(
        "Tokens: click one to see the features active on it",
        positions,
        format_func=lambda i: render.visible_token(res.tokens[i], mark_spaces=True),
        selection_mode="single",
        key="prompt_token",
    )
    c1, c2 = st.columns([3, 2], gap="large")
    with c1:
        st.subheader("Features on the whole text")
        rank_by = st.radio(
            "Rank by",
            ["max", "relative", "total"],
            horizontal=True,
            key="prompt_rank",
            format_func={
                "max": "max activation",
                "relative": "max / feature's corpus max",
                "total": "total activation",
            }.get,
        )
        ranked_by = cast(Literal["max", "relative", "total"], rank_by)  # one of the selectbox's options
        whole = prompt.whole_text_features(res, base.max_act, rank_by=ranked_by, top=50)
        if whole.empty:
            st.info("No feature fired on this text.")
            return
        whole = whole.merge(labels_for(whole["feature"].tolist()), on="feature", how="left")
        whole["top token"] = [render.visible_token(res.tokens[int(p)], mark_spaces=True) for p in whole["argmax_pos"]]
        names = {
            int(r.feature): (r.label if isinstance(r.label, str) else r.top_tokens or "") for r in whole.itertuples()
        }
        hl = st.selectbox(
            "Highlight the text by feature",
            list(names),
            key="prompt_hl",
            format_func=lambda f: f"{f} · {names[f]}"[:80],
        )
        if hl is not None:
            acts = prompt.feature_over_tokens(res, int(hl))
            scale = float(base.max_act[int(hl)]) or float(acts.max()) or 1.0
            st.html(render.context_html(res.tokens, acts, scale, max_pos=int(np.argmax(acts)), skip_first=ctx.has_bos))
        result_table(
            whole[
                ["feature", "label", "explanation", "stale", "max_here", "relative", "total", "n_tokens"]
                + ["top token", "top_tokens"]
            ],
            "prompt_whole",
            {
                "max_here": st.column_config.NumberColumn("max here", format="%.2f"),
                "relative": st.column_config.NumberColumn("of corpus max", format="percent"),
                "total": st.column_config.NumberColumn(format="%.2f"),
                "n_tokens": st.column_config.NumberColumn("tokens", format="%d"),
                "top_tokens": st.column_config.TextColumn("corpus top tokens"),
            },
        )
    with c2:
        st.subheader("Per token")
        if tok is None:
            st.caption("Click a token above to see the features active on it.")
        else:
            per = prompt.token_features(res, int(tok), top=25)
            st.caption(
                f"Token {int(tok)} {render.md(repr(res.tokens[int(tok)]))}: {int((res.pos == int(tok)).sum())} active "
                "features (strongest 25)"
            )
            if not per.empty:
                per = per.merge(labels_for(per["feature"].tolist()), on="feature", how="left")
                result_table(
                    per[["feature", "label", "explanation", "stale", "act", "top_tokens"]],
                    "prompt_token_table",
                    {
                        "act": st.column_config.NumberColumn(format="%.3f"),
                        "top_tokens": st.column_config.TextColumn("corpus top tokens"),
                    },
                )


# ------------------------------------------------------------------------------------------ concept
@st.cache_data(max_entries=16, show_spinner=False)
def _concept_rank(
    _row: Mapping[str, Any], _store: Any, key: tuple, examples: tuple[str, ...], counter: tuple[str, ...]
) -> pd.DataFrame:
    return concept.rank_concept(get_runtime(_row), _store, key[0], examples, counter, top=50)


def concept_mode() -> None:
    st.caption(
        "Paste a few texts that show a concept (e.g. a scam email, a deceptive answer), and optionally "
        "texts that do not. Features are ranked by contrast: their peak activation per example text (on "
        "their own scale) above what they show on ordinary text of that length (from their corpus density) "
        "and above their peaks on the counter-examples, plus, when the dictionary has a meaning index, how "
        "close their words are to the examples (docs/search.md)."
    )
    with st.form("concept_form"):
        c1, c2 = st.columns(2)
        ex = c1.text_area(
            "Examples of the concept (blank line between texts, or one per line)", height=180, key="concept_examples"
        )
        ce = c2.text_area("Counter-examples (optional)", height=180, key="concept_counter")
        go = st.form_submit_button("Find features", type="primary")
    examples, counter = concept.split_texts(ex), concept.split_texts(ce)
    if not examples:
        if go:
            st.warning("Give at least one example text.")
        return
    try:
        with st.spinner(f"Running the model on {len(examples) + len(counter)} texts…"):
            ranked = _concept_rank(info, store, (sae_id, ctx.db_key), tuple(examples), tuple(counter))
    except Exception as e:  # noqa: BLE001
        show_error(f"Could not score the concept with SAE `{sae_id}`", e)
        return
    if ranked.empty:
        st.info("No feature fires more on the examples than on the baseline.")
        return
    ranked = ranked.merge(labels_for(ranked["feature"].tolist()), on="feature", how="left")
    st.caption(
        f"{len(examples)} examples, {len(counter)} counter-examples"
        + ("" if counter else " (baseline: what each feature shows on ordinary text, from its corpus density)")
    )
    cols = ["feature", "score", "contrast", "meaning", "peak_pos", "peak_neg", "coverage", "label", "explanation"]
    cols += ["stale", "top_tokens", "density"]
    if not counter:
        cols.remove("peak_neg")
    if ranked["meaning"].isna().all():
        cols.remove("meaning")
    result_table(
        ranked[cols],
        "concept_results",
        {
            "score": st.column_config.NumberColumn(format="%.2f"),
            "contrast": st.column_config.NumberColumn("contrast", format="%.2f"),
            "meaning": st.column_config.NumberColumn("meaning", format="%.2f"),
            "peak_pos": st.column_config.NumberColumn("peak on examples", format="%.2f"),
            "peak_neg": st.column_config.NumberColumn("peak on counter", format="%.2f"),
            "coverage": st.column_config.NumberColumn("fires on examples", format="percent"),
            "top_tokens": st.column_config.TextColumn("corpus top tokens"),
        },
    )
    steer_button(ctx, ranked)


{"text": text_mode, "meaning": meaning_mode, "prompt": prompt_mode, "concept": concept_mode}[mode]()
