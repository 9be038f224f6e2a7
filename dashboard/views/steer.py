"""Steer page (``steer?sae=ID&feature=3,17`` / ``steer?preset=NAME`` / a full shared configuration):
generate baseline and steered text side by side, streamed token by token, with SAE features edited (clamp,
add, orthogonal, cap, ablate), quality scores beside every output, strength sweeps and multi-turn chat.

URL parameters: ``sae``; ``feature`` (one id, a comma list of ids, or ``ID=MODE:VALUE`` specs);
``preset`` (a saved steering preset); ``prompt``, ``pos`` (all|generated), ``chat`` (1|0), ``n``, ``t``,
``top_p``, ``seed``, ``conv`` (1: multi-turn chat), ``system`` (system prompt). The math, generation, scores
and sweeps live in ``pipelines.steering``; this page only wires widgets.
"""

from __future__ import annotations

import html
import math
from contextlib import closing
from typing import Any
from urllib.parse import urlencode

import altair as alt
import pandas as pd
import streamlit as st

from featuredict.dashboard.charts import sweep_chart
from featuredict.dashboard.common import page_context
from featuredict.dashboard.render import md, text_block
from featuredict.db import queries
from featuredict.db.errors import one_line
from featuredict.db.queries import PresetError, feature_max_acts
from featuredict.pipelines.steering import (
    MAX_ACT_UNITS,
    MIN_DISTINCT,
    FeatureEdit,
    GenerationSettings,
    SteeringConfig,
    SteeringInputError,
    SweepSettings,
    Turn,
    chat_streams,
    geometric_strengths,
    interleave,
    list_presets,
    load_preset,
    paired_streams,
    run_sweep,
    save_preset,
    score_rows,
    validate_config,
)

DEFAULT_EDIT = FeatureEdit(0, "add", 4.0)  # a feature arriving without a value: +4 x its max activation
DEFAULT_PROMPT = "Write a short story about a walk in the park."
MODE_LABELS = {
    "clamp": "clamp to",
    "add": "add (x max act)",
    "orthogonal": "orthogonal (x max act)",
    "cap": "cap (x max act)",
    "ablate": "ablate",
}
TEXT_CSS = (
    "white-space: pre-wrap; word-break: break-word; font-size: 0.95rem; line-height: 1.6; min-height: 3rem; "
    "padding: 0.5rem 0.7rem; border: 1px solid #ddd; border-radius: 6px; background: #fafafa; color: #222;"
)
URL_KEYS = ("feature", "preset", "prompt", "pos", "chat", "n", "t", "top_p", "seed", "conv", "system")

ctx = page_context()
store, sae_id = ctx.store, ctx.sae_id
row = queries.sae_info(store, sae_id)
if row is None:  # the frame only picks ids it read from the table; a concurrent rebuild could drop it
    st.error(md(f"SAE {sae_id!r} is not in this database."))
    st.stop()
sae_row: dict[str, Any] = row  # found (the page stopped otherwise)
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
    "activation; **orthogonal** replaces the activation's component along that direction, **cap** caps it; "
    "**ablate** clamps the feature to 0. Quality scores use the unsteered model as the reference."
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
    ss["steer_conv"] = cfg.multi_turn
    ss["steer_system"] = cfg.system
    g = cfg.generation
    ss["steer_n"], ss["steer_t"], ss["steer_top_p"], ss["steer_seed"] = g.max_new_tokens, g.temperature, g.top_p, g.seed


url_state = {k: str(st.query_params[k]) for k in URL_KEYS if k in st.query_params}
signature = repr(sorted(url_state.items())) + sae_id
if st.session_state.get("_steer_url_sig") != signature:
    st.session_state["_steer_url_sig"] = signature
    for k in ("steer_result", "steer_sweep", "steer_conversation"):
        st.session_state.pop(k, None)
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
ss.setdefault("steer_conv", False)
ss.setdefault("steer_system", "")
ss.setdefault("steer_conversation", [])
defaults = GenerationSettings()
ss.setdefault("steer_n", defaults.max_new_tokens)
ss.setdefault("steer_t", defaults.temperature)
ss.setdefault("steer_top_p", defaults.top_p)
ss.setdefault("steer_seed", defaults.seed)
# features from the URL/preset that this SAE's table does not hold never reach the multiselect
ss["steer_features"] = [int(f) for f in ss["steer_features"] if int(f) in max_acts]

# ---- prompt ---------------------------------------------------------------------------------------------
chat_mode = st.toggle(
    "Multi-turn chat",
    key="steer_conv",
    help="Each message goes to both models; the baseline and the steered model each keep their own "
    "conversation (their own earlier replies). Needs the chat template.",
)
st.text_area("Your message" if chat_mode else "Prompt", key="steer_prompt", height=90)
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
if ss["steer_chat"]:
    st.text_input("System prompt (optional)", key="steer_system", placeholder="e.g. You are a helpful assistant.")

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
    help="Search above to add features; each gets a method and a value below.",
)


def _unit(mode: str) -> str:
    if mode == "clamp":
        return "activation units"
    return "no value (clamps to 0)" if mode == "ablate" else "x max activation"


for f in ss["steer_features"]:
    mx = max_acts.get(int(f), 0.0)
    ss.setdefault(_state_key(f, "mode"), DEFAULT_EDIT.mode)
    ss.setdefault(_state_key(f, "value"), float(DEFAULT_EDIT.value))
    c = st.columns([3, 2, 2, 3], vertical_alignment="bottom")
    c[0].markdown(f"**{md(_describe(f))}**")
    c[1].selectbox(
        "Mode",
        list(MODE_LABELS),
        key=_state_key(f, "mode"),
        format_func=lambda m: MODE_LABELS[m],
        label_visibility="collapsed",
    )
    mode = ss[_state_key(f, "mode")]
    c[2].number_input(
        "Value",
        key=_state_key(f, "value"),
        step=0.5,
        format="%.3f",
        label_visibility="collapsed",
        disabled=mode == "ablate",
    )
    c[3].caption(f"{_unit(mode)}; max observed activation {mx:.3f}")

# ---- generation settings --------------------------------------------------------------------------------
with st.expander("Generation settings", expanded=False):
    g = st.columns(4)
    g[0].number_input("Max new tokens", key="steer_n", step=8, min_value=1)
    g[1].number_input("Temperature", key="steer_t", step=0.1, min_value=0.0, help="0 = greedy")
    g[2].number_input("Top-p", key="steer_top_p", step=0.05, min_value=0.0, max_value=1.0)
    g[3].number_input("Seed", key="steer_seed", step=1, min_value=0, help="shared by both runs")


def current_config(prompt: str | None = None) -> SteeringConfig:
    edits = tuple(
        FeatureEdit(
            int(f),
            str(ss[_state_key(f, "mode")]),  # type: ignore[arg-type]  # checked by FeatureEdit
            0.0 if ss[_state_key(f, "mode")] == "ablate" else float(ss[_state_key(f, "value")]),
        )
        for f in ss["steer_features"]
    )
    return SteeringConfig(
        prompt=str(ss["steer_prompt"] if prompt is None else prompt),
        edits=edits,
        positions=str(ss["steer_positions"]),  # type: ignore[arg-type]  # checked by SteeringConfig
        chat_template=bool(ss["steer_chat"]),
        generation=GenerationSettings(
            max_new_tokens=int(ss["steer_n"]),
            temperature=float(ss["steer_t"]),
            top_p=float(ss["steer_top_p"]),
            seed=int(ss["steer_seed"]),
        ),
        multi_turn=bool(ss["steer_conv"]),
        system=str(ss["steer_system"]) if ss["steer_chat"] else "",
    )


try:
    config = current_config(ss.get("_steer_pending"))
except SteeringInputError as e:  # a setting out of range (e.g. top-p 0): fixable in the widgets above
    ss.pop("_steer_pending", None)
    st.error(md(e))
    st.stop()


# ---- output and quality ---------------------------------------------------------------------------------
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


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def show_scores(scores: dict[str, Any] | None) -> None:
    """The quality scores beside the outputs: fluency of both, divergence, each feature's concept score."""
    if not scores:
        return
    b, s = scores["baseline"], scores["steered"]
    st.markdown(
        "**Quality** (reference: the unsteered model) · *fluency*: perplexity of each text under the unsteered "
        "model · *divergence*: mean KL(steered ‖ unsteered) of the next-token distributions over the generated "
        "tokens · *concept*: each feature's mean activation on the generated text in an unedited pass, in units "
        "of its max activation"
    )
    concept = list(s["concept"].items())
    cols = st.columns(3 + len(concept[:4]))
    cols[0].metric("Fluency: baseline perplexity", _fmt(b["perplexity"]))
    bp, sp = b["perplexity"], s["perplexity"]
    ratio = sp / bp if bp and sp and math.isfinite(bp) and math.isfinite(sp) else None
    cols[1].metric(
        "Fluency: steered perplexity",
        _fmt(sp),
        delta=None if ratio is None else f"x{ratio:.2f} vs baseline",
        delta_color="inverse",
    )
    cols[2].metric("Divergence (KL, nats/token)", _fmt(s["divergence_kl"]))
    for col, (f, v) in zip(cols[3:], concept[:4], strict=False):
        base_v = b["concept"].get(f)
        delta = None if v is None or base_v is None else f"{v - base_v:+.3f} vs baseline"
        col.metric(f"Concept #{f}", _fmt(v, ".3f"), delta=delta)
    sd, bd = s.get("distinct_tokens"), b.get("distinct_tokens")
    if sd is not None and sd < MIN_DISTINCT:
        st.warning(
            f"The steered text has collapsed into repeats: only {sd:.0%} of its tokens are distinct (baseline "
            f"{_fmt(bd, '.0%')}). Perplexity can stay low on repeated tokens; try a "
            "lower strength."
        )


def show_details(res: dict[str, Any]) -> None:
    for n in res["notes"]:
        st.info(n)
    show_scores(res.get("scores"))
    if res["features"] and res["steered_tokens"]:
        st.markdown(
            "**Steered features on the generated tokens** (measured inside the steered run; *before edit* is "
            "the SAE's reading of the activation arriving at the hook, *after edit* re-encodes the edited "
            "activation)"
        )
        st.dataframe(_summary(res), hide_index=True, width="stretch")
        st.dataframe(_acts_table(res), hide_index=True, width="stretch")


def result_record(config: SteeringConfig, streams: dict[str, Any], tokens: list[str], rt: Any) -> dict[str, Any]:
    base, steer = streams["baseline"].result, streams["steered"].result

    def rows(t: Any) -> list[list[float]]:
        return t.tolist() if t is not None else []

    qb, qs = score_rows(rt, [base, steer], max_acts)
    return {
        "user": config.prompt,
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
        "scores": {"baseline": qb.to_dict(), "steered": qs.to_dict()},
    }


def columns_header(describe: str) -> list[Any]:
    cols = list(st.columns(2))
    cols[0].markdown("**Baseline**")
    cols[1].markdown(f"**Steered** · `{html.escape(describe)}`")
    return cols


def _runtime() -> Any:
    from featuredict.pipelines.model.runtime import cached_runtime_from_row

    with st.spinner("Loading the model and SAE (first time only)..."):
        return cached_runtime_from_row(sae_row)


def _stream_into(streams: dict[str, Any], slots: dict[str, Any], rt: Any) -> dict[str, Any] | None:
    """Stream both runs into their slots; the result record, or None after a one-line error."""
    for slot in slots.values():
        slot.markdown(_text_box("", cursor=True), unsafe_allow_html=True)
    try:
        with closing(interleave(streams)) as events:  # a rerun/stop mid-way closes both streams
            for name, _piece in events:  # show the stream's whole decoded text so far
                slots[name].markdown(_text_box(streams[name].result.text, cursor=True), unsafe_allow_html=True)
        res = result_record(config, streams, rt.token_strings(streams["steered"].result.token_ids), rt)
    except SteeringInputError as e:  # e.g. NaN logits from an edit too large for the model
        st.error(md(f"Generation stopped: {e}"))
        return None
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        st.error(md(f"Generation stopped: {one_line(e, with_type=True)}"))
        return None
    for name, slot in slots.items():
        slot.markdown(_text_box(res[name]), unsafe_allow_html=True)
    return res


def _start(make: Any) -> tuple[Any, dict[str, Any]] | None:
    """Validate, load the runtime and open the streams (``make(rt)``); None after a one-line error."""
    try:
        validate_config(config, d_sae, max_acts)
        if not config.edits:
            raise SteeringInputError("pick at least one feature to steer (search above)")
        rt = _runtime()
        return rt, make(rt)
    except SteeringInputError as e:
        st.error(md(e))
    except Exception as e:  # noqa: BLE001 - loading failures: one line, never a traceback
        st.error(md(f"Cannot steer: {one_line(e, with_type=True)}"))
    return None


def _send() -> None:
    """The Send button's callback: keep the message for this run and empty the box for the next one."""
    ss["_steer_pending"] = ss["steer_prompt"]
    ss["steer_prompt"] = ""


# ---- run: one prompt --------------------------------------------------------------------------------------
if not chat_mode:
    run = st.button("Generate", type="primary", key="steer_run")
    if run:
        ss.pop("steer_result", None)
        started = _start(lambda rt: paired_streams(rt, config, max_acts, keep_logits=True))
        if started is not None:
            rt, streams = started
            cols = columns_header(config.describe())
            result = _stream_into(streams, {"baseline": cols[0].empty(), "steered": cols[1].empty()}, rt)
            if result is not None:
                ss["steer_result"] = result
                show_details(result)
    elif "steer_result" in ss:
        res = ss["steer_result"]
        cols = columns_header(res["describe"])
        cols[0].markdown(_text_box(res["baseline"]), unsafe_allow_html=True)
        cols[1].markdown(_text_box(res["steered"]), unsafe_allow_html=True)
        show_details(res)

# ---- run: multi-turn chat ---------------------------------------------------------------------------------
else:
    turns: list[dict[str, Any]] = ss["steer_conversation"]
    buttons = st.columns([1, 1, 4])
    send = buttons[0].button("Send", type="primary", key="steer_run", on_click=_send)
    if buttons[1].button("New conversation", key="steer_reset", disabled=not turns):
        ss["steer_conversation"] = turns = []
    cols = columns_header(config.describe())
    for t in turns:
        for col, side in zip(cols, ("baseline", "steered"), strict=True):
            col.markdown(f"**You:** {md(t['user'])}")
            col.markdown(_text_box(t[side]), unsafe_allow_html=True)
    pending = ss.pop("_steer_pending", None)
    if send and pending is not None:
        history = [Turn(t["user"], t["baseline"], t["steered"]) for t in turns]
        started = _start(lambda rt: chat_streams(rt, config, history, max_acts, keep_logits=True))
        if started is not None:
            rt, streams = started
            for col in cols:
                col.markdown(f"**You:** {md(config.prompt)}")
            result = _stream_into(streams, {"baseline": cols[0].empty(), "steered": cols[1].empty()}, rt)
            if result is not None:
                turns.append(result)
                ss["steer_conversation"] = turns
    if turns:
        st.caption(f"Turn {len(turns)} of this conversation:")
        show_details(turns[-1])
    else:
        st.caption("Type a message and press Send; both models answer, each in its own conversation.")


# ---- strength sweep ---------------------------------------------------------------------------------------
def _use_strength(strength: float) -> None:
    """Callback of the recommendation button: every feature's value at ``strength`` (ablate unchanged)."""
    for f in ss["steer_features"]:
        mode = ss[_state_key(f, "mode")]
        if mode == "clamp":
            ss[_state_key(f, "value")] = float(strength * max_acts.get(int(f), 0.0))
        elif mode in MAX_ACT_UNITS:
            ss[_state_key(f, "value")] = float(strength)


with st.expander("Strength sweep", expanded="steer_sweep" in ss):
    st.caption(
        "Generate at a grid of strengths (in units of each feature's max activation: the value of add, "
        "orthogonal and cap, strength x max act for clamp; ablated features stay ablated) x seeds, as one batch, "
        "and score each. The recommended strength has the highest concept score whose perplexity stays within "
        "the factor of the baseline's and whose text keeps at least half of its tokens distinct (not collapsed)."
    )
    w = st.columns(5)
    w[0].number_input("From (x max act)", key="steer_sw_lo", value=0.5, min_value=0.01, step=0.5)
    w[1].number_input("To (x max act)", key="steer_sw_hi", value=16.0, min_value=0.01, step=1.0)
    w[2].number_input("Strengths", key="steer_sw_n", value=8, min_value=1, max_value=16, step=1)
    w[3].number_input("Seeds", key="steer_sw_seeds", value=1, min_value=1, max_value=8, step=1)
    w[4].number_input("Perplexity factor", key="steer_sw_ratio", value=2.0, min_value=1.0, step=0.5)
    if chat_mode:
        st.caption("Sweeps run on one prompt: turn multi-turn chat off to sweep.")
    elif st.button("Run sweep", key="steer_sweep_run"):
        ss.pop("steer_sweep", None)
        try:
            settings = SweepSettings(
                strengths=geometric_strengths(
                    float(ss["steer_sw_lo"]), float(ss["steer_sw_hi"]), int(ss["steer_sw_n"])
                ),
                seeds=tuple(range(config.generation.seed, config.generation.seed + int(ss["steer_sw_seeds"]))),
                max_ppl_ratio=float(ss["steer_sw_ratio"]),
            )
            validate_config(config, d_sae, max_acts)
            rt = _runtime()
            with st.spinner(f"Generating {len(settings.strengths) * len(settings.seeds)} steered rows in one batch..."):
                sweep = run_sweep(rt, config, settings, max_acts)
            ss["steer_sweep"] = {"describe": config.describe(), **sweep.to_dict()}
        except SteeringInputError as e:
            st.error(md(e))
        except Exception as e:  # noqa: BLE001 - one line, never a traceback
            st.error(md(f"Sweep stopped: {one_line(e, with_type=True)}"))
    sw = ss.get("steer_sweep")
    if sw:
        summary = pd.DataFrame(sw["summary"]).astype(
            {"concept": float, "perplexity": float, "divergence": float, "distinct": float}
        )
        base_ppl = sw["baseline_perplexity"] if sw["baseline_perplexity"] is not None else float("nan")
        rec = sw["recommended_strength"]
        for n in sw["notes"]:
            st.info(n)
        st.markdown(f"**Sweep of** `{html.escape(sw['describe'])}` · baseline perplexity {_fmt(base_ppl)}")
        chart: alt.HConcatChart = sweep_chart(summary, base_ppl, sw["sweep"]["max_ppl_ratio"], rec)
        st.altair_chart(chart, width="stretch")
        texts = {r["strength"]: r["text"] for r in reversed(sw["rows"])}  # the first seed's text
        table = summary.assign(text=[texts.get(s, "") for s in summary["strength"]])
        st.dataframe(table, hide_index=True, width="stretch", key="steer_sweep_table")
        if rec is None:
            st.warning(
                f"No strength keeps the perplexity within {sw['sweep']['max_ppl_ratio']:g}x the baseline's with at "
                f"least {MIN_DISTINCT:g} distinct tokens (a text collapsed into repeats does not count)."
            )
        else:
            st.success(
                md(
                    f"Recommended strength: {rec:g} x max activation (the highest concept score whose perplexity "
                    f"stays within {sw['sweep']['max_ppl_ratio']:g}x the baseline's and whose text has not "
                    "collapsed into repeats)."
                )
            )
            st.button(f"Use strength {rec:g}", key="steer_sweep_use", on_click=_use_strength, args=(rec,))

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
    if store.read_only:
        st.caption("Read-only server: presets cannot be saved.")
    if st.button("Save preset", key="steer_preset_save", disabled=store.read_only):
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
