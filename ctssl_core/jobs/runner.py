"""The job process: runs one job's command, heartbeats its progress, writes its final state.

``python -m ctssl_core.jobs.runner --store S --job J [--total N] -- ARGV...``

Why a small runner between the worker and the command: the runner is the
leader of the job's own process group (started with ``start_new_session``),
so it outlives the worker and the dashboard, and it is the one process that
knows how the command ended. It

- starts ARGV (no shell) in its group, output to ``jobs/<J>/job.log``;
- every ``--heartbeat`` seconds writes heartbeat + progress (the last line
  of the run's ``metrics.jsonl``: step/total and current metrics);
- on SIGTERM (cancel: sent to the whole group) gives the command ``--grace``
  seconds to save a checkpoint and exit, then SIGKILLs it;
- at the end merges the run's metrics, closes runs the command left open and
  sets the job succeeded / failed (with the exit code and last log lines) /
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
from pathlib import Path

from ctssl_core.db import StoreError
from ctssl_core.paths import REPO_ROOT
from ctssl_core.results.write import JOB_DIR_ENV, tail_metrics, utcnow


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ctssl_core.jobs.runner")
    p.add_argument("--store", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--total", type=int, default=None)
    p.add_argument("--grace", type=float, default=None, help="SIGTERM -> SIGKILL seconds (default: queue.DEFAULT_GRACE_S)")
    p.add_argument("--heartbeat", type=float, default=3.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command after --")
    return args


def main(argv: list[str] | None = None) -> int:
    from ctssl_core.jobs import procs, queue

    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.grace is None:
        args.grace = queue.DEFAULT_GRACE_S
    store, job_id = queue.absolute_store(args.store), args.job  # its command runs in the repository folder
    jd = queue.job_dir(store, job_id)
    jd.mkdir(parents=True, exist_ok=True)
    term = {"at": None}

    def _on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        if term["at"] is None:
            term["at"] = time.monotonic()

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)

    env = {**os.environ, JOB_DIR_ENV: str(jd), "CTSSL_STORE": str(store), "CTSSL_JOB_ID": job_id,
           "PYTHONUNBUFFERED": "1"}
    with open(jd / "job.log", "ab", buffering=0) as log:
        log.write(f"[ctssl job {job_id}] {utcnow():%Y-%m-%d %H:%M:%S} UTC start: "
                  f"{shlex.join(a if len(a) < 160 else a[:40] + '...' for a in args.command)}\n".encode())
        child = subprocess.Popen(args.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=REPO_ROOT)
        forwarded = killed = False
        last_hb = 0.0
        while True:
            rc = child.poll()
            now = time.monotonic()
            if rc is None and term["at"] is not None:
                if not forwarded:
                    child.send_signal(signal.SIGTERM)  # may be a duplicate of the group signal: harmless
                    forwarded = True
                elif now - term["at"] > args.grace and not killed:
                    log.write(f"[ctssl job {job_id}] no exit {args.grace:.0f}s after SIGTERM: SIGKILL\n".encode())
                    child.kill()
                    killed = True
            if rc is not None or now - last_hb >= args.heartbeat:
                last_hb = now
                if _beat(store, job_id, args.total) and term["at"] is None:
                    term["at"] = time.monotonic()  # cancel requested but no signal arrived (pgid not yet known)
            if rc is not None:
                break
            time.sleep(0.05)

        if term["at"] is not None:
            state, error = "cancelled", "cancelled by user"
        elif rc == 0:
            state, error = "succeeded", None
        else:
            tail = queue.log_tail(store, job_id, n_lines=3)
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            state, error = "failed", f"{how}: {tail[-600:]}"
        log.write(f"[ctssl job {job_id}] {utcnow():%Y-%m-%d %H:%M:%S} UTC {state}"
                  f"{'' if rc == 0 else f' (exit {rc})'}\n".encode())
    for _ in range(50):
        try:
            queue.close_runs(store, job_id, "succeeded" if state == "succeeded" else state, error)
            queue.finish(store, job_id, state, error)
            break
        except StoreError:
            time.sleep(0.2)
    me = os.getpid()
    for pid in procs.group_members(os.getpgid(0)):
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)  # stragglers (e.g. data-loader workers) die with the job
            except ProcessLookupError:
                pass
    return 0


def _beat(store: Path, job_id: str, total: int | None) -> bool:
    """One heartbeat with progress from the newest run's metrics tail. Returns cancel_requested."""
    from ctssl_core.jobs import queue

    run_ids = queue.job_run_ids(store, job_id)
    rec = tail_metrics(store, run_ids[-1]) if run_ids else None
    step = int(rec["step"]) if rec and rec.get("step") is not None else None
    current = {k: v for k, v in rec.items() if k not in ("step", "epoch")} if rec else None
    try:
        return queue.heartbeat(store, job_id, step=step, total=total, current=current,
                               run_id=run_ids[-1] if run_ids else None)
    except StoreError:
        return False  # the store is busy: the next beat retries


if __name__ == "__main__":
    sys.exit(main())
