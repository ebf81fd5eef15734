"""``ctssl dashboard``: open the results dashboard (Streamlit) on localhost."""

from __future__ import annotations

HELP = "open the dashboard (Streamlit, bound to 127.0.0.1) on a results store"


def add_arguments(p) -> None:
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="bind address; the default keeps the dashboard on this machine only")


def build_command(app: str, port: int, address: str = "127.0.0.1") -> list[str]:
    """The streamlit command line (separate so that tests can check it without starting a server)."""
    import sys

    return [sys.executable, "-m", "streamlit", "run", app, "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def run(args) -> int:
    import os
    import subprocess

    from ctssl_core.config import ConfigError
    from ctssl_core.paths import REPO_ROOT, default_store

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    app = REPO_ROOT / "app.py"
    if not app.exists():
        raise ConfigError(f"cannot find the dashboard app at {app}; run from a ctssl checkout (pip install -e .)")
    store = os.path.abspath(args.store) if args.store else str(default_store())
    env = {**os.environ, "CTSSL_STORE": store}
    print(f"ctssl dashboard: http://{args.address}:{args.port}  (store {store}; Ctrl+C to stop)")
    return subprocess.call(build_command(str(app), args.port, args.address), cwd=REPO_ROOT, env=env)
