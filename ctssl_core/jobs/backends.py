"""Where a job runs. ``LocalBackend`` starts it on this machine; a cluster would be a second backend.

The ``Backend`` protocol is what the worker needs and nothing more: start a
claimed job, poll it, cancel it. A Ray Jobs backend would map ``start`` to
``JobSubmissionClient.submit_job(entrypoint=shlex.join(argv))``, ``poll`` to
``get_job_status`` and ``cancel`` to ``stop_job``; a Slurm one to
``sbatch``/``squeue``/``scancel``. The job's state machine, queue and page
do not change.

Not built yet, because it is not a small step: the queue reconciles and cancels
jobs by pid/process group from any process (``ctssl jobs cancel``, a restarted
worker), and a job must outlive the worker that started it. A plain Ray task is
owned by the process that submitted it and dies with it; Ray Jobs needs the job
server of ``ray[default]`` (the dashboard). Within one job, a benchmark already
spreads its units over Ray: ``ctssl_core/executors.py`` (``benchmark.executor``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ctssl_core.jobs import procs
from ctssl_core.jobs.queue import DEFAULT_GRACE_S, DEFAULT_HANG_S, absolute_store
from ctssl_core.paths import REPO_ROOT


@dataclass
class Handle:
    """What a backend returns for a started job."""

    job_id: str
    pid: int | None
    pgid: int | None
    native: Any = None  # backend-specific (a Popen, a Ray submission id, a Slurm job id)


class Backend(Protocol):
    name: str

    def start(self, store_root: Path, job_id: str, argv: list[str], total: int | None) -> Handle: ...

    def poll(self, handle: Handle) -> int | None:
        """None while running, else an exit status."""

    def cancel(self, handle: Handle) -> None: ...


class LocalBackend:
    """Each job in its own session/process group, led by ``ctssl_core.jobs.runner``.

    ``start_new_session=True`` is what keeps a job alive through a Streamlit
    rerun, a browser refresh, a dashboard restart or a worker crash: none of
    their signals reach another session.
    """

    name = "local"

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, heartbeat_s: float = 3.0, hang_s: float = DEFAULT_HANG_S):
        self.grace_s = grace_s
        self.heartbeat_s = heartbeat_s
        self.hang_s = hang_s  # the runner stops a live command that makes no progress for this long (0: never)

    def start(self, store_root: Path, job_id: str, argv: list[str], total: int | None) -> Handle:
        store_root = absolute_store(store_root)  # the runner's working directory is the repository
        cmd = [sys.executable, "-m", "ctssl_core.jobs.runner", "--store", str(store_root), "--job", job_id,
               "--grace", str(self.grace_s), "--heartbeat", str(self.heartbeat_s), "--hang", str(self.hang_s)]
        if total:
            cmd += ["--total", str(int(total))]
        proc = subprocess.Popen(cmd + ["--", *argv], cwd=REPO_ROOT, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True)
        return Handle(job_id, proc.pid, proc.pid, proc)

    def poll(self, handle: Handle) -> int | None:
        if isinstance(handle.native, subprocess.Popen):
            return handle.native.poll()  # also reaps it: no zombie
        return None if procs.is_alive(handle.pid) else 0

    def cancel(self, handle: Handle) -> None:
        procs.signal_group(handle.pgid, signal.SIGTERM)


BACKENDS: dict[str, type] = {"local": LocalBackend}
