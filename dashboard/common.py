"""Shared plumbing for the Streamlit pages: which database, one Store per process, SAE selection.

The database path comes from ``--db`` after ``--`` on the streamlit command line
(``streamlit run dashboard/app.py -- --db PATH``), else ``$FEATUREDICT_DB``, else ``featuredict.duckdb``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

from db.schema import DatabaseError
from db.store import Store

DEFAULT_DB = "featuredict.duckdb"


def db_path() -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.db or os.environ.get("FEATUREDICT_DB") or DEFAULT_DB).expanduser()


@st.cache_resource(show_spinner=False)
def _open_store(path: str, mtime: float) -> Store:
    # mtime in the key: a rebuild swaps the file in, and the next run opens the new one.
    return Store(path)


def get_store() -> Store:
    """The process-wide Store; on a missing/empty/locked/wrong-version file show why and stop the page."""
    path = db_path()
    try:
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return _open_store(str(path), mtime)
    except DatabaseError as e:
        st.error(str(e))
        st.stop()
        raise  # unreachable: st.stop raises


def sae_ids(store: Store) -> list[str]:
    return [r[0] for r in store.rows("SELECT sae_id FROM saes ORDER BY sae_id")]


def pick_sae(store: Store, key: str = "sae") -> str:
    """SAE selector bound to the ``sae`` query parameter; stops the page when the file has no SAE."""
    ids = sae_ids(store)
    if not ids:
        st.warning("This database holds no SAE yet. Build one with `featuredict build` or `featuredict demo`.")
        st.stop()
    wanted = st.query_params.get("sae")
    index = ids.index(wanted) if wanted in ids else 0
    choice = st.sidebar.selectbox("SAE", ids, index=index, key=key)
    if st.query_params.get("sae") != choice:
        st.query_params["sae"] = choice
    return choice
