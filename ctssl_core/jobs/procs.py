"""Process facts from /proc: is a job's process alive (not a zombie, not a reused pid)? who is in its group?

Why not ``os.kill(pid, 0)``: it succeeds for zombies and for an unrelated
process that got the same pid after a machine restart, and either would
leave a dead job shown as running forever.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, pgid) of ``pid`` or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = text.rsplit(")", 1)[-1].split()  # comm may contain spaces and ')'
    return rest[0], int(rest[2])


def is_alive(pid: int | None, marker: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, ``marker`` is in its command line."""
    if not pid:
        return False
    st = _stat(int(pid))
    if st is None or st[0] in ("Z", "X"):
        return False
    if marker:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return marker in cmd
    return True


def group_members(pgid: int | None, include_zombies: bool = False) -> list[int]:
    """Pids whose process group is ``pgid``."""
    if not pgid:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _stat(int(d.name))
        if st and st[1] == int(pgid) and (include_zombies or st[0] not in ("Z", "X")):
            out.append(int(d.name))
    return out


def signal_group(pgid: int | None, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group no longer exists."""
    if not pgid or int(pgid) <= 1 or int(pgid) == os.getpgid(0):
        return False  # never signal our own group (that would kill the worker/dashboard)
    try:
        os.killpg(int(pgid), sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_group(pgid: int | None) -> bool:
    return signal_group(pgid, signal.SIGKILL)
