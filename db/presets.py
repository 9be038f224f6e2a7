"""Queries for steering: named presets (``steering_presets``) and the feature facts steering needs.

All writes go through ``Store.write`` (the one serialized writer path); every value travels as a parameter.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from featuredict.pipelines.steering import SteeringConfig, SteeringInputError

from .store import Store

PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,79}")


class PresetError(ValueError):
    """A preset that cannot be saved or loaded, with a one-line message fit to show a user."""


def check_preset_name(name: str) -> str:
    name = (name or "").strip()
    if not PRESET_NAME.fullmatch(name):
        raise PresetError(
            f"preset name {name!r} is not allowed: use 1-80 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def save_preset(store: Store, name: str, sae_id: str, config: SteeringConfig, overwrite: bool = False) -> str:
    """Store ``config`` under ``name`` for ``sae_id``; refuses to replace an existing preset unless
    ``overwrite``. Returns the cleaned name."""
    name = check_preset_name(name)
    payload = config.to_json()
    now = datetime.now(UTC).replace(tzinfo=None)

    def write(cur: Any) -> None:
        exists = cur.execute("SELECT count(*) FROM steering_presets WHERE name = ?", [name]).fetchone()[0]
        if exists and not overwrite:
            raise PresetError(f"a preset named {name!r} already exists; pick another name or overwrite it")
        cur.execute(
            "INSERT INTO steering_presets (name, sae_id, config_json, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET sae_id = excluded.sae_id, config_json = excluded.config_json, "
            "created_at = excluded.created_at",
            [name, sae_id, payload, now],
        )

    store.write(write)
    return name


def load_preset(store: Store, name: str) -> tuple[str, SteeringConfig]:
    """``(sae_id, config)`` of preset ``name``; PresetError when absent or unreadable."""
    rows = store.rows("SELECT sae_id, config_json FROM steering_presets WHERE name = ?", [name])
    if not rows:
        raise PresetError(f"no steering preset named {name!r} in this database")
    sae_id, payload = rows[0]
    try:
        return str(sae_id), SteeringConfig.from_json(payload)
    except SteeringInputError as e:
        raise PresetError(f"preset {name!r} is unreadable: {e}") from None


def list_presets(store: Store, sae_id: str | None = None) -> list[dict[str, Any]]:
    """Presets, newest first: dicts with name, sae_id, created_at, config (SteeringConfig or None)."""
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
            cfg: SteeringConfig | None = SteeringConfig.from_json(payload)
        except SteeringInputError:
            cfg = None
        out.append({"name": name, "sae_id": sid, "created_at": created, "config": cfg})
    return out


def delete_preset(store: Store, name: str) -> bool:
    """Delete preset ``name``; True when it existed."""

    def write(cur: Any) -> bool:
        n = cur.execute("SELECT count(*) FROM steering_presets WHERE name = ?", [name]).fetchone()[0]
        cur.execute("DELETE FROM steering_presets WHERE name = ?", [name])
        return bool(n)

    return store.write(write)


# ---- feature facts ---------------------------------------------------------------------------------------
def sae_row(store: Store, sae_id: str) -> dict[str, Any] | None:
    """The ``saes`` row of ``sae_id`` as a dict (what ``runtime_from_row`` reads), or None."""
    df = store.df("SELECT * FROM saes WHERE sae_id = ?", [sae_id])
    if df.empty:
        return None
    return {k: (None if _isna(v) else v) for k, v in df.iloc[0].to_dict().items()}


def _isna(v: Any) -> bool:
    try:
        return bool(v != v)  # NaN / NaT
    except (TypeError, ValueError):
        return False


def feature_max_acts(store: Store, sae_id: str) -> dict[int, float]:
    """feature id -> features.max_act for every feature of ``sae_id``."""
    return {int(f): float(m) for f, m in store.rows("SELECT feature, max_act FROM features WHERE sae_id = ?", [sae_id])}


def feature_summaries(store: Store, sae_id: str, features: list[int]) -> dict[int, dict[str, Any]]:
    """Display facts for ``features``: max_act, density, label (from ``labels``), top promoted tokens."""
    if not features:
        return {}
    rows = store.rows(
        "SELECT f.feature, f.max_act, f.density, f.pos_tokens, l.label FROM features f "
        "LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature "
        "WHERE f.sae_id = ? AND list_contains(?, f.feature)",
        [sae_id, [int(x) for x in features]],
    )
    return {
        int(f): {"max_act": float(m), "density": float(d), "pos_tokens": list(p or [])[:5], "label": lab}
        for f, m, d, p, lab in rows
    }


def search_features(store: Store, sae_id: str, query: str, limit: int = 50) -> list[int]:
    """Feature ids matching ``query``: an id (or comma list of ids), else a case-insensitive substring of the
    label, the promoted tokens or the search text. Live features first, by max_act."""
    q = (query or "").strip()
    if not q:
        return []
    parts = [p.strip() for p in q.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        wanted = [int(p) for p in parts]
        rows = store.rows(
            "SELECT feature FROM features WHERE sae_id = ? AND list_contains(?, feature) ORDER BY feature",
            [sae_id, wanted],
        )
        found = {int(r[0]) for r in rows}
        return [f for f in wanted if f in found]
    needle = q.lower()
    rows = store.rows(
        "SELECT f.feature FROM features f "
        "LEFT JOIN labels l ON l.sae_id = f.sae_id AND l.feature = f.feature "
        "WHERE f.sae_id = ? AND ("
        "  contains(lower(coalesce(l.label, '')), ?) OR contains(lower(coalesce(f.search_text, '')), ?) "
        "  OR contains(lower(array_to_string(coalesce(f.pos_tokens, []::VARCHAR[]), ' ')), ?)) "
        "ORDER BY f.dead, f.max_act DESC LIMIT ?",
        [sae_id, needle, needle, needle, int(limit)],
    )
    return [int(r[0]) for r in rows]
