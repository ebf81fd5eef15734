"""Shared helpers for the dashboard pages: the current store, cached loaders, friendly errors.

Why: every page needs the same three things — which store is selected, a
cache that refreshes when the store changes, and errors turned into messages
(the dashboard must never show a stack trace). Loaders take every input as an
argument (store path + store version + query args) so the cache is honest.
"""

from __future__ import annotations

import streamlit as st

from ctssl_core.db import StoreBusy, StoreError, StoreMissing
from ctssl_core.paths import default_store
from ctssl_core.results import read
from ctssl_core.results.read import hint


def _leave_directory_mode() -> None:
    """Make a page URL opened on a fresh server go through app.py's router.

    Because a ``pages/`` folder sits beside app.py, Streamlit starts each new
    server process in its old directory-based multipage mode until some run
    calls ``st.navigation``. If the very first visit is ``/compare``, it runs
    pages/compare.py alone: no router, no sidebar store setting, every file in
    pages/ listed as a page. We switch that mode off and rerun, which executes
    app.py and resolves the same URL path. Uses Streamlit's PagesManager flag
    (the one ``st.navigation`` itself clears); a no-op once app.py has run.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a future Streamlit without the flag has no directory mode to leave
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_directory_mode()


def current_store() -> str:
    """The store chosen in the sidebar (defaults to $CTSSL_STORE / data/store)."""
    return str(st.session_state.get("ctssl_store") or default_store()).strip()


def _name(fn) -> str:
    """The cache key of a read.py function; anything else is a programming error, said plainly."""
    if getattr(fn, "__module__", None) != read.__name__ or not callable(fn):
        raise TypeError(f"query functions come from ctssl_core.results.read, got {fn!r}")
    return fn.__qualname__


@st.cache_data(show_spinner=False, max_entries=512)
def _load(name: str, _fn, store: str, version, args: tuple, kwargs: tuple):
    """Cached ``_fn(store, *args, **kwargs)``; ``name`` (the function's) keys the cache in place of the
    unhashed ``_fn``, and ``version`` changes when the store is written."""
    return _fn(store, *args, **dict(kwargs))


@st.cache_data(show_spinner=False, max_entries=256)
def _load_many(store: str, version: int, key: tuple, _calls: tuple) -> list:
    """Cached batch of read.py calls on one connection (``read.snapshot``); ``key`` names ``_calls``.

    The cache is keyed by the store path string (``store``), never by the Snapshot, which lives only
    for this batch."""
    with read.snapshot(store) as snap:
        return [fn(snap, *args) for fn, *args in _calls]


def query_many(*calls: tuple) -> list:
    """``query_many((read.run_table,), (read.derived, "speed_ratio"))`` -> [DataFrame, DataFrame]: one connection."""
    store = current_store()
    key = tuple((_name(fn), *args) for fn, *args in calls)
    return _guard(store, lambda: _load_many(store, read.store_version(store), key, tuple(calls)))


def query(fn, *args, missing_ok: bool = False, live: tuple = (), **kwargs):
    """Run a read.py query (the function, e.g. ``read.forest``) for the current store, turning store
    problems into messages.

    A missing/busy/unreadable store stops the page with a message. A missing
    result *file* (``ResultFileMissing``) shows a warning and returns None when
    ``missing_ok`` so that the rest of the page still renders.
    ``live``: run ids whose run folders the query also reads (``read.curves`` shows lines the store has not
    merged yet); the cached answer is refreshed when their files grow, not only when the store changes.
    """
    store = current_store()
    name = _name(fn)
    version = (read.store_version(store), read.run_files_version(store, live))
    return _guard(store, lambda: _load(name, fn, store, version, args,
                                       tuple(sorted(kwargs.items()))), missing_ok)


def _guard(store: str, thunk, missing_ok: bool = False):
    try:
        return thunk()
    except read.ResultFileMissing as e:
        if missing_ok:
            st.warning(str(e))
            return None
        st.warning(str(e))
        st.stop()
    except StoreMissing as e:
        st.info(f"No ctssl store at `{store}` yet. Create one with {hint('synth')} then {hint('ingest')}, or "
                f"{hint('benchmark_quick')}.\n\nOr point the **Store** setting in the sidebar at an existing store.")
        st.stop()
    except StoreBusy as e:
        st.warning(f"{e} The page will show results as soon as the store is free; reload it in a moment.")
        st.stop()
    except StoreError as e:
        st.warning(str(e))
        st.stop()
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file must not show a traceback
        st.error(f"The store at {store} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                 f"Check that it is a ctssl store, or create one with {hint('benchmark_quick')}.")
        st.stop()


# ---------------------------------------------------------------- deep links (issue 14 item 5)
def url_value(param: str, options: list, fallback=None):
    """The value the URL names for ``param`` if it is one of ``options``, else ``fallback``.

    Why validate: a link is visitor input; an unknown or stale value (a deleted run, another
    benchmark) falls back to the page default instead of an error or an empty view.
    """
    v = st.query_params.get(param)
    return v if v is not None and v in [str(o) for o in options] else fallback


def url_values(param: str, options: list, fallback: list) -> list:
    """Like :func:`url_value` for a multi-select: the URL's values that are options (all unknown: fallback)."""
    known = [str(o) for o in options]
    vals = [v for v in st.query_params.get_all(param) if v in known]
    return vals or list(fallback)


def url_index(param: str, options: list, default: int = 0) -> int:
    """Index for a selectbox/radio: the URL's value when valid, else ``default``.

    The URL is written back with the widget's value after every run (:func:`to_url`), so in steady
    state this index equals the widget's value and sharing the address reproduces the view.
    """
    v = url_value(param, options)
    return [str(o) for o in options].index(v) if v is not None else default


def to_url(**params) -> None:
    """Write page state into the address bar (lists as repeated params; None/empty removes the param)."""
    for k, v in params.items():
        if v is None or (isinstance(v, (list, tuple)) and not v):
            if k in st.query_params:
                del st.query_params[k]
        elif isinstance(v, (list, tuple)):
            if st.query_params.get_all(k) != [str(x) for x in v]:
                st.query_params[k] = [str(x) for x in v]
        elif st.query_params.get(k) != str(v):
            st.query_params[k] = str(v)


def benchmark_choice() -> str | None:
    """Sidebar selector of the store's benchmarks; returns the chosen id (None: the store has none).

    Defaults to the latest finished benchmark (``read.latest_finished``); pages
    filter their tables by it so two benchmarks are never mixed.
    """
    bench = query(read.benchmarks)
    if bench.empty:
        return None
    ids = bench.benchmark_id.astype(str).tolist()
    chosen = url_value("benchmark", ids) or st.session_state.get("ctssl_benchmark")  # link, else last choice
    if chosen not in ids:                                # first visit, or another store was chosen
        chosen = read.latest_finished(bench)
    labels = {r.benchmark_id: f"{r.benchmark_id} · {r.profile} · {r.status} · {str(r.started_at)[:16]}"
              for r in bench.itertuples()}
    pick = st.sidebar.selectbox("Benchmark", ids, index=ids.index(chosen), format_func=lambda b: labels.get(b, b),
                                key="benchmark_id",
                                help="Results of one benchmark at a time; the latest finished one by default.")
    st.session_state["ctssl_benchmark"] = pick
    to_url(benchmark=pick)
    return pick


def sidebar_status() -> None:
    """One caption with what the store holds, and the older-schema note if any."""
    store = current_store()
    try:
        info = _load(_name(read.store_info), read.store_info, store, read.store_version(store), (), ())
    except StoreMissing:
        st.caption(f"No store at `{store}` yet.")
        return
    except Exception as e:  # noqa: BLE001
        st.caption(f"Store unreadable: {type(e).__name__}")
        return
    c = info.counts
    st.caption(f"{c.get('runs', 0):,} runs · {c.get('results', 0):,} results · {c.get('patients', 0):,} patients · "
               f"{c.get('slices', 0):,} slices")
    if info.outdated:
        st.caption("⚠️ older store format — some views are limited.")


def show_outdated_note(info: "read.StoreInfo | None" = None) -> None:
    """Say once per page when the store is from an older schema (what is missing, how to upgrade)."""
    info = info if info is not None else query(read.store_info)
    msg = info.message()
    if msg:
        with st.expander("This store is from an older ctssl version", expanded=False):
            st.write(msg)
