"""Links into the steer page: a set of features with strengths as a ``steer?...`` URL, and the concept search's
"steer with this concept" control (the top features with strengths, editable, then one click to the page).

Strengths from a concept search: the top feature gets ``add DEFAULT_STRENGTH`` (x its max activation), each
other feature the same scaled by its concept score relative to the top one (rounded to 0.5, at least 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import streamlit as st

from featuredict.dashboard.common import PageContext, page_file, url
from featuredict.dashboard.render import md
from featuredict.pipelines.steering.config import (
    MAX_FEATURES,
    MODES,
    FeatureEdit,
    SteeringConfig,
    SteeringInputError,
)

DEFAULT_STRENGTH = 4.0  # the steer page's default for a feature that arrives without a value
DEFAULT_TOP = 3

FeatureStrengths = Sequence[FeatureEdit] | Sequence[tuple[int, float]] | Mapping[int, float]


def _edits(features_with_strengths: FeatureStrengths) -> tuple[FeatureEdit, ...]:
    """``FeatureEdit``s as given, ``(feature, strength)`` pairs or ``{feature: strength}`` as ``add`` edits."""
    items = (
        list(features_with_strengths.items())
        if isinstance(features_with_strengths, Mapping)
        else list(features_with_strengths)
    )
    out = []
    for item in items:
        if isinstance(item, FeatureEdit):
            out.append(item)
        elif isinstance(item, tuple | list) and len(item) == 2:
            f, s = item
            if not isinstance(s, int | float) or isinstance(s, bool):
                raise SteeringInputError(f"feature {f}: strength {s!r} is not a number")
            out.append(FeatureEdit(f, "add", float(s)))
        else:
            raise SteeringInputError(f"{item!r} is not a feature with a strength")
    return tuple(out)


def steer_params(sae_id: str, features_with_strengths: FeatureStrengths, prompt: str | None = None) -> dict[str, str]:
    """The steer page's query parameters for these features (see ``steer_url``)."""
    config = SteeringConfig(prompt=prompt or "", edits=_edits(features_with_strengths))
    if not config.edits:
        raise SteeringInputError("no features to steer with")
    params = {"sae": sae_id, "feature": ",".join(e.spec() for e in config.edits)}
    return params | ({"prompt": prompt} if prompt else {})


def steer_url(sae_id: str, features_with_strengths: FeatureStrengths, prompt: str | None = None) -> str:
    """The steer page's URL (relative, like ``common.url``) with these features: ``FeatureEdit``s keep their
    method; ``(feature, strength)`` pairs or a ``{feature: strength}`` mapping become ``add`` edits.
    SteeringInputError (one line) for a bad edit, a feature listed twice or more than 32 features."""
    return url("steer", **steer_params(sae_id, features_with_strengths, prompt))


def concept_steering_set(
    concept_df: pd.DataFrame, top: int = DEFAULT_TOP, strength: float = DEFAULT_STRENGTH
) -> pd.DataFrame:
    """The steering set a concept search suggests: its ``top`` features by ``score`` with columns feature,
    label (when present), method (``add``) and strength (``strength`` x score / best score, to 0.5, >= 0.5)."""
    if concept_df.empty or "feature" not in concept_df or "score" not in concept_df:
        return pd.DataFrame({"feature": [], "label": [], "method": [], "strength": []})
    df = concept_df.sort_values("score", ascending=False, kind="stable").head(max(1, min(int(top), MAX_FEATURES)))
    best = float(df["score"].iloc[0])
    rel = df["score"].astype(float) / best if best > 0 else pd.Series(1.0, index=df.index)
    labels = df["label"].fillna("").astype(str) if "label" in df else pd.Series("", index=df.index)
    return pd.DataFrame(
        {
            "feature": df["feature"].astype(int).to_numpy(),
            "label": labels.to_numpy(),
            "method": "add",
            "strength": [max(0.5, round(strength * float(r) * 2) / 2) for r in rel],
        }
    )


def edits_from_table(table: pd.DataFrame) -> tuple[FeatureEdit, ...]:
    """The edited steering set (rows with a feature; ``ablate`` ignores the strength) as FeatureEdits."""
    out = []
    for row in table.to_dict("records"):
        f, method, s = row.get("feature"), str(row.get("method") or "add"), row.get("strength")
        if f is None or (isinstance(f, float) and math.isnan(f)):
            continue
        if method == "ablate":
            out.append(FeatureEdit(int(f), "ablate"))
            continue
        if s is None or not isinstance(s, int | float) or isinstance(s, bool) or math.isnan(s):
            raise SteeringInputError(f"feature {int(f)}: give a strength")
        out.append(FeatureEdit(int(f), method, float(s)))  # type: ignore[arg-type]  # checked by FeatureEdit
    return tuple(out)


def steer_button(
    ctx: PageContext, concept_result_df: pd.DataFrame, prompt: str | None = None, key: str = "concept_steer"
) -> None:
    """Under concept search results: the suggested steering set (top features with strengths, editable) and
    one link that opens the steer page with that set in its URL. Errors show as one line."""
    if concept_result_df.empty:
        return
    st.markdown("**Steer with this concept**")
    n = st.number_input(
        "Features in the steering set",
        min_value=1,
        max_value=min(MAX_FEATURES, len(concept_result_df)),
        value=min(DEFAULT_TOP, len(concept_result_df)),
        key=f"{key}_top",
    )
    suggested = concept_steering_set(concept_result_df, int(n))
    table = st.data_editor(
        suggested,
        hide_index=True,
        key=f"{key}_table_{int(n)}",
        disabled=["feature", "label"],
        column_config={
            "feature": st.column_config.NumberColumn(format="%d", width="small"),
            "method": st.column_config.SelectboxColumn(options=list(MODES), required=True),
            "strength": st.column_config.NumberColumn(
                help="x max activation (clamp: activation units; ablate: ignored)", step=0.5, format="%.2f"
            ),
        },
    )
    try:
        params = steer_params(ctx.sae_id, edits_from_table(pd.DataFrame(table)), prompt)
    except SteeringInputError as e:
        st.error(md(f"Cannot steer with this set: {e}"))
        return
    st.page_link(page_file("steer"), label="Steer with these features", icon=":material/tune:", query_params=params)
