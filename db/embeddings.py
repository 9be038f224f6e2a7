"""Reads and writes behind search by meaning: the ``feature_embeddings`` table and the words it embeds.

A feature's words are its explanations, label, tags and notes plus a short summary of its top contexts
(``pipelines/search/meaning.py`` composes them into one text). This module only moves rows: every statement is a
constant and values travel as parameters (bulk rows as a registered Arrow table). Writes go through
``Store.write`` (one lock, one transaction), like ``db/writes.py``.

``feature_embeddings.updated_at`` is the time the row was last written *or verified current* (``touch``), in
naive UTC like ``saes.built_at``, so ``updated_at < built_at`` means "not checked since the last build".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from featuredict.db.queries import Reader, SearchFilters, filter_clauses, top_tokens
from featuredict.db.store import Store


def utc_now() -> datetime:
    """Naive UTC now (the convention of ``saes.built_at``)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _ids(features: Sequence[int]) -> list[int]:
    return [int(f) for f in features]


# ------------------------------------------------------------------------------------------------ words


def feature_ids(db: Reader, sae_id: str) -> list[int]:
    """Every feature id of the SAE, ascending."""
    return [int(r[0]) for r in db.rows("SELECT feature FROM features WHERE sae_id = ? ORDER BY feature", [sae_id])]


def feature_words(db: Reader, sae_id: str, features: Sequence[int] | None = None) -> pd.DataFrame:
    """The curated and generated words of features that have any: columns feature, explanations (list[str]:
    texts of explanations with text, best first: highest mean score, LLM/imported before the ``tokens`` summary,
    newest), label, tags (list[str] or None), notes. ``features`` None: every feature of the SAE.
    Texts are untrusted (LLM output, imports, user input)."""
    scope, params = "sae_id = ?", list[Any]([sae_id])
    if features is not None:
        scope += " AND feature IN (SELECT unnest(?::INTEGER[]))"
        params.append(_ids(features))
    return db.df(
        f"""WITH ex AS (
                SELECT feature,
                       list(text ORDER BY (CASE WHEN detection IS NULL AND fuzzing IS NULL THEN NULL
                                           ELSE (coalesce(detection, fuzzing) + coalesce(fuzzing, detection)) / 2
                                           END) DESC NULLS LAST,
                                          (method = 'tokens'), created_at DESC, id DESC) AS explanations
                FROM explanations WHERE {scope} AND text IS NOT NULL GROUP BY feature),
            lab AS (SELECT feature, label, tags, notes FROM labels WHERE {scope})
            SELECT coalesce(ex.feature, lab.feature) AS feature, ex.explanations, lab.label, lab.tags, lab.notes
            FROM ex FULL OUTER JOIN lab ON lab.feature = ex.feature
            ORDER BY 1""",
        params + params,
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
        params.append(_ids(features))
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
        params.append(_ids(features))
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
        [sae_id, _ids(features)],
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


# ------------------------------------------------------------------------------------------- embeddings


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
        params.append(_ids(features))
    rows = db.rows(f"SELECT feature, text_hash FROM feature_embeddings WHERE sae_id = ? AND model = ?{scope}", params)
    return {int(f): str(h) for f, h in rows}


def embedded_texts(db: Reader, sae_id: str, model: str, features: Sequence[int]) -> dict[int, str]:
    """feature -> the text that was embedded (untrusted: explanations, labels and corpus text)."""
    rows = db.rows(
        """SELECT feature, text FROM feature_embeddings
           WHERE sae_id = ? AND model = ? AND feature IN (SELECT unnest(?::INTEGER[]))""",
        [sae_id, model, _ids(features)],
    )
    return {int(f): str(t) for f, t in rows}


def _arrow(store: Store, sql: str, params: list[Any]) -> pa.Table:
    """One query's rows as an Arrow table (no per-row Python work)."""
    with store.reading() as cur:
        rel = cur.sql(sql, params=params)
        # duckdb 2 names it to_arrow_table; 1.x fetch_arrow_table.
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


def load_vectors(
    store: Store, sae_id: str, model: str, since: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stored vectors of (SAE, model), by feature: ``features [n]`` int64, ``vectors [n, dim]`` float32 and
    the updated_at of each row (as text). ``since``: only rows with ``updated_at`` after it (a delta).
    One Arrow fetch, no per-row Python work."""
    sql = "SELECT feature, vector, CAST(updated_at AS VARCHAR) AS t FROM feature_embeddings WHERE sae_id = ? AND model = ?"
    params: list[Any] = [sae_id, model]
    if since is not None:
        sql += " AND updated_at > CAST(? AS TIMESTAMP)"
        params.append(since)
    tbl = _arrow(store, sql + " ORDER BY feature", params)
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
    sql = "SELECT feature, text FROM feature_embeddings WHERE sae_id = ? AND model = ?"
    params: list[Any] = [sae_id, model]
    if since is not None:
        sql += " AND updated_at > CAST(? AS TIMESTAMP)"
        params.append(since)
    tbl = _arrow(store, sql + " ORDER BY feature", params)
    return tbl.column("feature").to_numpy().astype(np.int64), tbl.column("text").to_pylist()


def upsert_embeddings(
    store: Store,
    sae_id: str,
    model: str,
    features: Sequence[int],
    texts: Sequence[str],
    hashes: Sequence[str],
    vectors: np.ndarray,
) -> int:
    """Insert or replace the vectors of ``features`` (one transaction). ``vectors [n, dim]`` float32,
    L2-normalised. Returns the number of rows written."""
    n = len(features)
    if not (len(texts) == len(hashes) == n == len(vectors)):
        raise ValueError("features, texts, hashes and vectors differ in length")
    if n == 0:
        return 0
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    tbl = pa.table(
        {
            "feature": pa.array(_ids(features), pa.int32()),
            "text": pa.array([str(t) for t in texts], pa.string()),
            "text_hash": pa.array([str(h) for h in hashes], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(
                pa.list_(pa.float32())
            ),
        }
    )
    now = utc_now()

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        cur.register("_new_embeddings", tbl)
        try:
            cur.execute(
                """INSERT INTO feature_embeddings (sae_id, feature, model, text, text_hash, vector, updated_at)
                   SELECT ?, feature, ?, text, text_hash, vector, ? FROM _new_embeddings
                   ON CONFLICT (sae_id, feature, model) DO UPDATE SET text = excluded.text,
                       text_hash = excluded.text_hash, vector = excluded.vector, updated_at = excluded.updated_at""",
                [sae_id, model, now],
            )
        finally:
            cur.unregister("_new_embeddings")
        return n

    return store.write(fn)


def _on_features(store: Store, head: str, params: list[Any], sae_id: str, model: str, features: Sequence[int]) -> int:
    """Run ``head`` (a constant UPDATE/DELETE on feature_embeddings) on the rows of ``features``; how many."""
    ids = _ids(features)
    if not ids:
        return 0
    sql = head + " WHERE sae_id = ? AND model = ? AND feature IN (SELECT unnest(?::INTEGER[])) RETURNING feature"
    return store.write(lambda cur: len(cur.execute(sql, [*params, sae_id, model, ids]).fetchall()))


def touch_embeddings(store: Store, sae_id: str, model: str, features: Sequence[int]) -> int:
    """Mark stored vectors as verified current (their text did not change): sets ``updated_at`` to now."""
    return _on_features(store, "UPDATE feature_embeddings SET updated_at = ?", [utc_now()], sae_id, model, features)


def delete_embeddings(store: Store, sae_id: str, model: str, features: Sequence[int]) -> int:
    """Delete the stored vectors of ``features`` (features without words or contexts any more)."""
    return _on_features(store, "DELETE FROM feature_embeddings", [], sae_id, model, features)


# ------------------------------------------------------------------------------------------- results


def filtered_rows(
    db: Reader, sae_id: str, features: Sequence[int], filters: SearchFilters | None = None
) -> pd.DataFrame:
    """Summary rows of those ``features`` that pass ``filters`` (the filters of text search), in the given
    order: columns feature, label, tags, density, max_act, top_tokens."""
    filters = filters or SearchFilters()
    ids = _ids(features)
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
