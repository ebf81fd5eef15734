"""The job process: runs one job's command, heartbeats its progress, writes its final state.

``python -m ctssl_core.jobs.runner --store S --job J [--total N] -- ARGV...``

Why a small runner between the worker and the command: the runner is the
leader of the job's own process group (started with ``start_new_session``),
so it outlives the worker and the dashboard, and it is the one process that
knows how the command ended. It

- starts ARGV (no shell) in its group, output to ``jobs/<J>/job.log``;
- every ``--heartbeat`` seconds writes heartbeat + progress (the last line
  of the run's ``metrics.jsonl``: step/total and current metrics); a store
  error (busy, disk full) is logged and retried with backoff, never fatal;
- on SIGTERM (cancel: sent to the whole group) gives the command ``--grace``
  seconds to save a checkpoint and exit, then SIGKILLs it;
- stops the command as hung when it is alive but shows no progress (no new
  metrics line, no output) for ``--hang`` seconds of its monotonic clock;
- at the end merges the run's metrics, closes runs the command left open and
  sets the job succeeded / failed (with the exit code and last log lines; on a disk that was full,
  what to do about it, waiting as long as the full disk refuses the record) /
  cancelled, then kills any stragglers left in its group.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ctssl_core.config import ConfigError
from ctssl_core.db import is_disk_full
from ctssl_core.jobs.queue import DEFAULT_GRACE_S, DEFAULT_HANG_S
from ctssl_core.paths import REPO_ROOT
from ctssl_core.results.runfolder import tail_metrics
from ctssl_core.results.runfolder import JOB_DIR_ENV, utcnow


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ctssl_core.jobs.runner")
    p.add_argument("--store", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--total", type=int, default=None)
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds from SIGTERM to SIGKILL")
    p.add_argument("--heartbeat", type=float, default=3.0)
    p.add_argument("--hang", type=float, default=DEFAULT_HANG_S,
                   help="stop the command as hung after this many seconds alive without progress (0: never)")
    p.add_argument("--executor", default="local",
                   help="where the command runs (executors.EXECUTORS): local = in this runner's process group; "
                        "ray or slurm = one task or job of that engine, with the job's device")
    p.add_argument("--ray-address", default="", help="--executor ray: '' starts a local Ray instance")
    p.add_argument("--slurm-partition", default="", help="--executor slurm: '' = the cluster's default")
    p.add_argument("--slurm-timeout-min", type=int, default=240, help="--executor slurm: the job's time limit")
    p.add_argument("--device", default="auto", help="the job's device (cpu, cuda, auto): what an engine reserves")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command after --")
    return args


@dataclass
class Supervisor:
    """Watches one job's command: forwards a stop, escalates to SIGKILL, heartbeats.

    Why a class with an injected ``clock`` (monotonic seconds): every decision is a
    comparison of two readings of this one process's monotonic clock, never of
    wall-clock times written by different processes, and tests drive it step by
    step with a fake child and a fake clock.

    Hang: ``progress()`` returns a token that changes whenever the training
    process shows progress (``progress_token``); if the command is alive and the
    token has not changed for ``hang_s`` seconds (0/None: never), the job is
    stopped as hung (SIGTERM, SIGKILL after the grace) and recorded failed. A
    command that exits is never "hung", and a stale heartbeat in the store plays
    no part: liveness is the runner's own pid, checked by ``queue.reconcile``.

    Store errors never end it: a heartbeat that raises anything (a lock held by
    another writer, disk full, an I/O error) is logged, backed off (doubling from
    ``heartbeat_s`` up to ``max_backoff_s``) and retried, while the command keeps
    running and being watched; the runner outliving its child is what keeps the
    child from being orphaned.
    """

    child: Any                                  # Popen-like: poll(), send_signal(), kill()
    beat: Callable[[], bool]                    # one heartbeat; returns cancel_requested
    log: Callable[[str], None]
    progress: Callable[[], Any] = lambda: None  # token that changes when the command makes progress
    grace_s: float = DEFAULT_GRACE_S
    heartbeat_s: float = 3.0
    hang_s: float | None = DEFAULT_HANG_S
    max_backoff_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    term_at: float | None = None
    why: str | None = None                      # 'cancel' | 'hung'
    last_token: Any = None
    last_progress: float | None = None          # clock() when the token last changed
    forwarded: bool = False
    killed: bool = False
    beat_failures: int = 0
    disk_full: bool = False                     # a heartbeat failed on a full disk
    next_beat: float = field(default=float("-inf"))

    def request_stop(self, why: str = "cancel") -> None:
        """SIGTERM arrived or a cancel was read from the store: stop the command (once)."""
        if self.term_at is None:
            self.term_at, self.why = self.clock(), why

    def step(self) -> int | None:
        """One look at the command; its exit status once it has ended, else None."""
        rc = self.child.poll()
        now = self.clock()
        if rc is None and self.term_at is None:
            self._watch_progress(now)
        if rc is None and self.term_at is not None:
            if not self.forwarded:
                self.child.send_signal(signal.SIGTERM)  # may duplicate the group signal: harmless
                self.forwarded = True
            elif now - self.term_at > self.grace_s and not self.killed:
                self.log(f"no exit {self.grace_s:.0f}s after SIGTERM: SIGKILL")
                self.child.kill()
                self.killed = True
        if rc is not None or now >= self.next_beat:
            self._beat(now)
        return rc

    def _watch_progress(self, now: float) -> None:
        """Reset the hang timer when the progress token changes; stop the command when it has not
        changed for ``hang_s`` while the command is alive."""
        if not self.hang_s or self.hang_s <= 0:
            return
        if not getattr(self.child, "started", True):   # queued in an engine for its resources: not hung
            self.last_token = self.last_progress = None
            return
        try:
            token = self.progress()
        except OSError:
            return  # unreadable now (e.g. disk trouble): neither progress nor proof of a hang
        if self.last_progress is None or token != self.last_token:
            self.last_token, self.last_progress = token, now
            return
        if now - self.last_progress > self.hang_s:
            self.log(f"no progress for {now - self.last_progress:.0f}s (no new metrics line or output) while "
                     f"the command is alive: hung; stopping it")
            self.request_stop("hung")

    def _beat(self, now: float) -> None:
        try:
            cancel = self.beat()
        except Exception as e:  # noqa: BLE001 - any store failure; the command must keep its watcher
            self.beat_failures += 1
            self.disk_full = self.disk_full or is_disk_full(e)
            delay = min(self.max_backoff_s, self.heartbeat_s * 2 ** self.beat_failures)
            self.next_beat = now + delay
            if self.beat_failures == 1 or self.beat_failures % 10 == 0:
                self.log(f"heartbeat failed ({self.beat_failures}x): {type(e).__name__}: {str(e)[:200]}; "
                         f"the job keeps running, retrying in {delay:.0f}s")
            return
        if self.beat_failures:
            self.log(f"heartbeat works again after {self.beat_failures} failure(s)")
            self.beat_failures = 0
        self.next_beat = now + self.heartbeat_s
        if cancel:
            self.request_stop("cancel")  # cancel requested but no signal arrived (pgid not yet known)

    def outcome(self, rc: int, tail: Callable[[], str]) -> tuple[str, str | None]:
        """(final state, error) of the job from how its command ended."""
        if self.why == "hung":
            return "failed", (f"hung: its process was alive but made no progress for more than {self.hang_s:g}s "
                              f"(no new metrics line, no output); it was stopped. Resume it, or raise the worker's "
                              f"--hang if this step is legitimately silent that long")
        if self.term_at is not None:
            return "cancelled", "cancelled by user"
        if rc == 0:
            return "succeeded", None
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        return "failed", f"{how}: {tail()[-600:]}"


NEARLY_FULL_BYTES = 1 << 20  # free space under which a failed job's disk counts as full (DuckDB writes 256 KiB blocks)


def disk_full_error(error: str | None, store: Path, job_id: str) -> str:
    """``error`` with what to do about the full disk under the store (once)."""
    note = (f"The disk holding the store {store} was full while this job ran, so its output, checkpoint or "
            f"records may not have been written: free space on that disk, then `ctssl jobs resume {job_id}`.")
    if error and note in error:
        return error
    return f"{error}\n{note}" if error else note


def disk_nearly_full(path: Path, below: int = NEARLY_FULL_BYTES) -> bool:
    """True when the filesystem holding ``path`` has less than ``below`` bytes free for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < below


def record_end(store: Path, job_id: str, state: str, error: str | None, log: Callable[[str], None],
               tries: int = 40, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Close the job's runs and write its final state, retrying any store error with backoff
    (about 5 minutes in all). False if the store never took it: reconcile then finds the
    runner gone and marks the job from its row.

    A full disk is waited out, however long, every 10 s: nothing can record anything on it,
    and giving up would leave the job to reconcile, which cannot know why its process is gone
    ("killed, out of memory"). A failed job's error then says the disk was full and what to do.
    The runner stays alive meanwhile, so the job shows ``running`` until space is freed."""
    from ctssl_core.jobs import queue

    i = full = 0
    while i < tries:
        try:
            queue.close_runs(store, job_id, state, error)
            queue.finish(store, job_id, state, error)
            return True
        except Exception as e:  # noqa: BLE001 - disk full, I/O error, a lock: wait and retry
            if is_disk_full(e):
                if state == "failed":
                    error = disk_full_error(error, store, job_id)
                if full % 30 == 0:
                    log(f"could not record the end, the disk is full ({type(e).__name__}: {str(e)[:200]}); "
                        f"waiting for free space")
                full += 1
                sleep(10.0)
                continue
            if i in (0, tries - 1):
                log(f"could not record the end ({type(e).__name__}: {str(e)[:200]}); retrying")
            sleep(min(10.0, 0.2 * 2 ** i))
            i += 1
    return False


def main(argv: list[str] | None = None) -> int:
    from ctssl_core.jobs import queue

    args = _parse(sys.argv[1:] if argv is None else argv)
    store, job_id = queue.absolute_store(args.store), args.job  # its command runs in the repository folder
    jd = queue.job_dir(store, job_id)
    jd.mkdir(parents=True, exist_ok=True)
    early = {"stop": False}
    sup: Supervisor | None = None

    def _on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        if sup is None:
            early["stop"] = True
        else:
            sup.request_stop("cancel")

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)

    env = {**os.environ, JOB_DIR_ENV: str(jd), "CTSSL_STORE": str(store), "CTSSL_JOB_ID": job_id,
           "PYTHONUNBUFFERED": "1"}
    own = {"bytes": 0, "disk_full": False}  # what the runner itself wrote to job.log: not the command's progress
    with open(jd / "job.log", "ab", buffering=0) as log_f:
        def log(msg: str) -> None:
            data = f"[ctssl job {job_id}] {msg}\n".encode()
            try:
                own["bytes"] += log_f.write(data) or 0
            except OSError as e:  # a full disk must not stop the watcher
                own["disk_full"] = own["disk_full"] or is_disk_full(e)

        log(f"{utcnow():%Y-%m-%d %H:%M:%S} UTC start: "
            f"{shlex.join(a if len(a) < 160 else a[:40] + '...' for a in args.command)}")
        engine = None
        try:
            if args.executor == "local":
                child: Any = subprocess.Popen(args.command, stdout=log_f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT)
            else:
                try:
                    engine = _open_engine(args, store)
                except SystemExit:   # Ray's client ends a process on SIGTERM while it connects: a cancel
                    log("stopped while connecting to the engine")
                    record_end(store, job_id, "cancelled", "cancelled by user", log)
                    _kill_group()
                    return 0
                finally:
                    signal.signal(signal.SIGTERM, _on_term)   # the runner's again, whatever the client set
                    signal.signal(signal.SIGINT, _on_term)
                child = _command_on_engine(engine, args, env, jd)
                gpu = {"cuda": " and a GPU", "auto": " (and a GPU where the cluster has one)"}.get(args.device, "")
                log(f"the command is handed to the {args.executor} engine; it waits there for 1 CPU{gpu}")
        except Exception as e:  # noqa: BLE001 - no engine (Ray unreachable, no Slurm): the job fails, saying why
            log(f"could not start the command: {type(e).__name__}: {e}")
            record_end(store, job_id, "failed", f"could not start the command on {args.executor!r}: {e}", log)
            _close(engine)
            _kill_group()
            return 0
        sup = Supervisor(child, lambda: _beat(store, job_id, args.total), log,
                         progress=lambda: progress_token(store, job_id, own["bytes"]),
                         grace_s=args.grace, heartbeat_s=args.heartbeat, hang_s=args.hang)
        if early["stop"]:
            sup.request_stop("cancel")
        handed = time.monotonic()
        announced = engine is None
        try:
            while (rc := sup.step()) is None:
                if not announced and child.started:
                    log(f"the command started on the {args.executor} engine after "
                        f"{time.monotonic() - handed:.1f}s in its queue")
                    announced = True
                time.sleep(0.05)
        except BaseException:
            if engine is not None:
                child.kill()
                _close(engine)
            _kill_group()  # never leave the command running without its watcher
            raise
        if getattr(child, "error", None):
            log(f"the {args.executor} engine: {child.error}")
        _close(engine)
        state, error = sup.outcome(rc, lambda: queue.log_tail(store, job_id, n_lines=3))
        log(f"{utcnow():%Y-%m-%d %H:%M:%S} UTC {state}{'' if rc == 0 else f' (exit {rc})'}")
        # On a disk that filled up, the command's own message (StoreFull: free space, resume) may
        # never have reached its log, leaving a failed job with a traceback's last lines or nothing
        if state == "failed" and (sup.disk_full or own["disk_full"] or disk_nearly_full(store)):
            error = disk_full_error(error, store, job_id)
        record_end(store, job_id, state, error, log)
    _kill_group()
    return 0


def _open_engine(args: argparse.Namespace, store: Path) -> Any:
    """The benchmark's engine (``executors.py``) named by ``--executor``, for this job's command; SIGTERM stays
    the runner's (no term guard)."""
    from ctssl_core.executors import EXECUTORS, EngineSettings, check_executor

    check_executor(args.executor)
    settings = EngineSettings(args.executor, ray_address=args.ray_address, slurm_partition=args.slurm_partition,
                              slurm_timeout_min=args.slurm_timeout_min)
    return EXECUTORS[args.executor].from_config(settings, store, term_guard=False)


def _command_on_engine(engine: Any, args: argparse.Namespace, env: dict[str, str], jd: Path) -> Any:
    """The command as one engine call, watched as a ``Popen`` (``EngineCommand``). Only the job's own variables
    travel (a cluster node has its own PATH and Python)."""
    from ctssl_core.executors import EngineCommand, Resources

    if args.device.startswith("cuda") and getattr(engine, "gpus", None) == 0:   # Ray would queue it forever
        raise ConfigError(f"the job asks for a GPU (device {args.device!r}) and the {args.executor} cluster has "
                          f"none; submit it again with device 'cpu' or 'auto', or add GPU nodes to the cluster")
    job_env = {k: v for k, v in env.items() if k.startswith("CTSSL_") or k == "PYTHONUNBUFFERED"}
    return EngineCommand(engine, args.command, job_env, jd / "job.log", args.grace, Resources(1, args.device),
                         started_path=jd / ENGINE_STARTED)


ENGINE_STARTED = "command.started"   # written by the engine's side when the command starts (after any queueing)


def _close(engine: Any) -> None:
    if engine is not None:
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - the job's end is recorded either way
            pass


def progress_token(store: Path, job_id: str, own_log_bytes: int = 0) -> tuple:
    """What the training process has produced so far: its runs (``runs.txt``), the size of each
    run's ``metrics.jsonl`` (one line per logged step, line-buffered) and the bytes it wrote to
    ``job.log`` (not counting ``own_log_bytes``, the runner's own lines). Any change is progress.

    Sizes only, no file times: times come from the wall clock, which may step."""
    from ctssl_core.jobs import queue
    from ctssl_core.paths import store_paths
    from ctssl_core.results.runfolder import METRICS_FILE

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return -1

    jd = queue.job_dir(store, job_id)
    runs = tuple((rid, size(store_paths(store).run_dir(rid) / METRICS_FILE))
                 for rid in queue.job_run_ids(store, job_id))
    return runs, size(jd / "job.log") - own_log_bytes


def _kill_group() -> None:
    """SIGKILL every other process in the runner's group (stragglers such as data-loader workers)."""
    from ctssl_core.jobs import procs

    me = os.getpid()
    for pid in procs.group_members(os.getpgid(0)):
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _beat(store: Path, job_id: str, total: int | None) -> bool:
    """One heartbeat with progress from the newest run's metrics tail, then the store's merge of the lines
    the job's training process wrote to its run folder (it never writes DuckDB itself: results/runfolder.py),
    so a long run's metrics reach the store while it trains. Returns cancel_requested.

    Raises on a store error (the Supervisor logs, backs off and retries); a merge that finds the store busy
    waits for the next beat (the lines stay in the file, merged exactly once later)."""
    from ctssl_core.db import StoreBusy
    from ctssl_core.jobs import queue
    from ctssl_core.results.write import merge_pending

    run_ids = queue.job_run_ids(store, job_id)
    rec = tail_metrics(store, run_ids[-1]) if run_ids else None
    step = int(rec["step"]) if rec and rec.get("step") is not None else None
    current = {k: v for k, v in rec.items() if k not in ("step", "epoch")} if rec else None
    cancel = queue.heartbeat(store, job_id, step=step, total=total, current=current,
                             run_id=run_ids[-1] if run_ids else None)
    for rid in run_ids[-2:]:      # the newest, and the one before (its end may not be merged yet)
        try:
            merge_pending(store, rid, timeout_s=2.0)
        except StoreBusy:
            break
    return cancel


if __name__ == "__main__":
    sys.exit(main())
