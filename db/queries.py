"""Read queries behind the dashboard pages. Every statement is a constant; values travel as parameters.

Each function takes a ``Reader`` (``db.store.Store`` or anything with ``df(sql, params)`` and
``rows(sql, params)``) and returns plain Python / pandas. Shapes are given per function.

Text search has no full-text index (DuckDB's FTS extension is not available offline): it runs ``contains``
over lower-cased compact columns (label, tags, notes, ``max_tokens``, promoted logit tokens and
``features.search_text``), requires every query term to match somewhere, and ranks by weighted matches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd


class Reader(Protocol):
    def df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame: ...

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]: ...


def top_tokens(n: int) -> str:
    """SQL for the first ``n`` max-activating tokens of feature row ``f``, trimmed, joined by ' · ' (a constant
    expression; ``n`` is an int from code). Indexed ``concat_ws`` is ~3x cheaper than a list lambda at 65k rows."""
    return "concat_ws(' · ', " + ", ".join(f"nullif(trim(f.max_tokens[{i}]), '')" for i in range(1, int(n) + 1)) + ")"


# ----------------------------------------------------------------------------------------------- SAEs

SAE_COLUMNS = (
    "sae_id, model_spec, model_name, model_kwargs, dtype, sae_source, hook_name, hook_kind, architecture, d_in, "
    "d_sae, context_size, prepend_bos, corpus, n_tokens, n_contexts, fve, l0, dead_fraction, hist_edges, "
    "build_seconds, built_at, tool_version"
)


def sae_ids(db: Reader) -> list[str]:
    """Every SAE id in the database, sorted."""
    return [str(r[0]) for r in db.rows("SELECT sae_id FROM saes ORDER BY sae_id")]


def sae_overview(db: Reader) -> pd.DataFrame:
    """One row per SAE (all ``saes`` columns but config_json), plus ``n_features`` and ``n_labelled``."""
    return db.df(
        f"""SELECT {SAE_COLUMNS},
               (SELECT count(*) FROM features f WHERE f.sae_id = s.sae_id) AS n_features,
               (SELECT count(*) FROM labels l WHERE l.sae_id = s.sae_id) AS n_labelled
            FROM saes s ORDER BY sae_id"""
    )


def sae_info(db: Reader, sae_id: str) -> dict[str, Any] | None:
    """The ``saes`` row of one SAE as a dict (config_json included), or None."""
    df = db.df("SELECT * FROM saes WHERE sae_id = ?", [sae_id])
    return None if df.empty else _row_dict(df.iloc[0])


def density_histogram(db: Reader, sae_id: str, bins_per_decade: int = 4) -> tuple[pd.DataFrame, int]:
    """Histogram of log10(density) of live features: DataFrame ``[bins]`` with columns
    (log10_lo, log10_hi, count), and the number of dead (density 0) features."""
    df = db.df(
        """SELECT floor(log10(density) * ?) / ? AS log10_lo, count(*) AS count
           FROM features WHERE sae_id = ? AND density > 0 GROUP BY 1 ORDER BY 1""",
        [bins_per_decade, bins_per_decade, sae_id],
    )
    df["log10_hi"] = df["log10_lo"] + 1.0 / bins_per_decade
    dead = db.rows("SELECT count(*) FROM features WHERE sae_id = ? AND density <= 0", [sae_id])[0][0]
    return df[["log10_lo", "log10_hi", "count"]], int(dead)


def density_range(db: Reader, sae_id: str) -> tuple[float, float]:
    """(min, max) log10 density over live features; (-8, 0) when there is none."""
    r = db.rows(
        "SELECT min(log10(density)), max(log10(density)) FROM features WHERE sae_id = ? AND density > 0",
        [sae_id],
    )[0]
    if r[0] is None:
        return -8.0, 0.0
    return float(r[0]), float(r[1])


def feature_count(db: Reader, sae_id: str) -> int:
    return int(db.rows("SELECT count(*) FROM features WHERE sae_id = ?", [sae_id])[0][0])


# -------------------------------------------------------------------------------------------- features

FEATURE_COLUMNS = (
    "f.feature, f.max_act, f.fire_count, f.density, f.mean_act, f.dead, f.hist_counts, f.pos_tokens, "
    "f.pos_values, f.neg_tokens, f.neg_values, f.decoder_norm, f.neighbours, f.neighbour_cos, f.umap_x, "
    "f.umap_y, f.max_tokens, l.label, l.tags, l.notes, l.author, l.updated_at"
)


def feature(db: Reader, sae_id: str, feature_id: int) -> dict[str, Any] | None:
    """Everything the feature page header needs (not the decoder nor search_text), or None.

    Keys: feature, max_act, fire_count, density, mean_act, dead, hist_counts [B], pos_tokens/pos_values [k],
    neg_tokens/neg_values [k], decoder_norm, neighbours/neighbour_cos [n], umap_x, umap_y, max_tokens [top],
    label, tags [t], notes, author, updated_at (label fields None when unlabelled).
    """
    df = db.df(
        f"""SELECT {FEATURE_COLUMNS}
            FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
            WHERE f.sae_id = ? AND f.feature = ?""",
        [sae_id, int(feature_id)],
    )
    return None if df.empty else _row_dict(df.iloc[0])


def examples(db: Reader, sae_id: str, feature_id: int, kind: Literal["top", "interval"] = "top") -> pd.DataFrame:
    """Examples of one feature, ordered for display: rows ``[n]`` with columns band, band_lo, band_hi, rank,
    context_id, max_act, max_pos, tokens (list[str] ``[pos]``), acts (float array ``[pos]``).

    Top examples come by rank; interval samples by band descending (strongest first), then rank.
    """
    order = "rank" if kind == "top" else "band DESC, rank"
    return db.df(
        f"""SELECT band, band_lo, band_hi, rank, context_id, max_act, max_pos, tokens, acts
            FROM examples WHERE sae_id = ? AND feature = ? AND kind = ? ORDER BY {order}""",
        [sae_id, int(feature_id), kind],
    )


def features_by_ids(db: Reader, sae_id: str, ids: Sequence[int]) -> pd.DataFrame:
    """Summary rows for the given features, in the given order: columns feature, label, tags, density,
    max_act, mean_act, top_tokens (first max_tokens joined). Unknown ids are dropped."""
    ids = [int(i) for i in ids]
    if not ids:
        return pd.DataFrame(columns=["feature", "label", "tags", "density", "max_act", "mean_act", "top_tokens"])
    df = db.df(
        f"""SELECT f.feature, l.label, l.tags, f.density, f.max_act, f.mean_act,
                  {top_tokens(5)} AS top_tokens
           FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
           WHERE f.sae_id = ? AND f.feature IN (SELECT unnest(?::INTEGER[]))""",
        [sae_id, ids],
    )
    pos = {f: i for i, f in enumerate(ids)}
    return df.assign(_o=df["feature"].map(pos)).sort_values("_o").drop(columns="_o").reset_index(drop=True)


def neighbours(db: Reader, sae_id: str, feature_id: int) -> pd.DataFrame:
    """Decoder-cosine neighbours of one feature, most similar first: columns feature, cos, label, density,
    max_act, top_tokens."""
    return db.df(
        f"""WITH nb AS (
               SELECT unnest(neighbours) AS feature, unnest(neighbour_cos) AS cos,
                      generate_subscripts(neighbours, 1) AS i
               FROM features WHERE sae_id = ? AND feature = ?)
           SELECT nb.feature, nb.cos, l.label, f.density, f.max_act,
                  {top_tokens(4)} AS top_tokens
           FROM nb LEFT JOIN features f ON f.sae_id = ? AND f.feature = nb.feature
                   LEFT JOIN labels l ON l.sae_id = ? AND l.feature = nb.feature
           ORDER BY nb.i""",
        [sae_id, int(feature_id), sae_id, sae_id],
    )


def feature_baselines(db: Reader, sae_id: str, d_sae: int) -> dict[str, np.ndarray]:
    """Corpus statistics as dense arrays ``[d_sae]`` indexed by feature id: density, mean_act, max_act
    (missing features / dead: 0)."""
    df = db.df(
        "SELECT feature, density, coalesce(mean_act, 0) AS mean_act, max_act FROM features WHERE sae_id = ?",
        [sae_id],
    )
    out = {k: np.zeros(d_sae, dtype=np.float64) for k in ("density", "mean_act", "max_act")}
    idx = df["feature"].to_numpy()
    ok = (idx >= 0) & (idx < d_sae)
    for k in out:
        out[k][idx[ok]] = df[k].to_numpy(dtype=np.float64)[ok]
    return out


# ------------------------------------------------------------------------------------------------ map


def map_points(db: Reader, sae_id: str) -> pd.DataFrame:
    """All features with a UMAP position, compact for a scatter of 65k+ points: columns feature (int32),
    x, y (float32), log10_density (float32; -9 for dead), label, tag (first tag), top_tokens (str)."""
    df = db.df(
        f"""SELECT f.feature, f.umap_x AS x, f.umap_y AS y,
                  CASE WHEN f.density > 0 THEN log10(f.density) ELSE -9 END AS log10_density,
                  l.label, l.tags[1] AS tag, {top_tokens(3)} AS top_tokens
           FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
           WHERE f.sae_id = ? AND f.umap_x IS NOT NULL AND f.umap_y IS NOT NULL
           ORDER BY f.feature""",
        [sae_id],
    )
    return df.astype({"feature": "int32", "x": "float32", "y": "float32", "log10_density": "float32"})


# -------------------------------------------------------------------------------------------- labels


def label(db: Reader, sae_id: str, feature_id: int) -> dict[str, Any] | None:
    """The ``labels`` row of one feature as a dict (tags as a list), or None."""
    df = db.df(
        "SELECT label, tags, notes, author, updated_at FROM labels WHERE sae_id = ? AND feature = ?",
        [sae_id, int(feature_id)],
    )
    if df.empty:
        return None
    d = _row_dict(df.iloc[0])
    d["tags"] = list(d["tags"]) if d["tags"] is not None else []
    return d


def all_tags(db: Reader, sae_id: str | None = None) -> list[str]:
    """Distinct tags in use (for one SAE, or all), sorted."""
    if sae_id is None:
        rows = db.rows("SELECT DISTINCT unnest(tags) AS t FROM labels ORDER BY t")
    else:
        rows = db.rows("SELECT DISTINCT unnest(tags) AS t FROM labels WHERE sae_id = ? ORDER BY t", [sae_id])
    return [r[0] for r in rows if r[0]]


# --------------------------------------------------------------------------------------------- lists


def list_names(db: Reader) -> pd.DataFrame:
    """Saved lists: columns list_name, n (features), last_added."""
    return db.df("SELECT list_name, count(*) AS n, max(added_at) AS last_added FROM lists GROUP BY 1 ORDER BY 1")


def list_members(db: Reader, list_name: str) -> pd.DataFrame:
    """Members of one list, oldest first: columns sae_id, feature, note, added_at, label, tags, density,
    max_act, top_tokens."""
    return db.df(
        f"""SELECT m.sae_id, m.feature, m.note, m.added_at, l.label, l.tags, f.density, f.max_act,
                  {top_tokens(5)} AS top_tokens
           FROM lists m
           LEFT JOIN features f ON f.sae_id = m.sae_id AND f.feature = m.feature
           LEFT JOIN labels l ON l.sae_id = m.sae_id AND l.feature = m.feature
           WHERE m.list_name = ? ORDER BY m.added_at, m.sae_id, m.feature""",
        [list_name],
    )


def lists_of_feature(db: Reader, sae_id: str, feature_id: int) -> list[str]:
    rows = db.rows(
        "SELECT list_name FROM lists WHERE sae_id = ? AND feature = ? ORDER BY list_name", [sae_id, int(feature_id)]
    )
    return [r[0] for r in rows]


# -------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchFilters:
    """Filters of text search. Density bounds are log10; None = unbounded."""

    min_log10_density: float | None = None
    max_log10_density: float | None = None
    min_max_act: float | None = None
    labelled: Literal["any", "labelled", "unlabelled"] = "any"
    tag: str | None = None
    include_dead: bool = False


# (name, column expression, weight) per searchable field, all over lower-cased text. Curated fields (label,
# tags) outweigh everything the build extracted (max tokens 4 + logits 2 + context 1 + log1p(count) <= ~10).
_FIELDS: tuple[tuple[str, str, float], ...] = (
    ("label", "lower(coalesce(l.label, ''))", 12.0),
    ("tags", "lower(coalesce(array_to_string(l.tags, ' '), ''))", 10.0),
    ("notes", "lower(coalesce(l.notes, ''))", 4.0),
    ("max_tokens", "lower(coalesce(array_to_string(f.max_tokens, ' '), ''))", 4.0),
    ("logits", "lower(coalesce(array_to_string(f.pos_tokens, ' '), ''))", 2.0),
    ("context", "lower(coalesce(f.search_text, ''))", 1.0),
)
MAX_TERMS = 8
FEATURE_ID_RE = re.compile(r"^\s*(?:#|feature\s*)?(\d+)\s*$", re.IGNORECASE)


def parse_terms(query: str) -> list[str]:
    """Lower-cased search terms: double-quoted phrases stay whole, other words split on whitespace.
    At most MAX_TERMS; empty for a blank query."""
    terms = [m.group(1) or m.group(2) for m in re.finditer(r'"([^"]+)"|(\S+)', query or "")]
    terms = [t.strip().lower() for t in terms if t and t.strip()]
    return list(dict.fromkeys(terms))[:MAX_TERMS]


def feature_id_in_query(query: str) -> int | None:
    """The feature id when the whole query is a number ('123', '#123', 'feature 123')."""
    m = FEATURE_ID_RE.match(query or "")
    return int(m.group(1)) if m else None


def search(db: Reader, sae_id: str, query: str, filters: SearchFilters | None = None, limit: int = 50) -> pd.DataFrame:
    """Ranked text search over one SAE's features.

    Every term must match at least one field; score = sum over terms of field weights (label 12, tags 10,
    notes 4, max tokens 4, logit tokens 2, context text 1) + log1p(occurrences in the context text), then
    ties by max_act. A query that is just a feature id also returns that feature first.
    A blank query lists features passing the filters by max_act.

    Returns ``[<=limit]`` rows: feature, score, label, tags, density, max_act, top_tokens, matched
    (comma list of fields), snippet (context text around the first match, raw text: escape before HTML).
    """
    filters = filters or SearchFilters()
    terms = parse_terms(query)
    where = ["f.sae_id = ?"]
    params: list[Any] = [sae_id]
    if not filters.include_dead:
        where.append("NOT f.dead")
    if filters.min_log10_density is not None:
        where.append("f.density >= ?")
        params.append(10.0 ** float(filters.min_log10_density))
    if filters.max_log10_density is not None:
        where.append("f.density <= ?")
        params.append(10.0 ** float(filters.max_log10_density))
    if filters.min_max_act is not None:
        where.append("f.max_act >= ?")
        params.append(float(filters.min_max_act))
    if filters.labelled == "labelled":
        where.append("l.feature IS NOT NULL")
    elif filters.labelled == "unlabelled":
        where.append("l.feature IS NULL")
    if filters.tag:
        where.append("list_contains(l.tags, ?)")
        params.append(filters.tag)

    fid = feature_id_in_query(query)
    select_fields = ", ".join(f"{expr} AS t_{name}" for name, expr, _ in _FIELDS)
    if terms:
        term_match, score_parts, matched_parts = [], [], []
        term_params: list[Any] = []
        score_params: list[Any] = []
        matched_params: list[Any] = []
        for t in terms:
            term_match.append("(" + " OR ".join(f"contains(t_{name}, ?)" for name, _, _ in _FIELDS) + ")")
            term_params += [t] * len(_FIELDS)
            for name, _, w in _FIELDS:
                score_parts.append(f"CASE WHEN contains(t_{name}, ?) THEN {w} ELSE 0 END")
                score_params.append(t)
            score_parts.append("ln(1 + (length(t_context) - length(replace(t_context, ?, ''))) / ?)")
            score_params += [t, len(t)]
        for name, _, _ in _FIELDS:
            matched_parts.append(f"CASE WHEN {' OR '.join(f'contains(t_{name}, ?)' for _ in terms)} THEN '{name}' END")
            matched_params += terms
        id_clause = " OR feature = ?" if fid is not None else ""
        sql = f"""
            WITH base AS (
                SELECT f.feature, l.label, l.tags, f.density, f.max_act, f.search_text,
                       {top_tokens(5)} AS top_tokens, {select_fields}
                FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
                WHERE {" AND ".join(where)}),
            hits AS (SELECT * FROM base WHERE ({" AND ".join(term_match)}){id_clause})
            SELECT feature, ({" + ".join(score_parts)}) {"+ CASE WHEN feature = ? THEN 1000 ELSE 0 END" if fid is not None else ""} AS score,
                   label, tags, density, max_act, top_tokens,
                   concat_ws(', ', {", ".join(matched_parts)}) AS matched, search_text
            FROM hits ORDER BY score DESC, max_act DESC, feature LIMIT ?"""
        all_params = params + term_params + ([fid] if fid is not None else []) + score_params
        all_params += ([fid] if fid is not None else []) + matched_params + [int(limit)]
        df = db.df(sql, all_params)
    else:
        sql = f"""
            SELECT f.feature, {"CASE WHEN f.feature = ? THEN 1000.0 ELSE 0.0 END" if fid is not None else "0.0"} AS score,
                   l.label, l.tags, f.density, f.max_act,
                   {top_tokens(5)} AS top_tokens, '' AS matched, f.search_text
            FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
            WHERE {" AND ".join(where)} ORDER BY score DESC, f.max_act DESC, f.feature LIMIT ?"""
        df = db.df(sql, ([fid] if fid is not None else []) + params + [int(limit)])
    if fid is not None and (df.empty or int(df["feature"].iloc[0]) != fid):
        # The id may be filtered out above; show it anyway when it exists (it was asked for by id).
        direct = db.df(
            f"""SELECT f.feature, 1000.0 AS score, l.label, l.tags, f.density, f.max_act,
                      {top_tokens(5)} AS top_tokens, 'id' AS matched, f.search_text
               FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
               WHERE f.sae_id = ? AND f.feature = ?""",
            [sae_id, fid],
        )
        df = pd.concat([direct, df[df["feature"] != fid]], ignore_index=True).head(limit)
    elif fid is not None:
        df.loc[0, "matched"] = "id" + (", " + df.loc[0, "matched"] if df.loc[0, "matched"] else "")
    df["snippet"] = [snippet(t, terms) for t in df["search_text"]]
    return df.drop(columns=["search_text"]).reset_index(drop=True)


def snippet(text: str | None, terms: Sequence[str], width: int = 90) -> str:
    """Up to ``width`` characters of ``text`` around the first occurrence of any term (raw text)."""
    if not text or (isinstance(text, float) and math.isnan(text)):
        return ""
    low = text.lower()
    hits = [i for i in (low.find(t) for t in terms) if i >= 0]
    if not hits:
        return text[:width] + ("…" if len(text) > width else "")
    i = min(hits)
    lo = max(0, i - width // 3)
    hi = min(len(text), lo + width)
    return ("…" if lo > 0 else "") + text[lo:hi] + ("…" if hi < len(text) else "")


# ----------------------------------------------------------------------------------------------- utils


def _row_dict(row: pd.Series) -> dict[str, Any]:
    """A DataFrame row as a dict with numpy scalars turned into Python ones and NaN/NaT into None."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v.tolist()
        else:
            v = v.item() if isinstance(v, np.generic) else v
            out[str(k)] = (
                None if v is pd.NaT or v is pd.NA or v is None or (isinstance(v, float) and math.isnan(v)) else v
            )
    return out
