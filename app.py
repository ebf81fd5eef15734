"""ctssl dashboard: ``streamlit run app.py`` (or ``ctssl dashboard``).

The router only: page list, the sidebar store setting and a one-line store
status. Each page is a thin script in ``pages/`` that calls the query layer
(``ctssl_core/results/read.py``) through cached loaders (``pages/common.py``).
"""

from pathlib import Path

import streamlit as st

from ctssl_core.commands.dashboard import allowed_stores
from ctssl_core.results.read import hint

ROOT = Path(__file__).resolve().parent

st.set_page_config(page_title="ctssl — SSL for chest CT", layout="wide")

STORES = allowed_stores()
if "ctssl_store" not in st.session_state:
    st.session_state["ctssl_store"] = STORES[0]

# URL paths equal the file stems, so /compare etc. also work on a fresh server (see pages/common.py).
pages = [
    st.Page(str(ROOT / "pages" / "overview.py"), title="Overview", url_path="overview", default=True),
    st.Page(str(ROOT / "pages" / "compare.py"), title="Compare strategies", url_path="compare"),
    st.Page(str(ROOT / "pages" / "curves.py"), title="Learning curves", url_path="curves"),
    st.Page(str(ROOT / "pages" / "embeddings.py"), title="Embeddings & bias", url_path="embeddings"),
    st.Page(str(ROOT / "pages" / "data.py"), title="Data", url_path="data"),
]
if (ROOT / "pages" / "jobs.py").exists():
    pages.append(st.Page(str(ROOT / "pages" / "jobs.py"), title="Jobs", url_path="jobs"))

nav = st.navigation(pages)
def _pick_store() -> None:
    st.session_state["ctssl_store"] = st.session_state["ctssl_store_pick"]


with st.sidebar:
    # A list, not a text box: visitors choose among the configured stores only (see allowed_stores).
    # The session value itself is written only by code (this script, tests), never by a visitor.
    current = st.session_state["ctssl_store"]
    options = STORES if current in STORES else [current, *STORES]
    st.session_state["ctssl_store_pick"] = current
    st.selectbox("Store", options, key="ctssl_store_pick", on_change=_pick_store,
                 help=f"The store given to {hint('dashboard')} ($CTSSL_STORE), and the stores under "
                      f"`--stores-root` if one was given.")
    from pages.common import sidebar_status  # noqa: E402 - after set_page_config

    sidebar_status()
nav.run()
