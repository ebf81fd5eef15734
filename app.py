"""ctssl dashboard: ``streamlit run app.py`` (or ``ctssl dashboard``).

The router only: page list, the sidebar store setting and a one-line store
status. Each page is a thin script in ``pages/`` that calls the query layer
(``ctssl_core/results/read.py``) through cached loaders (``pages/common.py``).
"""

from pathlib import Path

import streamlit as st

from ctssl_core.paths import default_store

ROOT = Path(__file__).resolve().parent

st.set_page_config(page_title="ctssl — SSL for chest CT", layout="wide")

if "ctssl_store" not in st.session_state:
    st.session_state["ctssl_store"] = str(default_store())

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
with st.sidebar:
    st.text_input("Store", key="ctssl_store",
                  help="Folder holding ctssl.duckdb. Defaults to $CTSSL_STORE or data/store.")
    from pages.common import sidebar_status  # noqa: E402 - after set_page_config

    sidebar_status()
nav.run()
