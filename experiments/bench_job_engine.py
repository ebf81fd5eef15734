#!/usr/bin/env python
"""What does running a job's command on Ray cost, against running it in the runner's process group?

The same short job (the ``tick`` test kind: a real process that writes its run folder, 3 steps, no sleep)
is submitted K times, one after the other, to a worker whose backend runs commands

  (a) local  in the job runner's own process group (the default), and
  (b) ray    as one Ray task on a Ray instance this script starts once (``ctssl worker --executor ray``),

and the wall from submit to the job's final state is measured side by side, alternating a/b per round so
the machine's load falls on both. Each ray job's runner connects to the instance afresh (a job runner is
its own process), so its overhead is the connection plus the task's start; a real job trains for minutes.

    python experiments/bench_job_engine.py            # K=5 rounds, a 2-CPU Ray instance
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def one_job(store: Path, jobs) -> float:
    t = time.perf_counter()
    job_id = jobs.submit(store, "tick", {"steps": 3, "interval_s": 0.0})
    while (job := jobs.get_job(store, job_id))["state"] not in jobs.FINAL:
        time.sleep(0.02)
    wall = time.perf_counter() - t
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['state']}: {job['error']}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    import ctssl_core.jobs.testing  # noqa: F401 - the tick kind
    from ctssl_core import jobs

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init (once, by this script): {time.perf_counter() - t:.1f} s")
    address = ray.get_runtime_context().gcs_address
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        workers = {}
        for name in walls:
            store = Path(tmp) / name
            w = jobs.Worker(store, poll_s=0.02, reconcile_every_s=0.5,
                            backend=jobs.LocalBackend(executor=name, ray_address=address, heartbeat_s=0.2))
            stop = threading.Event()
            th = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
            th.start()
            workers[name] = (store, stop, th)
        try:
            for name in walls:           # a first job each: imports and page cache warmed, not counted
                one_job(workers[name][0], jobs)
            for _ in range(args.rounds):
                for name in walls:
                    walls[name].append(one_job(workers[name][0], jobs))
        finally:
            for _, stop, th in workers.values():
                stop.set()
                th.join(timeout=10)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in walls.items()}
    for k, v in walls.items():
        print(f"{k:5s} submit -> succeeded, {len(v)} jobs: median {med[k]:.2f} s  "
              f"(min {min(v):.2f}, max {max(v):.2f})")
    print(f"ray - local per job: {med['ray'] - med['local']:+.2f} s; ray/local: {med['ray'] / med['local']:.2f}x")


if __name__ == "__main__":
    main()
