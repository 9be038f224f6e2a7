"""Named steering presets as ``SteeringConfig``: the typed side of ``featuredict.db.queries``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from featuredict.db.queries import PresetError, read_preset, read_presets
from featuredict.db.writes import write_preset
from featuredict.pipelines.steering.config import SteeringConfig, SteeringInputError

if TYPE_CHECKING:
    from featuredict.db.store import Store


@dataclass(frozen=True)
class Preset:
    """A saved preset; ``config`` is None when the stored JSON no longer reads as a steering config."""

    name: str
    sae_id: str
    created_at: datetime
    config: SteeringConfig | None


def _config(name: str, data: dict[str, Any]) -> SteeringConfig:
    try:
        return SteeringConfig.from_mapping(data)
    except SteeringInputError as e:
        raise PresetError(f"preset {name!r} is unreadable: {e}") from None


def save_preset(store: Store, name: str, sae_id: str, config: SteeringConfig, overwrite: bool = False) -> str:
    """Store ``config`` under ``name`` for ``sae_id``; PresetError for a bad name or, unless ``overwrite``,
    an existing one. Returns the cleaned name."""
    return write_preset(store, name, sae_id, config.to_dict(), overwrite=overwrite)


def load_preset(store: Store, name: str) -> tuple[str, SteeringConfig]:
    """``(sae_id, config)`` of preset ``name``; PresetError when absent or unreadable."""
    sae_id, data = read_preset(store, name)
    return sae_id, _config(name, data)


def list_presets(store: Store, sae_id: str | None = None) -> list[Preset]:
    """Presets (of one SAE, or all), newest first."""
    out = []
    for row in read_presets(store, sae_id):
        try:
            config = None if row["config"] is None else _config(row["name"], row["config"])
        except PresetError:
            config = None
        out.append(Preset(str(row["name"]), str(row["sae_id"]), row["created_at"], config))
    return out
