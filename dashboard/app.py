"""featuredict dashboard entry point: ``streamlit run dashboard/app.py -- --db PATH`` (or ``featuredict serve``).

The shared frame of every page (Streamlit's ``st.navigation`` pattern): the navigation, the database
(opened once per run, with a message instead of a page when it cannot be), the SAE picker in the sidebar
bound to ``?sae=``. The chosen page then runs with that ``PageContext`` (``common.page_context()``).
Url paths: overview (default), search, feature, map, lists, and steer when ``dashboard/views/steer.py`` is
installed. Any exception a page raises is shown as one error line, never as a traceback (the traceback goes
to the server log).
"""

from __future__ import annotations

import altair as alt
import streamlit as st

from featuredict.dashboard.common import PAGES, draw_frame, page_file, show_error, use_context

# Streamlit ships chart data as Arrow (its own transformer has no row cap); lift altair's 5,000-row guard
# too, for anything that serialises a chart outside Streamlit (the map draws 65k+ points).
alt.data_transformers.disable_max_rows()

st.set_page_config(page_title="featuredict", page_icon=":material/dictionary:", layout="wide")

names = list(PAGES)
page = st.navigation(
    [
        st.Page(page_file(name), title=PAGES[name][0], icon=PAGES[name][1], url_path=name, default=i == 0)
        for i, name in enumerate(names)
    ]
)
try:
    with use_context(draw_frame()):
        page.run()
except Exception as e:  # noqa: BLE001 - st.stop / st.rerun / switch_page are BaseExceptions and pass through
    show_error(f"The {page.title} page failed", e)
