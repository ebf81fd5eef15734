"""Real-browser harness for the dashboard: a headless ``streamlit run`` plus Debian's Chromium.

Why a harness and not only AppTest: AppTest runs the script but not the
browser, so it cannot see a broken websocket, a page that never finishes
loading, or a chart the frontend refuses to draw. This starts the real
server on a free localhost port with a given ``CTSSL_STORE`` and drives it with
Playwright using the system ``chromium`` binary (``playwright install`` cannot
download browsers here; ``make test`` installs the apt package).

Use from a test module (tests/ is on ``sys.path`` under pytest)::

    from browser_harness import browser, page, start_dashboard, goto_page, shot  # noqa: F401

    def test_x(start_dashboard, page, tmp_path):
        url = start_dashboard(store_root)          # waits for /_stcore/health
        goto_page(page, url, "jobs")                # waits for the script run to finish
        page.get_by_text("Queue").wait_for()
        shot(page, "jobs")                          # -> test-artifacts/jobs.png
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


class HarnessError(RuntimeError):
    """The server or browser could not start; the message says what to install or check."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise HarnessError(
            "the browser tests need Debian's Chromium: `apt-get install -y chromium` "
            "(`make test` does this)")
    return path


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise HarnessError(f"streamlit did not answer {url}/_stcore/health in {timeout_s:.0f}s:\n"
                       f"{log.read_text()[-4000:]}")


@contextlib.contextmanager
def streamlit_app(store: str | Path | None, port: int | None = None, app: str | Path = "app.py",
                  env: dict[str, str] | None = None, timeout_s: float = 90.0) -> Iterator[str]:
    """Run ``streamlit run app.py`` headless on 127.0.0.1; yield its base URL; stop it after.

    ``store`` becomes ``CTSSL_STORE`` (None leaves the environment as is).
    """
    port = port or free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"streamlit-{port}.log"
    full_env = {**os.environ, **(env or {})}
    if store is not None:
        full_env["CTSSL_STORE"] = str(store)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app),
           "--server.address", "127.0.0.1", "--server.port", str(port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--server.runOnSave", "false"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log, timeout_s)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# app.py's URL path per page name (kept in one place so a rename touches one line)
URL_PATHS = {"overview": "",  # the default page is served at the root URL
             "compare": "compare", "curves": "curves",
             "embeddings": "embeddings", "data": "data", "jobs": "jobs"}


def wait_script_done(page, timeout_ms: float = 30_000) -> None:
    """Wait until the app has rendered something and no script run is in progress.

    Streamlit shows ``stStatusWidget`` (a "Stop" / "Running..." control) only
    while the script runs; we wait for it to be absent three polls in a row,
    because a widget change can start a new run right after one finishes.
    """
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    deadline = time.monotonic() + timeout_ms / 1000
    quiet = 0
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count()
        skeleton = page.locator('[data-testid="stAppSkeleton"], [data-testid="stSkeleton"]').count()
        rendered = page.locator('[data-testid="stMain"] [data-testid="stElementContainer"]').count()
        quiet = quiet + 1 if (running == 0 and skeleton == 0 and rendered > 0) else 0
        if quiet >= 3:
            return
        page.wait_for_timeout(150)
    raise HarnessError(f"the Streamlit script was still running after {timeout_ms / 1000:.0f}s")


def goto_page(page, base_url: str, url_path: str = "", timeout_ms: float = 60_000) -> None:
    """Open a page by name ("jobs", "curves"...; see URL_PATHS) or URL path, then wait for the script run."""
    url_path = URL_PATHS.get(url_path, url_path)
    page.goto(f"{base_url}/{url_path}".rstrip("/"), timeout=timeout_ms)
    wait_script_done(page, timeout_ms)


def shot(page, name: str) -> Path:
    """Save a full-page screenshot to ``test-artifacts/<name>.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def exceptions_on_page(page) -> list[str]:
    """Texts of any Streamlit exception boxes (a page must never show one)."""
    return page.locator('[data-testid="stException"]').all_inner_texts()


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (Playwright driving the system binary)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh browser tab (own context) at a desktop size; console errors collected on ``page.errors``."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.errors = []  # type: ignore[attr-defined]
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture
def start_dashboard() -> Iterator[Callable[..., str]]:
    """Factory: ``url = start_dashboard(store_root, **kw)``; every server started is stopped after the test."""
    stack = contextlib.ExitStack()

    def _start(store: str | Path | None, **kw) -> str:
        return stack.enter_context(streamlit_app(store, **kw))

    with stack:
        yield _start


@pytest.fixture(scope="module")
def start_dashboard_module() -> Iterator[Callable[..., str]]:
    """Module-scoped variant of :func:`start_dashboard` (one server shared by a module's tests)."""
    stack = contextlib.ExitStack()

    def _start(store: str | Path | None, **kw) -> str:
        return stack.enter_context(streamlit_app(store, **kw))

    with stack:
        yield _start
