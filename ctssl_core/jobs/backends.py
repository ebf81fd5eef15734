"""Where a job runs: the runner on this machine, its command on any engine of ``executors.EXECUTORS``.

The ``Backend`` protocol is what the worker needs and nothing more: start a
claimed job, poll it, cancel it. ``LocalBackend`` starts the job's runner
(``jobs/runner.py``) in its own session here: the runner must outlive the worker
and the dashboard, and the queue cancels and reconciles a job by the runner's
pid and process group from any process (``ctssl jobs cancel``, a restarted
worker). Where the runner starts the job's *command* is the same choice a
benchmark makes for its units: ``executor`` ``local`` (a child in the runner's
group), ``ray`` (one Ray task with the job's device, on a local instance or the
cluster at ``ray_address``) or ``slurm`` (one Slurm job through submitit), with
the same engine classes (``executors.py``). The runner watches an engine's
command as it watches a local one: heartbeat and progress from the run folder
and the job's log (so the store must be on a filesystem the cluster's nodes
see), cancel as an interrupt with the same grace, then a kill.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ctssl_core.config import ConfigError
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

    def start(self, store_root: Path, job_id: str, argv: list[str], total: int | None,
              device: str = "auto") -> Handle: ...

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

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, heartbeat_s: float = 3.0, hang_s: float = DEFAULT_HANG_S,
                 executor: str = "local", ray_address: str = "", slurm_partition: str = "",
                 slurm_timeout_min: int = 240):
        from ctssl_core.executors import check_executor

        check_executor(executor)   # an unknown engine, or Ray/submitit missing: said now, not per job
        if executor == "ray" and not ray_address:
            raise ConfigError("ctssl worker --executor ray needs --ray-address, the address of a running Ray cluster "
                              "('auto' finds one started on this machine with `ray start --head`). A Ray instance "
                              "started per job would live in the job's process group, and a cancel would tear it "
                              "down before the command could save its checkpoint")
        if executor == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("ctssl worker --executor slurm: no Slurm on this machine (sbatch not found); start the "
                              "worker on a Slurm login node, or use --executor local or ray")
        self.grace_s = grace_s
        self.heartbeat_s = heartbeat_s
        self.hang_s = hang_s  # the runner stops a live command that makes no progress for this long (0: never)
        self.executor, self.ray_address, self.slurm_partition = executor, ray_address, slurm_partition
        self.slurm_timeout_min = int(slurm_timeout_min)
        self.name = executor  # the jobs table's `backend`: where the command ran

    def start(self, store_root: Path, job_id: str, argv: list[str], total: int | None,
              device: str = "auto") -> Handle:
        store_root = absolute_store(store_root)  # the runner's working directory is the repository
        cmd = [sys.executable, "-m", "ctssl_core.jobs.runner", "--store", str(store_root), "--job", job_id,
               "--grace", str(self.grace_s), "--heartbeat", str(self.heartbeat_s), "--hang", str(self.hang_s)]
        if self.executor != "local":
            cmd += ["--executor", self.executor, "--ray-address", self.ray_address,
                    "--slurm-partition", self.slurm_partition, "--slurm-timeout-min", str(self.slurm_timeout_min),
                    "--device", device]
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
