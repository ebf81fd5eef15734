"""`ctssl worker`: serve the store's job queue (one worker per store)."""

from __future__ import annotations

HELP = "Run queued jobs, each in its own process group (one per GPU, N concurrent CPU jobs)."


def add_arguments(p) -> None:
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--once", action="store_true", help="exit when nothing is queued or running")
    p.add_argument("--max-cpu-jobs", type=int, default=1, help="concurrent CPU jobs (default 1)")
    p.add_argument("--max-gpu-jobs", type=int, default=1, help="concurrent GPU jobs (default 1: one per device)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--hang", "--stale", dest="hang", type=float, default=None,
                   help="seconds a live job may make no progress (no new metrics line, no output) before it "
                        "counts as hung and is stopped (default 1800; 0: never). A job whose process died is "
                        "noticed at once, whatever this is")
    p.add_argument("--executor", default="local",
                   help="where each job's command runs: local (default; here, in the job's process group), ray "
                        "(a Ray task with the job's device) or slurm (a Slurm job). The job's runner stays on this "
                        "machine; the store must be on a filesystem the cluster's nodes see")
    p.add_argument("--ray-address", default="", help="--executor ray: the address of a running Ray cluster "
                                                      "(required; 'auto' finds one started here by `ray start --head`)")
    p.add_argument("--slurm-partition", default="", help="--executor slurm: the partition ('' = the default)")
    p.add_argument("--slurm-timeout-min", type=int, default=240,
                   help="--executor slurm: each job's time limit in minutes (default 240); Slurm ends a job "
                        "that runs longer (resume it from its checkpoint)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds from SIGTERM to SIGKILL on cancel (default 10); recorded with each job, "
                        "so `ctssl jobs cancel` waits the same time")


def run(args) -> int:
    from ctssl_core.jobs import LocalBackend, Worker, absolute_store
    from ctssl_core.jobs.queue import DEFAULT_GRACE_S, DEFAULT_HANG_S
    from ctssl_core.jobs.kinds import job_kinds
    from ctssl_core.paths import default_store

    job_kinds()  # import CTSSL_JOB_PLUGINS now: a bad plugin name fails here, loudly
    store = absolute_store(args.store or default_store())  # once, against the caller's folder
    w = Worker(store, max_cpu_jobs=args.max_cpu_jobs, max_gpu_jobs=args.max_gpu_jobs,
               backend=LocalBackend(grace_s=DEFAULT_GRACE_S if args.grace is None else args.grace,
                                    hang_s=DEFAULT_HANG_S if args.hang is None else args.hang,
                                    executor=args.executor, ray_address=args.ray_address,
                                    slurm_partition=args.slurm_partition,
                                    slurm_timeout_min=args.slurm_timeout_min))
    print(f"worker {w.worker_id} serving {store} (cpu slots {args.max_cpu_jobs}, gpu slots {args.max_gpu_jobs}, "
          f"commands on {args.executor})", flush=True)
    w.run(once=args.once, idle_exit_s=args.idle_exit)
    print("worker: exiting (running jobs continue on their own)", flush=True)
    return 0
