"""Writing arrays into the store safely: temp name then rename, a full disk told apart from a bad
file, and the temp files of interrupted ingests found and removed.

Why its own module: these are the only file writes of an ingest, and another ingest into the
same store must be able to tell its own half-written files from stale ones by name alone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np


def _host_tag() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _tmp_name(stem: str, pid: int | None = None, host: str | None = None) -> str:
    """Temp name of an array being written: tagged with the writer's pid and host, so that another
    ingest into the same store can tell its files (still being written) from stale ones."""
    return f".{stem}.{pid if pid is not None else os.getpid()}@{host or _host_tag()}.tmp.npy"


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write under a temp name, then rename: readers never see a half-written array. A failed write
    (disk full) removes its temp file, so the failure leaves nothing behind.

    numpy reports a full disk as a short write, ``OSError("16384 requested and 10176 written")``
    with no errno, which ``is_transient`` cannot tell from a bad file: the series was recorded
    ``decode_failed`` for good ("re-export the series"). A short write is never the DICOM's fault,
    so it is raised again as ENOSPC when the disk has less room than the array, else EIO: both
    transient, so the next run retries the files."""
    tmp = path.with_name(_tmp_name(path.stem))
    try:
        np.save(tmp, np.ascontiguousarray(arr))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is None:
            raise _short_write_error(e, path, arr.nbytes) from e
        raise


def _short_write_error(e: OSError, path: Path, nbytes: int) -> OSError:
    """An errno-less short write as the OSError it stands for (see ``_atomic_save``)."""
    import errno

    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < nbytes + (1 << 16)  # the header and the filesystem's own blocks
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} (writing {path.name}: {e})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's process)
        return True
    return True


def stale_temp_files(folders, host: str | None = None, alive=None) -> list[Path]:
    """Temp arrays left by interrupted ingests: written on this host by a process that is gone.

    Why not every ``.*.tmp.npy``: a second ingest into the same store would delete the files the
    first is writing (its rename then fails). Files of another host, or of a live process, stay.
    Names without a host (older ctssl) count as this host's.
    """
    import re

    host = host or _host_tag()
    alive = alive or _pid_alive
    pat = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?\.tmp\.npy$")
    out = []
    for folder in folders:
        for f in sorted(Path(folder).glob(".*.tmp.npy")):
            m = pat.match(f.name)
            if m is None or (m["host"] or host) != host:
                continue
            if not alive(int(m["pid"])):
                out.append(f)
    return out
