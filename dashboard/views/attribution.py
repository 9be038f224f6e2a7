"""Attribution page (``attribution?sae=ID&saes=ID2,ID3&prompt=TEXT&position=N&target=TOKEN&mode=full``): why did
the model say that. Enter a prompt (or a chat as JSON), pick the output token to explain (or a contrast), and see
the ranked features with their words and a bar chart, a token x feature heatmap, the layered graph (feature
nodes open their pages) and the intervention check; one link sends the top features to the Steer page.
Prompt, tokens and feature words are untrusted: Streamlit widgets and tables show them as text, Altair as SVG
text, and nothing here is written as HTML."""

from __future__ import annotations

import json
import threading
from typing import cast

import pandas as pd
import streamlit as st

from featuredict.dashboard import attribution_charts as charts
from featuredict.dashboard.common import (
    page_context,
    qp_int,
    qp_str,
    set_param,
    url,
)
from featuredict.dashboard.render import md
from featuredict.db import queries as q
from featuredict.db.errors import one_line
from featuredict.pipelines.attribution.attribute import MODES, AttributionInputError, Mode
from featuredict.pipelines.attribution.graph import GraphConfig
from featuredict.pipelines.attribution.run import MODE_NOTES, Request, load_slots, run_loaded, sae_rows, to_json

ctx = page_context()
store, sae_id = ctx.store, ctx.sae_id
_LOCK = threading.Lock()  # one attribution at a time per process (each holds a full backward pass in memory)

st.title("Why did the model say that?")
st.caption(
    "Attribution = activation x gradient of the target for every active feature, each SAE spliced in with its "
    "error kept as a node; checked below by ablating the top features. See docs/attribution.md."
)

if "attr_pos_next" in st.session_state:
    st.session_state["attr_pos"] = st.session_state.pop("attr_pos_next")
others = [s for s in q.sae_ids(store) if s != sae_id]
want_extra = [s for s in qp_str("saes").split(",") if s in others]
with st.form("attr_form"):
    kind = st.radio(
        "Input", ["prompt", "chat (JSON)"], horizontal=True, index=1 if qp_str("chat") else 0, key="attr_kind"
    )
    text = st.text_area("Prompt", value=qp_str("prompt"), height=100, key="attr_prompt")
    chat_text = st.text_area(
        "Chat: a JSON list of {role, content} messages",
        value=qp_str("chat"),
        height=100,
        key="attr_chat",
        help='e.g. [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]',
    )
    c1, c2, c3 = st.columns(3)
    extra = c1.multiselect("More SAEs (same model)", others, default=want_extra, key="attr_saes")
    mode_names: list[str] = list(MODES)
    picked_mode = c2.radio(
        "Mode",
        mode_names,
        index=mode_names.index(qp_str("mode", "full")) if qp_str("mode", "full") in mode_names else 0,
        horizontal=True,
        key="attr_mode",
        help=" / ".join(MODE_NOTES.values()),
    )
    mode = cast(Mode, picked_mode or "full")  # one of MODES
    position = c3.number_input(
        "Position (blank: the last)",
        value=qp_int("position"),
        step=1,
        key="attr_pos",
        help="the position whose next-token prediction is explained; 0 is BOS",
    )
    t1, t2, t3 = st.columns(3)
    target = t1.text_input(
        "Target token (blank: the model's own prediction)", value=qp_str("target"), key="attr_target"
    )
    ca, cb = qp_str("contrast").split("|", 1) if "|" in qp_str("contrast") else ("", "")
    con_a = t2.text_input("or contrast: token A", value=ca, key="attr_ca")
    con_b = t3.text_input("minus token B", value=cb, key="attr_cb")
    graph_on = st.checkbox("Build the graph", value=qp_str("graph", "1") != "0", key="attr_graph")
    go = st.form_submit_button("Explain", type="primary")

auto = not go and (qp_str("prompt") or qp_str("chat")) and "attr_result" not in st.session_state
if go or auto:
    is_chat = kind.startswith("chat")
    set_param("prompt", None if is_chat else text)
    set_param("chat", chat_text if is_chat else None)
    set_param("saes", ",".join(extra) or None)
    set_param("mode", mode)
    set_param("position", None if position is None else int(position))
    set_param("target", target or None)
    set_param("contrast", f"{con_a}|{con_b}" if con_a and con_b else None)
    try:
        chat = None
        if is_chat:
            try:
                chat = json.loads(chat_text)
            except ValueError as e:
                raise AttributionInputError(f"the chat is not JSON: {e}") from None
            if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
                raise AttributionInputError("the chat must be a JSON list of {role, content} messages")
        req = Request(
            saes=[sae_id, *extra],
            prompt=None if is_chat else text,
            chat=chat,
            target=target or None,
            contrast=(con_a, con_b) if con_a and con_b else None,
            position=None if position is None else int(position),
            mode=mode,
            graph=GraphConfig() if graph_on else None,
        )
        rows = sae_rows(store, req.saes)
        with st.spinner("Attributing (one forward and backward pass, then the checks)..."), _LOCK:
            loaded, slots = load_slots(rows)
            res = run_loaded(store, loaded, slots, req, prepend_bos=bool(rows[0].get("prepend_bos", True)))
        st.session_state["attr_result"] = (to_json(res, 30), res.graph.to_json() if res.graph else None)
    except AttributionInputError as e:
        st.session_state.pop("attr_result", None)
        st.error(md(f"Cannot attribute: {one_line(e, 500)}"))
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        st.session_state.pop("attr_result", None)
        st.error(md(f"Attribution failed: {type(e).__name__}: {one_line(e, 500)}"))

result = st.session_state.get("attr_result")
if not result:
    st.stop()
data, graph = result
t = data["target"]

# click an output token: the prediction made at that position is explained next (same prompt, mode and SAEs)
toks = data["prompt_tokens"]
picked = st.pills(
    "Explain another output: click the token whose next-token prediction you want explained",
    options=list(range(len(toks))),
    format_func=lambda i: md(f"{i}: {toks[i]!r}"),
    default=t["position"],
    key=f"attr_pick_{len(toks)}_{t['position']}",
)
if picked is not None and int(picked) != int(t["position"]):
    set_param("position", int(picked))
    st.session_state["attr_pos_next"] = int(picked)  # applied before the form is drawn on the rerun
    st.session_state.pop("attr_result", None)
    st.rerun()
st.subheader("Target")
st.markdown(f"**{md(t['label'])}** = {t['value']:.4f} · mode **{data['mode']}**: {md(data['mode_note'])}")
st.caption(
    "Top predictions there: " + md(", ".join(f"{p['token']!r} {p['prob']:.3f}" for p in data["top_predictions"]))
)

st.subheader("Features that drove it")
feats = data["features"]
table = pd.DataFrame(
    [
        {
            "open": url("feature", sae=f["sae"], feature=f["feature"]),
            "sae": f["sae"],
            "feature": f["feature"],
            "position": f["position"],
            "token": f["token"],
            "activation": f["activation"],
            "gradient": f["gradient"],
            "attribution": f["attribution"],
            "density": f["density"],
            "words": f["words"],
        }
        for f in feats
    ],
    columns=[
        "open",
        "sae",
        "feature",
        "position",
        "token",
        "activation",
        "gradient",
        "attribution",
        "density",
        "words",
    ],
)
st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    column_config={"open": st.column_config.LinkColumn("open", display_text="open")},
)
st.altair_chart(charts.ranked_bars(feats[:20]), width="stretch")

st.subheader("Token x feature")
top_pairs = list(dict.fromkeys((f["sae"], f["feature"]) for f in feats[:12]))
st.altair_chart(charts.token_feature_heatmap(data["prompt_tokens"], feats, top_pairs), width="stretch")

if graph:
    st.subheader("Graph")
    n_f = sum(n["feature_type"] == "cross layer transcoder" for n in graph["nodes"])
    st.caption(
        f"{len(graph['nodes'])} nodes ({n_f} features) and {len(graph['links'])} edges kept by influence "
        f"(nodes {graph['metadata']['node_threshold']}, edges {graph['metadata']['edge_threshold']}). Tokens at the "
        "bottom, one row per SAE, the target on top; click a feature node to open its page."
    )

    def _link(n: dict) -> str | None:
        if n["feature_type"] != "cross layer transcoder":
            return None
        return url("feature", sae=n.get("sae") or sae_id, feature=n["feature"])

    st.altair_chart(charts.layered_graph(graph, _link), width="stretch")
    st.download_button(
        "Download graph JSON (circuit-tracer / Neuronpedia format)",
        json.dumps(graph, ensure_ascii=False),
        file_name="attribution-graph.json",
        mime="application/json",
    )

st.subheader("Checked by intervention")
chk = data["check"]
rows_chk = [*chk["single"], *([chk["together"]] if chk["together"] else [])]
st.dataframe(
    pd.DataFrame(
        [{"ablation": a["label"], "predicted change": a["predicted"], "actual change": a["actual"]} for a in rows_chk]
    ),
    hide_index=True,
    width="stretch",
)
for s in chk["sum_check"]:
    exact = abs(s["remainder"]) < 1e-3 * max(1.0, abs(s["delta"]))
    st.markdown(
        md(
            f"Sum check, {s['sae']}: T(clean) - T(every node of this SAE removed) = {s['delta']:+.4f} = features "
            f"{s['features']:+.4f} + error {s['error']:+.4f} + nonlinear remainder {s['remainder']:+.4f}."
        )
    )
    if not exact:
        st.caption(
            "The remainder is not zero: the model after this SAE is not linear in its activation (MLPs after a "
            "residual SAE stay nonlinear; in full mode attention and norms too). Attribution is a linear estimate; "
            "the ablations above show how good it is here."
        )

primary = [f for f in feats if f["sae"] == sae_id][:8]
if primary:
    from featuredict.dashboard.steer_links import steer_params
    from featuredict.pipelines.steering.config import FeatureEdit

    seen: set[int] = set()
    edits = []
    for f in primary:
        if f["feature"] not in seen:
            seen.add(f["feature"])
            edits.append(FeatureEdit(int(f["feature"]), "ablate"))
    prompt_text = qp_str("prompt") or None
    steer_href = url("steer", **steer_params(sae_id, edits, prompt_text))  # url-encoded: no markdown breaks out
    st.markdown(f":material/tune: [Send the top {len(edits)} features to Steer (ablate them there)]({steer_href})")
