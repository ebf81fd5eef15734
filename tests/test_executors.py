"""Unit engines (ctssl_core/executors.py): the smoke benchmark's units on a local Ray instance, cancelled
by SIGTERM mid-run and resumed, against the local executor's results on the same store."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import pytest

from ctssl_core.benchmark import run_benchmark

from ctssl_core.plan import BenchmarkConfig, make_plan, unit_resources
from ctssl_core.config import ConfigError
from ctssl_core.executors import Resources, check_executor


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs, no dashboard) for the module; the engine joins it and leaves it up."""
    import ray  # the `ray` extra, pinned in requirements-test.txt
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _invalidate(store, run_ids):
    """Mark runs unfinished, as a crash mid-benchmark leaves them (the benchmark reruns non-succeeded runs):
    in their run folders' records (what the units write) and in the store."""
    import duckdb

    from ctssl_core.paths import store_paths
    from ctssl_core.results.runfolder import update_record

    for rid in run_ids:
        update_record(store, rid, lambda rec: {**rec, "status": "failed"})
    con = duckdb.connect(str(store_paths(store).db))
    try:
        con.execute("UPDATE runs SET status = 'failed' WHERE run_id IN (SELECT unnest(?))", [list(run_ids)])
        con.execute("DELETE FROM summaries")
    finally:
        con.close()


def _query(store, sql, params=()):
    import duckdb

    from ctssl_core.paths import store_paths

    con = duckdb.connect(str(store_paths(store).db), read_only=True)
    try:
        return con.execute(sql, list(params)).df()
    finally:
        con.close()


def test_bad_executor_settings_say_what_to_do(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown 'dask'.*\['local', 'ray', 'slurm'\]"):
        BenchmarkConfig(strategies=("rotation",), executor="dask")
    monkeypatch.setitem(sys.modules, "ray", None)            # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'ctssl\[ray\]'"):
        check_executor("ray")
    with pytest.raises(ConfigError, match=r"pip install 'ctssl\[ray\]'"):
        make_plan("smoke", ["benchmark.executor=ray"])
    check_executor("local")                                   # the default needs nothing extra
    from ctssl_core.cli import main
    from ctssl_core.jobs import LocalBackend

    with pytest.raises(ConfigError, match=r"pip install 'ctssl\[ray\]'"):
        LocalBackend(executor="ray")                          # said when the worker starts, not per job
    with pytest.raises(ConfigError, match=r"unknown 'dask'.*\['local', 'ray', 'slurm'\]"):
        LocalBackend(executor="dask")
    assert main(["worker", "--store", "unused-store", "--executor", "dask", "--once"]) == 2
    monkeypatch.delitem(sys.modules, "ray")
    with pytest.raises(ConfigError, match=r"needs --ray-address.*ray start --head"):
        LocalBackend(executor="ray")                          # a Ray instance per job dies with its cancel


def test_units_declare_threads_and_the_device_their_config_asks_for(ray_local, tmp_path):
    from ctssl_core.executors import RayEngine

    plan = make_plan("smoke", ["benchmark.threads=3", "downstream.train.device=cuda"])
    res = {u.kind + ("-nc" if u.init == "negative_control" and u.kind == "control" else ""): unit_resources(plan, u)
           for u in plan.units}
    assert {r.cpus for r in res.values()} == {3}
    assert res["finetune"].device == "cuda" and res["control"].device == "cuda"   # positive control trains
    assert res["control-nc"].device == "cpu"                                       # shuffles weights only
    assert res["embed"].device == "cpu" and res["pretrain"].device == "auto"
    engine = RayEngine()                                      # joins the module's instance: 2 CPUs, no GPU
    try:
        assert engine.gpus == 0
        assert [engine.num_gpus(Resources(1, d)) for d in ("cuda", "auto", "cpu")] == [1.0, 0.0, 0.0]
        engine.gpus = 1.0                                     # on a cluster with GPUs 'auto' takes one
        assert engine.num_gpus(Resources(1, "auto")) == 1.0
    finally:
        engine.close()
    assert ray_local.is_initialized()                         # it did not shut down an instance it did not start


def test_scheduler_passes_results_to_the_units_that_need_them_and_raises_the_first_failure(ray_local):
    """``run_in_order`` on Ray with toy units (name, the key it needs): a unit gets its provider's result;
    after a failure the started units end and are yielded, nothing new starts, and the failure is raised."""
    from ctssl_core.executors import RayEngine, run_in_order

    def unit(name, got):                                      # runs in a Ray worker
        if name == "bad":
            raise ValueError("boom: a unit failed")
        return f"{name}({got})"

    def run(units, out):
        for u, result in run_in_order(RayEngine(), units, {}, unit, args=lambda u, ids: (u[0], ids.get(u[1])),
                                      needs=lambda u: u[1], provides=lambda u: u[0],
                                      resources=lambda u: Resources(1, "cpu")):
            out.append((u[0], result))
        return sorted(out)

    assert run([("p", None), ("f", "p"), ("g", "f")], []) == [("f", "f(p(None))"), ("g", "g(f(p(None)))"),
                                                              ("p", "p(None)")]
    seen: list = []
    with pytest.raises(ValueError, match="boom"):             # the unit's own exception type, through Ray
        run([("p", None), ("bad", "p"), ("f", "p"), ("after", "bad")], seen)
    seen = [name for name, _ in seen]
    assert sorted(seen) == ["f", "p"]                         # f was started with bad, so it ended and counts
    with pytest.raises(ConfigError, match=r"never ran: \['nothing'\]"):
        run([("p", None), ("orphan", "nothing")], [])
    assert ray_local.is_initialized()


def test_a_second_sigterm_does_not_interrupt_the_cancel_of_the_started_units():
    """A job-queue cancel delivers SIGTERM twice (to the job's group, and the runner's forward). The first
    stops the scheduler; the second, arriving while it cancels the started units, must not cut that short
    (units left running on a cluster), and the handler before the engine is back afterwards."""
    from ctssl_core.executors import _TermGuard, run_in_order

    class Engine(_TermGuard):                                 # the guard of the Ray and Slurm engines
        name, slots = "fake", None

        def __init__(self):
            self.cancelled, self.closed = [], False
            self._guard_term()

        def submit(self, fn, args, res):
            return args[0]

        def wait(self, handles):
            with self._interruptible():
                os.kill(os.getpid(), signal.SIGTERM)            # the cancel's first SIGTERM
                time.sleep(5)                                 # the handler raises in here
            raise AssertionError("SIGTERM was not turned into KeyboardInterrupt")

        def cancel(self, handles, stop=None):
            os.kill(os.getpid(), signal.SIGTERM)                # the second, while the scheduler cancels
            time.sleep(0.2)
            self.cancelled += handles

        def close(self):
            self.closed = True
            self._restore_term()

    before = signal.getsignal(signal.SIGTERM)
    eng = Engine()
    with pytest.raises(KeyboardInterrupt) as stop:
        list(run_in_order(eng, ["a", "b"], {}, print, args=lambda u, ids: (u,), needs=lambda u: None,
                          provides=lambda u: None, resources=lambda u: Resources()))
    assert getattr(stop.value, "signal", None) == "SIGTERM"
    assert sorted(eng.cancelled) == ["a", "b"] and eng.closed
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_while_the_benchmark_merges_a_unit_is_raised_at_the_next_wait():
    """The benchmark merges each finished unit's folder into DuckDB between the scheduler's waits; a SIGTERM
    raised in there became 'RuntimeError: Query interrupted' (a cancel read as a failure). It is raised
    where the scheduler next waits instead: the consumer's work ends whole, the rest is cancelled."""
    import duckdb

    from ctssl_core.executors import _TermGuard, run_in_order

    class Engine(_TermGuard):
        name, slots = "fake", 1

        def __init__(self):
            self.cancelled, self.waits = [], 0
            self._guard_term()

        def submit(self, fn, args, res):
            return args[0]

        def wait(self, handles):
            self.waits += 1
            with self._interruptible():
                return list(handles)

        def result(self, handle):
            return handle

        def cancel(self, handles, stop=None):
            self.cancelled += handles

        def close(self):
            self._restore_term()

    eng, merged = Engine(), []
    con = duckdb.connect()
    with pytest.raises(KeyboardInterrupt) as stop:
        for u, _ in run_in_order(eng, ["a", "b", "c"], {}, print, args=lambda u, ids: (u,),
                                 needs=lambda u: None, provides=lambda u: None, resources=lambda u: Resources()):
            os.kill(os.getpid(), signal.SIGTERM)                # the cancel lands while this unit is merged
            con.execute("SELECT count(*) FROM range(20000000)").fetchall()   # a query long enough to be hit
            time.sleep(0.2)
            merged.append(u)
    assert getattr(stop.value, "signal", None) == "SIGTERM"
    assert merged == ["a"] and eng.waits == 1 and eng.cancelled == []   # "b" was never started


def _top_level_unit(name):
    """A unit a spawned pool process can import (by this module's name): ``victim`` is killed with -9."""
    if name == "victim":
        os.kill(os.getpid(), signal.SIGKILL)
    return name


POOL_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from ctssl_core.executors import PoolEngine, Resources, run_in_order

def unit(name, out):
    (Path(out) / f"{name}.started").touch()
    if name == "q":
        return name
    if name == "b":                         # outside a training loop (embedding, scoring): no handler of its own
        try:
            time.sleep(300)
        except KeyboardInterrupt as e:      # what the benchmark's units do: record the end, cancelled
            (Path(out) / "b.recorded").write_text(getattr(e, "signal", "?"))
            raise
    stop = []                               # as train.py's loop: SIGTERM -> save a checkpoint, then return
    before = signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        for i in range(3000):
            if stop:
                time.sleep(0.5)             # saving
                (Path(out) / f"{name}.saved").write_text(str(i))
                return name
            time.sleep(0.1)
        return name
    finally:
        signal.signal(signal.SIGTERM, before)   # as train.fit restores the handler it found

if __name__ == "__main__":
    out, units = sys.argv[1], sys.argv[2].split(",")
    try:
        for u, r in run_in_order(PoolEngine(2), units, {}, unit, args=lambda u, ids: (u, out),
                                 needs=lambda u: None, provides=lambda u: None, resources=lambda u: Resources()):
            if u == "q":
                raise RuntimeError("the consumer failed")   # e.g. a full disk while merging the unit
    except KeyboardInterrupt as e:
        (Path(out) / "stopped").write_text(getattr(e, "signal", "?"))
    except RuntimeError:
        (Path(out) / "error").touch()
    finally:
        (Path(out) / "finally").touch()    # run_benchmark's finally: the benchmark's status, the last merge
"""


def _pool_bench(tmp_path, units):
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "pool_bench.py"
    script.write_text(POOL_SCRIPT)
    return out, subprocess.Popen([sys.executable, str(script), str(out), ",".join(units)], start_new_session=True)


@pytest.mark.parametrize("to", ["process", "group"])
def test_a_sigterm_stops_a_local_pool_benchmark_after_its_running_units_save(tmp_path, to):
    """``benchmark.workers=2`` (the local pool engine). SIGTERM to the benchmark alone (``kill PID``): the
    running units are sent SIGTERM; to its process group (``ctssl jobs cancel``): they get it directly. A unit
    in its training loop saves; one outside it (no handler of its own) gets a SIGTERM stop and records its end.
    The benchmark waits for them, stops as by SIGTERM, and its own clean-up runs (the process used to die at
    once, and the job runner then killed the units mid-save)."""
    out, proc = _pool_bench(tmp_path, ["a", "b"])
    try:
        deadline = time.monotonic() + 120
        while not ((out / "a.started").exists() and (out / "b.started").exists()):
            assert time.monotonic() < deadline and proc.poll() is None, "the pool's units never started"
            time.sleep(0.1)
        time.sleep(0.3)                                          # into their loops
        if to == "process":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "a.saved").exists() and (out / "b.recorded").read_text() == "SIGTERM"
    assert (out / "stopped").read_text() == "SIGTERM" and (out / "finally").exists()


def test_a_pool_process_killed_mid_unit_ends_the_benchmark_with_what_to_do(tmp_path):
    """A pool process killed (-9, the kernel's OOM killer) while it runs a unit: the benchmark ends with a
    message saying what happened and how to resume (the CLI prints it without a traceback), not a bare
    BrokenProcessPool."""
    from ctssl_core.executors import PoolEngine, UnitProcessDied, run_in_order

    with pytest.raises(UnitProcessDied, match="died while it ran a unit.*re-run the same command"):
        list(run_in_order(PoolEngine(2, term_guard=False), ["victim"], {}, _top_level_unit,
                          args=lambda u, ids: (u,), needs=lambda u: None, provides=lambda u: None,
                          resources=lambda u: Resources()))


def test_an_error_of_the_benchmark_itself_stops_the_pools_running_units(tmp_path):
    """The consumer (the benchmark merging a unit) fails while another unit trains: the running unit is sent
    SIGTERM and saves, instead of the pool's shutdown waiting for it to train to its end (hours)."""
    out, proc = _pool_bench(tmp_path, ["a", "q"])
    try:
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "error").exists() and (out / "a.saved").exists() and (out / "finally").exists()


def test_a_busy_store_does_not_hold_the_benchmark_after_a_unit(tmp_path):
    """After each unit the benchmark merges its folder; with the store held by another process it gives up
    after a short wait (the next merge takes it) instead of the 30 s a connection waits, during which a
    cancel could not reach the scheduler and a job's grace ran out."""
    import multiprocessing as mp

    from ctssl_core.benchmark import _merge_unit
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths
    from ctssl_core.results import runfolder as rf
    from ctssl_core.results.write import merge_pending
    from ctssl_core.schema import ensure_schema
    from test_db import _hold_write_lock

    store = tmp_path / "store"
    with connect(store_paths(store).db) as con:
        ensure_schema(con)
    rf.record_start(store, "ft-busy-pe-random-1", "finetune", "pe", "random", "tiny", {})
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_write_lock, args=(store_paths(store).db, 60.0, ready))
    holder.start()
    try:
        assert ready.wait(60)
        said: list[str] = []
        _merge_unit(store, said.append)
        assert holder.is_alive()                  # it gave up while the store was still held
        assert len(said) == 1 and "busy" in said[0] and "merged later" in said[0]
    finally:
        holder.terminate()
        holder.join(30)
    assert _query(store, "SELECT count(*) AS n FROM runs").n[0] == 0
    merge_pending(store)                          # the next merge takes it
    assert _query(store, "SELECT run_id, status FROM runs").values.tolist() == [["ft-busy-pe-random-1", "running"]]


def test_ray_cancel_by_sigterm_then_resume_reruns_nothing_finished_and_matches_local(smoke_store, tmp_path,
                                                                                    ray_local, monkeypatch):
    """Three fine-tunes of the smoke store (built by the local executor) are unfinished. Through Ray: the
    first finishes, the second sends SIGTERM to the benchmark process while it runs, the third is queued
    (2 CPUs). The benchmark cancels the Ray tasks and stops; a re-run executes exactly the two cancelled
    units, and the summaries equal the local executor's."""
    import ctssl_core.benchmark as bm

    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    over = ["benchmark.executor=ray"]
    plan = make_plan("smoke", over)
    redo = [u.run_id for u in plan.units if u.kind == "finetune" and u.task == "pe"][:3]
    first = redo[0]
    _invalidate(store, redo)
    calls, driver, term_before = tmp_path / "calls", os.getpid(), signal.getsignal(signal.SIGTERM)
    calls.mkdir()

    def slow_after_first(plan, u, root, ids, threads=0):      # runs in a Ray worker (cloudpickled by value)
        (calls / f"{u.run_id}.{time.time_ns()}").touch()      # one file per execution
        if u.run_id != first:
            for _ in range(12000):                             # until the first unit has finished (<= 600 s:
                                                               # a loaded 2-core CPU took > 60 s)
                if (calls / "first.done").exists() or not (calls / "driver.running").exists():
                    break
                time.sleep(0.05)
            if u.run_id == redo[1]:                             # one unit cancels; the third, started once
                if not (calls / "driver.running").exists():     # the first's CPU freed, only waits
                    raise RuntimeError("the benchmark ended before this unit could cancel it")
                os.kill(driver, signal.SIGTERM)                 # a job-queue cancel sends two: to the group,
                os.kill(driver, signal.SIGTERM)                 # and the runner's forward to its command
            for _ in range(6000):                               # Python-level work, as a training loop:
                time.sleep(0.05)                                # ray.cancel's KeyboardInterrupt lands here
        from ctssl_core.benchmark import _worker_unit as real   # the worker's module is not patched

        out = real(plan, u, root, ids, threads)
        (calls / "first.done").touch()
        return out

    monkeypatch.setattr(bm, "_worker_unit", slow_after_first)
    (calls / "driver.running").touch()
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            run_benchmark("smoke", store, over, progress=False, log=lambda m: None)
    finally:
        (calls / "driver.running").unlink()
    assert getattr(stop.value, "signal", None) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is term_before               # the engine restored the handler
    ran = sorted(p.name.rsplit(".", 1)[0] for p in calls.iterdir() if p.name != "first.done")
    assert first in ran and (calls / "first.done").exists()
    status = _query(store, "SELECT run_id, status FROM runs WHERE run_id IN (SELECT unnest(?))", [redo])
    status = dict(zip(status.run_id, status.status))
    assert status[first] == "succeeded" and status[redo[1]] != "succeeded" and status[redo[2]] != "succeeded"
    assert _query(store, "SELECT status FROM benchmarks").status.tolist() == ["cancelled"]

    again = tmp_path / "again"
    again.mkdir()

    def counted(plan, u, root, ids, threads=0):
        from ctssl_core.benchmark import _worker_unit as real

        (again / u.run_id).touch()
        return real(plan, u, root, ids, threads)

    monkeypatch.setattr(bm, "_worker_unit", counted)
    out = run_benchmark("smoke", store, over, progress=False, log=lambda m: None)
    assert out["ran"] == 2 and out["skipped"] == len(plan.runs) - 2
    assert sorted(p.name for p in again.iterdir()) == sorted(redo[1:])      # nothing finished ran again
    assert (_query(store, "SELECT status FROM runs WHERE run_id IN (SELECT unnest(?))", [redo]).status
            == "succeeded").all()

    # headline results: the summaries of the Ray-resumed store equal the local executor's on the same store
    sql = "SELECT task, init, metric, value, ci_low, ci_high FROM summaries ORDER BY ALL"
    local, viaray = _query(smoke_store, sql), _query(store, sql)
    assert len(viaray) == len(local) > 0
    assert (viaray[["task", "init", "metric"]].values == local[["task", "init", "metric"]].values).all()
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(viaray[col].to_numpy(float), local[col].to_numpy(float), rtol=1e-6, atol=1e-9,
                                   equal_nan=True)


def _command_pids(store):
    """Pids of processes whose command line names ``store`` and runs the tick job's script."""
    out = []
    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if len(cmd) > 3 and cmd[1] == b"-c" and b"tick run" in cmd[2] and cmd[3] == str(store).encode():
            out.append(int(d))
    return out


def test_a_job_command_runs_as_a_ray_task_and_is_cancelled_and_resumed_through_it(ray_local, tmp_path):
    """``ctssl worker --executor ray``: the job's runner stays here, its command is a task on the Ray instance
    (not in the runner's process group). Progress and metrics reach the store while it runs; a cancel reaches
    the command as SIGTERM (it saves its checkpoint) and the job is cancelled; the resumed job continues from
    the checkpoint on Ray. Its runner killed with -9, Ray ends the command (no copy left to run beside a
    resume); resumed again, it ends with every step logged, as on the local executor."""
    import threading

    import ctssl_core.jobs.testing  # noqa: F401 - registers the "tick" job kind
    from ctssl_core import jobs
    from ctssl_core.jobs import procs

    store = tmp_path / "store"
    address = ray_local.get_runtime_context().gcs_address
    w = jobs.Worker(store, poll_s=0.1, reconcile_every_s=0.5,
                    backend=jobs.LocalBackend(grace_s=10.0, executor="ray", ray_address=address))
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
    t.start()

    def wait_for(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if v := pred():
                return v
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}: {jobs.log_tail(store, job_id)}")

    try:
        job_id = jobs.submit(store, "tick", {"steps": 400, "interval_s": 0.04})
        job = wait_for(lambda: (j := jobs.get_job(store, job_id))["state"] == "running" and (j["step"] or 0) >= 5
                       and j, 120, "the job running on Ray with progress")
        assert job["backend"] == "ray" and "train/loss" in job["current"]
        [pid] = _command_pids(store)                           # the command, in a Ray worker's process
        assert os.getpgid(pid) != job["pgid"] and pid not in procs.group_members(job["pgid"])
        assert "the command started on the ray engine after" in jobs.log_tail(store, job_id, n_lines=50)
        assert jobs.cancel(store, job_id, wait=True) == "cancelled"
        first = jobs.get_job(store, job_id)
        rid = first["run_id"]
        log = jobs.log_tail(store, job_id, n_lines=50)
        assert "SIGTERM: checkpoint" in log                     # Ray's cancel reached the command as SIGTERM
        wait_for(lambda: not _command_pids(store), 30, "the command gone")
        saved = int(re.search(r"SIGTERM: checkpoint at step (\d+)", log).group(1))
        assert 5 <= saved < 399

        job_id = jobs.resume(store, job_id)
        job = wait_for(lambda: (j := jobs.get_job(store, job_id))["state"] == "running"
                       and (j["step"] or 0) >= saved + 20 and j, 120, "the resumed job running on")
        assert f"steps {saved + 1}..399" in jobs.log_tail(store, job_id, n_lines=50)  # from its checkpoint
        os.killpg(job["pgid"], signal.SIGKILL)                  # kill -9 the runner: Ray ends its task (the
        wait_for(lambda: not _command_pids(store), 30, "Ray ending the dead runner's command")   # owner died)
        jobs.reconcile(store)
        assert jobs.get_job(store, job_id)["state"] == "failed"

        again = jobs.resume(store, job_id)                     # nothing of the killed attempt still runs
        done = wait_for(lambda: (j := jobs.get_job(store, again))["state"] in jobs.FINAL and j, 120,
                        "the resumed job ending")
        assert done["state"] == "succeeded" and done["run_id"] == rid and done["backend"] == "ray"
        steps = _query(store, "SELECT count(DISTINCT step) AS d, max(step) AS m FROM metrics "
                              "WHERE run_id = ? AND name = 'train/loss'", [rid])
        assert steps.d[0] == 400 and steps.m[0] == 399            # every step (one logged just before the kill
                                                                  # may be logged twice, as on the local executor)
        assert _query(store, "SELECT value FROM results WHERE run_id = ?", [rid]).value.tolist() == [1 / 400]
    finally:
        stop.set()
        t.join(timeout=10)


def test_a_cuda_job_is_accepted_on_a_gpu_less_machine_when_its_worker_runs_jobs_on_a_cluster(tmp_path, ray_local):
    """The local worker refuses a ``cuda`` job on a machine without a GPU (this one); a worker whose jobs run on
    Ray or Slurm, which reserve the GPU there, takes it, at submit and again when it claims the job. A stale
    ``worker.json`` (its pid now another process's) does not count. On a Ray cluster without GPUs the job fails
    at once, saying so, instead of waiting in Ray's queue for ever."""
    import json
    import threading

    from ctssl_core import jobs
    from ctssl_core.jobs.kinds import has_gpu
    from ctssl_core.jobs.presence import WORKER_INFO, jobs_root, worker_executor

    assert not has_gpu()
    store = tmp_path / "store"
    spec = {"task": "rotation", "steps": 5, "device": "cuda"}
    with pytest.raises(jobs.JobSpecError, match="no GPU that the local worker could use.*--executor ray"):
        jobs.submit(store, "pretrain", spec)
    jobs_root(store).mkdir(parents=True, exist_ok=True)
    (jobs_root(store) / WORKER_INFO).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                            "executor": "ray"}))
    assert worker_executor(store) == "local"                  # alive pid, but no worker holds the lock
    address = ray_local.get_runtime_context().gcs_address
    w = jobs.Worker(store, poll_s=0.1, backend=jobs.LocalBackend(executor="ray", ray_address=address))
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while worker_executor(store) != "ray":
            assert time.monotonic() < deadline, "the worker never said where it runs jobs"
            time.sleep(0.05)
        job_id = jobs.submit(store, "pretrain", spec)
        assert jobs.get_job(store, job_id)["spec"]["params"]["device"] == "cuda"
        while jobs.get_job(store, job_id)["state"] not in jobs.FINAL:
            assert time.monotonic() < deadline + 60, jobs.log_tail(store, job_id)
            time.sleep(0.1)
        job = jobs.get_job(store, job_id)
        assert job["state"] == "failed" and "asks for a GPU" in job["error"] and "has none" in job["error"]
    finally:
        stop.set()
        t.join(timeout=10)
    assert worker_executor(store) == "local"                  # no worker: the local rule again
    with pytest.raises(jobs.JobSpecError, match="no GPU"):
        jobs.submit(store, "pretrain", spec)


def test_the_worker_passes_its_engine_settings_to_each_jobs_runner(tmp_path, monkeypatch):
    """``ctssl worker --executor slurm`` is refused where there is no Slurm (no ``sbatch``), and otherwise hands
    the partition, the time limit and the job's device to every job's runner (checked on the runner's argv,
    since no Slurm runs here)."""
    from ctssl_core.cli import main
    from ctssl_core.jobs import backends

    monkeypatch.setattr(backends.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="no Slurm on this machine.*login node"):
        backends.LocalBackend(executor="slurm")
    assert main(["worker", "--store", str(tmp_path / "s"), "--executor", "slurm", "--once"]) == 2
    monkeypatch.setattr(backends.shutil, "which", lambda name: f"/usr/bin/{name}")
    cmds: list = []

    class FakePopen:
        pid = 99999

        def __init__(self, cmd, **kw):
            cmds.append(cmd)

    monkeypatch.setattr(backends.subprocess, "Popen", FakePopen)
    b = backends.LocalBackend(executor="slurm", slurm_partition="gpu", slurm_timeout_min=600)
    b.start(tmp_path / "s", "job-1", ["true"], None, device="cuda")
    runner = cmds[0][:cmds[0].index("--")]
    opt = {k: runner[runner.index(k) + 1] for k in ("--executor", "--slurm-partition", "--slurm-timeout-min",
                                                    "--device")}
    assert b.name == "slurm" and opt == {"--executor": "slurm", "--slurm-partition": "gpu",
                                         "--slurm-timeout-min": "600", "--device": "cuda"}
    assert cmds[0][-1] == "true"
    backends.LocalBackend().start(tmp_path / "s", "job-2", ["true"], None, device="cuda")
    assert "--executor" not in cmds[1]                       # local: the command runs in the runner's group


def test_a_job_whose_engine_cannot_start_fails_and_says_why(tmp_path, monkeypatch):
    """The worker's engine is there, the runner's is not (here: a Ray that fails to import in the job's
    process): the job fails at once with what to do, rather than hanging or vanishing."""
    import threading

    import ctssl_core.jobs.testing  # noqa: F401 - registers the "tick" job kind
    from ctssl_core import jobs

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ray.py").write_text("raise ImportError('this Ray is broken')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    store = tmp_path / "store"
    w = jobs.Worker(store, poll_s=0.1, backend=jobs.LocalBackend(executor="ray", ray_address="auto"))
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        job_id = jobs.submit(store, "tick", {"steps": 3})
        deadline = time.monotonic() + 60
        while jobs.get_job(store, job_id)["state"] not in jobs.FINAL and time.monotonic() < deadline:
            time.sleep(0.1)
        job = jobs.get_job(store, job_id)
        assert job["state"] == "failed", jobs.log_tail(store, job_id)
        assert "could not start the command on 'ray'" in job["error"] and "pip install 'ctssl[ray]'" in job["error"]
    finally:
        stop.set()
        t.join(timeout=10)


def test_slurm_engine_runs_units_as_submitit_jobs_and_cancels_them_on_sigterm(tmp_path, monkeypatch):
    """submitit's local cluster (each unit a subprocess here; no Slurm on CI): results reach the units that
    need them; SIGTERM to the benchmark process cancels the running job (SIGINT: it unwinds) and is raised
    as a SIGTERM stop; without Slurm, executor=slurm is refused with what to do."""
    import submitit

    from ctssl_core.executors import SlurmEngine, run_in_order

    driver, marks = os.getpid(), tmp_path / "marks"
    marks.mkdir()

    def unit(name, got):                                      # runs in a submitit job (a subprocess)
        if name == "stop":
            os.kill(driver, signal.SIGTERM)
            time.sleep(120)                                   # interrupted by the cancel long before
        (marks / name).touch()
        return f"{name}({got})"

    def run(units):
        engine = SlurmEngine(tmp_path / "jobs", cluster="local")
        engine.poll_s = 0.05
        return sorted(r for _, r in run_in_order(engine, units, {}, unit, args=lambda u, ids: (u[0], ids.get(u[1])),
                                                 needs=lambda u: u[1], provides=lambda u: u[0],
                                                 resources=lambda u: Resources(1, "cpu")))

    term_before = signal.getsignal(signal.SIGTERM)
    assert run([("p", None), ("f", "p")]) == ["f(p(None))", "p(None)"]
    with pytest.raises(KeyboardInterrupt) as stop:
        run([("p", None), ("stop", "p")])
    assert getattr(stop.value, "signal", None) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is term_before
    assert sorted(p.name for p in marks.iterdir()) == ["f", "p"]     # the cancelled unit never finished

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: -1))
    with pytest.raises(ConfigError, match="no Slurm on this machine"):
        SlurmEngine(tmp_path / "jobs")
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ConfigError, match=r"pip install 'ctssl\[slurm\]'"):
        check_executor("slurm")
