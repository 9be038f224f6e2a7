"""Export of a saved list to CSV and JSON (pure pandas)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd


def as_list(v: object) -> list:
    """A DuckDB list cell (list / ndarray / NULL as None, NaN or pd.NA) as a Python list."""
    return list(v) if isinstance(v, list | tuple | np.ndarray) else []


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(v: object) -> object:
    """A text cell a spreadsheet would run as a formula (``=HYPERLINK(..)``, ``+cmd``, ``@SUM``) gets a leading
    ``'`` so it opens as text (OWASP "CSV injection"). Numbers and other values are left alone."""
    return "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v


def export_list(members: pd.DataFrame, name: str) -> tuple[str, str]:
    """(CSV text, JSON text) of a list's members: list_name, sae_id, feature, label, tags, note, added_at,
    density, max_act, top_tokens."""
    out = members.copy()
    out.insert(0, "list_name", name)
    out["tags"] = [as_list(t) for t in out["tags"]]
    out["added_at"] = pd.to_datetime(out["added_at"]).dt.strftime("%Y-%m-%dT%H:%M:%S")
    cols = ["list_name", "sae_id", "feature", "label", "tags", "note", "added_at", "density", "max_act", "top_tokens"]
    out = out[cols]
    csv_df = out.assign(tags=[";".join(t) for t in out["tags"]])
    for col in ("list_name", "sae_id", "label", "tags", "note", "top_tokens"):  # user and corpus text
        csv_df[col] = [csv_safe(v) for v in csv_df[col]]
    records = json.loads(out.to_json(orient="records"))
    return csv_df.to_csv(index=False), json.dumps({"list_name": name, "features": records}, indent=2)
