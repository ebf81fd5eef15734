"""Short-lived DuckDB connections with retry, so no process ever shows a lock error.

DuckDB allows one read-write process *or* many read-only ones, never both. We
therefore never hold a connection open: every reader and writer opens the file,
does its work, and closes it, retrying with back-off while another process
holds it. Training processes never write DuckDB directly (they append JSONL;
see ``results/write.py``), so locks are held for milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import random
import time
from pathlib import Path
from typing import Iterator

# "different configuration": a read-only and a read-write connection to one file inside one
# process (e.g. two Streamlit sessions, or a worker thread); it clears when the other closes.
LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "lock on file", "database is locked",
                "same database file with a different configuration")


class StoreError(RuntimeError):
    """A store problem the user can fix; the message says what to do."""


class StoreMissing(StoreError):
    pass


class StoreBusy(StoreError):
    pass


class StoreFull(StoreError):
    """The disk holding the store is full (or over quota); the message says what was kept and how to go on."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_MARKERS = ("No space left on device", "Disk quota exceeded")


def is_lock_error(exc: BaseException) -> bool:
    return any(m.lower() in str(exc).lower() for m in LOCK_MARKERS)


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc``, or an exception it was raised from or while handling, is a full disk.

    Why the text and the chain, not only ``errno``: DuckDB reports ENOSPC only in its message
    (an IOException or a TransactionException on COMMIT), and ``torch.save`` into a Python file
    raises a RuntimeError whose ``__context__`` is the OSError. Without this the user sees a
    traceback instead of "free space and go on"."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(m in str(exc) for m in DISK_FULL_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def connect(db_path: str | Path, read_only: bool = False, timeout_s: float = 30.0) -> Iterator["duckdb.DuckDBPyConnection"]:  # noqa: F821
    """Open ``db_path`` briefly. Retries on lock conflicts for up to ``timeout_s``.

    Read-only on a missing file raises :class:`StoreMissing` with the command that
    creates it, instead of DuckDB's bare IOException.
    """
    import duckdb

    path = Path(db_path)
    if read_only and not path.exists():
        raise StoreMissing(
            f"no ctssl store at {path.parent} (missing {path.name}). "
            f"Create one with `ctssl synth` then `ctssl ingest`, or `ctssl benchmark --profile quick`."
        )
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as e:  # IOException / ConnectionException on lock
            if not is_lock_error(e) or time.monotonic() > deadline:
                if is_lock_error(e):
                    raise StoreBusy(
                        f"the store {path} stayed locked by another process for {timeout_s:.0f}s; "
                        f"is a long-running command holding it? Try again when it finishes."
                    ) from e
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.6, 0.25)
    try:
        yield con
    finally:
        con.close()
