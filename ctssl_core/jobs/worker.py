"""The worker: claims queued jobs, starts them through a backend, keeps the queue truthful.

One worker per store, enforced by an ``flock`` on ``<store>/jobs/worker.lock``
(held for the worker's lifetime; the kernel releases it if the worker dies,
so a crashed worker never blocks the next). Even with two workers a job
would be claimed once (the claim is a single conditional UPDATE); the lock
just keeps slot counting simple. Slots: ``max_gpu_jobs`` (default 1: one
job per device) and ``max_cpu_jobs`` (default 1) concurrent jobs, counting the
store's jobs still running on this machine that a previous worker started
(``queue.running_here``): jobs outlive the worker that started them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ctssl_core.db import StoreError, is_disk_full
from ctssl_core.jobs import queue
from ctssl_core.jobs.backends import Backend, Handle, LocalBackend
from ctssl_core.jobs.kinds import JobSpecError, build_argv, validate_spec
from ctssl_core.jobs.presence import clear_worker_info, lock_path, worker_running, write_worker_info
from ctssl_core.paths import REPO_ROOT


def _say(msg: str) -> None:
    """A line to the worker's log (its stderr), or nowhere when the disk holding the log is full:
    a log line must never stop the worker (``print`` raises OSError on a full disk)."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except OSError:
        pass


class WorkerBusy(StoreError):
    """Another worker already serves this store."""


def ensure_worker(store_root: str | Path, max_cpu_jobs: int = 1, idle_exit_s: float | None = 900.0) -> int | None:
    """Start a detached worker for this store unless one runs. Returns the new pid, or None if one ran.

    Detached (own session), so the dashboard that starts it can rerun or
    restart freely; a second worker started by a race exits at once (lock).
    """
    store_root = queue.absolute_store(store_root)  # the worker runs in the repository folder
    if worker_running(store_root):
        return None
    root = queue.jobs_root(store_root)
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ctssl_core.cli", "worker", "--store", str(store_root),
           "--max-cpu-jobs", str(int(max_cpu_jobs))]
    if idle_exit_s:
        cmd += ["--idle-exit", str(float(idle_exit_s))]
    with open(root / "worker.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, close_fds=True)
    return proc.pid


class Worker:
    def __init__(self, store_root: str | Path, max_cpu_jobs: int = 1, max_gpu_jobs: int = 1,
                 backend: Backend | None = None, poll_s: float = 0.5,
                 reconcile_every_s: float = 2.0, worker_id: str | None = None):
        if max_cpu_jobs < 0 or max_gpu_jobs < 0:
            raise StoreError("--max-cpu-jobs and --max-gpu-jobs must be >= 0")
        self.store_root = queue.absolute_store(store_root)
        self.slots = {"cpu": int(max_cpu_jobs), "gpu": int(max_gpu_jobs)}
        self.backend = backend or LocalBackend()
        self.poll_s = poll_s
        self.reconcile_every_s = reconcile_every_s
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.handles: dict[str, tuple[Handle, str]] = {}
        self.unrecorded: dict[str, tuple[Handle, float]] = {}  # started, process not yet in the store
        self.others: dict[str, str] = {}  # running here but not started by this worker: job_id -> resource
        self._last_reconcile = 0.0
        self._lock_file = None

    # ---- lock
    def acquire(self) -> None:
        path = lock_path(self.store_root)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        deadline = time.monotonic() + 2.0  # a worker_running() probe holds the lock for microseconds
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                f.close()
                raise WorkerBusy(f"a worker (pid {worker_running(self.store_root)}) already serves "
                                 f"{self.store_root}; it will run the queued jobs") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        write_worker_info(self.store_root, getattr(self.backend, "name", "local"))   # what a submit checks a
                                                                                    # cuda job against

    def release(self) -> None:
        if self._lock_file is not None:
            clear_worker_info(self.store_root)
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ---- one pass
    def free(self) -> dict[str, int]:
        """Slots left: the limits minus this worker's own jobs and minus the jobs of this store
        still running on this machine that it did not start (a predecessor killed with -9
        left them running; they hold their slots until they end)."""
        used = {"cpu": 0, "gpu": 0}
        for _, res in self.handles.values():
            used[res] += 1
        self.others = {j: r for j, r in queue.running_here(self.store_root).items() if j not in self.handles}
        for res in self.others.values():
            used[res] += 1
        return {k: self.slots[k] - used[k] for k in self.slots}

    def reap(self) -> None:
        for job_id, (h, _) in list(self.handles.items()):
            if self.backend.poll(h) is not None:
                del self.handles[job_id]

    def step(self) -> int:
        """Reap finished, reconcile, start what fits. Returns the number of jobs started."""
        self.reap()
        for job_id in list(self.unrecorded):  # before reconcile, which fails a running job with no process
            self._record_started(job_id)
        if time.monotonic() - self._last_reconcile >= self.reconcile_every_s:
            self._last_reconcile = time.monotonic()
            queue.reconcile(self.store_root)
        started = 0
        while True:
            free = tuple(r for r, n in self.free().items() if n > 0)
            job = queue.claim(self.store_root, self.worker_id, free) if free else None
            if job is None:
                return started
            self._start(job)
            started += 1

    def _start(self, job: dict) -> None:
        job_id, kind, spec = job["job_id"], job["kind"], job["spec"]
        try:  # re-validate: the store may have changed since submit, and the row is not trusted
            params = validate_spec(kind, spec.get("params") or {}, self.store_root)
            argv = build_argv(kind, params, self.store_root, spec.get("resume_run"))
        except JobSpecError as e:
            queue.finish(self.store_root, job_id, "failed", error=f"invalid spec: {e}")
            return
        total = getattr(params, "steps", None)
        try:
            h = self.backend.start(self.store_root, job_id, argv, total, device=getattr(params, "device", "auto"))
        except OSError as e:  # fork/exec failed (out of processes or memory): say so now, not after a timeout
            queue.finish(self.store_root, job_id, "failed", error=f"could not start the job process: {e}")
            return
        self.handles[job_id] = (h, spec.get("resource") if spec.get("resource") in self.slots else "cpu")
        self.unrecorded[job_id] = (h, float(getattr(self.backend, "grace_s", queue.DEFAULT_GRACE_S)))
        self._record_started(job_id)

    def _record_started(self, job_id: str) -> None:
        """Record a started job's process (``queue.set_started``); on a store error it stays in
        ``unrecorded`` and the next pass tries again, before it reconciles.

        Why: the job's process runs from the moment it is started; the store may refuse the record
        (a full disk: ``proc.json`` and DuckDB cannot be written). That error used to escape the
        worker's loop (an OSError is no store error), so the worker died, the job showed ``running``
        with no process, and nothing started or reconciled the store's jobs any more."""
        h, grace_s = self.unrecorded[job_id]
        if queue.set_started(self.store_root, job_id, h.pid, h.pgid, self.backend.name, grace_s=grace_s):
            self.backend.cancel(h)  # cancelled between claim and start
        del self.unrecorded[job_id]

    # ---- loop
    def run(self, once: bool = False, idle_exit_s: float | None = None, stop=None) -> None:
        """Serve the queue. ``once``: return when nothing is queued or running.
        ``idle_exit_s``: return after that long with nothing to do. ``stop``: a threading.Event."""
        import duckdb

        self.acquire()
        try:
            idle_since = time.monotonic()
            while stop is None or not stop.is_set():
                try:
                    started = self.step()
                except (StoreError, duckdb.Error, OSError) as e:
                    # a store busy for long, a transient conflict, a full disk: retry. Any other OSError
                    # is not the store's and stops the worker, as before.
                    if isinstance(e, OSError) and not is_disk_full(e):
                        raise
                    _say(f"worker: {type(e).__name__}: {e}")
                    started = 0
                    idle_since = time.monotonic()  # a pass that failed did not find the queue idle
                if started or self.handles or self.others:  # a predecessor's job still holds a slot
                    idle_since = time.monotonic()
                elif once:
                    return
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    return
                time.sleep(self.poll_s)
        finally:
            # leave running jobs alone: they are detached and the next worker adopts their rows
            self.release()
