"""Storage of named steering presets (``steering_presets``) as plain JSON objects, and features' max_act.

This layer knows nothing of steering configs: it checks preset names, stores a JSON-ready dict per name and
returns dicts. ``featuredict.pipelines.steering.presets`` turns them into ``SteeringConfig``.
All writes go through ``Store.write`` (the one serialized writer path); every value travels as a parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from featuredict.db.errors import UserError
from featuredict.db.store import Store

PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,79}")


class PresetError(UserError, ValueError):
    """A preset that cannot be saved or loaded, with a one-line message fit to show a user."""


def check_preset_name(name: str) -> str:
    """``name`` stripped; PresetError unless it is 1-80 letters, digits, spaces, '_', '-' or '.'."""
    name = (name or "").strip()
    if not PRESET_NAME.fullmatch(name):
        raise PresetError(
            f"preset name {name!r} is not allowed: use 1-80 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def _decode(name: str, payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as e:
        raise PresetError(f"preset {name!r} is unreadable: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise PresetError(f"preset {name!r} is unreadable: its JSON is not an object")
    return data


def write_preset(store: Store, name: str, sae_id: str, config: Mapping[str, Any], overwrite: bool = False) -> str:
    """Store the JSON object ``config`` under ``name`` for ``sae_id``; refuses to replace an existing preset
    unless ``overwrite``. Returns the cleaned name."""
    name = check_preset_name(name)
    try:
        payload = json.dumps(dict(config), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PresetError(f"preset {name!r} cannot be stored as JSON: {e}") from None
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


def delete_preset(store: Store, name: str) -> bool:
    """Delete preset ``name``; True when it existed."""

    def write(cur: Any) -> bool:
        n = cur.execute("SELECT count(*) FROM steering_presets WHERE name = ?", [name]).fetchone()[0]
        cur.execute("DELETE FROM steering_presets WHERE name = ?", [name])
        return bool(n)

    return store.write(write)


def feature_max_acts(store: Store, sae_id: str) -> dict[int, float]:
    """feature id -> features.max_act for every feature of ``sae_id`` (the unit of a steering ``add``)."""
    return {int(f): float(m) for f, m in store.rows("SELECT feature, max_act FROM features WHERE sae_id = ?", [sae_id])}
