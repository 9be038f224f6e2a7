"""featuredict dashboard entry point: ``streamlit run dashboard/app.py -- --db PATH`` (or ``featuredict serve``).

Multipage app (``st.navigation``); url paths: overview (default), search, feature, map, lists, and steer
when ``dashboard/views/steer.py`` is installed. Any exception a page raises is shown as one error line,
never as a traceback (the traceback goes to the server log).
"""

from __future__ import annotations

import altair as alt
import streamlit as st

from featuredict.dashboard.common import PAGES, PAGES_DIR, show_error

# Streamlit ships chart data as Arrow (its own transformer has no row cap); lift altair's 5,000-row guard
# too, for anything that serialises a chart outside Streamlit (the map draws 65k+ points).
alt.data_transformers.disable_max_rows()

st.set_page_config(page_title="featuredict", page_icon=":material/dictionary:", layout="wide")

TITLES = {
    "overview": ("Overview", ":material/dashboard:"),
    "search": ("Search", ":material/search:"),
    "feature": ("Feature", ":material/neurology:"),
    "map": ("Map", ":material/scatter_plot:"),
    "lists": ("Lists", ":material/list:"),
    "steer": ("Steer", ":material/tune:"),
}


def build_pages() -> list[st.Page]:
    pages = []
    for name, (file, url_path) in PAGES.items():
        if name == "steer" and not (PAGES_DIR / "steer.py").exists():
            continue  # another module's page; absent until installed
        title, icon = TITLES[name]
        pages.append(st.Page(file, title=title, icon=icon, url_path=url_path, default=name == "overview"))
    return pages


page = st.navigation(build_pages())
try:
    page.run()
except Exception as e:  # noqa: BLE001 - st.stop / st.rerun / switch_page are BaseExceptions and pass through
    show_error(f"The {page.title} page failed", e)
