"""Cached reads shared by pages (Streamlit caches keyed by database file + SAE)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from featuredict.db import queries as q
from featuredict.db.records import FeatureBaselines
from featuredict.db.store import Store


def db_key(store: Store) -> str:
    """Cache key of a database's built content: path + inode + the newest build time of its SAEs.

    The build time matters because a rebuild swaps in a new file and the filesystem may reuse the old inode;
    label and list writes do not change it, so they keep the (model-run) caches warm.
    """
    try:
        ino = store.path.stat().st_ino
    except OSError:
        ino = -1
    try:
        built = store.rows("SELECT max(built_at) FROM saes")[0][0]
    except Exception:  # noqa: BLE001 - a key must not fail; the page reports database problems itself
        built = None
    return f"{store.path}:{ino}:{built}"


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def _map_points(_store: Store, key: str, sae_id: str) -> pd.DataFrame:
    return q.map_points(_store, sae_id)


def cached_map_points(store: Store, sae_id: str) -> pd.DataFrame:
    """``q.map_points`` (all features' UMAP positions + label/tag/top tokens), cached until a label edit here
    or a write from any other process (``Store.generation``)."""
    return _map_points(store, f"{db_key(store)}:{store.generation()}", sae_id)


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def _baselines(_store: Store, key: str, sae_id: str, d_sae: int) -> FeatureBaselines:
    return q.feature_baselines(_store, sae_id, d_sae)


def cached_baselines(store: Store, sae_id: str, d_sae: int) -> FeatureBaselines:
    """``q.feature_baselines``: the density / mean_act / max_act arrays ``[d_sae]``."""
    return _baselines(store, db_key(store), sae_id, d_sae)


def clear_label_caches() -> None:
    """Forget cached reads that show labels/tags (after a label edit)."""
    _map_points.clear()
