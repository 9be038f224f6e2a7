"""Reads and writes behind Neuronpedia import / export (``pipelines/neuronpedia.py``).

Imported explanations go into ``explanations`` through ``Store.write`` (one lock, one transaction), with ids
``max(id) + 1, + 2, ...`` read under that lock, as ``db/writes.py`` assigns them. An import never duplicates: a
row whose (sae_id, feature, method, text, explainer_model) is already stored is skipped and counted. Every
statement is a constant; values travel as parameters (bulk rows as a registered Arrow table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from featuredict.db.queries import Reader
from featuredict.db.store import Store, scalar

IMPORT_FIELDS = ("sae_id", "feature", "text", "method", "explainer_model", "author", "source", "created_at")


def insert_explanations(store: Store, rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """Insert explanation rows (keys ``IMPORT_FIELDS``; ``created_at`` optional, default now) that are not
    stored yet, in one transaction. Returns (inserted, skipped as already present, within the rows or in the
    table). The caller checks that features exist; text is stored as given (untrusted: readers escape it)."""
    if not rows:
        return 0, 0
    for r in rows:
        if not r.get("sae_id") or not r.get("method") or not str(r.get("text") or "").strip():
            raise ValueError("an imported explanation needs sae_id, method and text")
    created: list[datetime | None] = [r.get("created_at") for r in rows]
    tbl = pa.table(
        {
            "sae_id": pa.array([str(r["sae_id"]) for r in rows], pa.string()),
            "feature": pa.array([int(r["feature"]) for r in rows], pa.int32()),
            "text": pa.array([str(r["text"]) for r in rows], pa.string()),
            "method": pa.array([str(r["method"]) for r in rows], pa.string()),
            "explainer_model": pa.array([r.get("explainer_model") for r in rows], pa.string()),
            "author": pa.array([r.get("author") for r in rows], pa.string()),
            "source": pa.array([r.get("source") for r in rows], pa.string()),
            "created_at": pa.array(created, pa.timestamp("us")),
            "ord": pa.array(range(len(rows)), pa.int64()),
        }
    )

    def fn(cur: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        cur.register("_import_rows", tbl)
        try:
            base = int(scalar(cur, "SELECT coalesce(max(id), 0) FROM explanations"))
            inserted = cur.execute(
                """INSERT INTO explanations (id, sae_id, feature, text, method, explainer_model, author, source,
                       created_at)
                   SELECT ? + row_number() OVER (ORDER BY ord), sae_id, feature, text, method, explainer_model,
                          author, source, coalesce(created_at, now()::TIMESTAMP)
                   FROM (SELECT * FROM _import_rows n
                         QUALIFY row_number() OVER (PARTITION BY sae_id, feature, method, text, explainer_model
                                                    ORDER BY ord) = 1) n
                   WHERE NOT EXISTS (
                       SELECT 1 FROM explanations e
                       WHERE e.sae_id = n.sae_id AND e.feature = n.feature AND e.method = n.method
                         AND e.text = n.text AND e.explainer_model IS NOT DISTINCT FROM n.explainer_model)
                   RETURNING id""",
                [base],
            ).fetchall()
        finally:
            cur.unregister("_import_rows")
        return len(inserted), len(rows) - len(inserted)

    return store.write(fn)


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
