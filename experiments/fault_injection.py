"""Fault injection for the job system (issue 13): does any job get lost, run twice, end in the wrong
state or lose rows when its processes are killed or its store is held busy?

    PYTHONPATH=. python experiments/fault_injection.py                 # 20 trials per scenario
    PYTHONPATH=. python experiments/fault_injection.py --quick         # 3 trials, store busy 3 s
    PYTHONPATH=. python experiments/fault_injection.py --trials 5 --busy-s 20 --scenario kill9_runner

Every trial uses a fresh store and the ``tick`` test job kind (``ctssl_core/jobs/testing.py``):
real processes (``ctssl worker``, the runner, the command) that log through ``RunLogger``,
checkpoint, resume and write one results row, without training anything. Random points come
from ``--seed``. Scenarios:

- ``kill9_worker``: three jobs queued, the worker killed -9 at a random step of a random job
  (or, one trial in five, at a random moment from its start) and restarted at once
  (``--once``, one CPU slot): every job must succeed, never two at a time.
- ``kill9_runner`` / ``kill9_training``: kill -9 of the job's runner / of its command at a
  random step; the job must end ``failed`` (its orphan killed), and its resume must succeed
  and continue the same run.
- ``store_busy``: another process holds the store's DuckDB file (read-write) for ``--busy-s``
  seconds while a job runs: the job must succeed, not be killed as dead or hung.
- ``cancel_during_eval``: the job is cancelled during its scoring phase: it must end
  ``cancelled``, its run ``cancelled``, with no results row.
- ``disk_full_ingest``: the store is a tmpfs mount. Part of a tiny synthetic cohort is ingested,
  then the rest is added and the filesystem is shrunk to leave a random share of the space the
  rest needs: that ``ctssl ingest`` must end with a clear message (exit 0 or 2, never a
  traceback), leave what was stored before unchanged, record the files it could not store as
  retryable (``transient``, never a permanent reason); once the filesystem is enlarged, a re-run
  of the same command must give a store equal to a reference ingest into a roomy store (same
  series, pixel arrays and catalog rows).
- ``disk_full_checkpoint``: a real (tiny, ``smoke``) pretraining job on a store on a tmpfs is
  cancelled at a random step (its SIGTERM checkpoint is the last good one); the filesystem is
  shrunk to leave a random share of a checkpoint's size free (in one trial of five, nothing: the
  tmpfs's 4 KiB floor) and the job is resumed. Once its
  command has exited the filesystem is enlarged (the resumed training may itself fill the disk
  completely, and then nothing, not even the job's end, can be recorded until space is freed);
  then the job must be, or become (its runner or the worker's reconcile), ``failed`` with a
  message about disk space, ``checkpoints/last.pt`` unchanged and loadable, no partial checkpoint
  file left; and ``jobs resume`` must continue the same run from that checkpoint and succeed. Not the ``tick`` kind: it writes its own JSON checkpoint, not
  through ``ctssl_core.checkpoint``.

The two disk-full scenarios mount tmpfs (``mount -t tmpfs``, ``mount -o remount,size=``): run as
root, or under ``unshare -rm`` (an unprivileged user and mount namespace); every mount is
unmounted when its trial ends.

``--executor ray`` runs the five job scenarios with every worker started as ``ctssl worker --executor ray``
against a Ray instance the script starts: each job's command is then a Ray task's child, outside its
runner's process group (``kill9_training`` finds it by its environment; ``kill9_runner`` relies on Ray
ending a dead owner's task).

Counted per scenario, over all trials (all must be 0):

- ``lost``: jobs (or resume chains) that never reached a final state in time;
- ``double_run``: samples (every ~30 ms, from /proc) with more job commands of the store alive
  than the worker's one slot, plus jobs claimed more than once;
- ``wrong_state``: jobs or runs whose final state is not the expected one, results written by
  a cancelled run;
- ``rows_lost``: metric values written to a run's ``metrics.jsonl`` that are not in the store,
  plus missing results rows of succeeded runs (a pretraining writes none); for
  ``disk_full_ingest`` also catalog rows and stored arrays missing or different from the
  reference ingest.

For ``disk_full_ingest``, ``lost`` counts series of the reference store never stored after the
re-run, and ``wrong_state`` a failure reported without a clear message, a file recorded for good
(not retryable), damage to what was stored before, or a store left unusable.

Prints a table (and ``--json PATH`` writes it); exit status 1 if any count is not 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PLUGIN = "ctssl_core.jobs.testing"
TICK_MARK = b"from ctssl_core.results.runfolder import RunLogger"  # in the tick command's argv
PRETRAIN_MARK = b"ctssl_core.cli\x00pretrain\x00"  # a pretrain job's command (disk_full_checkpoint)
SLOTS = 1  # every worker here runs with --max-cpu-jobs 1
WORKER_EXTRA: list[str] = []  # --executor ray: ["--executor", "ray", "--ray-address", ADDR] for every worker
COLUMNS = ("lost", "double_run", "wrong_state", "rows_lost")


@dataclass
class Tally:
    """What one scenario found over its trials."""

    trials: int = 0
    lost: int = 0
    double_run: int = 0
    wrong_state: int = 0
    rows_lost: int = 0
    notes: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)  # how the fault showed (disk full: which path failed)

    def add(self, other: "Tally") -> None:
        self.trials += other.trials
        for c in COLUMNS:
            setattr(self, c, getattr(self, c) + getattr(other, c))
        self.notes += other.notes
        for k, v in other.seen.items():
            self.seen[k] = self.seen.get(k, 0) + v

    def saw(self, what: str) -> None:
        self.seen[what] = self.seen.get(what, 0) + 1


def _env() -> dict[str, str]:
    return {**os.environ, "CTSSL_JOB_PLUGINS": PLUGIN, "PYTHONPATH": str(REPO_ROOT)}


def wait_for(pred, timeout: float, every: float = 0.05):
    """Poll ``pred`` until it returns something truthy; None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    return None


# --------------------------------------------------------------------------- processes


def store_processes(store: Path) -> dict[int, tuple[str | None, bool, int]]:
    """Live processes working for ``store``: pid -> (job id, is a job command, parent pid)."""
    from ctssl_core.jobs import procs

    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        if procs.environ_value(pid, "CTSSL_STORE") != str(store) or not procs.is_alive(pid):
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        is_command = ((TICK_MARK in cmd or PRETRAIN_MARK in cmd)
                      and b"ctssl_core.jobs.runner" not in cmd)  # the runner's argv holds it too
        out[pid] = (procs.environ_value(pid, "CTSSL_JOB_ID"), is_command, ppid)
    return out


def commands_alive(store: Path) -> int:
    """Job commands of ``store`` alive now, not counting a command's own children."""
    seen = store_processes(store)
    cmd_pids = {p for p, (_, is_cmd, _) in seen.items() if is_cmd}
    return sum(1 for p in cmd_pids if seen[p][2] not in cmd_pids)


class Monitor(threading.Thread):
    """Samples /proc: counts moments with more job commands of the store alive than slots.

    A command's own children are not another command: between fork and exec (e.g. the
    ``git describe`` that ``start_run`` runs) a child still shows the command's argv."""

    def __init__(self, store: Path, every_s: float = 0.03):
        super().__init__(daemon=True)
        self.store, self.every_s = store, every_s
        self.stop = threading.Event()
        self.overlaps = 0
        self.max_alive = 0

    def run(self) -> None:
        while not self.stop.is_set():
            alive = commands_alive(self.store)
            self.max_alive = max(self.max_alive, alive)
            if alive > SLOTS:
                self.overlaps += 1
            time.sleep(self.every_s)


def start_worker(store: Path, once: bool = False, tag: str = "") -> subprocess.Popen:
    """``ctssl worker`` for ``store`` with one CPU slot, in its own session (as ensure_worker does)."""
    cmd = [sys.executable, "-m", "ctssl_core.cli", "worker", "--store", str(store), "--max-cpu-jobs", str(SLOTS)]
    cmd += (["--once"] if once else ["--idle-exit", "60"]) + WORKER_EXTRA
    log = open(store / f"worker{tag}.log", "ab")
    try:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env={**_env(), "CTSSL_STORE": str(store)},
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def stop_all(store: Path, workers: list[subprocess.Popen]) -> None:
    """SIGKILL the workers this trial started and every process still working for its store."""
    for w in workers:
        if w.poll() is None:
            w.kill()
        try:
            w.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for pid in store_processes(store):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------- checks


# DuckDB's message for a read past the end of the database file. Seen once (disk_full_checkpoint, seed 3,
# 2026-12-03) by this harness's own read-only lookup while a job's process was failing to write the same
# file on a full disk; the same store read fine moments later in that trial. It is also exactly what DuckDB
# says for a database file that is truncated for good (checked: truncate a file by one block and open it),
# so the product's readers (db.connect) do not retry it: they cannot tell it from corruption, and a failed
# read there costs one refresh (the worker retries its pass, the dashboard its page). Only this harness's
# lookups, which must not count a moment of a failing writer as a wrong state, retry it, briefly.
SHORT_READ = "Could not read enough bytes"


def job_row(store: Path, job_id: str, tries: int = 20, every_s: float = 0.25) -> dict:
    """``jobs.get_job(..., live=False)`` for this harness's checks, retried on ``SHORT_READ`` (see above)."""
    import duckdb

    from ctssl_core import jobs

    for i in range(tries):
        try:
            return jobs.get_job(store, job_id, live=False)
        except duckdb.IOException as e:
            if SHORT_READ not in str(e) or i == tries - 1:
                raise
            time.sleep(every_s)
    raise AssertionError("unreachable")


def final_state(store: Path, job_id: str, timeout: float) -> str | None:
    from ctssl_core import jobs

    return wait_for(lambda: (s := job_row(store, job_id)["state"]) in jobs.FINAL and s, timeout)


def rows_lost(store: Path, run_ids: list[str]) -> tuple[int, list[str]]:
    """Metric values in each run's metrics.jsonl missing from the ``metrics`` table, plus a missing
    results row for each succeeded run that is not a pretraining (a pretraining's product is its
    checkpoint; it writes no results rows). Returns (count, notes)."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths
    from ctssl_core.results.runfolder import METRICS_FILE, RESERVED as _RESERVED

    lost, notes = 0, []
    with connect(store_paths(store).db, read_only=True) as con:
        for rid in dict.fromkeys(run_ids):
            expected = set()
            path = store_paths(store).run_dir(rid) / METRICS_FILE
            for line in path.read_text().splitlines() if path.exists() else []:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by kill -9: never a whole row
                expected |= {(rec["step"], k) for k in rec if k not in _RESERVED}
            have = set(con.execute("SELECT step, name FROM metrics WHERE run_id = ?", [rid]).fetchall())
            missing = expected - have
            status = con.execute("SELECT status, kind FROM runs WHERE run_id = ?", [rid]).fetchall()
            n_res = con.execute("SELECT count(*) FROM results WHERE run_id = ?", [rid]).fetchone()[0]
            if status and status[0][0] == "succeeded" and status[0][1] != "pretrain" and n_res == 0:
                missing.add(("results", "final_loss"))
            if missing:
                lost += len(missing)
                notes.append(f"{rid}: {len(missing)} rows missing, e.g. {sorted(missing, key=str)[:3]}")
    return lost, notes


def attempts(store: Path, job_ids: list[str]) -> int:
    """Jobs claimed more than once."""
    from ctssl_core import jobs

    return sum(1 for j in job_ids if (jobs.get_job(store, j, live=False)["attempts"] or 0) > 1)


def expect_state(t: Tally, store: Path, job_id: str, want: str, timeout: float, what: str) -> str | None:
    got = final_state(store, job_id, timeout)
    if got is None:
        t.lost += 1
        t.notes.append(f"{what} {job_id}: not final after {timeout:.0f}s")
    elif got != want:
        from ctssl_core import jobs

        t.wrong_state += 1
        t.notes.append(f"{what} {job_id}: {got}, expected {want} ({jobs.get_job(store, job_id)['error']})")
    return got


# --------------------------------------------------------------------------- scenarios


def kill9_worker(store: Path, rng: random.Random, cfg: argparse.Namespace, t: Tally, workers: list) -> list[str]:
    from ctssl_core import jobs

    ids = [jobs.submit(store, "tick", {"steps": 20, "interval_s": 0.05}) for _ in range(3)]
    workers.append(start_worker(store, tag="1"))
    if rng.random() < 0.2:  # a random moment, most likely before the first claim
        time.sleep(rng.uniform(0.0, 3.0))
    else:  # while one of the jobs runs, at a random step
        job, at = ids[rng.randrange(len(ids))], rng.randint(0, 15)
        wait_for(lambda: (jobs.get_job(store, job)["step"] or -1) >= at, 120)
    workers[-1].send_signal(signal.SIGKILL)
    workers[-1].wait(timeout=10)
    workers.append(start_worker(store, once=True, tag="2"))  # restarted at once
    for j in ids:
        expect_state(t, store, j, "succeeded", 120, "job")
    t.double_run += attempts(store, ids)
    return [r for j in ids for r in jobs.job_run_ids(store, j)]


def _kill_at_random_step(store: Path, rng: random.Random, t: Tally, workers: list, target: str) -> list[str]:
    from ctssl_core import jobs
    from ctssl_core.jobs import procs

    steps = 40
    job_id = jobs.submit(store, "tick", {"steps": steps, "interval_s": 0.05})
    workers.append(start_worker(store))
    at = rng.randint(1, steps - 15)
    job = wait_for(lambda: (j := jobs.get_job(store, job_id))["pid"] and (j["step"] or -1) >= at and j, 90)
    if not job:
        t.lost += 1
        t.notes.append(f"{job_id}: never reached step {at}")
        return jobs.job_run_ids(store, job_id)
    if target == "runner":
        victims = [job["pid"]]
    else:   # its group (a local command and its children), or wherever an engine runs it (Ray: a worker's child)
        victims = {p for p in procs.group_members(job["pgid"])
                   if p != job["pid"] and procs.environ_value(p, "CTSSL_JOB_ID") == job_id}
        victims |= {p for p, (jid, is_cmd, _) in store_processes(store).items() if jid == job_id and is_cmd}
    for p in victims:
        os.kill(p, signal.SIGKILL)
    if expect_state(t, store, job_id, "failed", 60, f"killed {target}") is None:
        return jobs.job_run_ids(store, job_id)
    new_id = jobs.resume(store, job_id)
    expect_state(t, store, new_id, "succeeded", 120, "resumed job")
    t.double_run += attempts(store, [job_id, new_id])
    runs = jobs.job_run_ids(store, job_id) + jobs.job_run_ids(store, new_id)
    if len(set(runs)) != 1:  # the resume must continue the same run, not start another
        t.wrong_state += 1
        t.notes.append(f"{job_id}: resume made runs {runs}")
    return runs


def kill9_runner(store, rng, cfg, t, workers):
    return _kill_at_random_step(store, rng, t, workers, "runner")


def kill9_training(store, rng, cfg, t, workers):
    return _kill_at_random_step(store, rng, t, workers, "training")


HOLD_SCRIPT = r"""
import sys, time, duckdb
db, hold = sys.argv[1], float(sys.argv[2])
while True:
    try:
        con = duckdb.connect(db); break
    except duckdb.Error:
        time.sleep(0.05)
print("holding", flush=True)
t0 = time.monotonic()
con.execute("CREATE TABLE IF NOT EXISTS fault_injection_busy (t DOUBLE)")
while time.monotonic() - t0 < hold:
    con.execute("INSERT INTO fault_injection_busy VALUES (?)", [time.time()]); time.sleep(0.2)
con.close()
"""


def store_busy(store, rng, cfg, t, workers):
    from ctssl_core import jobs
    from ctssl_core.paths import store_paths

    steps = int(math.ceil((cfg.busy_s + 3.0) / 0.05))  # still running when the store frees
    job_id = jobs.submit(store, "tick", {"steps": steps, "interval_s": 0.05})
    workers.append(start_worker(store))
    at = rng.randint(1, 20)
    wait_for(lambda: (jobs.get_job(store, job_id)["step"] or -1) >= at, 90)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(store_paths(store).db), str(cfg.busy_s)],
                              stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "holding" or holder.wait(timeout=cfg.busy_s + 120) != 0:
        raise RuntimeError(f"the process meant to hold the store busy failed (exit {holder.wait()})")
    expect_state(t, store, job_id, "succeeded", cfg.busy_s + 180, "job under a busy store")
    t.double_run += attempts(store, [job_id])
    return jobs.job_run_ids(store, job_id)


def cancel_during_eval(store, rng, cfg, t, workers):
    from ctssl_core import jobs
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    job_id = jobs.submit(store, "tick", {"steps": 10, "interval_s": 0.02, "eval_s": 8.0})
    workers.append(start_worker(store))
    if not wait_for(lambda: "evaluating" in jobs.log_tail(store, job_id), 90):
        t.lost += 1
        t.notes.append(f"{job_id}: never reached its evaluation")
        return jobs.job_run_ids(store, job_id)
    time.sleep(rng.uniform(0.0, 2.0))
    state = jobs.cancel(store, job_id, wait=True)
    got = expect_state(t, store, job_id, "cancelled", 60, f"cancelled during evaluation (cancel said {state})")
    runs = jobs.job_run_ids(store, job_id)
    with connect(store_paths(store).db, read_only=True) as con:
        for rid in runs:
            status = con.execute("SELECT status FROM runs WHERE run_id = ?", [rid]).fetchone()
            n_res = con.execute("SELECT count(*) FROM results WHERE run_id = ?", [rid]).fetchone()[0]
            if got == "cancelled" and (n_res or (status and status[0] != "cancelled")):
                t.wrong_state += 1
                t.notes.append(f"{rid}: cancelled job but run {status} with {n_res} results rows")
    return runs


# --------------------------------------------------------------------------- disk full

MIB = 1 << 20
ROOMY = 256 * MIB  # the tmpfs size when space is "freed"
_reference: dict[str, Path] = {}  # built once per process: the synthetic cohort and its roomy reference store


def _mount_cmd(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)} failed: {r.stderr.strip() or r.returncode}. The disk-full "
                           f"scenarios need tmpfs mounts: run as root or under `unshare -rm`")


def mount_tmpfs(where: Path, size: int) -> None:
    """A tmpfs of ``size`` bytes on ``where`` (an empty folder)."""
    _mount_cmd("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))


def resize_tmpfs(where: Path, size: int) -> None:
    """Shrink or enlarge the tmpfs on ``where`` (never below what it holds: the kernel refuses that)."""
    _mount_cmd("-o", f"remount,size={max(size, used_bytes(where) + 4096)}", str(where))


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def used_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _ctssl(*args: str, store: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**_env(), **({"CTSSL_STORE": str(store)} if store else {})}
    return subprocess.run([sys.executable, "-m", "ctssl_core.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


INGEST_SIZE = "32"  # the smoke profile's stored size: small arrays, a store of a few MiB


def reference(cfg: argparse.Namespace) -> dict[str, Path]:
    """The tiny synthetic cohort (``ctssl synth --preset tiny``) and a reference ingest of it into a
    roomy store; built once per process under ``--tmp``."""
    if _reference:
        return _reference
    root = Path(tempfile.mkdtemp(prefix="fi-reference-", dir=cfg.tmp)).resolve()
    cohort, store = root / "cohort", root / "store"
    for args in (("synth", "--preset", "tiny", "--out", str(cohort), "--no-progress"),
                 ("ingest", str(cohort), "--store", str(store), "--size", INGEST_SIZE, "--no-progress")):
        r = _ctssl(*args)
        if r.returncode != 0:
            raise RuntimeError(f"ctssl {args[0]} for the reference failed: {r.stdout[-800:]}{r.stderr[-800:]}")
    _reference.update(root=root, cohort=cohort, store=store)
    return _reference


CATALOG = {  # table -> columns compared with the reference (times of the ingest itself left out)
    "patients": "patient_key, age, sex, race, attributes",
    "studies": "study_key, patient_key, dataset, pe_exam, exam_labels",
    "series": "* EXCLUDE (ingested_at)",
    "slices": "* EXCLUDE (slice_id)",  # a running number in ingest order: a two-part ingest numbers differently
    "ingested_files": "path, size, status",
    "ingest_errors": "path, reason",
}


def catalog_rows(store: Path) -> dict[str, set[tuple]]:
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    with connect(store_paths(store).db, read_only=True) as con:
        return {t: set(map(tuple, con.execute(f"SELECT {cols} FROM {t}").fetchall())) for t, cols in CATALOG.items()}


def stored_arrays(store: Path) -> dict[str, str]:
    """Every stored array (slices/, masks/) -> sha256 of its bytes; temp files included, so a leftover shows."""
    import hashlib

    return {str(f.relative_to(store)): hashlib.sha256(f.read_bytes()).hexdigest()
            for d in ("slices", "masks") if (store / d).is_dir() for f in sorted((store / d).iterdir())}


def _copy_key(src_store: Path, store: Path) -> None:
    """The reference store's pseudonym key (and its synthetic marker, if any): the same key gives
    the same patient/series keys, so the catalogs can be compared row for row."""
    from ctssl_core.data.pseudonym import synthetic_marker
    from ctssl_core.paths import store_paths

    key = store_paths(src_store).secret
    for f in (key, synthetic_marker(key)):
        if f.exists():
            shutil.copy2(f, store / f.name)


def disk_full_ingest(store, rng, cfg, t, workers):
    ref = reference(cfg)
    _copy_key(ref["store"], store)
    src, held = store.parent / "src", store.parent / "held"
    shutil.copytree(ref["cohort"], src)  # copy2: same sizes and mtimes as the reference's files
    held.mkdir()
    patients = sorted(p.name for p in (src / "dicom").iterdir())
    n_held = rng.randint(1, len(patients) - 1)
    for name in rng.sample(patients, n_held):
        shutil.move(src / "dicom" / name, held / name)
    args = ("ingest", str(src), "--store", str(store), "--size", INGEST_SIZE, "--no-progress")
    r = _ctssl(*args)
    if r.returncode != 0:
        raise RuntimeError(f"first ingest (roomy) failed: {r.stdout[-600:]}{r.stderr[-600:]}")
    before_rows, before_arrays = catalog_rows(store), stored_arrays(store)
    for d in held.iterdir():
        shutil.move(d, src / "dicom" / d.name)
    # what the rest adds: its share of the reference's arrays (the DuckDB file is mostly there after the
    # first part; counting it, with a 1 MiB floor, left the disk roomy enough in 5 or 6 trials of 20)
    arrays = sum(f.stat().st_size for d in ("slices", "masks") for f in (ref["store"] / d).iterdir())
    need = arrays * n_held / len(patients)
    free = int(rng.uniform(0.0, 0.8) * need)
    resize_tmpfs(store, used_bytes(store) + free)
    r = _ctssl(*args)
    out = r.stdout + r.stderr
    n_transient = sum(1 for ln in out.splitlines() if ln.startswith("transient "))
    t.saw("ingest exit 2, store full" if r.returncode == 2 and "is full" in out else
          "ingest exit 0, files left transient" if r.returncode == 0 and n_transient else
          "ingest exit 0, disk did not fill" if r.returncode == 0 else f"ingest exit {r.returncode}")
    if r.returncode not in (0, 2) or "Traceback" in out:
        t.wrong_state += 1
        t.notes.append(f"ingest on a full disk: exit {r.returncode}, not a clear message: {out[-700:]}")
    elif r.returncode == 2 and not ("space" in out.lower() and "ingest" in out):
        t.wrong_state += 1
        t.notes.append(f"ingest on a full disk: exit 2 without saying to free space and re-run: {out[-400:]}")
    try:
        now_rows, now_arrays = catalog_rows(store), stored_arrays(store)
    except Exception as e:  # noqa: BLE001 - an unreadable store is the finding
        t.wrong_state += 1
        t.notes.append(f"store unusable after the full disk: {type(e).__name__}: {e}")
    else:
        for table in ("patients", "studies", "series", "slices"):
            gone = before_rows[table] - now_rows[table]
            if gone:
                t.wrong_state += 1
                t.notes.append(f"{table}: {len(gone)} rows stored before the full disk changed or gone")
        changed = [k for k, v in before_arrays.items() if now_arrays.get(k) != v]
        if changed:
            t.wrong_state += 1
            t.notes.append(f"arrays stored before the full disk changed or gone: {changed[:3]}")
        final = {reason for _, reason in now_rows["ingest_errors"]} - {"transient"}
        if final:
            t.wrong_state += 1
            t.notes.append(f"full disk recorded as {sorted(final)}, not as transient (retryable)")
        if r.returncode == 0 and "transient" in out and "run ingest again" not in out:
            t.wrong_state += 1
            t.notes.append(f"transient errors without saying to run ingest again: {out[-400:]}")
    resize_tmpfs(store, ROOMY)
    r = _ctssl(*args)
    if r.returncode != 0:
        t.wrong_state += 1
        t.notes.append(f"re-run after space was freed: exit {r.returncode}: {(r.stdout + r.stderr)[-600:]}")
    want_rows, want_arrays = catalog_rows(ref["store"]), stored_arrays(ref["store"])
    got_rows, got_arrays = catalog_rows(store), stored_arrays(store)
    series_lost = {row[0] for row in want_rows["series"]} - {row[0] for row in got_rows["series"]}
    t.lost += len(series_lost)
    if series_lost:
        t.notes.append(f"{len(series_lost)} series never stored after the re-run")
    for table in CATALOG:
        diff = want_rows[table] ^ got_rows[table]
        if diff:
            t.rows_lost += len(want_rows[table] - got_rows[table]) or len(diff)
            t.notes.append(f"{table}: {len(want_rows[table] - got_rows[table])} reference rows missing or "
                           f"different, {len(got_rows[table] - want_rows[table])} extra, e.g. {sorted(diff, key=str)[:2]}")
    bad = sorted(k for k in want_arrays.keys() | got_arrays.keys() if want_arrays.get(k) != got_arrays.get(k))
    if bad:
        t.rows_lost += len(bad)
        t.notes.append(f"{len(bad)} stored arrays missing, extra or different from the reference: {bad[:3]}")
    return []


def disk_full_checkpoint(store, rng, cfg, t, workers):
    import hashlib

    from ctssl_core import jobs
    from ctssl_core.checkpoint import read_checkpoint
    from ctssl_core.paths import store_paths

    ref = reference(cfg)
    for f in ref["store"].iterdir():  # the ingested store, without its runs
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, store / f.name)
    steps = 60
    job_id = jobs.submit(store, "pretrain", {"task": "masked_region", "steps": steps, "profile": "smoke",
                                             "device": "cpu"})
    workers.append(start_worker(store))
    # above the first logged step, so a restart from 0 shows; and half the run before its end: the job's step
    # is seen at heartbeats (3 s apart) and the cancel takes its time, so a cancel drawn near the last step
    # landed after the training had ended (24 steps, 2026-12-03 16:30: the run succeeded, the trial tested
    # nothing and was counted wrong)
    at = rng.randint(3, steps // 2)
    if not wait_for(lambda: (jobs.get_job(store, job_id)["step"] or -1) >= at, 300, every=0.2):
        t.lost += 1
        t.notes.append(f"{job_id}: never reached step {at}")
        return jobs.job_run_ids(store, job_id)
    jobs.cancel(store, job_id, wait=True)
    if expect_state(t, store, job_id, "cancelled", 120, "pretraining cancelled for its checkpoint") != "cancelled":
        return jobs.job_run_ids(store, job_id)
    run_id = jobs.job_run_ids(store, job_id)[-1]
    from ctssl_core.results.runfolder import read_record

    if (read_record(store, run_id) or {}).get("status") == "succeeded":
        t.saw("not exercised: the training ended before the cancel landed")
        return jobs.job_run_ids(store, job_id)
    ckdir = store_paths(store).run_dir(run_id) / "checkpoints"
    last = ckdir / "last.pt"
    good = hashlib.sha256(last.read_bytes()).hexdigest()
    good_step = int(read_checkpoint(last)["step"])
    # one trial in five leaves no space at all (4 KiB): the resumed job then cannot even record its start
    # or write its own message, the case seed 19 met by chance on 2026-12-03 and 0 of 20 trials met later
    share = 0.0 if rng.random() < 0.2 else rng.uniform(0.05, 0.9)
    resize_tmpfs(store, used_bytes(store) + int(share * last.stat().st_size))
    full_id = jobs.resume(store, job_id)
    # The resumed training may itself use up the little space left (metrics, DuckDB's WAL) before its
    # checkpoint, leaving the disk completely full: then nothing can record the job's end (DuckDB cannot
    # write at all), however long one waits (seed 19, 2026-12-03). So: wait for the job's command to exit,
    # free the space, and only then require the end: `failed` with a message about disk space, recorded
    # by its runner (which retries) or by the worker's reconcile (if the runner gave up), never
    # `succeeded`, never left `running`.
    seen = {"alive": False}
    if not wait_for(lambda: _command_ended(store, full_id, seen), 600, every=0.1):
        t.lost += 1
        t.notes.append(f"resumed onto a full disk {full_id}: its command {'never ended' if seen['alive'] else 'never started'} "
                       f"in 600s")
    resize_tmpfs(store, ROOMY)
    got = expect_state(t, store, full_id, "failed", 180, "resumed onto a full disk, then space freed")
    error = job_row(store, full_id)["error"] or ""
    t.saw("failed: checkpoint not written, disk full" if "checkpoint last.pt was not written" in error else
          "failed: disk full elsewhere" if "space" in error.lower() else f"ended {got}")
    if got == "failed" and "space" not in error.lower():
        t.wrong_state += 1
        t.notes.append(f"{full_id}: failed without a message about disk space: {error[-400:]}")
    if hashlib.sha256(last.read_bytes()).hexdigest() != good:
        t.wrong_state += 1
        t.notes.append(f"{run_id}: last.pt changed by the failed write")
    try:
        read_checkpoint(last)
    except Exception as e:  # noqa: BLE001
        t.wrong_state += 1
        t.notes.append(f"{run_id}: last.pt unreadable after the full disk: {e}")
    leftovers = sorted(p.name for p in ckdir.iterdir() if p.name != "last.pt")
    if leftovers:
        t.wrong_state += 1
        t.notes.append(f"{run_id}: partial checkpoint files left: {leftovers}")
    if got not in jobs.FINAL:
        return jobs.job_run_ids(store, job_id) + jobs.job_run_ids(store, full_id)
    metrics = store_paths(store).run_dir(run_id) / "metrics.jsonl"
    n_before = len(metrics.read_bytes())
    final_id = jobs.resume(store, full_id)
    expect_state(t, store, final_id, "succeeded", 300, "resumed after space was freed")
    runs = [r for j in (job_id, full_id, final_id) for r in jobs.job_run_ids(store, j)]
    if set(runs) != {run_id}:
        t.wrong_state += 1
        t.notes.append(f"{job_id}: resumes made runs {runs}, not one run")
    final_step = int(read_checkpoint(last)["step"])
    new_steps = [json.loads(ln)["step"] for ln in metrics.read_bytes()[n_before:].decode().splitlines() if ln.strip()]
    if final_step != steps or not new_steps or min(new_steps) <= good_step:  # continued, not started again
        t.wrong_state += 1
        t.notes.append(f"{final_id}: from checkpoint step {good_step} it logged steps {new_steps[:3]}... "
                       f"and ended at step {final_step} of {steps}")
    t.double_run += attempts(store, [job_id, full_id, final_id])
    return runs


def _command_ended(store: Path, job_id: str, seen: dict) -> bool:
    """True once the job is final, or its command (seen alive before: ``seen['alive']``) is gone."""
    from ctssl_core import jobs

    alive = any(j == job_id and is_cmd for j, is_cmd, _ in store_processes(store).values())
    seen["alive"] = seen["alive"] or alive
    return (seen["alive"] and not alive) or job_row(store, job_id)["state"] in jobs.FINAL


SCENARIOS = {f.__name__: f for f in (kill9_worker, kill9_runner, kill9_training, store_busy, cancel_during_eval,
                                      disk_full_ingest, disk_full_checkpoint)}
ON_TMPFS = ("disk_full_ingest", "disk_full_checkpoint")  # their store is a tmpfs mount


# --------------------------------------------------------------------------- driver


def run_trial(name: str, seed: int, cfg: argparse.Namespace) -> Tally:
    """One trial of one scenario in a fresh store; always cleans up its processes."""
    t = Tally(trials=1)
    store = Path(tempfile.mkdtemp(prefix=f"fi-{name}-", dir=cfg.tmp)).resolve() / "store"
    store.mkdir(parents=True)
    mounted = False
    try:
        if name in ON_TMPFS:
            mount_tmpfs(store, ROOMY)
            mounted = True
        return _trial(name, seed, cfg, t, store)
    finally:
        if mounted:
            if t.notes:  # keep what the trial left for a look, before the mount goes
                shutil.copytree(store, store.parent / "store-kept", dirs_exist_ok=True, ignore_dangling_symlinks=True)
            unmount(store)
        if not cfg.keep and not t.notes:
            shutil.rmtree(store.parent, ignore_errors=True)


def _trial(name: str, seed: int, cfg: argparse.Namespace, t: Tally, store: Path) -> Tally:
    workers: list[subprocess.Popen] = []
    mon = Monitor(store)
    mon.start()
    runs: list[str] = []
    try:
        runs = SCENARIOS[name](store, random.Random(seed), cfg, t, workers)
    except Exception as e:  # noqa: BLE001 - a crash of the harness or the system is a finding, not an abort
        t.wrong_state += 1
        t.notes.append(f"{name} seed {seed}: {type(e).__name__}: {e}")
    finally:
        mon.stop.set()
        mon.join(timeout=10)
        stop_all(store, workers)
    t.double_run += mon.overlaps
    if mon.overlaps:
        t.notes.append(f"{name} seed {seed}: {mon.overlaps} samples with {mon.max_alive} job commands alive")
    try:
        n, notes = rows_lost(store, runs)
        t.rows_lost += n
        t.notes += notes
    except Exception as e:  # noqa: BLE001
        t.rows_lost += 1
        t.notes.append(f"{name} seed {seed}: could not check rows: {type(e).__name__}: {e}")
    if t.notes:
        kept = store.parent / "store-kept" if name in ON_TMPFS else store
        t.notes.append(f"{name} seed {seed}: store kept at {kept}")
    return t


def format_table(tallies: dict[str, Tally]) -> str:
    head = f"{'scenario':20} {'trials':>6} " + " ".join(f"{c:>11}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, t in tallies.items():
        lines.append(f"{name:20} {t.trials:>6} " + " ".join(f"{getattr(t, c):>11}" for c in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="trials per scenario (default 20)")
    p.add_argument("--quick", action="store_true", help="3 trials per scenario, store busy 3 s (for a test)")
    p.add_argument("--busy-s", type=float, default=90.0, help="seconds the store is held busy (default 90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="only these (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    p.add_argument("--tmp", default=None, help="folder for the trial stores (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep every trial's store")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the workers run job commands (ray: a Ray instance this script starts, 4 CPUs; "
                        "only the job scenarios, not the disk-full ones)")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.trials, cfg.busy_s = 3, min(cfg.busy_s, 3.0)
    if cfg.trials < 1 or cfg.busy_s <= 0:
        p.error("--trials must be >= 1 and --busy-s > 0")
    os.environ.update({"CTSSL_JOB_PLUGINS": PLUGIN})
    import ctssl_core.jobs.testing  # noqa: F401 - registers "tick" in this process too

    scenarios = cfg.scenario or [n for n in SCENARIOS if cfg.executor == "local" or n not in ON_TMPFS]
    if cfg.executor == "ray":
        import ray

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        WORKER_EXTRA[:] = ["--executor", "ray", "--ray-address", ray.get_runtime_context().gcs_address]
        print(f"job commands run on Ray at {WORKER_EXTRA[-1]}", flush=True)
    tallies: dict[str, Tally] = {}
    try:
        for name in scenarios:
            tallies[name] = Tally()
            for i in range(cfg.trials):
                t = run_trial(name, cfg.seed * 100_003 + i, cfg)
                tallies[name].add(t)
                print(f"{name} trial {i + 1}/{cfg.trials}: " + ", ".join(f"{c} {getattr(t, c)}" for c in COLUMNS),
                      flush=True)
    finally:
        if _reference and not cfg.keep:
            shutil.rmtree(_reference["root"], ignore_errors=True)
    print()
    print(format_table(tallies))
    for name, t in tallies.items():
        if t.seen:
            print(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in sorted(t.seen.items())))
    notes = [n for t in tallies.values() for n in t.notes]
    if notes:
        print("\n" + "\n".join(notes))
    if cfg.json:
        cfg.json.write_text(json.dumps({k: asdict(v) for k, v in tallies.items()}, indent=2))
    return 1 if any(getattr(t, c) for t in tallies.values() for c in COLUMNS) else 0


if __name__ == "__main__":
    sys.exit(main())
