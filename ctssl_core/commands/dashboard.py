"""``ctssl dashboard``: open the results dashboard (Streamlit) on localhost."""

from __future__ import annotations

HELP = "open the dashboard (Streamlit, bound to 127.0.0.1) on a results store"


def add_arguments(p) -> None:
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="bind address; the default keeps the dashboard on this machine only")
    p.add_argument("--stores-root", default=None, metavar="DIR",
                   help="also offer every store directly under DIR (folders holding ctssl.duckdb) in the sidebar")


STORES_ROOT_ENV = "CTSSL_STORES_ROOT"


def allowed_stores(environ=None) -> list[str]:
    """The stores a dashboard visitor may open: the configured one ($CTSSL_STORE, set by ``--store``),
    then every existing store directly under $CTSSL_STORES_ROOT (``--stores-root``).

    Why a list and not a text box: a visitor of the page must not read any store the dashboard's
    user can, create folders or a DuckDB file anywhere writable, or start jobs there (issue 13).
    Only folders that already hold ``ctssl.duckdb`` are offered from the root; nothing is created.
    """
    import os
    from pathlib import Path

    from ctssl_core.paths import data_root

    env = os.environ if environ is None else environ
    out = [os.path.abspath(env.get("CTSSL_STORE") or (data_root() / "store"))]
    root = env.get(STORES_ROOT_ENV)
    if root and Path(root).is_dir():
        base = Path(os.path.abspath(root))
        for p in sorted(base.iterdir()):
            # a symlink pointing out of the root is not "under" it
            if (p / "ctssl.duckdb").is_file() and p.resolve().parent == base.resolve():
                out.append(str(p))
    return list(dict.fromkeys(out))


def exposure_warning(address: str) -> str | None:
    """A warning when ``address`` lets other machines reach the dashboard (None for loopback)."""
    import ipaddress

    if address.strip().lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(address.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to a public interface
    return (f"warning: --address {address} is not loopback: anyone who can reach this machine on that address can "
            f"read the results in the store(s) offered and queue jobs that run as you. There is no login; keep the "
            f"default 127.0.0.1 and use an SSH tunnel (ssh -L 8501:127.0.0.1:8501 host) to view it remotely.")


def build_command(app: str, port: int, address: str = "127.0.0.1") -> list[str]:
    """The streamlit command line (separate so that tests can check it without starting a server)."""
    import sys

    return [sys.executable, "-m", "streamlit", "run", app, "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def run(args) -> int:
    import os
    import subprocess
    import sys

    from ctssl_core.config import ConfigError
    from ctssl_core.paths import REPO_ROOT, default_store

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    app = REPO_ROOT / "app.py"
    if not app.exists():
        raise ConfigError(f"cannot find the dashboard app at {app}; run from a ctssl checkout (pip install -e .)")
    store = os.path.abspath(args.store) if args.store else str(default_store())
    env = {**os.environ, "CTSSL_STORE": store}
    if args.stores_root:
        root = os.path.abspath(args.stores_root)
        if not os.path.isdir(root):
            raise ConfigError(f"--stores-root {args.stores_root} is not a folder; give the folder that holds your "
                              f"stores (each a folder with ctssl.duckdb)")
        env[STORES_ROOT_ENV] = root
    warn = exposure_warning(args.address)
    if warn:
        print(warn, file=sys.stderr)
    print(f"ctssl dashboard: http://{args.address}:{args.port}  (store {store}; Ctrl+C to stop)")
    return subprocess.call(build_command(str(app), args.port, args.address), cwd=REPO_ROOT, env=env)
