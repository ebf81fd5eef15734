"""Job system: queue, validation, worker, runner, cancel, kill -9 + reconcile + resume, concurrency.

Jobs are the ``tick`` test kind (ctssl_core/jobs/testing.py): a real process
that logs through RunLogger, checkpoints its step, saves on SIGTERM and
resumes — everything the queue cares about, without training.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ctssl_core.jobs.testing  # noqa: F401 - registers the "tick" kind
from ctssl_core import jobs
from ctssl_core.cli import main
from ctssl_core.db import connect
from ctssl_core.jobs import kinds, procs, queue
from ctssl_core.paths import REPO_ROOT, store_paths
from ctssl_core.results import write as W

PLUGIN = "ctssl_core.jobs.testing"


def wait_for(pred, timeout=60.0, every=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def q(store, sql, params=()):
    with connect(store_paths(store).db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def worker(store):
    """An in-process worker loop in a thread; stops it and kills leftover job groups after the test."""
    started: list = []

    def _start(**kw):
        w = jobs.Worker(store, poll_s=0.1, reconcile_every_s=0.5, **kw)
        stop = threading.Event()
        t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
        t.start()
        started.append((w, stop, t))
        return w

    yield _start
    for w, stop, t in started:
        stop.set()
        t.join(timeout=10)
        for h, _ in list(w.handles.values()):
            procs.kill_group(h.pgid)
            if h.native is not None:
                h.native.wait(timeout=10)


def job_state(store, job_id):
    return jobs.get_job(store, job_id)["state"]


# --------------------------------------------------------------------------- happy path


def test_submit_run_succeeded_with_metrics_and_result(store):
    job_id = jobs.submit(store, "tick", {"steps": 8, "interval_s": 0.01})
    assert job_state(store, job_id) == "queued"
    jobs.Worker(store, poll_s=0.1).run(once=True)
    job = jobs.get_job(store, job_id)
    assert job["state"] == "succeeded" and job["error"] is None
    assert job["progress"] == 1.0 and job["total"] == 8 and job["attempts"] == 1
    assert job["pid"] and job["pgid"] == job["pid"]  # its own process group
    rid = job["run_id"]
    assert rid and jobs.job_run_ids(store, job_id) == [rid]
    assert q(store, "SELECT count(*), count(DISTINCT step), max(step) FROM metrics WHERE run_id=?", [rid]) == [
        (16, 8, 7)]
    assert q(store, "SELECT status FROM runs WHERE run_id=?", [rid]) == [("succeeded",)]
    assert q(store, "SELECT metric, value FROM results WHERE run_id=?", [rid]) == [("final_loss", 1 / 8)]
    tail = jobs.log_tail(store, job_id)
    assert "done" in tail and "succeeded" in tail.splitlines()[-1]
    assert not procs.is_alive(job["pid"])
    with pytest.raises(jobs.JobStateError, match="already succeeded"):
        jobs.cancel(store, job_id)


def test_failing_command_marks_job_failed_with_exit_code_and_log(store):
    job_id = jobs.submit(store, "tick", {"steps": 10, "interval_s": 0.01, "fail_at": 2})
    jobs.Worker(store, poll_s=0.1).run(once=True)
    job = jobs.get_job(store, job_id)
    assert job["state"] == "failed"
    assert "exit code 3" in job["error"] and "failing on purpose" in job["error"]
    # the command never closed its run: the runner did, and kept the metrics of steps 0..2
    assert q(store, "SELECT status FROM runs WHERE run_id=?", [job["run_id"]]) == [("failed",)]
    assert q(store, "SELECT count(DISTINCT step) FROM metrics") == [(3,)]


# --------------------------------------------------------------------------- validation


def test_invalid_input_rejected_with_message_and_nothing_queued(store):
    bad = [
        ("finetune", {"task": "pe", "fraction": -0.05}, "fraction must be >"),
        ("finetune", {"task": "pe", "fraction": 0.0}, "fraction must be >"),
        ("finetune", {"task": "pe", "fraction": 1.5}, "fraction must be <="),
        ("finetune", {"task": "pe", "fraction": float("nan")}, "not a finite number"),
        ("finetune", {"task": "pe", "init": "masked_region"}, "unknown checkpoint 'masked_region'"),
        ("finetune", {"task": "pe", "init": "../../etc/passwd"}, "looks like a path"),
        ("finetune", {"task": "pe", "init": "/tmp/ckpt.pt"}, "looks like a path"),
        ("finetune", {"task": "pe; rm -rf ~"}, "not allowed"),
        ("finetune", {"task": "$(reboot)"}, "not allowed"),
        ("finetune", {"task": "segmentation"}, "unknown task 'segmentation'"),
        ("finetune", {"task": "pe", "steps": 0}, "steps must be >= 1"),
        ("finetune", {"task": "pe", "seed": "one"}, "expected an integer"),
        ("finetune", {"task": "pe", "lr": 0.1}, "unknown config key"),
        ("embed", {"checkpoint": "no-such-run"}, "unknown checkpoint"),
        ("tick", {"steps": -1}, "steps must be >= 1"),
        ("shell", {}, "unknown job kind"),
    ]
    for kind, params, msg in bad:
        with pytest.raises(jobs.JobSpecError, match=msg.replace("(", r"\(").replace(")", r"\)")
                           .replace("$", r"\$").replace("?", r"\?")):
            jobs.submit(store, kind, params)
    assert jobs.list_jobs(store).empty


def test_checkpoints_in_store_become_valid_choices(store):
    rid = W.new_run_id("pretrain", "masked_region", "random")
    run_dir = W.start_run(store, rid, "pretrain", "masked_region", "random", "tiny", {})
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    W.finish_run(store, rid, "succeeded", checkpoint=ckpt)
    # a second succeeded run whose checkpoint file is gone is not offered
    rid2 = "pretrain-rotation-random-gone"
    W.start_run(store, rid2, "pretrain", "rotation", "random", "tiny", {})
    W.finish_run(store, rid2, "succeeded", checkpoint="runs/x/missing.pt")
    choices = jobs.field_choices("finetune", store)
    assert choices["init"] == ["random", "masked_region", rid]
    assert "pe" in choices["task"] and "smoke" in choices["profile"]
    for init in ("masked_region", rid, "random"):
        job_id = jobs.submit(store, "finetune", {"task": "pe", "init": init, "fraction": 0.05, "device": "cpu"})
        argv = jobs.build_argv("finetune", jobs.validate_spec("finetune", jobs.get_job(store, job_id)["spec"]
                                                              ["params"], store), store)
        assert argv[1:4] == ["-m", "ctssl_core.cli", "finetune"]
        assert argv[argv.index("--init") + 1] == init and argv[argv.index("--fraction") + 1] == "0.05"
    with pytest.raises(jobs.JobSpecError, match="unknown checkpoint 'rotation'"):
        jobs.submit(store, "finetune", {"task": "pe", "init": "rotation"})
    assert len(jobs.list_jobs(store)) == 3


def test_claim_is_exactly_once_across_threads_and_respects_slots(store, monkeypatch):
    ids = {jobs.submit(store, "tick", {"steps": 1}) for _ in range(6)}
    got: list[str] = []
    lock = threading.Lock()

    def claimer(name):
        while True:
            j = queue.claim(store, name, ("cpu",))
            if j is None:
                return
            with lock:
                got.append(j["job_id"])

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == sorted(ids)  # every job claimed, none twice
    if not kinds.has_gpu():
        with pytest.raises(jobs.JobSpecError, match="no GPU"):
            queue.submit(store, "finetune", {"task": "pe", "device": "cuda"})
        monkeypatch.setattr(kinds, "has_gpu", lambda: True)
    gpu_job = queue.submit(store, "finetune", {"task": "pe", "device": "cuda"})
    assert queue.claim(store, "w", ("cpu",)) is None  # a GPU job waits for a GPU slot
    assert queue.claim(store, "w", ("gpu",))["job_id"] == gpu_job


# --------------------------------------------------------------------------- cancel / kill / resume


def test_cancel_running_job_kills_group_no_zombie(store, worker):
    w = worker()
    job_id = jobs.submit(store, "tick", {"steps": 5000, "interval_s": 0.05})
    job = wait_for(lambda: (j := jobs.get_job(store, job_id))["state"] == "running" and (j["step"] or 0) >= 3 and j,
                   what="job running with progress")
    assert 0 < job["progress"] < 0.01 and "train/loss" in job["current"]
    pgid = job["pgid"]
    assert procs.group_members(pgid)  # runner + command
    assert jobs.cancel(store, job_id, wait=True) == "cancelled"
    wait_for(lambda: not procs.group_members(pgid, include_zombies=True), 10, what="group gone and reaped")
    wait_for(lambda: job_id not in w.handles, 10, what="worker dropping the handle")
    assert not Path(f"/proc/{job['pid']}").exists()  # reaped: no zombie
    final = jobs.get_job(store, job_id)
    assert final["state"] == "cancelled" and final["cancel_requested"]
    assert "SIGTERM: checkpoint" in jobs.log_tail(store, job_id)  # the command saved on SIGTERM
    assert q(store, "SELECT status FROM runs WHERE run_id=?", [final["run_id"]]) == [("cancelled",)]
    assert jobs.cancel(store, job_id) == "cancelled"  # idempotent
    # a queued job cancels without a process
    w.slots["cpu"] = 0  # nothing gets claimed now (set before submitting: the worker polls)
    queued = jobs.submit(store, "tick", {"steps": 1, "fail_at": 0})
    assert jobs.cancel(store, queued) == "cancelled"


def test_cancel_escalates_to_sigkill_after_grace(store):
    """A command that does not stop on SIGTERM (here: mid-way through a 5 s sleep) is killed after the grace."""
    w = jobs.Worker(store, poll_s=0.1, backend=jobs.LocalBackend(grace_s=1.0))
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        job_id = jobs.submit(store, "tick", {"steps": 100, "interval_s": 5.0})
        job = wait_for(lambda: (j := jobs.get_job(store, job_id))["run_id"] and j["step"] is not None and j,
                       what="job logging")
        assert jobs.cancel(store, job_id) == "running"  # asynchronous: the runner finishes the job
        wait_for(lambda: job_state(store, job_id) == "cancelled", 30, what="cancelled")
        wait_for(lambda: not procs.group_members(job["pgid"], include_zombies=True), 15, what="group gone")
        log = jobs.log_tail(store, job_id)
        assert "SIGKILL" in log and "SIGTERM: checkpoint" not in log
    finally:
        stop.set()
        t.join(timeout=10)


def test_kill9_marked_failed_metrics_kept_then_resumed_to_completion(store, worker):
    worker()
    job_id = jobs.submit(store, "tick", {"steps": 50, "interval_s": 0.2})  # ~10 s: still running when killed
    job = wait_for(lambda: (j := jobs.get_job(store, job_id))["run_id"] and (j["step"] or 0) >= 15 and j,
                   what="job past step 15")
    rid = job["run_id"]
    wait_for(lambda: q(store, "SELECT count(*) FROM metrics")[0][0] > 0, 20, what="a first merge")
    os.killpg(job["pgid"], signal.SIGKILL)  # kill -9 the whole job: no handler runs
    wait_for(lambda: not procs.is_alive(job["pid"]), 10, what="the kernel ending the runner")
    jobs.reconcile(store)  # the next check (the worker's own loop may have got there first)
    failed = jobs.get_job(store, job_id)
    assert failed["state"] == "failed" and "is gone" in failed["error"]
    # every whole line the dead process wrote is in the store, exactly once
    lines = (store_paths(store).run_dir(rid) / "metrics.jsonl").read_text().splitlines()
    assert q(store, "SELECT count(*) FROM metrics WHERE run_id=?", [rid]) == [(2 * len(lines),)]
    assert q(store, "SELECT status FROM runs WHERE run_id=?", [rid]) == [("failed",)]
    new_id = jobs.resume(store, job_id)
    assert jobs.get_job(store, new_id)["spec"]["resume_run"] == rid
    done = wait_for(lambda: (j := jobs.get_job(store, new_id))["state"] in jobs.FINAL and j, 60,
                    what="resumed job finishing")
    assert done["state"] == "succeeded" and done["run_id"] == rid
    first = int(re.search(r"steps (\d+)\.\.49", jobs.log_tail(store, new_id)).group(1))
    assert 15 <= first <= len(lines)  # continued from its checkpoint, not from 0
    assert q(store, "SELECT count(DISTINCT step), max(step) FROM metrics WHERE run_id=?", [rid]) == [(50, 49)]
    assert q(store, "SELECT status FROM runs WHERE run_id=?", [rid]) == [("succeeded",)]
    with pytest.raises(jobs.JobStateError, match="only failed or cancelled"):
        jobs.resume(store, new_id)


def test_dead_runner_with_unknown_pid_is_failed_by_reconcile(store):
    """A row left 'running' by a machine restart: pid does not exist (or is someone else's)."""
    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, "w", ("cpu",))["job_id"] == job_id
    queue.set_started(store, job_id, os.getpid(), 999999)  # alive but not our runner: a reused pid
    changed = jobs.reconcile(store)
    assert [c[0] for c in changed] == [job_id] and "is gone" in changed[0][1]
    assert job_state(store, job_id) == "failed"
    assert jobs.reconcile(store) == []  # idempotent


# --------------------------------------------------------------------------- worker lock, CLI


def test_only_one_worker_per_store(store):
    w1 = jobs.Worker(store)
    w1.acquire()
    try:
        assert jobs.worker_running(store) == os.getpid()
        with pytest.raises(jobs.WorkerBusy, match="already serves"):
            jobs.Worker(store).acquire()
        assert jobs.ensure_worker(store) is None  # no second worker started
    finally:
        w1.release()
    assert jobs.worker_running(store) is None


def test_cli_parity_submit_list_cancel_resume_logs(store, capsys, monkeypatch):
    monkeypatch.setenv("CTSSL_JOB_PLUGINS", PLUGIN)
    s = ["--store", str(store)]
    assert main(["jobs", *s, "submit", "tick", "steps=3", "interval_s=0.01", "--no-worker"]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[0]
    assert job_state(store, job_id) == "queued"
    assert main(["jobs", *s, "list"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", *s, "kinds"]) == 0
    assert "fraction" in capsys.readouterr().out
    assert main(["jobs", *s, "submit", "tick", "steps=-3", "--no-worker"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["jobs", *s, "cancel", job_id]) == 0
    assert job_state(store, job_id) == "cancelled"
    assert main(["jobs", *s, "resume", job_id]) == 0
    new_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert new_id != job_id and job_state(store, new_id) == "queued"
    assert main(["jobs", *s, "logs", "job-nope"]) == 2
    assert "no job" in capsys.readouterr().err
    # a real worker process runs the queued job to completion
    env = {**os.environ, "CTSSL_JOB_PLUGINS": PLUGIN}
    r = subprocess.run([sys.executable, "-m", "ctssl_core.cli", "worker", "--store", str(store), "--once"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert job_state(store, new_id) == "succeeded"
    assert main(["jobs", *s, "logs", new_id]) == 0
    assert "done" in capsys.readouterr().out
    assert len(jobs.list_jobs(store)) == 2  # the invalid submit queued nothing


# --------------------------------------------------------------------------- concurrency (the one long test)


@pytest.mark.slow
def test_two_jobs_at_20hz_and_a_polling_reader_no_lock_errors_exact_rows(store):
    """Two jobs log 600 lines each at ~20/s (2 metrics a line) while this process polls every second,
    as the dashboard does. The worker is its own process, like in production."""
    steps = 600
    ids = [jobs.submit(store, "tick", {"steps": steps, "interval_s": 0.05}) for _ in range(2)]
    env = {**os.environ, "CTSSL_JOB_PLUGINS": PLUGIN}
    wproc = subprocess.Popen([sys.executable, "-m", "ctssl_core.cli", "worker", "--store", str(store),
                              "--once", "--max-cpu-jobs", "2"], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    errors: list[str] = []
    polls = 0
    both_running = False
    try:
        while wproc.poll() is None:
            t = time.monotonic()
            try:
                df = jobs.list_jobs(store)
                both_running |= bool((df["state"] == "running").sum() == 2)
                with connect(store_paths(store).db, read_only=True) as con:
                    con.execute("SELECT run_id, count(*) FROM metrics GROUP BY run_id").fetchall()
                polls += 1
            except Exception as e:  # noqa: BLE001 - any error here is what the test forbids
                errors.append(repr(e))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
        out = wproc.stdout.read()
    finally:
        if wproc.poll() is None:
            wproc.kill()
        wproc.wait()
    assert wproc.returncode == 0, out
    assert errors == []
    assert both_running and polls >= 25
    for job_id in ids:
        job = jobs.get_job(store, job_id)
        assert job["state"] == "succeeded", job["error"]
        assert q(store, "SELECT count(*), count(DISTINCT step) FROM metrics WHERE run_id=?", [job["run_id"]]) == [
            (2 * steps, steps)]
    assert q(store, "SELECT count(*) FROM metrics") == [(2 * 2 * steps,)]


# --------------------------------------------------------------------------- real kinds


@pytest.mark.slow
def test_real_pretrain_job_on_tiny_store_feeds_the_finetune_form(store_copy):
    """`ctssl pretrain` through the queue; its checkpoint then becomes a fine-tuning choice whose
    argv names it (running the fine-tuning too would double this test's time on 2 cores)."""
    store = store_copy
    pre = jobs.submit(store, "pretrain", {"task": "rotation", "steps": 3, "profile": "smoke", "device": "cpu"})
    jobs.Worker(store, poll_s=0.2).run(once=True)
    job = jobs.get_job(store, pre)
    assert job["state"] == "succeeded", jobs.log_tail(store, pre)
    assert job["progress"] == 1.0 and job["step"] == 3 and job["run_id"].startswith("pretrain-rotation-")
    assert q(store, "SELECT kind, status FROM runs WHERE run_id=?", [job["run_id"]]) == [("pretrain", "succeeded")]
    assert q(store, "SELECT count(*) FROM metrics WHERE run_id=? AND name='train/loss'", [job["run_id"]])[0][0] > 0
    choices = jobs.field_choices("finetune", store)["init"]
    assert "rotation" in choices and job["run_id"] in choices
    spec = jobs.validate_spec("finetune", {"task": "pe", "init": job["run_id"], "steps": 3, "device": "cpu"}, store)
    argv = jobs.build_argv("finetune", spec, store)
    assert argv[argv.index("--init") + 1] == job["run_id"] and "downstream.train.steps=3" in argv


# --------------------------------------------------------------------------- relative --store (issue 13 item 4)


def test_relative_store_is_resolved_once_against_the_callers_folder(tmp_path, monkeypatch, capsys):
    """`ctssl jobs submit --store rel` from /somewhere and the worker it starts (which runs in the
    repository folder) must name the same store: the absolute path of /somewhere/rel."""
    monkeypatch.setenv("CTSSL_JOB_PLUGINS", PLUGIN)
    monkeypatch.chdir(tmp_path)
    started: list = []
    monkeypatch.setattr(jobs, "ensure_worker", lambda store, **kw: started.append(store) or 4321)
    assert main(["jobs", "--store", "rel", "submit", "tick", "steps=2"]) == 0
    job_id = capsys.readouterr().out.splitlines()[0]
    expected = (tmp_path / "rel").resolve()
    assert started == [expected] and expected.is_absolute()
    assert jobs.get_job(expected, job_id)["spec"]["store"] == str(expected)
    assert not (REPO_ROOT / "rel").exists()
    # the worker command resolves a relative --store the same way
    served: list = []

    class FakeWorker:
        def __init__(self, store, **kw):
            served.append(store)
            self.worker_id = "w"

        def run(self, **kw):
            pass

    monkeypatch.setattr(jobs, "Worker", FakeWorker)
    assert main(["worker", "--store", "rel", "--once"]) == 0
    assert served == [expected]
    # the library entry points that start processes in the repository folder resolve it too
    from ctssl_core.jobs import backends, worker as worker_mod

    cmds: list = []

    class FakePopen:
        pid = 99999

        def __init__(self, cmd, **kw):
            cmds.append((cmd, kw.get("cwd")))

    monkeypatch.setattr(backends.subprocess, "Popen", FakePopen)
    backends.LocalBackend().start(Path("rel"), job_id, ["true"], None)
    worker_mod.ensure_worker("rel")
    for cmd, cwd in cmds:
        assert cwd == REPO_ROOT and cmd[cmd.index("--store") + 1] == str(expected)
    assert len(cmds) == 2
    assert worker_mod.Worker("rel").store_root == expected
    assert queue.absolute_store("~/x") == (Path.home() / "x").resolve()
