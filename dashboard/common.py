"""Shared plumbing for the Streamlit app: the page table, which database, one Store per process, the shared
frame every page runs in (``PageContext``), URL state and error display.

The database path comes from ``--db`` after ``--`` on the streamlit command line
(``streamlit run dashboard/app.py -- --db PATH``), else ``$FEATUREDICT_DB``, else ``featuredict.duckdb``.

app.py draws the frame once per run (``draw_frame``: open the store, the SAE picker in the sidebar) and runs
the page inside ``use_context``; a page reads what it needs with ``page_context()`` and only lays out.

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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import streamlit as st

from featuredict.dashboard.data import db_key
from featuredict.dashboard.render import md
from featuredict.db import queries as q
from featuredict.db.errors import one_line
from featuredict.db.schema import DatabaseError
from featuredict.db.store import Store

DEFAULT_DB = "featuredict.duckdb"
VIEWS_DIR = Path(__file__).resolve().parent / "views"
# The one page table: name (= url path; the file is views/<name>.py) -> (title, icon). Order = navigation order;
# the first is the default page. "steer" is another module's page, listed only when its file is installed.
PAGES: dict[str, tuple[str, str]] = {
    "overview": ("Overview", ":material/dashboard:"),
    "search": ("Search", ":material/search:"),
    "feature": ("Feature", ":material/neurology:"),
    "map": ("Map", ":material/scatter_plot:"),
    "lists": ("Lists", ":material/list:"),
    "review": ("Review queue", ":material/fact_check:"),
    "scan": ("Scan", ":material/policy:"),
    "attribution": ("Attribution", ":material/account_tree:"),
    "steer": ("Steer", ":material/tune:"),
}
log = logging.getLogger("featuredict.dashboard")


def db_path() -> Path:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.db or os.environ.get("FEATUREDICT_DB") or DEFAULT_DB).expanduser()


def read_only_mode() -> bool:
    """Whether the app serves read-only: ``--read-only`` after ``--`` (``featuredict serve --read-only``) or
    ``$FEATUREDICT_READ_ONLY`` set to 1/true/yes. The database file is then opened read-only, every write is
    refused by ``Store.write`` and pages hide their edit widgets."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--read-only", action="store_true")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return bool(args.read_only) or os.environ.get("FEATUREDICT_READ_ONLY", "").strip().lower() in ("1", "true", "yes")


_STORES: dict[str, Store] = {}
_STORES_LOCK = threading.Lock()


def open_store(path: str | Path, read_only: bool | None = None) -> Store:
    """The process-wide Store of ``path`` (raises ``DatabaseError``), read-only when ``read_only`` (default:
    ``read_only_mode()``).

    One per path: its read connection closes whenever another process (a CLI command, another dashboard, a
    build swapping in a rebuilt file) writes, and reopens on the next read, so the page sees the new rows.
    """
    p = Path(path)
    ro = read_only_mode() if read_only is None else bool(read_only)
    key = f"{p}|{'ro' if ro else 'rw'}"
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None or not p.exists():
            store = _STORES[key] = Store(p, read_only=ro)
        return store


def _store_or_stop() -> Store:
    """The process-wide Store; on a missing/empty/locked/wrong-version file show why and stop the run."""
    path = db_path()
    try:
        return open_store(path)
    except DatabaseError as e:
        st.error(md(str(e)))
        st.stop()
        raise  # unreachable: st.stop raises
    except Exception as e:  # noqa: BLE001 - any other open failure: a message, never a traceback
        log.exception("opening %s failed", path)
        st.error(md(f"Cannot open the database {path}: {one_line(e, 500, with_type=True)}"))
        st.stop()
        raise


def _sae_picker(store: Store, key: str = "sae") -> str:
    """SAE selector in the sidebar, bound to the ``sae`` query parameter; stops the run when the file has no SAE."""
    ids = q.sae_ids(store)
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
    st.sidebar.caption(
        f"Database: `{str(db_path()).replace('`', '')}`" + (" · **read-only**" if read_only_mode() else "")
    )
    return choice


# ---------------------------------------------------------------------------------------- page context


@dataclass(frozen=True)
class PageContext:
    """What the shared frame hands every page: the open ``store``, the SAE picked in the sidebar (``sae_id``)
    and its ``saes`` row (``sae``, as ``q.sae_info`` returns it), and ``db_key``, the cache key of the
    database's built content (``data.db_key``: changes with a rebuild, not with label or list writes)."""

    store: Store
    sae_id: str
    sae: Mapping[str, Any]
    db_key: str

    @property
    def d_sae(self) -> int:
        return int(self.sae["d_sae"])

    @property
    def has_bos(self) -> bool:
        """Whether stored contexts start with BOS (not shown)."""
        return bool(self.sae.get("prepend_bos", True))


_CONTEXT: ContextVar[PageContext | None] = ContextVar("featuredict_page_context", default=None)


def draw_frame() -> PageContext:
    """The frame every page shares: open the database (or say why not and stop), draw the SAE picker."""
    store = _store_or_stop()
    sae_id = _sae_picker(store)
    sae = q.sae_info(store, sae_id)
    if sae is None:  # a rebuild replaced the file between the picker's read and this one
        st.error(md(f"SAE {sae_id!r} is no longer in this database; reload the page."))
        st.stop()
    return PageContext(store=store, sae_id=sae_id, sae=sae, db_key=db_key(store))


@contextmanager
def use_context(ctx: PageContext) -> Iterator[PageContext]:
    """Make ``ctx`` what ``page_context()`` returns while the page runs (app.py: ``with use_context(..): page.run()``)."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def page_context() -> PageContext:
    """The frame app.py drew for this run. A page file run on its own (``streamlit run dashboard/views/x.py``,
    or an AppTest of one page file) draws the frame itself; its links to other pages need app.py's navigation."""
    ctx = _CONTEXT.get()
    return ctx if ctx is not None else draw_frame()


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


def watchlist_picker(store: Store, key: str, where: Any = None, empty: str = "") -> str:
    """A "Watchlist" select box over the file's lists, bound to the ``list`` query parameter; with no list yet,
    ``empty`` as an info line and the run stops."""
    names = q.list_names(store)["list_name"].tolist()
    if not names:
        st.info(empty or "No lists yet: add features to a list (feature page or Lists page) to use it as a watchlist.")
        st.stop()
    want = qp_str("list", names[0])
    sync_widget(key, "list", want if want in names else names[0])
    chosen = str((where or st).selectbox("Watchlist", names, key=key))
    set_param("list", chosen, key=key)
    return chosen


def page_file(name: str) -> str:
    """The file of page ``name`` relative to app.py (for ``st.Page``, ``st.page_link``, ``st.switch_page``)."""
    if name not in PAGES:
        raise KeyError(f"no dashboard page {name!r}")
    return f"views/{name}.py"


def url(page: str, **params: Any) -> str:
    """Relative URL of a page with query parameters (None values dropped), e.g. ``feature?sae=x&feature=3``."""
    query = urlencode({k: str(v) for k, v in params.items() if v is not None and v != ""})
    if page not in PAGES:
        raise KeyError(f"no dashboard page {page!r}")
    return f"{page}?{query}" if query else page


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


def show_error(context: str, e: BaseException) -> None:
    """Log the exception with its traceback on the server, show one line to the user."""
    log.exception("%s", context)
    st.error(f"{context}: {md(one_line(e, 500, with_type=True))}")


def guarded(context: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on an exception show ``context`` + the message (no traceback) and return None."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        show_error(context, e)
        return None


# ------------------------------------------------------------------------------------------- runtime


def get_runtime(sae_row: Mapping[str, Any]) -> Any:
    """The model + SAE that built ``sae_row`` (loaded once per process, shared by all sessions).

    Raises whatever loading raises; callers show it with ``show_error``.
    """
    from featuredict.pipelines.model.runtime import cached_runtime_from_row

    return cached_runtime_from_row(sae_row)


def fmt_density(d: float | None) -> str:
    if d is None or d != d:
        return "–"
    if d <= 0:
        return "0 (dead)"
    return f"{d:.2e}" if d < 0.01 else f"{d:.3f}"


# ------------------------------------------------------------------------------------------ reviewer identity


def signed_in_user() -> str | None:
    """The signed-in user's email (or name) when the server has OIDC auth configured (``[auth]`` in
    ``.streamlit/secrets.toml``) and the user logged in; None otherwise (pages then ask for a name)."""
    try:
        if not st.user.is_logged_in:
            return None
    except (AttributeError, KeyError):  # no [auth] section: st.user has no is_logged_in
        return None
    for key in ("email", "name", "sub"):
        try:
            v = st.user[key]
        except KeyError:
            continue
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def reviewer_name(container: Any = None, key: str = "author") -> str | None:
    """Who is editing: the signed-in user when auth is configured, else a name field (remembered for the
    session under ``st.session_state[key]``) drawn in ``container`` (``st`` by default). None when blank."""
    user = signed_in_user()
    box = container if container is not None else st
    if user is not None:
        box.caption(f"Signed in as {md(user)}")
        return user
    name = box.text_input("Your name (optional)", value=st.session_state.get(key, ""), key=f"{key}_field")
    st.session_state[key] = name
    return name.strip() or None
