"""Which worker serves a store, and where it runs job commands: files under ``<store>/jobs/``, no SQL.

Why a module of its own: both the job kinds (a ``cuda`` job is possible on a machine without a GPU when the
serving worker runs commands on a cluster) and the worker need it, and the worker imports the kinds.

- ``worker.lock``: held (``flock``) by the serving worker for its lifetime, holding its pid; the kernel
  releases it when the worker dies, so the lock, not a pid, says whether a worker serves the store.
- ``worker.json``: the serving worker's pid, host and executor (``ctssl worker --executor``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

WORKER_INFO = "worker.json"


def jobs_root(store_root: str | Path) -> Path:
    return Path(store_root) / "jobs"


def lock_path(store_root: str | Path) -> Path:
    return jobs_root(store_root) / "worker.lock"


def worker_running(store_root: str | Path) -> int | None:
    """Pid of the worker serving this store, or None if no worker holds the lock."""
    path = lock_path(store_root)
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _info_path(store_root: str | Path) -> Path:
    return jobs_root(store_root) / WORKER_INFO


def write_worker_info(store_root: str | Path, executor: str) -> None:
    """Called by the worker once it holds the lock (best effort: a full disk must not stop it)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "executor": executor}
    try:
        _info_path(store_root).write_text(json.dumps(info))
    except OSError:
        pass


def clear_worker_info(store_root: str | Path) -> None:
    """Called by the worker before it lets go of the lock."""
    try:
        _info_path(store_root).unlink()
    except OSError:
        pass


def worker_executor(store_root: str | Path | None) -> str:
    """Where the worker serving this store runs job commands; 'local' when none serves it, or when the file is
    not the serving worker's (a stale file whose pid another process now has, a worker on another host)."""
    if store_root is None:
        return "local"
    try:
        info = json.loads(_info_path(store_root).read_text())
        pid, host = int(info["pid"]), info.get("host")
    except (OSError, ValueError, KeyError, TypeError):
        return "local"
    if host != socket.gethostname() or worker_running(store_root) != pid:
        return "local"
    return str(info.get("executor") or "local")
