"""Shared plumbing for the Streamlit pages: which database, one Store per process, SAE selection, URL state.

The database path comes from ``--db`` after ``--`` on the streamlit command line
(``streamlit run dashboard/app.py -- --db PATH``), else ``$FEATUREDICT_DB``, else ``featuredict.duckdb``.

URL contract (every view is shareable): ``?sae=ID`` on every page, ``feature=N`` on the feature, map and
steer pages (steer: a comma list), ``query=TEXT`` (and ``mode=text|prompt|concept``) on search,
``list=NAME`` on lists. Page paths for ``st.page_link`` / ``st.switch_page`` are relative to app.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import streamlit as st

from featuredict.dashboard.render import md
from featuredict.db.schema import DatabaseError
from featuredict.db.store import Store

DEFAULT_DB = "featuredict.duckdb"
DASHBOARD_DIR = Path(__file__).resolve().parent
PAGES_DIR = DASHBOARD_DIR / "views"
# page name -> (file relative to app.py, url_path)
PAGES = {
    "overview": ("views/overview.py", "overview"),
    "search": ("views/search.py", "search"),
    "feature": ("views/feature.py", "feature"),
    "map": ("views/map.py", "map"),
    "lists": ("views/lists.py", "lists"),
    "steer": ("views/steer.py", "steer"),
}
log = logging.getLogger("featuredict.dashboard")


def db_path() -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.db or os.environ.get("FEATUREDICT_DB") or DEFAULT_DB).expanduser()


_STORES: dict[str, tuple[tuple[int, int], Store]] = {}
_STORES_LOCK = threading.Lock()


def _file_id(path: Path) -> tuple[int, int]:
    if not path.exists():
        return (0, 0)
    s = path.stat()
    return (int(s.st_dev), int(s.st_ino))


def open_store(path: str | Path) -> Store:
    """The process-wide Store of ``path`` (raises ``DatabaseError``).

    Keyed by the file's (device, inode): our own label/list writes keep the one Store (and so the one writer
    lock); a rebuilt file renamed over the old one gets a new Store, after the old one is closed (DuckDB
    hands a new connection to the *cached* old instance while any connection to that path is open).
    """
    p = Path(path)
    key, fid = str(p), _file_id(p)
    with _STORES_LOCK:
        cur = _STORES.get(key)
        if cur is not None and cur[0] == fid:
            return cur[1]
        if cur is not None:
            _STORES.pop(key)
            try:
                cur[1].close()
            except Exception:  # noqa: BLE001 - already closed / in use: the new open still proceeds
                log.warning("closing the previous connection to %s failed", key, exc_info=True)
        store = Store(p)
        _STORES[key] = (fid, store)
        return store


def ensure_navigation() -> None:
    """Make sure pages run under app.py's ``st.navigation``.

    Because ``dashboard/pages/`` exists next to app.py, Streamlit starts every process (and every AppTest
    run) in its legacy "pages directory" mode until some script calls ``st.navigation``; in that mode a
    first request for ``/feature`` would run the page file directly, bypassing app.py (layout, error
    guard). Leave that mode and run app.py in place (which runs this page again under st.navigation), then
    end the legacy run. Not a rerun: that would drop this run's button clicks and form submits.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - internal module moved
        return
    if PagesManager.uses_pages_directory:
        import runpy

        PagesManager.uses_pages_directory = False
        runpy.run_path(str(DASHBOARD_DIR / "app.py"), run_name="__main__")
        st.stop()


def get_store() -> Store:
    """The process-wide Store; on a missing/empty/locked/wrong-version file show why and stop the page."""
    ensure_navigation()
    path = db_path()
    try:
        return open_store(path)
    except DatabaseError as e:
        st.error(md(str(e)))
        st.stop()
        raise  # unreachable: st.stop raises
    except Exception as e:  # noqa: BLE001 - any other open failure: a message, never a traceback
        log.exception("opening %s failed", path)
        st.error(md(f"Cannot open the database {path}: {type(e).__name__}: {first_line(e)}"))
        st.stop()
        raise


def sae_ids(store: Store) -> list[str]:
    return [r[0] for r in store.rows("SELECT sae_id FROM saes ORDER BY sae_id")]


def pick_sae(store: Store, key: str = "sae") -> str:
    """SAE selector bound to the ``sae`` query parameter; stops the page when the file has no SAE."""
    ids = sae_ids(store)
    if not ids:
        st.warning("This database holds no SAE yet. Build one with `featuredict build` or `featuredict demo`.")
        st.stop()
    wanted = st.query_params.get("sae")
    sync_widget(key, "sae", wanted if wanted in ids else ids[0])
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[0]
    choice = st.sidebar.selectbox("SAE", ids, key=key)
    if st.query_params.get("sae") != choice:
        set_param("sae", choice, key)
    st.sidebar.caption(f"Database: `{str(db_path()).replace('`', '')}`")
    return choice


# ------------------------------------------------------------------------------------------ URL state


def qp_int(name: str) -> int | None:
    """An integer query parameter, or None when absent or not an integer."""
    raw = st.query_params.get(name)
    try:
        return int(str(raw).strip()) if raw is not None and str(raw).strip() != "" else None
    except ValueError:
        return None


def qp_str(name: str, default: str = "") -> str:
    v = st.query_params.get(name)
    return default if v is None else str(v)


def sync_widget(key: str, param: str, value: Any) -> None:
    """Before a widget with ``key`` is drawn: when the URL's ``param`` changed since the last run (a link
    was followed), push ``value`` into the widget's state so the URL wins over the remembered value."""
    seen = f"_{key}_qp_seen"
    raw = st.query_params.get(param)
    if st.session_state.get(seen, "<unset>") != raw:
        st.session_state[seen] = raw
        st.session_state[key] = value
        if raw is not None:
            # Re-send: a st.page_link to the *same* page reruns with the new query string but leaves the
            # browser's address bar at the old one; this makes the shown URL match the shown view.
            st.query_params[param] = raw


def set_param(param: str, value: Any, key: str | None = None) -> None:
    """Write a query parameter (removing it for None/''), and remember it as seen for ``key``."""
    if value is None or value == "":
        if param in st.query_params:
            del st.query_params[param]
        raw = None
    else:
        raw = str(value)
        if st.query_params.get(param) != raw:
            st.query_params[param] = raw
    if key is not None:
        st.session_state[f"_{key}_qp_seen"] = raw


def page_file(name: str) -> str:
    return PAGES[name][0]


def steer_available() -> bool:
    """Whether the steering page (written by another module) is installed."""
    return (PAGES_DIR / "steer.py").exists()


def url(page: str, **params: Any) -> str:
    """Relative URL of a page with query parameters (None values dropped), e.g. ``feature?sae=x&feature=3``."""
    q = urlencode({k: str(v) for k, v in params.items() if v is not None and v != ""})
    return f"{PAGES[page][1]}?{q}" if q else PAGES[page][1]


def feature_link(sae_id: str, feature: int, label: str | None = None, icon: str | None = None) -> None:
    """A ``st.page_link`` to a feature page."""
    st.page_link(
        page_file("feature"),
        label=label or f"Feature {feature}",
        icon=icon,
        query_params={"sae": sae_id, "feature": str(int(feature))},
    )


def go_feature(sae_id: str, feature: int) -> None:
    """Switch to the feature page of ``feature`` (stops this run)."""
    st.switch_page(page_file("feature"), query_params={"sae": sae_id, "feature": str(int(feature))})


# ---------------------------------------------------------------------------------------------- errors


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:500] if s else type(e).__name__


def show_error(context: str, e: BaseException) -> None:
    """Log the exception with its traceback on the server, show one line to the user."""
    log.exception("%s", context)
    st.error(f"{context}: {md(type(e).__name__ + ': ' + first_line(e))}")


def guarded(context: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on an exception show ``context`` + the message (no traceback) and return None."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        show_error(context, e)
        return None


# ------------------------------------------------------------------------------------------- runtime


def get_runtime(sae_row: dict[str, Any]) -> Any:
    """The model + SAE that built ``sae_row`` (loaded once per process, shared by all sessions).

    Raises whatever loading raises; callers show it with ``show_error``.
    """
    from featuredict.pipelines.runtime import cached_runtime_from_row

    return cached_runtime_from_row(sae_row)


def fmt_density(d: float | None) -> str:
    if d is None or d != d:
        return "–"
    if d <= 0:
        return "0 (dead)"
    return f"{d:.2e}" if d < 0.01 else f"{d:.3f}"
