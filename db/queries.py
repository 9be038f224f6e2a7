"""Every read of featuredict's tables: the dashboard's pages, the CLI, search by meaning, Neuronpedia export and
steering presets. Every statement is a constant; values travel as parameters. (Every write is in ``writes.py``.)

Each function takes a ``Reader`` (``db.store.Store`` or anything with ``df(sql, params)`` and
``rows(sql, params)``) and returns plain Python / pandas. Shapes are given per function.

Text search has no full-text index (DuckDB's FTS extension is not available offline): it runs ``contains``
over lower-cased compact columns (label, tags, notes, ``max_tokens``, promoted logit tokens and
``features.search_text``), requires every query term to match somewhere, and ranks by weighted matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from featuredict.db.errors import UserError
from featuredict.db.records import FeatureBaselines, SaeRecord
from featuredict.db.store import Store


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


class UnknownSae(UserError, ValueError):
    """An SAE id the database does not hold, or none given where the database holds several."""


def resolve_sae(db: Reader, wanted: str | None, where: object | None = None) -> str:
    """``wanted`` when the database holds it; the only SAE when ``wanted`` is None; else ``UnknownSae`` naming
    the SAEs there are. ``where`` names the database in the message (default: the reader's ``path``)."""
    ids = sae_ids(db)
    place = where if where is not None else getattr(db, "path", "the database")
    listing = ", ".join(ids) or "none"
    if wanted is None:
        if len(ids) == 1:
            return ids[0]
        raise UnknownSae(f"give --sae: {place} holds {len(ids)} SAEs ({listing})")
    if wanted not in ids:
        raise UnknownSae(f"no SAE {wanted!r} in {place} (it holds: {listing})")
    return wanted


def sae_overview(db: Reader) -> pd.DataFrame:
    """One row per SAE (all ``saes`` columns but config_json), plus ``n_features`` and ``n_labelled``."""
    return db.df(
        f"""SELECT {SAE_COLUMNS},
               (SELECT count(*) FROM features f WHERE f.sae_id = s.sae_id) AS n_features,
               (SELECT count(*) FROM labels l WHERE l.sae_id = s.sae_id) AS n_labelled
            FROM saes s ORDER BY sae_id"""
    )


def stage_seconds(db: Reader, sae_id: str) -> dict[str, float]:
    """``{stage: seconds}`` of the SAE's build, in build order (``saes.stage_seconds``); empty when the build
    did not time its stages, the value is unreadable, or the file predates the column (opened read-only)."""
    has = db.rows(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'saes' AND column_name = 'stage_seconds'"
    )
    if not has or not has[0][0]:
        return {}
    rows = db.rows("SELECT stage_seconds FROM saes WHERE sae_id = ?", [sae_id])
    if not rows or not rows[0][0]:
        return {}
    try:
        data = json.loads(rows[0][0])
    except (TypeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}


SAE_EVAL_COLUMNS = (
    "sae_id, method, n_tokens, n_contexts, context_size, ce_clean, ce_sae, ce_zero, delta_lm_loss, loss_recovered, "
    "kl, fve, l0, created_at"
)


def sae_evals(db: Reader, sae_id: str | None = None) -> pd.DataFrame:
    """Quality figures per (SAE, method) (table ``sae_evals``; columns ``SAE_EVAL_COLUMNS``), of one SAE or all;
    empty when the file predates the table (a read-only open does not create it)."""
    has = db.rows("SELECT count(*) FROM information_schema.tables WHERE table_name = 'sae_evals'")[0][0]
    if not has:
        return pd.DataFrame(columns=[c.strip() for c in SAE_EVAL_COLUMNS.split(",")])
    if sae_id is None:
        return db.df(f"SELECT {SAE_EVAL_COLUMNS} FROM sae_evals ORDER BY sae_id, method")
    return db.df(f"SELECT {SAE_EVAL_COLUMNS} FROM sae_evals WHERE sae_id = ? ORDER BY method", [sae_id])


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


def feature_baselines(db: Reader, sae_id: str, d_sae: int) -> FeatureBaselines:
    """Corpus statistics as dense arrays ``[d_sae]`` indexed by feature id: density, mean_act, max_act
    (missing features / dead: 0)."""
    df = db.df(
        "SELECT feature, density, coalesce(mean_act, 0) AS mean_act, max_act FROM features WHERE sae_id = ?",
        [sae_id],
    )
    out = FeatureBaselines.zeros(d_sae)
    idx = df["feature"].to_numpy()
    ok = (idx >= 0) & (idx < d_sae)
    for k in ("density", "mean_act", "max_act"):
        getattr(out, k)[idx[ok]] = df[k].to_numpy(dtype=np.float64)[ok]
    return out


def sae_record(db: Reader, sae_id: str) -> SaeRecord | None:
    """The ``saes`` row of one SAE as a typed record (JSON parsed), or None."""
    info = sae_info(db, sae_id)
    return None if info is None else SaeRecord.from_row(info)


# ------------------------------------------------------------------------------------------------ map


def map_points(db: Reader, sae_id: str) -> pd.DataFrame:
    """All features with a UMAP position, compact for a scatter of 65k+ points: columns feature (int32),
    x, y (float32), log10_density (float32; -9 for dead), label, tag (first tag), top_tokens (str),
    explanation (the best explanation's text cut to 90 characters, ``[stale] ``-prefixed when made for other
    SAE weights; raw LLM text: escape before HTML)."""
    df = db.df(
        f"""WITH {_best_cte("e.sae_id = ?")}
           SELECT f.feature, f.umap_x AS x, f.umap_y AS y,
                  CASE WHEN f.density > 0 THEN log10(f.density) ELSE -9 END AS log10_density,
                  l.label, l.tags[1] AS tag, {top_tokens(3)} AS top_tokens,
                  CASE WHEN b.stale THEN '[stale] ' ELSE '' END
                      || CASE WHEN length(b.text) > 90 THEN left(b.text, 89) || '…' ELSE b.text END AS explanation
           FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
                LEFT JOIN best b ON b.sae_id = f.sae_id AND b.feature = f.feature
           WHERE f.sae_id = ? AND f.umap_x IS NOT NULL AND f.umap_y IS NOT NULL
           ORDER BY f.feature""",
        [*_current({sae_id: sae_fingerprint(db, sae_id)}), sae_id, sae_id],
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
    max_act, top_tokens, explanation (best explanation's text, ``[stale] ``-prefixed when made for other SAE
    weights, or NULL; raw LLM text)."""
    saes = [r[0] for r in db.rows("SELECT DISTINCT sae_id FROM lists WHERE list_name = ?", [list_name])]
    return db.df(
        f"""WITH {_best_cte("e.sae_id IN (SELECT sae_id FROM lists WHERE list_name = ?)")}
           SELECT m.sae_id, m.feature, m.note, m.added_at, l.label, l.tags, f.density, f.max_act,
                  {top_tokens(5)} AS top_tokens,
                  CASE WHEN b.stale THEN '[stale] ' ELSE '' END || b.text AS explanation
           FROM lists m
           LEFT JOIN features f ON f.sae_id = m.sae_id AND f.feature = m.feature
           LEFT JOIN labels l ON l.sae_id = m.sae_id AND l.feature = m.feature
           LEFT JOIN best b ON b.sae_id = m.sae_id AND b.feature = m.feature
           WHERE m.list_name = ? ORDER BY m.added_at, m.sae_id, m.feature""",
        [*_current({s: sae_fingerprint(db, s) for s in saes}), list_name, list_name],
    )


def lists_of_feature(db: Reader, sae_id: str, feature_id: int) -> list[str]:
    rows = db.rows(
        "SELECT list_name FROM lists WHERE sae_id = ? AND feature = ? ORDER BY list_name", [sae_id, int(feature_id)]
    )
    return [r[0] for r in rows]


# -------------------------------------------------------------------------------------------------------- explanations

EXPLANATION_COLUMNS = (
    "id, sae_id, feature, text, method, explainer_model, detection, fuzzing, scorer_model, error, author, source, "
    "sae_fingerprint, tokens_used, created_at"
)
# One number per explanation to rank by: the mean of the scores it has (detection, fuzzing), NULL when unscored.
_SCORE = (
    "CASE WHEN e.detection IS NULL AND e.fuzzing IS NULL THEN NULL "
    "ELSE (coalesce(e.detection, e.fuzzing) + coalesce(e.fuzzing, e.detection)) / 2 END"
)
# Stale: made for SAE weights whose fingerprint differs from the current one. The current fingerprints come as
# a relation ``cur(sae_id, fp)`` built from two list parameters (see ``_current``); NULL on either side = unknown
# = not stale.
_CURRENT = "(SELECT unnest(?::VARCHAR[]) AS sae_id, unnest(?::VARCHAR[]) AS fp)"
_STALE = "coalesce(e.sae_fingerprint <> cur.fp, false)"


def _current(fingerprints: dict[str, str | None]) -> list[Any]:
    """The two parameters of ``_CURRENT``: SAE ids and their current fingerprints."""
    return [list(fingerprints), list(fingerprints.values())]


BEST_COLUMNS = (
    "feature",
    "id",
    "text",
    "method",
    "explainer_model",
    "detection",
    "fuzzing",
    "scorer_model",
    "score",
    "stale",
    "created_at",
)
_RANK = "stale, score DESC NULLS LAST, (method = 'tokens'), created_at DESC, id DESC"


def _best_cte(scope: str) -> str:
    """SQL for a CTE ``best``: per (sae_id, feature), the best explanation that has text, among the rows of
    ``explanations e`` matching ``scope`` (a constant predicate from this module). Columns: sae_id, feature,
    id, text, method, explainer_model, detection, fuzzing, scorer_model, score, stale, created_at.
    Parameters: ``_current(...)``'s two, then ``scope``'s."""
    return f"""ranked AS (
            SELECT e.sae_id, e.feature, e.id, e.text, e.method, e.explainer_model, e.detection, e.fuzzing,
                   e.scorer_model, e.created_at, {_SCORE} AS score, {_STALE} AS stale
            FROM explanations e LEFT JOIN {_CURRENT} cur ON cur.sae_id = e.sae_id
            WHERE e.text IS NOT NULL AND {scope}),
        best AS (
            SELECT * FROM ranked
            QUALIFY row_number() OVER (PARTITION BY sae_id, feature ORDER BY {_RANK}) = 1)"""


def explanations(db: Reader, sae_id: str, feature_id: int, fingerprint: str | None = None) -> pd.DataFrame:
    """Every explanation row of one feature, best first (failed ones, with ``error`` and no text, last):
    columns EXPLANATION_COLUMNS + score (mean of detection and fuzzing, NaN when unscored) + stale (made for
    SAE weights other than ``fingerprint``; never when either is unknown). Text is untrusted: escape it."""
    return db.df(
        f"""SELECT {EXPLANATION_COLUMNS}, score, stale FROM (
                SELECT e.*, {_SCORE} AS score, {_STALE} AS stale
                FROM explanations e LEFT JOIN {_CURRENT} cur ON cur.sae_id = e.sae_id
                WHERE e.sae_id = ? AND e.feature = ?)
            ORDER BY text IS NULL, {_RANK}""",
        [*_current({sae_id: fingerprint}), sae_id, int(feature_id)],
    )


def best_explanations(
    db: Reader, sae_id: str, features: Sequence[int] | None = None, fingerprint: str | None = None
) -> pd.DataFrame:
    """The best explanation of each of ``features`` (None: every feature of the SAE) that has one: columns
    feature, id, text, method, explainer_model, detection, fuzzing, scorer_model, score, stale, created_at; one
    row per feature, ordered by feature. Best = made for the current weights (``fingerprint``; pass
    ``sae_fingerprint(db, sae_id)`` to rank stale ones last and flag them), then highest mean score, then
    LLM/imported words before the ``tokens`` summary, then newest. One query, whatever the number of features.
    ``text`` is untrusted (LLM output or an import): escape it before HTML."""
    if features is None:
        scope, params = "e.sae_id = ?", list[Any]([sae_id])
    else:
        ids = [int(f) for f in features]
        if not ids:
            return pd.DataFrame(columns=list(BEST_COLUMNS))
        scope, params = "e.sae_id = ? AND e.feature IN (SELECT unnest(?::INTEGER[]))", [sae_id, ids]
    return db.df(
        f"""WITH {_best_cte(scope)} SELECT {", ".join(BEST_COLUMNS)} FROM best ORDER BY feature""",
        [*_current({sae_id: fingerprint}), *params],
    )


def explained_features(
    db: Reader, sae_id: str, method: str, explainer_model: str | None, fingerprint: str | None
) -> set[int]:
    """Features that already have an explanation (text, no error) from ``method`` + ``explainer_model`` made
    for the current weights (``fingerprint``; rows without one count as current): what a resumed
    ``featuredict explain`` skips."""
    rows = db.rows(
        f"""SELECT DISTINCT e.feature FROM explanations e LEFT JOIN {_CURRENT} cur ON cur.sae_id = e.sae_id
            WHERE e.sae_id = ? AND e.method = ? AND e.explainer_model IS NOT DISTINCT FROM ?
              AND e.text IS NOT NULL AND NOT {_STALE}""",
        [*_current({sae_id: fingerprint}), sae_id, method, explainer_model],
    )
    return {int(r[0]) for r in rows}


def explanations_to_score(
    db: Reader,
    sae_id: str,
    features: Sequence[int],
    scorer_model: str,
    method: str | None = None,
    explainer_model: str | None = None,
    rescore: bool = False,
) -> pd.DataFrame:
    """Explanations with text of ``features`` (only those of ``method`` + ``explainer_model`` when a method
    is given) that ``scorer_model`` has not scored yet (all of them when ``rescore``): columns id, feature,
    text, ordered by feature, id."""
    where = ["sae_id = ?", "feature IN (SELECT unnest(?::INTEGER[]))", "text IS NOT NULL"]
    params: list[Any] = [sae_id, [int(f) for f in features]]
    if method is not None:
        where += ["method = ?", "explainer_model IS NOT DISTINCT FROM ?"]
        params += [method, explainer_model]
    if not rescore:
        where.append("(detection IS NULL OR scorer_model IS DISTINCT FROM ?)")
        params.append(scorer_model)
    return db.df(f"SELECT id, feature, text FROM explanations WHERE {' AND '.join(where)} ORDER BY feature, id", params)


def explanation_counts(db: Reader, sae_id: str) -> pd.DataFrame:
    """Per (method, explainer_model) of one SAE: n (rows with text), failed (rows with an error), scored,
    mean_detection, mean_fuzzing."""
    return db.df(
        """SELECT method, explainer_model, count(text) AS n, count(*) - count(text) AS failed,
                  count(detection) AS scored, avg(detection) AS mean_detection, avg(fuzzing) AS mean_fuzzing
           FROM explanations WHERE sae_id = ? GROUP BY ALL ORDER BY method, explainer_model""",
        [sae_id],
    )


# Fingerprints are memoised per (database file, SAE, build time): a rebuild changes built_at, a label or
# explanation write does not touch the decoders.
_FINGERPRINTS: dict[tuple[str, str, str], str | None] = {}
_FINGERPRINT_LOCK = threading.Lock()
FINGERPRINT_CHUNK = 8192


def sae_fingerprint(db: Reader, sae_id: str) -> str | None:
    """Fingerprint of the SAE's weights as the database stores them: ``dec-sha256:`` + the first 16 hex digits
    of sha256 over (d_in, then per feature in id order: the id and ``features.decoder`` as little-endian
    float32). None when the SAE has no features. An explanation stamped with another fingerprint was made for
    other weights (stale). Reads the decoders ``FINGERPRINT_CHUNK`` features at a time; memoised per
    (file, SAE, build time)."""
    built = db.rows("SELECT CAST(built_at AS VARCHAR), d_in FROM saes WHERE sae_id = ?", [sae_id])
    if not built:
        return None
    path = getattr(db, "path", None)
    key = (str(path), sae_id, str(built[0][0])) if path is not None else None
    if key is not None:
        with _FINGERPRINT_LOCK:
            if key in _FINGERPRINTS:
                return _FINGERPRINTS[key]
    h = hashlib.sha256(np.asarray([int(built[0][1] or 0)], dtype="<i8").tobytes())
    n, last = 0, -1
    while True:
        df = db.df(
            "SELECT feature, decoder FROM features WHERE sae_id = ? AND feature > ? ORDER BY feature LIMIT ?",
            [sae_id, last, FINGERPRINT_CHUNK],
        )
        if df.empty:
            break
        ids = df["feature"].to_numpy(dtype="<i8")
        dec = [np.asarray(v, dtype="<f4") for v in df["decoder"]]
        for i, v in zip(ids, dec, strict=True):
            h.update(i.tobytes())
            h.update(v.tobytes())
        n += len(df)
        last = int(ids[-1])
    out = None if n == 0 else "dec-sha256:" + h.hexdigest()[:16]
    if key is not None:
        with _FINGERPRINT_LOCK:
            if len(_FINGERPRINTS) > 64:
                _FINGERPRINTS.clear()
            _FINGERPRINTS[key] = out
    return out


# ------------------------------------------------------------------------- contexts for explainers (bulk)


def examples_for_features(db: Reader, sae_id: str, features: Sequence[int]) -> pd.DataFrame:
    """Every stored example of ``features`` in one query: columns feature, kind, band, rank, context_id,
    max_act, max_pos, tokens (list[str]), acts (float array); ordered by feature, kind ('interval' before
    'top'), band descending, rank. Token text is raw corpus text."""
    return db.df(
        """SELECT feature, kind, band, rank, context_id, max_act, max_pos, tokens, acts FROM examples
           WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))
           ORDER BY feature, kind, band DESC, rank""",
        [sae_id, [int(f) for f in features]],
    )


def feature_logit_tokens(db: Reader, sae_id: str, features: Sequence[int]) -> pd.DataFrame:
    """For many features in one query: columns feature, max_act, dead, pos_tokens (promoted tokens, list[str])."""
    return db.df(
        """SELECT feature, max_act, dead, pos_tokens FROM features
           WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[])) ORDER BY feature""",
        [sae_id, [int(f) for f in features]],
    )


def context_sample(db: Reader, sae_id: str, n: int, seed: int = 0) -> pd.DataFrame:
    """A repeatable pseudo-random sample of up to ``n`` stored top contexts of any feature of the SAE (the pool
    non-activating contexts are drawn from), chosen by a hash of (context, feature, seed): columns feature,
    context_id, max_pos, tokens."""
    return db.df(
        """SELECT feature, context_id, max_pos, tokens FROM examples WHERE sae_id = ? AND kind = 'top'
           ORDER BY hash(context_id, feature, ?), feature, context_id LIMIT ?""",
        [sae_id, int(seed), int(n)],
    )


def max_token_summary(db: Reader, sae_id: str, features: Sequence[int], skip_first: bool, k: int = 5) -> pd.DataFrame:
    """What the ``tokens`` explainer summarises, aggregated in SQL for many features at once (one query on
    ``examples``, one on ``features``): per feature, the commonest tokens at the max position of its stored
    contexts (top and interval), and the commonest tokens just before and just after it.

    Columns: feature, n (contexts), max_act, pos_tokens (list[str]); max_keys / max_raw / max_n (lists, k
    commonest max tokens: lower-cased trimmed key, one raw spelling, count), and the same for prev_* and next_*.
    ``skip_first``: position 0 is BOS (never reported as the token before).
    """
    ids = [int(f) for f in features]
    first = 1 if skip_first else 0
    agg = db.df(
        f"""WITH ex AS (
                SELECT feature, max_act, tokens[max_pos + 1] AS t_max,
                       CASE WHEN max_pos > ? THEN tokens[max_pos] END AS t_prev,
                       CASE WHEN max_pos + 1 < len(tokens) THEN tokens[max_pos + 2] END AS t_next
                FROM examples WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))),
            long AS (
                SELECT feature, 'max' AS slot, t_max AS tok, max_act FROM ex
                UNION ALL SELECT feature, 'prev', t_prev, max_act FROM ex WHERE t_prev IS NOT NULL
                UNION ALL SELECT feature, 'next', t_next, max_act FROM ex WHERE t_next IS NOT NULL),
            counted AS (
                SELECT feature, slot, lower(trim(tok)) AS key, min(tok) AS raw, count(*) AS n, sum(max_act) AS w
                FROM long GROUP BY ALL),
            ranked AS (
                SELECT * FROM counted
                QUALIFY row_number() OVER (PARTITION BY feature, slot ORDER BY n DESC, w DESC, key) <= {int(k)})
            SELECT feature, slot, list(key ORDER BY n DESC, w DESC, key) AS keys,
                   list(raw ORDER BY n DESC, w DESC, key) AS raws, list(n ORDER BY n DESC, w DESC, key) AS ns
            FROM ranked GROUP BY ALL""",
        [first, sae_id, ids],
    )
    base = db.df(
        """SELECT f.feature, f.max_act, f.pos_tokens, (SELECT count(*) FROM examples x
                   WHERE x.sae_id = f.sae_id AND x.feature = f.feature) AS n
           FROM features f WHERE f.sae_id = ? AND f.feature IN (SELECT unnest(?::INTEGER[])) ORDER BY f.feature""",
        [sae_id, ids],
    )
    for slot in ("max", "prev", "next"):
        part = agg[agg["slot"] == slot].set_index("feature")
        for col, src in (("keys", "keys"), ("raw", "raws"), ("n", "ns")):
            m = part[src].to_dict()
            base[f"{slot}_{col}"] = [m.get(int(f)) for f in base["feature"]]
    return base


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


def filter_clauses(filters: SearchFilters) -> tuple[list[str], list[Any]]:
    """SQL conditions (on ``features f`` left-joined to ``labels l``) and their parameters for ``filters``."""
    where: list[str] = []
    params: list[Any] = []
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
    return where, params


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
    w, p = filter_clauses(filters)
    where += w
    params += p

    fid = feature_id_in_query(query)
    select_fields = ", ".join(f"{expr} AS t_{name}" for name, expr, _ in _FIELDS)
    if terms:
        term_match, score_parts, matched_parts = [], [], []
        term_params: list[Any] = []
        score_params: list[Any] = []
        matched_params: list[Any] = []
        for t in terms:
            term_match.append("(" + " OR ".join(f"contains(t_{name}, ?)" for name, _e, _w in _FIELDS) + ")")
            term_params += [t] * len(_FIELDS)
            for name, _e, weight in _FIELDS:
                score_parts.append(f"CASE WHEN contains(t_{name}, ?) THEN {weight} ELSE 0 END")
                score_params.append(t)
            score_parts.append("ln(1 + (length(t_context) - length(replace(t_context, ?, ''))) / ?)")
            score_params += [t, len(t)]
        for name, _e, _w in _FIELDS:
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


# ------------------------------------------------------------------------------------------------ reviews


def review(db: Reader, sae_id: str, feature_id: int) -> dict[str, Any]:
    """A feature's review: status, reviewer, reason, version, updated_at (status 'unreviewed', version 0 when
    nobody reviewed it yet). The version goes back to ``writes.set_review(expected_version=...)``."""
    df = db.df(
        "SELECT status, reviewer, reason, version, updated_at FROM reviews WHERE sae_id = ? AND feature = ?",
        [sae_id, int(feature_id)],
    )
    if df.empty:
        return {"status": "unreviewed", "reviewer": None, "reason": None, "version": 0, "updated_at": None}
    d = _row_dict(df.iloc[0])
    d["version"] = int(d["version"])
    return d


def history(db: Reader, sae_id: str, feature_id: int, limit: int = 500) -> pd.DataFrame:
    """The feature's change history, newest first: changed_at, author, field, action, old_value, new_value
    (JSON text; untrusted, escape before HTML)."""
    df = db.df(
        """SELECT changed_at, author, field, action, old_value, new_value FROM history
           WHERE sae_id = ? AND feature = ? ORDER BY id DESC LIMIT ?""",
        [sae_id, int(feature_id), int(limit)],
    )
    for c in ("author", "old_value", "new_value"):  # NULL stays None (not NaN)
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


QueueOrder = Literal["max_act", "density", "watchlist", "concept"]
QUEUE_ORDERS: tuple[str, ...] = ("max_act", "density", "watchlist", "concept")


@dataclass(frozen=True)
class QueueRequest:
    """One review-queue query: ``order`` is the priority (max activation, density, membership of the list
    ``watchlist``, or a concept score given as ``scores`` (DataFrame feature, score)); ``statuses`` keeps only
    features with those review statuses (None: all); unreviewed features always come first."""

    sae_id: str
    order: QueueOrder = "max_act"
    statuses: tuple[str, ...] | None = None
    watchlist: str | None = None
    scores: pd.DataFrame | None = None
    limit: int = 100
    offset: int = 0

    def __post_init__(self) -> None:
        if self.order not in QUEUE_ORDERS:
            raise ValueError(f"order must be one of {', '.join(QUEUE_ORDERS)}; got {self.order!r}")
        if self.order == "watchlist" and not self.watchlist:
            raise ValueError("order 'watchlist' needs a list name")
        if self.order == "concept" and self.scores is None:
            raise ValueError("order 'concept' needs concept scores")
        if not 1 <= int(self.limit) <= 10_000 or int(self.offset) < 0:
            raise ValueError("limit must be in 1..10000 and offset >= 0")


def review_queue(db: Reader, req: QueueRequest) -> tuple[pd.DataFrame, int]:
    """Features to review, unreviewed first, then by the chosen priority (highest first), then id.

    Returns (page of rows: feature, status, reviewer, reason, label, density, max_act, priority; total rows
    matching). Dead features are left out. Only watchlist members / concept hits when ordering by those.
    """
    params: list[Any] = []
    join = ""
    if req.order == "watchlist":
        join = "JOIN lists w ON w.list_name = ? AND w.sae_id = f.sae_id AND w.feature = f.feature"
        params.append(req.watchlist)
        prio = "f.max_act"
    elif req.order == "concept":
        scores = req.scores if req.scores is not None else pd.DataFrame({"feature": [], "score": []})
        join = "JOIN (SELECT unnest(?::INTEGER[]) AS feature, unnest(?::DOUBLE[]) AS score) s ON s.feature = f.feature"
        params += [[int(x) for x in scores["feature"]], [float(x) for x in scores["score"]]]
        prio = "s.score"
    else:
        prio = f"f.{req.order}"  # a QUEUE_ORDERS constant, checked in QueueRequest
    status_sql = "coalesce(r.status, 'unreviewed')"
    where = ""
    if req.statuses is not None:
        where = f"AND {status_sql} IN (SELECT unnest(?::VARCHAR[]))"
    sql = f"""
        SELECT f.feature, {status_sql} AS status, r.reviewer, r.reason, l.label, f.density, f.max_act,
               {prio} AS priority, count(*) OVER () AS total
        FROM features f
        {join}
        LEFT JOIN reviews r ON r.sae_id = f.sae_id AND r.feature = f.feature
        LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
        WHERE f.sae_id = ? AND NOT f.dead {where}
        ORDER BY ({status_sql} = 'unreviewed') DESC, priority DESC NULLS LAST, f.feature
        LIMIT ? OFFSET ?
    """  # noqa: S608 - fragments are constants; values are parameters
    params.append(req.sae_id)
    if req.statuses is not None:
        params.append(list(req.statuses))
    params += [int(req.limit), int(req.offset)]
    df = db.df(sql, params)
    total = int(df["total"].iloc[0]) if len(df) else 0
    if not len(df) and req.offset:  # past the end: count without the page
        total = int(review_queue(db, QueueRequest(**{**req.__dict__, "offset": 0, "limit": 1}))[1])
    return df.drop(columns="total"), total


DEFAULT_THRESHOLD = 0.5  # of the feature's max activation, for watchlist members without settings
DEFAULT_SEVERITY = "medium"


def watchlist(db: Reader, list_name: str, sae_id: str) -> pd.DataFrame:
    """Watched features of list ``list_name`` for ``sae_id``: feature, threshold, severity, max_act, label.
    Members without settings get ``DEFAULT_THRESHOLD`` / ``DEFAULT_SEVERITY``. Empty when there are none."""
    return db.df(
        """SELECT m.feature, coalesce(w.threshold, ?) AS threshold, coalesce(w.severity, ?) AS severity,
                  f.max_act, l.label
           FROM lists m
           JOIN features f ON f.sae_id = m.sae_id AND f.feature = m.feature
           LEFT JOIN watch_settings w ON w.list_name = m.list_name AND w.sae_id = m.sae_id AND w.feature = m.feature
           LEFT JOIN labels l ON l.sae_id = m.sae_id AND l.feature = m.feature
           WHERE m.list_name = ? AND m.sae_id = ? ORDER BY m.feature""",
        [DEFAULT_THRESHOLD, DEFAULT_SEVERITY, list_name, sae_id],
    )


# ------------------------------------------------------------------------------ search by meaning (feature_embeddings)


def id_list(features: Sequence[int]) -> list[int]:
    """Feature ids as plain ints (a DuckDB INTEGER[] parameter)."""
    return [int(f) for f in features]


def feature_ids(db: Reader, sae_id: str) -> list[int]:
    """Every feature id of the SAE, ascending."""
    return [int(r[0]) for r in db.rows("SELECT feature FROM features WHERE sae_id = ? ORDER BY feature", [sae_id])]


def feature_words(
    db: Reader, sae_id: str, features: Sequence[int] | None = None, skip_methods: Sequence[str] = ()
) -> pd.DataFrame:
    """The curated and generated words of features that have any: columns feature, explanations (list[str]:
    texts of explanations with text, best first: highest mean score, LLM/imported before the ``tokens`` summary,
    newest; explanations by a method in ``skip_methods`` left out), label, tags (list[str] or None), notes.
    ``features`` None: every feature of the SAE. Texts are untrusted (LLM output, imports, user input)."""
    scope, params = "sae_id = ?", list[Any]([sae_id])
    if features is not None:
        scope += " AND feature IN (SELECT unnest(?::INTEGER[]))"
        params.append(id_list(features))
    skip, skip_params = "", list[Any]()
    if skip_methods:
        skip, skip_params = " AND method <> ALL(?::VARCHAR[])", [list(skip_methods)]
    return db.df(
        f"""WITH ex AS (
                SELECT feature,
                       list(text ORDER BY (CASE WHEN detection IS NULL AND fuzzing IS NULL THEN NULL
                                           ELSE (coalesce(detection, fuzzing) + coalesce(fuzzing, detection)) / 2
                                           END) DESC NULLS LAST,
                                          (method = 'tokens'), created_at DESC, id DESC) AS explanations
                FROM explanations WHERE {scope} AND text IS NOT NULL{skip} GROUP BY feature),
            lab AS (SELECT feature, label, tags, notes FROM labels WHERE {scope})
            SELECT coalesce(ex.feature, lab.feature) AS feature, ex.explanations, lab.label, lab.tags, lab.notes
            FROM ex FULL OUTER JOIN lab ON lab.feature = ex.feature
            ORDER BY 1""",
        params + skip_params + params,
    )


def context_windows(
    db: Reader,
    sae_id: str,
    features: Sequence[int] | None = None,
    n_examples: int = 3,
    before: int = 4,
    after: int = 2,
    skip_first: bool = True,
) -> pd.DataFrame:
    """A few tokens around the max token of each feature's ``n_examples`` strongest top contexts: columns
    feature, rank, window (list[str]: up to ``before`` tokens, the max token, up to ``after`` tokens), ordered
    by feature, rank. ``skip_first``: position 0 is BOS, never part of a window. Raw corpus text."""
    scope, params = "", list[Any]([1 if skip_first else 0, int(before), int(after), sae_id, int(n_examples)])
    if features is not None:
        scope = " AND feature IN (SELECT unnest(?::INTEGER[]))"
        params.append(id_list(features))
    # DuckDB lists are 1-based and list_slice is inclusive: the max token is tokens[max_pos + 1].
    return db.df(
        f"""SELECT feature, rank,
                   list_slice(tokens, greatest(? + 1, max_pos + 1 - ?), max_pos + 1 + ?) AS window
            FROM examples WHERE sae_id = ? AND kind = 'top' AND rank < ?{scope}
            ORDER BY feature, rank""",
        params,
    )


def max_tokens(db: Reader, sae_id: str, features: Sequence[int] | None = None) -> pd.DataFrame:
    """``features.max_tokens`` (the token at the max position of each top example): columns feature,
    max_tokens (list[str] or None)."""
    scope, params = "", list[Any]([sae_id])
    if features is not None:
        scope = " AND feature IN (SELECT unnest(?::INTEGER[]))"
        params.append(id_list(features))
    return db.df(f"SELECT feature, max_tokens FROM features WHERE sae_id = ?{scope} ORDER BY feature", params)


def feature_stats(db: Reader, sae_id: str) -> pd.DataFrame:
    """Per feature of the SAE, what search filters and result rows read: columns feature, density, max_act,
    dead, top_tokens (first max tokens joined by ' · '); by feature. Changes only with a rebuild."""
    return db.df(
        f"""SELECT f.feature, f.density, f.max_act, f.dead, {top_tokens(5)} AS top_tokens
            FROM features f WHERE f.sae_id = ? ORDER BY f.feature""",
        [sae_id],
    )


def labels_of(db: Reader, sae_id: str, features: Sequence[int]) -> dict[int, tuple[str | None, list[str]]]:
    """feature -> (label, tags) of those ``features`` that have a ``labels`` row."""
    rows = db.rows(
        "SELECT feature, label, tags FROM labels WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))",
        [sae_id, id_list(features)],
    )
    return {int(f): (lab, list(t or [])) for f, lab, t in rows}


def has_explanations(db: Reader, sae_id: str) -> bool:
    """Whether any explanation with text exists for the SAE (else result rows need no explanation lookup)."""
    return bool(db.rows("SELECT 1 FROM explanations WHERE sae_id = ? AND text IS NOT NULL LIMIT 1", [sae_id]))


def label_tags(db: Reader, sae_id: str) -> dict[int, list[str]]:
    """feature -> tags of every feature with a ``labels`` row (labelled), for the labelled / tag filters."""
    rows = db.rows("SELECT feature, tags FROM labels WHERE sae_id = ?", [sae_id])
    return {int(f): list(t or []) for f, t in rows}


def words_signature(db: Reader, sae_id: str) -> tuple[Any, ...]:
    """Changes whenever a label or an explanation of the SAE is added, edited or deleted (row counts and
    newest times of ``labels`` and ``explanations``, the sums of explanation ids and scores (scores order a
    feature's explanations), and the build time): one cheap
    query, run before every search by meaning to decide whether any text may be stale."""
    row = db.rows(
        """SELECT l.n, l.t, e.n, e.t, e.ids, e.scores, (SELECT CAST(built_at AS VARCHAR) FROM saes WHERE sae_id = ?)
           FROM (SELECT count(*) AS n, CAST(max(updated_at) AS VARCHAR) AS t FROM labels WHERE sae_id = ?) l,
                (SELECT count(*) AS n, CAST(max(created_at) AS VARCHAR) AS t, CAST(coalesce(sum(id), 0) AS VARCHAR)
                        AS ids, round(coalesce(sum(coalesce(detection, 0) + coalesce(fuzzing, 0)), 0), 6) AS scores
                 FROM explanations WHERE sae_id = ?) e""",
        [sae_id] * 3,
    )
    return tuple(row[0])


def words_candidates(db: Reader, sae_id: str, model: str, contexts_prefix: str) -> list[int]:
    """Features whose embedded text may depend on words: those with a label row or an explanation with text,
    and those whose stored text has words (it does not start with ``contexts_prefix``, the start of a text
    made of contexts alone), which covers words deleted since."""
    rows = db.rows(
        """SELECT feature FROM labels WHERE sae_id = ?
           UNION SELECT feature FROM explanations WHERE sae_id = ? AND text IS NOT NULL
           UNION SELECT feature FROM feature_embeddings
                 WHERE sae_id = ? AND model = ? AND NOT starts_with(text, ?)
           ORDER BY 1""",
        [sae_id, sae_id, sae_id, model, contexts_prefix],
    )
    return [int(r[0]) for r in rows]


def embedding_models(db: Reader, sae_id: str) -> pd.DataFrame:
    """Embedding models with vectors for the SAE, most rows first: columns model, n, updated_at (newest)."""
    return db.df(
        """SELECT model, count(*) AS n, max(updated_at) AS updated_at
           FROM feature_embeddings WHERE sae_id = ? GROUP BY model ORDER BY n DESC, model""",
        [sae_id],
    )


def embedding_state(db: Reader, sae_id: str, model: str) -> tuple[int, str | None, str | None, str | None]:
    """(rows, newest updated_at, oldest updated_at, the SAE's built_at) of one (SAE, model): changes with every
    write or touch of its vectors, and with a rebuild of the SAE."""
    n, newest, oldest, built = db.rows(
        """SELECT count(*), CAST(max(updated_at) AS VARCHAR), CAST(min(updated_at) AS VARCHAR),
                  (SELECT CAST(built_at AS VARCHAR) FROM saes WHERE sae_id = ?)
           FROM feature_embeddings WHERE sae_id = ? AND model = ?""",
        [sae_id, sae_id, model],
    )[0]
    return int(n), newest, oldest, built


def not_checked_since_build(db: Reader, sae_id: str, model: str) -> int:
    """How many stored vectors of (SAE, model) were last written or verified before the SAE's last build (their
    context summaries may have changed: ``featuredict embed`` re-checks them)."""
    return int(
        db.rows(
            """SELECT count(*) FROM feature_embeddings e JOIN saes s ON s.sae_id = e.sae_id
               WHERE e.sae_id = ? AND e.model = ? AND e.updated_at < s.built_at""",
            [sae_id, model],
        )[0][0]
    )


def stored_hashes(db: Reader, sae_id: str, model: str, features: Sequence[int] | None = None) -> dict[int, str]:
    """feature -> text_hash of the stored vectors of (SAE, model) (only ``features`` when given)."""
    scope, params = "", list[Any]([sae_id, model])
    if features is not None:
        scope = " AND feature IN (SELECT unnest(?::INTEGER[]))"
        params.append(id_list(features))
    rows = db.rows(f"SELECT feature, text_hash FROM feature_embeddings WHERE sae_id = ? AND model = ?{scope}", params)
    return {int(f): str(h) for f, h in rows}


def embedded_texts(db: Reader, sae_id: str, model: str, features: Sequence[int]) -> dict[int, str]:
    """feature -> the text that was embedded (untrusted: explanations, labels and corpus text)."""
    rows = db.rows(
        """SELECT feature, text FROM feature_embeddings
           WHERE sae_id = ? AND model = ? AND feature IN (SELECT unnest(?::INTEGER[]))""",
        [sae_id, model, id_list(features)],
    )
    return {int(f): str(t) for f, t in rows}


def _arrow(store: Store, sql: str, params: list[Any]) -> pa.Table:
    """One query's rows as an Arrow table (no per-row Python work)."""
    with store.reading() as cur:
        rel = cur.sql(sql, params=params)
        # duckdb 2 names it to_arrow_table; 1.x fetch_arrow_table.
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


def _embedding_rows(store: Store, columns: str, sae_id: str, model: str, since: str | None) -> pa.Table:
    """``columns`` (a constant) of the ``feature_embeddings`` rows of (SAE, model) by feature, as one Arrow
    table; ``since``: only rows updated after it."""
    sql = f"SELECT {columns} FROM feature_embeddings WHERE sae_id = ? AND model = ?"  # noqa: S608 - constants
    params: list[Any] = [sae_id, model]
    if since is not None:
        sql += " AND updated_at > CAST(? AS TIMESTAMP)"
        params.append(since)
    return _arrow(store, sql + " ORDER BY feature", params)


def load_vectors(
    store: Store, sae_id: str, model: str, since: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stored vectors of (SAE, model), by feature: ``features [n]`` int64, ``vectors [n, dim]`` float32 and
    the updated_at of each row (as text). ``since``: only rows with ``updated_at`` after it (a delta).
    One Arrow fetch, no per-row Python work."""
    tbl = _embedding_rows(store, "feature, vector, CAST(updated_at AS VARCHAR) AS t", sae_id, model, since)
    feats = tbl.column("feature").to_numpy().astype(np.int64)
    if tbl.num_rows == 0:
        return feats, np.zeros((0, 0), dtype=np.float32), []
    vec = tbl.column("vector").combine_chunks()
    lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False)
    dim = int(lengths[0])
    if not (lengths == dim).all():
        raise ValueError(f"stored vectors of {model!r} for {sae_id!r} have different lengths; re-run featuredict embed")
    flat = pc.list_flatten(vec).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return feats, flat.reshape(len(feats), dim), tbl.column("t").to_pylist()


def load_texts(store: Store, sae_id: str, model: str, since: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The embedded texts of (SAE, model) by feature, as ``load_vectors`` returns the vectors: ``features [n]``
    int64 and the texts (``since``: only rows updated after it)."""
    tbl = _embedding_rows(store, "feature, text", sae_id, model, since)
    return tbl.column("feature").to_numpy().astype(np.int64), tbl.column("text").to_pylist()


def filtered_rows(
    db: Reader, sae_id: str, features: Sequence[int], filters: SearchFilters | None = None
) -> pd.DataFrame:
    """Summary rows of those ``features`` that pass ``filters`` (the filters of text search), in the given
    order: columns feature, label, tags, density, max_act, top_tokens."""
    filters = filters or SearchFilters()
    ids = id_list(features)
    cols = ["feature", "label", "tags", "density", "max_act", "top_tokens"]
    if not ids:
        return pd.DataFrame(columns=cols)
    where = ["f.sae_id = ?", "f.feature IN (SELECT unnest(?::INTEGER[]))"]
    params: list[Any] = [sae_id, ids]
    w, p = filter_clauses(filters)
    where += w
    params += p
    df = db.df(
        f"""SELECT f.feature, l.label, l.tags, f.density, f.max_act, {top_tokens(5)} AS top_tokens
            FROM features f LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature
            WHERE {" AND ".join(where)}""",
        params,
    )
    pos = {f: i for i, f in enumerate(ids)}
    return df.assign(_o=df["feature"].map(pos)).sort_values("_o").drop(columns="_o").reset_index(drop=True)[cols]


# --------------------------------------------------------------------------------------- Neuronpedia import and export


def feature_range(db: Reader, sae_id: str) -> list[int]:
    """Every feature id of the SAE, ascending."""
    return [int(r[0]) for r in db.rows("SELECT feature FROM features WHERE sae_id = ? ORDER BY feature", [sae_id])]


def features_for_export(db: Reader, sae_id: str, lo: int, hi: int) -> pd.DataFrame:
    """Features ``lo <= feature < hi`` of the SAE: columns feature, max_act, density, hist_counts, pos_tokens,
    pos_values, neg_tokens, neg_values, neighbours, neighbour_cos; by feature."""
    return db.df(
        """SELECT feature, max_act, density, hist_counts, pos_tokens, pos_values, neg_tokens, neg_values,
                  neighbours, neighbour_cos
           FROM features WHERE sae_id = ? AND feature >= ? AND feature < ? ORDER BY feature""",
        [sae_id, int(lo), int(hi)],
    )


def examples_for_export(db: Reader, sae_id: str, lo: int, hi: int) -> pd.DataFrame:
    """Stored contexts of features ``lo <= feature < hi``: columns feature, kind, band, band_lo, band_hi, rank,
    context_id, max_act, max_pos, tokens, acts; by feature, kind ('interval' before 'top'), band desc, rank."""
    return db.df(
        """SELECT feature, kind, band, band_lo, band_hi, rank, context_id, max_act, max_pos, tokens, acts
           FROM examples WHERE sae_id = ? AND feature >= ? AND feature < ?
           ORDER BY feature, kind, band DESC, rank""",
        [sae_id, int(lo), int(hi)],
    )


def explanations_for_export(db: Reader, sae_id: str) -> pd.DataFrame:
    """Explanations with text of the SAE: columns id, feature, text, method, explainer_model, author, source,
    created_at; by feature, id."""
    return db.df(
        """SELECT id, feature, text, method, explainer_model, author, source, created_at FROM explanations
           WHERE sae_id = ? AND text IS NOT NULL ORDER BY feature, id""",
        [sae_id],
    )


def labels_for_export(db: Reader, sae_id: str) -> pd.DataFrame:
    """Labels (non-empty) of the SAE: columns feature, label, author, updated_at; by feature."""
    return db.df(
        """SELECT feature, label, author, updated_at FROM labels
           WHERE sae_id = ? AND label IS NOT NULL AND trim(label) <> '' ORDER BY feature""",
        [sae_id],
    )


# ---------------------------------------------------------------------------------------------------- steering presets


class PresetError(UserError, ValueError):
    """A preset that cannot be saved or loaded, with a one-line message fit to show a user."""


def _decode(name: str, payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as e:
        raise PresetError(f"preset {name!r} is unreadable: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise PresetError(f"preset {name!r} is unreadable: its JSON is not an object")
    return data


def read_preset(store: Store, name: str) -> tuple[str, dict[str, Any]]:
    """``(sae_id, config dict)`` of preset ``name``; PresetError when absent or not a JSON object."""
    rows = store.rows("SELECT sae_id, config_json FROM steering_presets WHERE name = ?", [name])
    if not rows:
        raise PresetError(f"no steering preset named {name!r} in this database")
    sae_id, payload = rows[0]
    return str(sae_id), _decode(name, payload)


def read_presets(store: Store, sae_id: str | None = None) -> list[dict[str, Any]]:
    """Presets (of one SAE, or all), newest first: dicts with name, sae_id, created_at and config (the stored
    dict, or None when it is not a JSON object)."""
    if sae_id is None:
        rows = store.rows("SELECT name, sae_id, config_json, created_at FROM steering_presets ORDER BY created_at DESC")
    else:
        rows = store.rows(
            "SELECT name, sae_id, config_json, created_at FROM steering_presets WHERE sae_id = ? "
            "ORDER BY created_at DESC",
            [sae_id],
        )
    out = []
    for name, sid, payload, created in rows:
        try:
            config: dict[str, Any] | None = _decode(name, payload)
        except PresetError:
            config = None
        out.append({"name": name, "sae_id": sid, "created_at": created, "config": config})
    return out


def feature_max_acts(store: Store, sae_id: str) -> dict[int, float]:
    """feature id -> features.max_act for every feature of ``sae_id`` (the unit of a steering ``add``)."""
    return {int(f): float(m) for f, m in store.rows("SELECT feature, max_act FROM features WHERE sae_id = ?", [sae_id])}
