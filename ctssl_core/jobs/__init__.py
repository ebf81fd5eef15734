"""Job system: a persistent queue in the store, a detached worker, cancel, reconcile, resume.

    from ctssl_core import jobs
    job_id = jobs.submit(store, "finetune", {"task": "pe", "init": "masked_region", "fraction": 0.05})
    jobs.ensure_worker(store)            # or run `ctssl worker`
    jobs.list_jobs(store)                # DataFrame, newest first
    jobs.cancel(store, job_id); jobs.resume(store, job_id)

Modules: ``kinds`` (what a job may be, validated specs → argv), ``queue`` (the
``jobs`` table), ``runner`` (the job process), ``backends`` (local; a cluster
backend would sit beside it), ``worker`` (claims and starts), ``procs``.
"""

from ctssl_core.jobs.backends import BACKENDS, Backend, Handle, LocalBackend
from ctssl_core.jobs.kinds import (
    JOB_KINDS, JobKind, JobSpecError, build_argv, field_choices, job_kinds, validate_spec,
)
from ctssl_core.jobs.queue import (
    FINAL, STATES, JobStateError, absolute_store, cancel, get_job, job_dir, job_results, job_run_ids,
    list_jobs, log_tail, reconcile, resume, submit,
)
from ctssl_core.jobs.worker import Worker, WorkerBusy, ensure_worker, worker_running
from ctssl_core.results.store_api import checkpoints

__all__ = [
    "BACKENDS", "Backend", "Handle", "LocalBackend", "JOB_KINDS", "JobKind", "JobSpecError", "build_argv",
    "field_choices", "job_kinds", "validate_spec", "FINAL", "STATES", "JobStateError", "absolute_store", "cancel",
    "checkpoints", "get_job", "job_dir", "job_results", "job_run_ids", "list_jobs", "log_tail", "reconcile", "resume",
    "submit", "Worker", "WorkerBusy", "ensure_worker", "worker_running",
]
