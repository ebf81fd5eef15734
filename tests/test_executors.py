"""Unit engines (ctssl_core/executors.py): the smoke benchmark's units on a local Ray instance, cancelled
by SIGTERM mid-run and resumed, against the local executor's results on the same store."""

from __future__ import annotations

import os
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
            if (calls / "driver.running").exists():             # never signal the process after the benchmark
                os.kill(driver, signal.SIGTERM)                 # the job queue's cancel (a late one once hit
            else:                                               # another test, minutes later)
                raise RuntimeError("the benchmark ended before this unit could cancel it")
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
    assert _query(store, "SELECT status FROM benchmarks").status.tolist() == ["failed"]

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
