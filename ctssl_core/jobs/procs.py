"""Process facts from /proc: is a job's process alive (not a zombie, not a reused pid)? who is in its group?

Why not ``os.kill(pid, 0)``: it succeeds for zombies and for an unrelated
process that got the same pid after a machine restart, and either would
leave a dead job shown as running forever.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, pgid) of ``pid`` or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = text.rsplit(")", 1)[-1].split()  # comm may contain spaces and ')'
    return rest[0], int(rest[2])


def this_host() -> str:
    """This machine's name, as the worker writes it into ``claimed_by`` (``host:pid``)."""
    return socket.gethostname()


def boot_id() -> str | None:
    """Kernel boot id: start times (clock ticks since boot) only compare within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def start_ticks(pid: int | None) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone.

    Why: with the boot id it identifies one process for good; a pid alone is
    reused by the next program that happens to get it.
    """
    if not pid:
        return None
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
        return int(text.rsplit(")", 1)[-1].split()[19])  # fields after comm start at field 3
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int | None) -> list[str] | None:
    """Argument list of ``pid`` (None if it is gone or unreadable)."""
    if not pid:
        return None
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def environ_value(pid: int, key: str) -> str | None:
    """Value of environment variable ``key`` in ``pid`` (None if unset, gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{int(pid)}/environ").read_bytes()
    except OSError:
        return None
    prefix = key.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def is_job_runner(pid: int | None, job_id: str, marker: str, started: int | None = None) -> bool:
    """True only if ``pid`` is alive, runs ``marker`` (the runner module) for ``job_id`` and, when
    ``started`` is given, started at that tick. Anything else is someone else's process."""
    if not is_alive(pid):
        return False
    args = cmdline(pid) or []
    if marker not in args:
        return False
    job_ok = any((a == "--job" and i + 1 < len(args) and args[i + 1] == job_id) or a == f"--job={job_id}"
                 for i, a in enumerate(args))
    if not job_ok:
        return False
    return started is None or start_ticks(pid) == started


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
