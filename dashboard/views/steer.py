"""Steer page (``steer?sae=ID&feature=3,17`` / ``steer?preset=NAME`` / a full shared configuration):
generate baseline and steered text side by side, streamed token by token, with SAE features clamped or added.

URL parameters: ``sae``; ``feature`` (one id, a comma list of ids, or ``ID=MODE:VALUE`` specs);
``preset`` (a saved steering preset); ``prompt``, ``pos`` (all|generated), ``chat`` (1|0), ``n``, ``t``,
``top_p``, ``seed``. The math and generation live in ``pipelines.steering``; this page only wires widgets.
"""

from __future__ import annotations

import html
from contextlib import closing
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from featuredict.dashboard.common import page_context
from featuredict.dashboard.render import md, text_block
from featuredict.db import queries
from featuredict.db.presets import PresetError, feature_max_acts
from featuredict.pipelines.steering import (
    FeatureEdit,
    GenerationSettings,
    SteeringConfig,
    SteeringInputError,
    interleave,
    list_presets,
    load_preset,
    paired_streams,
    save_preset,
    validate_config,
)

DEFAULT_EDIT = FeatureEdit(0, "add", 4.0)  # a feature arriving without a value: +4 x its max activation
DEFAULT_PROMPT = "Write a short story about a walk in the park."
MODE_LABELS = {"clamp": "clamp to", "add": "add (x max act)"}
TEXT_CSS = (
    "white-space: pre-wrap; word-break: break-word; font-size: 0.95rem; line-height: 1.6; min-height: 3rem; "
    "padding: 0.5rem 0.7rem; border: 1px solid #ddd; border-radius: 6px; background: #fafafa; color: #222;"
)
URL_KEYS = ("feature", "preset", "prompt", "pos", "chat", "n", "t", "top_p", "seed")

ctx = page_context()
store, sae_id = ctx.store, ctx.sae_id
row = queries.sae_info(store, sae_id)
if row is None:  # the frame only picks ids it read from the table; a concurrent rebuild could drop it
    st.error(md(f"SAE {sae_id!r} is not in this database."))
    st.stop()
d_sae = int(row["d_sae"])


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def _max_acts(_store: Any, key: str, sid: str) -> dict[int, float]:
    """``feature_max_acts``, cached by the database's content key (``ctx.db_key``: path, inode, newest build)."""
    return feature_max_acts(_store, sid)


max_acts = _max_acts(store, ctx.db_key, sae_id)

st.title("Steer")
st.caption(
    "Generate from a prompt twice, without and with SAE feature edits. **clamp** sets the feature's activation "
    "to a value at every edited position (the SAE's reconstruction error is kept, so nothing else changes); "
    "**add** pushes the activation along the feature's decoder direction by a multiple of its max observed "
    "activation."
)


# ---- URL -> widget state (only when the URL changed: a followed link wins over remembered widgets) -----
def _state_key(f: int, what: str) -> str:
    return f"steer_{what}_{f}"


def _load_into_widgets(cfg: SteeringConfig) -> None:
    ss = st.session_state
    if cfg.prompt:
        ss["steer_prompt"] = cfg.prompt
    ss["steer_features"] = [e.feature for e in cfg.edits]
    for e in cfg.edits:
        ss[_state_key(e.feature, "mode")] = e.mode
        ss[_state_key(e.feature, "value")] = float(e.value)
    ss["steer_positions"] = cfg.positions
    ss["steer_chat"] = cfg.chat_template
    g = cfg.generation
    ss["steer_n"], ss["steer_t"], ss["steer_top_p"], ss["steer_seed"] = g.max_new_tokens, g.temperature, g.top_p, g.seed


url_state = {k: str(st.query_params[k]) for k in URL_KEYS if k in st.query_params}
signature = repr(sorted(url_state.items())) + sae_id
if st.session_state.get("_steer_url_sig") != signature:
    st.session_state["_steer_url_sig"] = signature
    st.session_state.pop("steer_result", None)
    try:
        if "preset" in url_state:
            preset_sae, url_cfg = load_preset(store, url_state["preset"])
            if preset_sae != sae_id:
                st.query_params["sae"] = preset_sae
                st.session_state.pop("_steer_url_sig", None)
                st.rerun()
        else:
            url_cfg = SteeringConfig.from_mapping(url_state, default_edit=DEFAULT_EDIT)
            if not url_cfg.prompt:
                url_cfg = SteeringConfig(**{**url_cfg.__dict__, "prompt": DEFAULT_PROMPT})
        # edits from a URL are checked before they reach the widgets (a NaN cannot be shown in a number box)
        validate_config(SteeringConfig(**{**url_cfg.__dict__, "prompt": url_cfg.prompt or "x"}), d_sae, max_acts)
        _load_into_widgets(url_cfg)
    except (SteeringInputError, PresetError) as e:
        st.session_state["_steer_url_error"] = f"Cannot use this link: {e}"
    else:
        st.session_state.pop("_steer_url_error", None)
if st.session_state.get("_steer_url_error"):
    st.error(md(st.session_state["_steer_url_error"]))

ss = st.session_state
ss.setdefault("steer_prompt", DEFAULT_PROMPT)
ss.setdefault("steer_features", [])
ss.setdefault("steer_positions", "all")
ss.setdefault("steer_chat", True)
defaults = GenerationSettings()
ss.setdefault("steer_n", defaults.max_new_tokens)
ss.setdefault("steer_t", defaults.temperature)
ss.setdefault("steer_top_p", defaults.top_p)
ss.setdefault("steer_seed", defaults.seed)
# features from the URL/preset that this SAE's table does not hold never reach the multiselect
ss["steer_features"] = [int(f) for f in ss["steer_features"] if int(f) in max_acts]

# ---- prompt ---------------------------------------------------------------------------------------------
st.text_area("Prompt", key="steer_prompt", height=90)
opts = st.columns([1, 2])
opts[0].checkbox(
    "Apply chat template",
    key="steer_chat",
    help="Wrap the prompt as a user turn with the tokenizer's chat template (instruct models such as "
    "SmolLM2-135M-Instruct); ignored for models without one.",
)
opts[1].radio(
    "Edit positions",
    ["all", "generated"],
    key="steer_positions",
    horizontal=True,
    format_func=lambda p: "prompt and generated tokens" if p == "all" else "generated tokens only",
)

# ---- features -------------------------------------------------------------------------------------------
st.subheader("Features")
query = st.text_input("Search features", key="steer_search", placeholder="feature id(s), label or token text")
ids = [p.strip() for p in query.split(",") if p.strip()]
if ids and all(p.isdigit() for p in ids):  # one id or a comma list of ids
    found = queries.features_by_ids(store, sae_id, [int(p) for p in ids])["feature"].tolist()
else:
    hits = queries.search(store, sae_id, query, queries.SearchFilters(include_dead=True)) if ids else None
    found = [] if hits is None else hits["feature"].tolist()
if query.strip() and not found:
    st.caption("No feature matches that search.")
options = list(dict.fromkeys([*ss["steer_features"], *found]))
summaries = {int(r["feature"]): r for r in queries.features_by_ids(store, sae_id, options).to_dict("records")}


def _describe(f: int) -> str:
    s = summaries.get(int(f), {})
    what = next((t for t in (s.get("label"), s.get("top_tokens")) if isinstance(t, str) and t), "")
    mx = s.get("max_act")
    return f"#{f}" + (f" · {what}" if what else "") + (f" · max {mx:.2f}" if mx is not None else "")


st.multiselect(
    "Steered features",
    options,
    key="steer_features",
    format_func=_describe,
    help="Search above to add features; each gets a mode and a value below.",
)

for f in ss["steer_features"]:
    mx = max_acts.get(int(f), 0.0)
    ss.setdefault(_state_key(f, "mode"), DEFAULT_EDIT.mode)
    ss.setdefault(_state_key(f, "value"), float(DEFAULT_EDIT.value))
    c = st.columns([3, 2, 2, 3], vertical_alignment="bottom")
    c[0].markdown(f"**{md(_describe(f))}**")
    c[1].selectbox(
        "Mode", list(MODE_LABELS), key=_state_key(f, "mode"), format_func=MODE_LABELS.get, label_visibility="collapsed"
    )
    c[2].number_input("Value", key=_state_key(f, "value"), step=0.5, format="%.3f", label_visibility="collapsed")
    unit = "activation units" if ss[_state_key(f, "mode")] == "clamp" else "x max activation"
    c[3].caption(f"{unit}; max observed activation {mx:.3f}")

# ---- generation settings --------------------------------------------------------------------------------
with st.expander("Generation settings", expanded=False):
    g = st.columns(4)
    g[0].number_input("Max new tokens", key="steer_n", step=8, min_value=1)
    g[1].number_input("Temperature", key="steer_t", step=0.1, min_value=0.0, help="0 = greedy")
    g[2].number_input("Top-p", key="steer_top_p", step=0.05, min_value=0.0, max_value=1.0)
    g[3].number_input("Seed", key="steer_seed", step=1, min_value=0, help="shared by both runs")


def current_config() -> SteeringConfig:
    edits = tuple(
        FeatureEdit(int(f), str(ss[_state_key(f, "mode")]), float(ss[_state_key(f, "value")]))
        for f in ss["steer_features"]
    )
    return SteeringConfig(
        prompt=str(ss["steer_prompt"]),
        edits=edits,
        positions=str(ss["steer_positions"]),
        chat_template=bool(ss["steer_chat"]),
        generation=GenerationSettings(
            max_new_tokens=int(ss["steer_n"]),
            temperature=float(ss["steer_t"]),
            top_p=float(ss["steer_top_p"]),
            seed=int(ss["steer_seed"]),
        ),
    )


try:
    config = current_config()
except SteeringInputError as e:  # a setting out of range (e.g. top-p 0): fixable in the widgets above
    st.error(md(e))
    st.stop()


# ---- run ------------------------------------------------------------------------------------------------
def _text_box(text: str, cursor: bool = False) -> str:
    return text_block(text + ("▌" if cursor else ""), TEXT_CSS)


def _acts_table(res: dict[str, Any]) -> pd.DataFrame:
    cols: dict[str, Any] = {"token": res["steered_tokens"]}
    for k, f in enumerate(res["features"]):
        cols[f"#{f} before edit"] = [a[k] for a in res["acts_before"]]
        cols[f"#{f} after edit"] = [a[k] for a in res["acts_after"]]
    return pd.DataFrame(cols)


def _summary(res: dict[str, Any]) -> pd.DataFrame:
    out = []
    for k, f in enumerate(res["features"]):
        base = [a[k] for a in res["baseline_acts"]]
        before = [a[k] for a in res["acts_before"]]
        after = [a[k] for a in res["acts_after"]]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        out.append(
            {
                "feature": f,
                "edit": res["edits"][k],
                "max_act": max_acts.get(f, float("nan")),
                "mean on baseline tokens": mean(base),
                "mean before edit (steered run)": mean(before),
                "mean after edit (steered run)": mean(after),
                "tokens firing before edit": sum(1 for x in before if x > 0),
            }
        )
    return pd.DataFrame(out)


def show_details(res: dict[str, Any]) -> None:
    for n in res["notes"]:
        st.info(n)
    if res["features"] and res["steered_tokens"]:
        st.markdown(
            "**Steered features on the generated tokens** (measured inside the steered run; *before edit* is "
            "the SAE's reading of the activation arriving at the hook, *after edit* re-encodes the edited "
            "activation)"
        )
        st.dataframe(_summary(res), hide_index=True, width="stretch")
        st.dataframe(_acts_table(res), hide_index=True, width="stretch")


def result_record(config: SteeringConfig, streams: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    base, steer = streams["baseline"].result, streams["steered"].result

    def rows(t: Any) -> list[list[float]]:
        return t.tolist() if t is not None else []

    return {
        "baseline": base.text,
        "steered": steer.text,
        "describe": config.describe(),
        "features": list(steer.features),
        "edits": [e.spec() for e in config.edits],
        "steered_tokens": tokens,
        "acts_before": rows(steer.acts_before),
        "acts_after": rows(steer.acts_after),
        "baseline_acts": rows(base.acts_before),
        "notes": list(steer.notes),
    }


def columns_header(describe: str) -> list[Any]:
    cols = st.columns(2)
    cols[0].markdown("**Baseline**")
    cols[1].markdown(f"**Steered** · `{html.escape(describe)}`")
    return cols


run = st.button("Generate", type="primary", key="steer_run")
if run:
    ss.pop("steer_result", None)
    streams: dict[str, Any] | None = None
    try:
        validate_config(config, d_sae, max_acts)
        if not config.edits:
            raise SteeringInputError("pick at least one feature to steer (search above)")
        from featuredict.pipelines.runtime import cached_runtime_from_row

        with st.spinner("Loading the model and SAE (first time only)..."):
            rt = cached_runtime_from_row(row)
        streams = paired_streams(rt, config, max_acts)
    except SteeringInputError as e:
        st.error(md(e))
    except Exception as e:  # noqa: BLE001 - loading failures: one line, never a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        st.error(md(f"Cannot steer: {type(e).__name__}: {first}"))
    if streams is not None:
        cols = columns_header(config.describe())
        slots = {"baseline": cols[0].empty(), "steered": cols[1].empty()}
        for slot in slots.values():
            slot.markdown(_text_box("", cursor=True), unsafe_allow_html=True)
        try:
            with closing(interleave(streams)) as events:  # a rerun/stop mid-way closes both streams
                for name, _piece in events:  # show the stream's whole decoded text so far
                    slots[name].markdown(_text_box(streams[name].result.text, cursor=True), unsafe_allow_html=True)
        except SteeringInputError as e:  # e.g. NaN logits from an edit too large for the model
            st.error(md(f"Generation stopped: {e}"))
        except Exception as e:  # noqa: BLE001 - one line, never a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            st.error(md(f"Generation stopped: {type(e).__name__}: {first}"))
        else:
            res = result_record(config, streams, rt.token_strings(streams["steered"].result.token_ids))
            ss["steer_result"] = res
            for name, slot in slots.items():
                slot.markdown(_text_box(res[name]), unsafe_allow_html=True)
            show_details(res)
elif "steer_result" in ss:
    res = ss["steer_result"]
    cols = columns_header(res["describe"])
    cols[0].markdown(_text_box(res["baseline"]), unsafe_allow_html=True)
    cols[1].markdown(_text_box(res["steered"]), unsafe_allow_html=True)
    show_details(res)

# ---- presets and sharing --------------------------------------------------------------------------------
st.divider()
st.subheader("Presets and sharing")
share = urlencode({"sae": sae_id, **config.to_query_params()})
st.markdown("Link to this configuration (append to the dashboard's address):")
st.code(f"steer?{share}", language=None)
pc = st.columns(2)
with pc[0]:
    name = st.text_input("Preset name", key="steer_preset_name", placeholder="e.g. dragons-everywhere")
    overwrite = st.checkbox("Overwrite an existing preset of that name", key="steer_preset_overwrite")
    if st.button("Save preset", key="steer_preset_save"):
        try:
            validate_config(config, d_sae, max_acts)
            saved = save_preset(store, name, sae_id, config, overwrite=overwrite)
        except (SteeringInputError, PresetError) as e:
            st.error(md(e))
        else:
            st.success(md(f"Saved preset {saved!r}. Share it as:"))
            st.code(f"steer?{urlencode({'preset': saved})}", language=None)
with pc[1]:
    presets = list_presets(store, sae_id)
    names = [p.name for p in presets]
    if names:
        pick = st.selectbox("Saved presets for this SAE", names, key="steer_preset_pick", format_func=lambda n: n)
        cfg = next(p.config for p in presets if p.name == pick)
        st.caption(html.escape(cfg.describe() if cfg else "unreadable preset"))
        if st.button("Load preset", key="steer_preset_load"):
            for k in URL_KEYS:
                if k in st.query_params:
                    del st.query_params[k]
            st.query_params["preset"] = pick
            st.rerun()
    else:
        st.caption("No saved presets for this SAE yet.")
