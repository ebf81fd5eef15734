"""A tiny job kind, ``tick``, for testing the job system without training anything.

Importing this module registers ``JOB_KINDS["tick"]``; set
``CTSSL_JOB_PLUGINS=ctssl_core.jobs.testing`` so a separately started worker
or dashboard knows it too. The job behaves like a training run where it
matters to the queue: it writes only its run folder (``results/runfolder.py``: it starts a run, logs
``train/loss`` and ``lr`` through ``RunLogger`` at a chosen rate, keeps a checkpoint (its step) and saves it on
SIGTERM, resumes from it with ``--resume RUN_ID``, and writes one results
row (``final_loss``) when it finishes, after an optional ``eval_s`` scoring
phase in which a SIGTERM cancels the run without results), and the job runner merges it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ctssl_core.jobs.kinds import JOB_KINDS, JobKind

TICK_SCRIPT = r"""
import json, os, signal, sys, time
from pathlib import Path
from ctssl_core.results.runfolder import RunLogger, new_run_id, record_end as finish_run, record_results
from ctssl_core.results.runfolder import record_start as start_run
store, steps, interval, resume, fail_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
eval_s = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
rid = resume or new_run_id("finetune", "tick", "random")
run_dir = start_run(store, rid, "finetune", "tick", "random", "none", {"steps": steps, "interval_s": interval})
ckpt = run_dir / "checkpoints" / "last.json"
ckpt.parent.mkdir(exist_ok=True)
start = json.loads(ckpt.read_text())["step"] + 1 if (resume and ckpt.exists()) else 0
print(f"tick run {rid}: steps {start}..{steps - 1}", flush=True)
log = RunLogger(store, rid)
t0 = time.monotonic()
for s in range(start, steps):
    if stop:
        log.close(); finish_run(store, rid, "cancelled", checkpoint=ckpt)
        print(f"SIGTERM: checkpoint at step {s - 1}", flush=True); sys.exit(143)
    log({"step": s, "epoch": s / steps, "wall_s": time.monotonic() - t0, "train/loss": 1.0 / (1 + s), "lr": 0.001})
    tmp = ckpt.with_suffix(".tmp"); tmp.write_text(json.dumps({"step": s})); os.replace(tmp, ckpt)
    if s == fail_at:
        print(f"failing on purpose at step {s}", flush=True); sys.exit(3)
    time.sleep(interval)
log.close()
if eval_s > 0:
    print("evaluating", flush=True)
    t_eval = time.monotonic()
    while time.monotonic() - t_eval < eval_s:
        if stop:  # cancelled while scoring: no results, the run is cancelled
            finish_run(store, rid, "cancelled", checkpoint=ckpt)
            print("SIGTERM during evaluation: no results", flush=True); sys.exit(143)
        time.sleep(0.02)
record_results(store, rid, [{"run_id": rid, "task": "tick", "init": "random", "split": "test", "metric": "final_loss",
                       "value": 1.0 / steps, "n": steps}])
finish_run(store, rid, "succeeded", checkpoint=ckpt)
print("done", flush=True)
"""


@dataclass(frozen=True)
class TickSpec:
    steps: int = field(default=20, metadata={"min": 1, "max": 100_000})
    interval_s: float = field(default=0.05, metadata={"min": 0.0, "max": 5.0})
    fail_at: int = field(default=-1, metadata={"min": -1, "max": 100_000})
    eval_s: float = field(default=0.0, metadata={"min": 0.0, "max": 600.0})  # a scoring phase after training
    device: str = field(default="cpu", metadata={"choices": lambda _r: ["cpu"]})


def _tick_argv(spec: TickSpec, store: Path, resume_run: str | None) -> list[str]:
    return [sys.executable, "-c", TICK_SCRIPT, str(store), str(spec.steps), str(spec.interval_s),
            resume_run or "", str(spec.fail_at), str(spec.eval_s)]


JOB_KINDS["tick"] = JobKind(TickSpec, _tick_argv, "Test job: logs a fake learning curve", resumable=True,
                            checkpoint="checkpoints/last.json")
