"""Job reliability defects (issue 13, Jobs items 1 and 5): deterministic, no sleeps.

- reconcile/cancel may signal a process group only when the recorded pid is verified to be
  this job's runner on this host; a job claimed on another host is never reconciled from here.
- a fine-tune stopped by a signal (``FitResult.stopped == 'signal'``) is recorded as cancelled
  and writes no results.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

import ctssl_core.jobs.testing  # noqa: F401 - registers the "tick" kind
from ctssl_core import jobs
from ctssl_core.db import connect
from ctssl_core.jobs import procs, queue
from ctssl_core.paths import store_paths


def q(store, sql, params=()):
    with connect(store_paths(store).db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


# --------------------------------------------------------------------------- finetune stopped by a signal


@pytest.mark.parametrize("stopped", ["signal", "completed"])
def test_finetune_stopped_by_signal_is_cancelled_without_results(store_copy, monkeypatch, stopped):
    """The fit returns early on SIGTERM; the fine-tune must not score, write results or say 'succeeded'."""
    from ctssl_core import train as train_mod
    from ctssl_core.finetune import FinetuneConfig, finetune

    def fake_fit(task, encoder, loader, tcfg, head=None, **kw):  # noqa: ARG001 - fit's signature
        return train_mod.FitResult(start_step=0, step=3, first_loss=1.0, final_loss=0.9, stopped=stopped,
                                   head=head)

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    cfg = FinetuneConfig(task="pe", n_boot=10, train={"steps": 4, "batch_size": 4, "device": "cpu"})
    from ctssl_core.results.write import merge_pending

    if stopped == "signal":
        with pytest.raises(KeyboardInterrupt, match="stopped by signal at step 3"):
            finetune(cfg, store_copy, run_id="ft-cancelled")
        assert q(store_copy, "SELECT count(*) FROM runs WHERE run_id = 'ft-cancelled'") == [(0,)]   # folder only
        merge_pending(store_copy)                                                   # as its driver does
        assert q(store_copy, "SELECT status FROM runs WHERE run_id = 'ft-cancelled'") == [("cancelled",)]
        assert q(store_copy, "SELECT count(*) FROM results WHERE run_id = 'ft-cancelled'") == [(0,)]
    else:  # control: the same fake fit, completed, does score and succeed
        res = finetune(cfg, store_copy, run_id="ft-done")
        merge_pending(store_copy)
        assert res.run_id == "ft-done" and res.metrics
        assert q(store_copy, "SELECT status FROM runs WHERE run_id = 'ft-done'") == [("succeeded",)]
        assert q(store_copy, "SELECT count(*) FROM results WHERE run_id = 'ft-done'")[0][0] == len(res.metrics)


# --------------------------------------------------------------------------- reconcile / cancel: whose process?


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def spawn():
    """Start real processes (own session unless a process group is given: 0 = a new group in this
    session, so a second process can join it); SIGKILL and reap them afterwards."""
    started: list[subprocess.Popen] = []

    def _spawn(argv=("sleep", "120"), env=None, group=None):
        kw = {"process_group": group} if group is not None else {"start_new_session": True}
        p = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, **kw)
        started.append(p)
        return p

    yield _spawn
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


@pytest.fixture
def signals(monkeypatch):
    """Record every group signal and every single-process kill the queue sends (then really send it)."""
    sent: list[tuple[str, int, int]] = []
    real_killpg, real_kill = os.killpg, os.kill

    def killpg(pgid, sig):  # procs.signal_group / kill_group end here
        sent.append(("group", int(pgid), int(sig)))
        return real_killpg(pgid, sig)

    def kill(pid, sig):
        sent.append(("pid", int(pid), int(sig)))
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "killpg", killpg)
    monkeypatch.setattr(os, "kill", kill)
    return sent


def dead_pid(spawn) -> int:
    p = spawn(("true",))
    p.wait(timeout=10)
    return p.pid


def running_job(store, claimed_by: str, pid, pgid) -> str:
    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, claimed_by, ("cpu",))["job_id"] == job_id
    queue.set_started(store, job_id, pid, pgid)
    return job_id


def here() -> str:
    return f"{procs.this_host()}:4242"


def test_reconcile_never_kills_a_program_that_reused_the_pid(store, spawn, signals):
    """Recorded pid is alive but is a `setsid sleep`, not our runner: the job fails, the sleep lives."""
    other = spawn()
    job_id = running_job(store, here(), other.pid, other.pid)
    changed = jobs.reconcile(store)
    assert [c[0] for c in changed] == [job_id] and "is gone" in changed[0][1]
    assert jobs.get_job(store, job_id)["state"] == "failed"
    assert signals == [] and other.poll() is None


def test_reconcile_of_a_dead_runner_spares_a_new_group_with_its_pgid(store, spawn, signals):
    """The runner died; its pgid now leads a `setsid sleep`: nothing is signalled."""
    other = spawn()
    job_id = running_job(store, here(), dead_pid(spawn), other.pid)
    assert [c[0] for c in jobs.reconcile(store)] == [job_id]
    assert signals == [] and other.poll() is None


def test_runner_command_line_with_another_start_time_is_a_reused_pid(store, spawn, signals, monkeypatch):
    """Same command line as our runner but a different start tick: not ours, never killed."""
    other = spawn()
    job_id = running_job(store, here(), other.pid, other.pid)  # records the sleep's real start tick
    argv = [sys.executable, "-m", queue.RUNNER_MARKER, "--store", str(store), "--job", job_id, "--", "x"]
    real_cmdline, real_ticks = procs.cmdline, procs.start_ticks
    monkeypatch.setattr(procs, "cmdline", lambda pid: argv if pid == other.pid else real_cmdline(pid))
    monkeypatch.setattr(procs, "start_ticks", lambda pid: real_ticks(pid) + 1 if pid == other.pid else real_ticks(pid))
    assert not queue.runner_verified(store, job_id, other.pid)
    changed = jobs.reconcile(store)
    assert [c[0] for c in changed] == [job_id] and "is gone" in changed[0][1]
    assert signals == [] and other.poll() is None


@pytest.mark.parametrize("heartbeat_age_s", [3600, -3600])
def test_verified_runner_with_a_stale_heartbeat_is_alive_not_hung(store, spawn, signals, as_runner,
                                                                   heartbeat_age_s):
    """Item 2: the heartbeat row is an hour old (store held busy, or the wall clock stepped forward)
    or an hour in the future (clock stepped back), but the runner is alive and verified: the job is
    left running and nothing is signalled. Before, it was SIGKILLed as 'hung' after 60 s."""
    runner = spawn()
    job_id = running_job(store, here(), runner.pid, runner.pid)
    as_runner(store, job_id, runner.pid)
    assert queue.runner_verified(store, job_id, runner.pid)
    assert not queue.runner_verified(store, "job-20000101-000000-abcdef", runner.pid)  # another job's id
    with connect(store_paths(store).db) as con:
        con.execute("UPDATE jobs SET heartbeat_at = heartbeat_at - to_seconds(?::BIGINT), "
                    "started_at = started_at - to_seconds(?::BIGINT) WHERE job_id = ?",
                    [heartbeat_age_s, heartbeat_age_s, job_id])
    assert jobs.reconcile(store) == [] and jobs.reconcile(store, start_grace_s=-1.0) == []
    assert jobs.get_job(store, job_id)["state"] == "running"
    assert signals == [] and runner.poll() is None
    # control: the same verified runner is killed with its whole group when the job is (kill_job)
    assert queue.kill_job(store, job_id, runner.pid, runner.pid) == [runner.pid]
    assert signals == [("group", runner.pid, int(signal.SIGKILL))]
    assert runner.wait(timeout=10) == -signal.SIGKILL
    changed = jobs.reconcile(store)  # and once it is gone, reconcile notices at once
    assert [c[0] for c in changed] == [job_id] and "is gone" in changed[0][1]


def test_orphans_of_a_dead_runner_are_killed_one_by_one_strangers_in_the_group_are_not(store, spawn, signals):
    """Runner killed -9: its command (CTSSL_JOB_ID in its environment) is killed; a stranger that
    shares the process group is not, and the group as a whole is never signalled."""
    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, here(), ("cpu",))["job_id"] == job_id
    orphan = spawn(env={queue.JOB_ID_ENV: job_id}, group=0)
    stranger = spawn(group=orphan.pid)
    queue.set_started(store, job_id, dead_pid(spawn), orphan.pid)
    assert [c[0] for c in jobs.reconcile(store)] == [job_id]
    assert signals == [("pid", orphan.pid, int(signal.SIGKILL))]
    assert orphan.wait(timeout=10) == -signal.SIGKILL and stranger.poll() is None


def test_job_claimed_on_another_host_is_never_reconciled_or_signalled_from_here(store, spawn, signals):
    """A dashboard on another machine sharing the store: the pids in the row are not this machine's."""
    other = spawn()
    job_id = running_job(store, "gpu-node-7.example:991", dead_pid(spawn), other.pid)
    assert jobs.reconcile(store, start_grace_s=-1.0) == []
    assert jobs.get_job(store, job_id)["state"] == "running"
    assert queue.cancel(store, job_id) == "running"  # only asks; that host's runner stops it
    assert q(store, "SELECT cancel_requested FROM jobs WHERE job_id = ?", [job_id]) == [(True,)]
    assert signals == [] and other.poll() is None
    # the same row claimed here (host matches) is judged: its runner is gone
    job_here = running_job(store, here(), dead_pid(spawn), other.pid)
    assert [c[0] for c in jobs.reconcile(store)] == [job_here]


def test_cancel_signals_only_a_verified_runner(store, spawn, signals):
    """Cancel of a job whose recorded pid/pgid now belong to a `setsid sleep`: the sleep is not
    signalled; waiting cancel finds no process of the job and records it cancelled at once."""
    other = spawn()
    job_id = running_job(store, here(), other.pid, other.pid)
    assert queue.cancel(store, job_id) == "running"
    assert q(store, "SELECT cancel_requested FROM jobs WHERE job_id = ?", [job_id]) == [(True,)]
    assert queue.cancel(store, job_id, wait=True) == "cancelled"
    assert signals == [] and other.poll() is None


def test_claim_host_parsing():
    assert queue.claim_host("node-1.example:123") == "node-1.example"
    assert queue.claim_host("w") is None and queue.claim_host(None) is None
    assert queue.claimed_here("w") and queue.claimed_here(here())
    assert not queue.claimed_here("node-that-is-not-this-one:1")


# --------------------------------------------------------------------------- item 3: a restarted worker


class RecordingBackend:
    """A backend that starts nothing: records which jobs the worker started (no pid yet)."""

    name = "local"
    grace_s = 10.0

    def __init__(self):
        self.started: list[str] = []

    def start(self, store_root, job_id, argv, total, device="auto"):  # noqa: ARG002 - Backend signature
        self.started.append(job_id)
        return jobs.Handle(job_id, None, None)

    def poll(self, handle):  # noqa: ARG002
        return None

    def cancel(self, handle):  # noqa: ARG002
        pass


@pytest.fixture
def as_runner(monkeypatch):
    """Make chosen live pids look like a job's runner (their command line names the runner module and
    the job id); their real start tick is recorded by set_started, so everything else is verified."""
    fake: dict[int, list[str]] = {}
    real_cmdline = procs.cmdline
    monkeypatch.setattr(procs, "cmdline", lambda pid: fake.get(pid) or real_cmdline(pid))

    def _as_runner(store, job_id, pid):
        fake[pid] = [sys.executable, "-m", queue.RUNNER_MARKER, "--store", str(store), "--job", job_id, "--", "x"]
    return _as_runner


def test_restarted_worker_counts_jobs_still_running_against_its_slots(store, spawn, as_runner):
    """Worker 1 started a job and was killed -9; the job's runner lives on. Worker 2 (max 1 CPU job)
    must not start a second job until that one has ended."""
    old_runner = spawn()
    adopted = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, f"{procs.this_host()}:1111", ("cpu",))["job_id"] == adopted  # the dead worker
    queue.set_started(store, adopted, old_runner.pid, old_runner.pid)
    as_runner(store, adopted, old_runner.pid)
    waiting = jobs.submit(store, "tick", {"steps": 1})
    backend = RecordingBackend()
    w = jobs.Worker(store, max_cpu_jobs=1, backend=backend, reconcile_every_s=0.0)
    assert queue.running_here(store) == {adopted: "cpu"}
    assert w.free() == {"cpu": 0, "gpu": 1}
    assert w.step() == 0 and backend.started == []
    assert jobs.get_job(store, adopted)["state"] == "running" and jobs.get_job(store, waiting)["state"] == "queued"
    # the adopted job ends (its runner dies): reconcile marks it and its slot is free again
    old_runner.kill()
    old_runner.wait(timeout=10)
    assert w.step() == 1 and backend.started == [waiting]
    assert jobs.get_job(store, adopted)["state"] == "failed"
    # the worker's own job is counted once (its handle), not twice: a third job waits
    third = jobs.submit(store, "tick", {"steps": 1})
    assert w.free() == {"cpu": 0, "gpu": 1} and w.step() == 0
    assert jobs.get_job(store, third)["state"] == "queued"


def test_running_jobs_of_another_host_or_with_a_dead_runner_hold_no_slot_here(store, spawn):
    other = spawn()
    remote = running_job(store, "gpu-node-7.example:991", other.pid, other.pid)
    dead = running_job(store, here(), dead_pid(spawn), None)
    assert queue.running_here(store) == {}
    assert jobs.Worker(store, max_cpu_jobs=1, backend=RecordingBackend()).free()["cpu"] == 1
    assert {jobs.get_job(store, j)["state"] for j in (remote, dead)} == {"running"}


# --------------------------------------------------------------------------- item 5: one grace, one resume


class FakeClock:
    """``queue._clock``/``queue._sleep``: time moves only when the code under test sleeps."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_waiting_cancel_never_sigkills_before_the_runners_grace(store, spawn, signals, as_runner, monkeypatch):
    """The worker ran with --grace 30 (recorded with the job); the command ignores SIGTERM while it
    saves. `ctssl jobs cancel` must not SIGKILL before 30 s (it used its own 10 s)."""
    runner = spawn(("sh", "-c", "trap '' TERM; sleep 120"))
    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, here(), ("cpu",))["job_id"] == job_id
    queue.set_started(store, job_id, runner.pid, runner.pid, grace_s=30.0)
    as_runner(store, job_id, runner.pid)
    assert queue.job_grace(store, job_id) == 30.0
    clock = FakeClock()
    monkeypatch.setattr(queue, "_clock", clock)
    monkeypatch.setattr(queue, "_sleep", clock.sleep)
    killed_at: list[float] = []
    real_kill_job = queue.kill_job
    monkeypatch.setattr(queue, "kill_job", lambda *a: killed_at.append(clock.t - 1000.0) or real_kill_job(*a))
    assert queue.cancel(store, job_id, wait=True) == "cancelled"
    assert killed_at and killed_at[0] >= 30.0
    assert signals[0] == ("group", runner.pid, int(signal.SIGTERM))
    assert ("group", runner.pid, int(signal.SIGKILL)) in signals
    assert runner.wait(timeout=10) == -signal.SIGKILL


def test_grace_defaults_to_the_one_setting_when_nothing_was_recorded(store):
    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.job_grace(store, job_id) == queue.DEFAULT_GRACE_S
    queue.job_dir(store, job_id).mkdir(parents=True)
    (queue.job_dir(store, job_id) / queue.PROC_FILE).write_text("{not json")
    assert queue.job_grace(store, job_id) == queue.DEFAULT_GRACE_S
    assert jobs.LocalBackend().grace_s == queue.DEFAULT_GRACE_S
    from ctssl_core.jobs.runner import _parse
    assert _parse(["--store", "s", "--job", job_id, "--", "true"]).grace == queue.DEFAULT_GRACE_S


def stopped_job(store, kind, params, state="cancelled", run_id=None):
    """A job that ran (its command started ``run_id``) and ended ``state``."""
    job_id = jobs.submit(store, kind, params)
    if run_id:
        queue.job_dir(store, job_id).mkdir(parents=True, exist_ok=True)
        (queue.job_dir(store, job_id) / "runs.txt").write_text(run_id + "\n")
        store_paths(store).run_dir(run_id).mkdir(parents=True, exist_ok=True)
    assert queue.finish(store, job_id, state, error="stopped")
    return job_id


def resumes_of(store, job_id):
    return q(store, "SELECT job_id FROM jobs WHERE json_extract_string(spec, '$.resumed_from') = ?", [job_id])


def test_a_job_is_resumed_once(store):
    job_id = stopped_job(store, "tick", {"steps": 5}, "failed")
    new_id = jobs.resume(store, job_id)
    with pytest.raises(jobs.JobStateError, match=f"already resumed as {new_id}"):
        jobs.resume(store, job_id)
    assert resumes_of(store, job_id) == [(new_id,)]
    assert jobs.get_job(store, job_id)["spec"]["resumed_by"] == new_id
    assert jobs.get_job(store, job_id)["state"] == "failed"  # the old record itself is unchanged
    # the new attempt, once it has failed too, can be resumed in turn
    assert queue.claim(store, here(), ("cpu",))["job_id"] == new_id
    assert queue.finish(store, new_id, "failed", error="again")
    third = jobs.resume(store, new_id)
    assert resumes_of(store, new_id) == [(third,)]
    with pytest.raises(jobs.JobStateError, match="only failed or cancelled"):
        jobs.resume(store, third)  # queued
    with pytest.raises(jobs.JobStateError, match="no job"):
        jobs.resume(store, "job-20000101-000000-abcdef")


def test_two_simultaneous_resumes_create_one_attempt(store):
    """Two dashboard sessions click Resume at the same moment (two threads, one process: DuckDB's
    MVCC is what separates them): one new job, and the other caller is told which."""
    job_id = stopped_job(store, "tick", {"steps": 5}, "cancelled")
    barrier = threading.Barrier(2)
    got: list = []

    def click():
        barrier.wait()
        try:
            got.append(("ok", jobs.resume(store, job_id)))
        except jobs.JobStateError as e:
            got.append(("refused", str(e)))

    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(kind for kind, _ in got) == ["ok", "refused"]
    new_id = next(v for kind, v in got if kind == "ok")
    assert f"already resumed as {new_id}" in next(v for kind, v in got if kind == "refused")
    assert resumes_of(store, job_id) == [(new_id,)]


def test_pretraining_cancelled_before_its_first_checkpoint_starts_afresh_with_a_note(store, capsys):
    """`--resume RUN` of a run without checkpoints/last.pt fails every time ('cannot resume: no
    checkpoint'); resume must queue the same spec fresh and say so."""
    params = {"task": "rotation", "steps": 7, "seed": 3, "profile": "smoke", "device": "cpu"}
    early = stopped_job(store, "pretrain", params, run_id="pretrain-rotation-random-early")
    new_id = jobs.resume(store, early)
    spec = jobs.get_job(store, new_id)["spec"]
    assert spec["resume_run"] is None and spec["params"] == params and spec["resumed_from"] == early
    assert "stopped before its first checkpoint" in spec["note"] and "started afresh" in spec["note"]
    argv = jobs.build_argv("pretrain", jobs.validate_spec("pretrain", spec["params"], store), store,
                           spec["resume_run"])
    assert "--resume" not in argv and argv[argv.index("--task") + 1] == "rotation"
    assert "train.steps=7" in argv and "train.seed=3" in argv
    # control: a run that did write its checkpoint is continued, with no note
    later = stopped_job(store, "pretrain", params, run_id="pretrain-rotation-random-later")
    ckpt = store_paths(store).run_dir("pretrain-rotation-random-later") / "checkpoints" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    from ctssl_core.checkpoint import LAST
    assert jobs.JOB_KINDS["pretrain"].checkpoint == f"checkpoints/{LAST}"  # what train.fit resumes from
    spec2 = jobs.get_job(store, jobs.resume(store, later))["spec"]
    assert spec2["resume_run"] == "pretrain-rotation-random-later" and "note" not in spec2
    # the CLI prints the note
    from ctssl_core.cli import main
    early2 = stopped_job(store, "pretrain", params, run_id="pretrain-rotation-random-early2")
    assert main(["jobs", "--store", str(store), "resume", early2]) == 0
    out = capsys.readouterr()
    assert "started afresh" in out.err and out.out.strip().startswith("job-")


# --------------------------------------------------------------------------- item 6: store errors in the heartbeat


class FakeChild:
    """Popen-like: alive until ``rc`` is set; records the signals the supervisor sends."""

    def __init__(self):
        self.rc = None
        self.sent: list[str] = []

    def poll(self):
        return self.rc

    def send_signal(self, sig):
        self.sent.append(signal.Signals(sig).name)

    def kill(self):
        self.sent.append("SIGKILL")


def disk_full():
    import duckdb
    raise duckdb.IOException('IO Error: Could not write file "ctssl.duckdb.wal": No space left on device')


def test_heartbeat_survives_disk_full_backs_off_and_recovers():
    from ctssl_core.jobs.runner import Supervisor

    clock, child, logged = FakeClock(), FakeChild(), []
    beats = {"n": 0, "fail": True, "cancel": False}

    def beat():
        beats["n"] += 1
        if beats["fail"]:
            disk_full()
        return beats["cancel"]

    sup = Supervisor(child, beat, logged.append, grace_s=5.0, heartbeat_s=3.0, max_backoff_s=60.0, clock=clock)
    waits = []
    for _ in range(7):
        assert sup.step() is None  # no exception: the watcher lives on
        waits.append(sup.next_beat - clock.t)
        clock.t = sup.next_beat
    assert waits == [6.0, 12.0, 24.0, 48.0, 60.0, 60.0, 60.0]  # doubling, capped
    assert beats["n"] == 7 and child.sent == []  # the command is left alone
    assert len(logged) == 1 and "No space left on device" in logged[0] and "keeps running" in logged[0]
    beats["fail"] = False
    sup.step()
    assert "works again after 7" in logged[-1] and sup.next_beat - clock.t == 3.0
    beats["cancel"] = True  # a cancel written to the store is still read once the store works
    clock.t = sup.next_beat
    sup.step()
    sup.step()
    assert child.sent == ["SIGTERM"]
    clock.t += 5.1
    sup.step()
    assert child.sent == ["SIGTERM", "SIGKILL"]
    child.rc = -9
    assert sup.step() == -9 and sup.outcome(-9, lambda: "") == ("cancelled", "cancelled by user")


def test_runner_with_a_failing_store_waits_for_its_command_and_records_the_end(store, monkeypatch):
    """The real runner main(): every heartbeat fails with disk full. Before, the error escaped
    and the runner died, leaving its command running unwatched and the job 'running'."""
    from ctssl_core.jobs import runner

    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, here(), ("cpu",))["job_id"] == job_id
    monkeypatch.setattr(queue, "heartbeat", lambda *a, **k: disk_full())
    group_killed = []
    monkeypatch.setattr(runner, "_kill_group", lambda: group_killed.append(1))  # our group is pytest's
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        rc = runner.main(["--store", str(store), "--job", job_id, "--heartbeat", "0.01", "--",
                          sys.executable, "-c", "print('trained', flush=True)"])
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    assert rc == 0 and group_killed == [1]
    job = jobs.get_job(store, job_id)
    assert job["state"] == "succeeded" and job["error"] is None
    log = jobs.log_tail(store, job_id)
    assert "trained" in log and "heartbeat failed" in log and "No space left" in log


def test_recording_the_end_retries_store_errors(store, monkeypatch):
    from ctssl_core.jobs import runner

    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, here(), ("cpu",))["job_id"] == job_id
    real_finish, calls = queue.finish, []

    def flaky_finish(*a, **k):
        calls.append(1)
        if len(calls) < 3:
            disk_full()
        return real_finish(*a, **k)

    monkeypatch.setattr(queue, "finish", flaky_finish)
    logged, slept = [], []
    assert runner.record_end(store, job_id, "failed", "exit code 1: x", logged.append, sleep=slept.append)
    assert len(calls) == 3 and slept == [10.0, 10.0] and len(logged) == 1  # a full disk: every 10 s
    job = jobs.get_job(store, job_id)
    assert job["state"] == "failed" and job["error"].startswith("exit code 1: x\n")
    assert "disk holding the store" in job["error"] and f"`ctssl jobs resume {job_id}`" in job["error"]
    # any other store error is retried with backoff, then given up (reconcile marks the job later)
    from ctssl_core.db import StoreBusy

    def busy(*a, **k):
        raise StoreBusy("the store stayed locked")

    monkeypatch.setattr(queue, "finish", busy)
    slept.clear()
    assert not runner.record_end(store, job_id, "failed", None, logged.append, tries=3, sleep=slept.append)
    assert slept == [0.2, 0.4, 0.8]


def test_recording_the_end_waits_out_a_full_disk_however_long(store, monkeypatch):
    """Nothing can record a job's end on a full disk. Giving up (after ~5 min, as for other errors) left
    the job to reconcile, which can only say its process is gone ("killed, out of memory"), not that
    the disk was full and what to do; so a full disk is waited out, and once space is freed the job
    ends failed with the disk-space message. A succeeded job's end gets no such note."""
    from ctssl_core.jobs import runner

    for state, error in (("failed", "exit code 1: Traceback"), ("succeeded", None)):
        job_id = jobs.submit(store, "tick", {"steps": 1})
        assert queue.claim(store, here(), ("cpu",))["job_id"] == job_id
        real_finish, calls = queue.finish, []

        def full_for_a_while(*a, **k):
            calls.append(1)
            if len(calls) <= 100:  # more than `tries` (3 here): the count of full-disk retries is not capped
                disk_full()
            return real_finish(*a, **k)

        monkeypatch.setattr(queue, "finish", full_for_a_while)
        logged, slept = [], []
        assert runner.record_end(store, job_id, state, error, logged.append, tries=3, sleep=slept.append)
        monkeypatch.setattr(queue, "finish", real_finish)
        assert len(calls) == 101 and slept == [10.0] * 100
        assert len(logged) == 4 and all("disk is full" in m for m in logged)  # every 30th try, not 100 lines
        job = jobs.get_job(store, job_id)
        assert job["state"] == state
        if state == "failed":
            assert "free space on that disk" in job["error"] and job["error"].count("The disk holding") == 1
        else:
            assert job["error"] is None


@pytest.mark.parametrize("evidence", ["heartbeat", "statvfs", "none"])
def test_a_job_that_failed_on_a_full_disk_says_so_even_when_its_own_message_was_lost(store, monkeypatch, evidence):
    """The real runner main(): its command fails (exit 1) without a word in its log, as when the disk
    was so full that its StoreFull message could not be written (disk_full_checkpoint, 2026-12-03).
    The runner saw the full disk (a heartbeat refused for it, or hardly any space left when the
    command ended): the job's error must say so and what to do. Without such evidence, no note."""
    from ctssl_core.jobs import runner

    job_id = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, here(), ("cpu",))["job_id"] == job_id
    if evidence == "heartbeat":
        real_heartbeat, beats = queue.heartbeat, []

        def first_beat_full(*a, **k):
            beats.append(1)
            if len(beats) == 1:
                disk_full()
            return real_heartbeat(*a, **k)
        monkeypatch.setattr(queue, "heartbeat", first_beat_full)
    if evidence == "statvfs":
        real_statvfs = os.statvfs
        monkeypatch.setattr(runner.os, "statvfs", lambda p: types.SimpleNamespace(
            f_bavail=3, f_frsize=real_statvfs(p).f_frsize))  # 3 blocks free
    monkeypatch.setattr(runner, "_kill_group", lambda: None)  # our group is pytest's
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert runner.main(["--store", str(store), "--job", job_id, "--heartbeat", "0.01", "--",
                            sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(1)"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    job = jobs.get_job(store, job_id)
    assert job["state"] == "failed" and job["error"].startswith("exit code 1")
    said = "free space on that disk" in job["error"] and f"`ctssl jobs resume {job_id}`" in job["error"]
    assert said == (evidence != "none"), job["error"]


def test_worker_survives_a_full_disk_while_recording_a_started_job(store, spawn, as_runner, monkeypatch):
    """The worker started a job's runner, then could not record its process (proc.json, DuckDB: the disk
    was full). The OSError escaped the worker's loop: the worker died, its job stayed `running` with no
    process recorded and nothing served the store any more. Now the worker lives on, logs (or not: its
    log is on the full disk too), and its next pass records the process before reconciling, so the
    live job is not failed as never started."""
    import errno

    from ctssl_core.jobs import worker as worker_mod

    runner_proc = spawn()
    job_id = jobs.submit(store, "tick", {"steps": 1})
    as_runner(store, job_id, runner_proc.pid)

    class OneProcessBackend(RecordingBackend):
        def start(self, store_root, job_id, argv, total, device="auto"):  # noqa: ARG002
            self.started.append(job_id)
            return jobs.Handle(job_id, runner_proc.pid, runner_proc.pid)

    full = {"on": True}
    real_record = queue._record_proc

    def record(*a, **k):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_record(*a, **k)

    monkeypatch.setattr(queue, "_record_proc", record)

    class FullStderr:  # the worker's log is on the full disk too
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker_mod.sys, "stderr", FullStderr())
    backend = OneProcessBackend()
    w = jobs.Worker(store, max_cpu_jobs=1, backend=backend, poll_s=0.0, reconcile_every_s=0.0)
    passes = []

    def fake_sleep(s):  # the worker's poll pause: the disk stays full for 3 passes, then space is freed
        passes.append(s)
        if len(passes) == 3:
            full["on"] = False
            # long enough ago that reconcile would fail a job with no process recorded
            with connect(store_paths(store).db) as con:
                con.execute("UPDATE jobs SET started_at = started_at - INTERVAL 5 MINUTE, "
                            "heartbeat_at = heartbeat_at - INTERVAL 5 MINUTE WHERE job_id = ?", [job_id])
        if len(passes) == 6:
            stop.set()

    stop = threading.Event()
    monkeypatch.setattr(worker_mod, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=fake_sleep))
    w.run(stop=stop)  # no OSError out of it
    assert backend.started == [job_id] and len(passes) == 6 and w.unrecorded == {}
    job = jobs.get_job(store, job_id)
    assert (job["state"], job["pid"], job["pgid"]) == ("running", runner_proc.pid, runner_proc.pid)
    assert queue.runner_verified(store, job_id, runner_proc.pid)


def test_worker_still_stops_on_an_oserror_that_is_not_a_full_disk(store, monkeypatch):
    import errno

    w = jobs.Worker(store, max_cpu_jobs=1, backend=RecordingBackend(), poll_s=0.0)

    def broken():
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(w, "step", broken)
    with pytest.raises(PermissionError):
        w.run()


# --------------------------------------------------------------------------- item 2: hung = alive and no progress


def test_a_live_command_without_progress_for_hang_s_is_stopped_as_hung():
    from ctssl_core.jobs.runner import Supervisor

    clock, child, logged = FakeClock(), FakeChild(), []
    token = {"v": ((("run-a", 100),), 0)}

    sup = Supervisor(child, lambda: False, logged.append, progress=lambda: token["v"], grace_s=5.0,
                     heartbeat_s=3.0, hang_s=100.0, clock=clock)
    sup.step()
    clock.t += 99.0
    sup.step()
    assert child.sent == []                          # quiet, but not for long enough
    token["v"] = ((("run-a", 180),), 0)              # a new metrics line: progress, timer restarts
    sup.step()
    clock.t += 99.0
    sup.step()
    assert child.sent == [] and sup.why is None
    clock.t += 2.0                                   # 101 s without progress while alive
    sup.step()
    assert sup.why == "hung" and child.sent == ["SIGTERM"] and "no progress for 101s" in logged[-1]
    sup.step()
    assert child.sent == ["SIGTERM"]                 # once, then the grace
    clock.t += 5.1
    sup.step()
    assert child.sent == ["SIGTERM", "SIGKILL"]
    child.rc = -9
    state, error = sup.outcome(sup.step(), lambda: "")
    assert state == "failed" and error.startswith("hung: its process was alive but made no progress for more "
                                                  "than 100s")


def test_no_hang_verdict_for_a_command_that_ended_or_when_hang_detection_is_off():
    from ctssl_core.jobs.runner import Supervisor

    clock, child = FakeClock(), FakeChild()
    sup = Supervisor(child, lambda: False, lambda m: None, progress=lambda: "same", hang_s=10.0, clock=clock)
    sup.step()
    clock.t += 1e6
    child.rc = 0                                     # it finished: quiet at the end is not a hang
    assert sup.step() == 0 and sup.why is None and child.sent == []
    assert sup.outcome(0, lambda: "") == ("succeeded", None)
    child = FakeChild()
    off = Supervisor(child, lambda: False, lambda m: None, progress=lambda: "same", hang_s=0, clock=clock)
    off.step()
    clock.t += 1e6
    off.step()
    off.step()
    assert off.why is None and child.sent == []

    def unreadable():
        raise OSError("EIO")

    child = FakeChild()
    eio = Supervisor(child, lambda: False, lambda m: None, progress=unreadable, hang_s=10.0, clock=clock)
    for _ in range(3):
        eio.step()
        clock.t += 100.0
    assert eio.why is None and child.sent == []     # unreadable is not proof of a hang


def test_a_command_queued_in_an_engine_is_not_hung_until_it_has_started():
    """A job's command handed to Ray or Slurm (``executors.EngineCommand``) may wait in the engine's queue for
    its resources longer than ``hang_s``, showing no progress: that is not a hang. The hang clock starts when
    the engine starts the command (``started``)."""
    from ctssl_core.jobs.runner import Supervisor

    clock, child = FakeClock(), FakeChild()
    child.started = False
    sup = Supervisor(child, lambda: False, lambda m: None, progress=lambda: "same", hang_s=10.0, clock=clock)
    for _ in range(5):                               # 500 s queued
        sup.step()
        clock.t += 100.0
    assert sup.why is None and child.sent == []
    child.started = True                             # the engine starts it; from now on the usual rule
    sup.step()
    clock.t += 9.0
    sup.step()
    assert sup.why is None
    clock.t += 2.0
    sup.step()
    assert sup.why == "hung" and child.sent == ["SIGTERM"]


def test_progress_token_counts_the_commands_output_and_metrics_not_the_runners_own_lines(store):
    from ctssl_core.jobs.runner import progress_token
    from ctssl_core.results.runfolder import RunLogger

    job_id = jobs.submit(store, "tick", {"steps": 1})
    jd = queue.job_dir(store, job_id)
    jd.mkdir(parents=True)
    own = len(b"[ctssl job x] start\n")
    (jd / "job.log").write_bytes(b"[ctssl job x] start\n")
    t0 = progress_token(store, job_id, own)
    assert t0 == ((), 0)
    (jd / "runs.txt").write_text("run-tick-1\n")
    t1 = progress_token(store, job_id, own)
    assert t1 != t0                                  # a new run is progress
    log = RunLogger(store, "run-tick-1")
    log({"step": 0, "train/loss": 1.0})
    t2 = progress_token(store, job_id, own)
    assert t2 != t1                                  # a metrics line is progress
    path = store_paths(store).run_dir("run-tick-1") / "metrics.jsonl"
    os.utime(path, (1.0, 1.0))                       # a wall-clock step: file times mean nothing
    assert progress_token(store, job_id, own) == t2
    with open(jd / "job.log", "ab") as f:
        f.write(b"[ctssl job x] heartbeat failed\n")
    assert progress_token(store, job_id, own + len(b"[ctssl job x] heartbeat failed\n")) == t2  # runner's own
    with open(jd / "job.log", "ab") as f:
        f.write(b"epoch 1 eval\n")
    assert progress_token(store, job_id, own + len(b"[ctssl job x] heartbeat failed\n")) != t2  # command output
    log.close()


def test_worker_cli_passes_hang_and_grace_to_the_runner(tmp_path, monkeypatch):
    from ctssl_core.cli import main

    got = []

    class FakeWorker:
        def __init__(self, store, backend=None, **kw):
            got.append(backend)
            self.worker_id = "w"

        def run(self, **kw):
            pass

    monkeypatch.setattr(jobs, "Worker", FakeWorker)
    assert main(["worker", "--store", str(tmp_path / "s"), "--once", "--hang", "120", "--grace", "30"]) == 0
    assert main(["worker", "--store", str(tmp_path / "s"), "--once"]) == 0
    assert (got[0].hang_s, got[0].grace_s) == (120.0, 30.0)
    assert (got[1].hang_s, got[1].grace_s) == (queue.DEFAULT_HANG_S, queue.DEFAULT_GRACE_S)


def test_worker_once_waits_for_a_predecessors_job_before_running_the_queue(store, spawn, as_runner, monkeypatch):
    """`ctssl worker --once` restarted after kill -9: it must neither exit while a job is queued behind
    the predecessor's still-running job nor start that job early; it runs it once the slot frees."""
    from ctssl_core.jobs import worker as worker_mod

    old_runner = spawn()
    adopted = jobs.submit(store, "tick", {"steps": 1})
    assert queue.claim(store, f"{procs.this_host()}:1111", ("cpu",))["job_id"] == adopted
    queue.set_started(store, adopted, old_runner.pid, old_runner.pid)
    as_runner(store, adopted, old_runner.pid)
    waiting = jobs.submit(store, "tick", {"steps": 1})

    class EndingBackend(RecordingBackend):
        def start(self, store_root, job_id, argv, total, device="auto"):  # noqa: ARG002
            self.started.append((job_id, old_runner.poll() is None))  # was the predecessor's job alive?
            return jobs.Handle(job_id, None, None)

        def poll(self, handle):  # ends at once: its runner would record that, then it is reaped
            queue.finish(store, handle.job_id, "succeeded")
            return 0

    backend = EndingBackend()
    loops = []

    def fake_sleep(s):  # the worker's poll pause: the predecessor's job ends after 3 idle loops
        loops.append(s)
        if len(loops) == 3:
            old_runner.kill()
            old_runner.wait(timeout=10)

    monkeypatch.setattr(worker_mod, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=fake_sleep))
    w = jobs.Worker(store, max_cpu_jobs=1, backend=backend, poll_s=0.0, reconcile_every_s=0.0)
    w.run(once=True)
    assert backend.started == [(waiting, False)]
    assert len(loops) >= 3 and jobs.get_job(store, adopted)["state"] == "failed"


def test_heartbeat_waits_only_briefly_for_a_store_held_by_another_writer(store, spawn, monkeypatch):
    """The runner's loop also forwards signals and watches its command: a heartbeat gives up on a
    busy store after a short wait (StoreBusy, retried later by the Supervisor) instead of 30 s."""
    from ctssl_core.db import StoreBusy

    job_id = running_job(store, here(), None, None)
    seen = []
    real_write = queue._write
    monkeypatch.setattr(queue, "_write", lambda root, fn, timeout_s=30.0: seen.append(timeout_s)
                        or real_write(root, fn, timeout_s))
    assert queue.heartbeat(store, job_id, step=1, total=2) is False
    assert seen == [2.0]
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); sys.stdin.read()", str(store_paths(store).db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusy):
            queue.heartbeat(store, job_id, step=2, total=2, timeout_s=0.3)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert queue.heartbeat(store, job_id, step=2, total=2) is False  # free again
    assert jobs.get_job(store, job_id, live=False)["step"] == 2


def test_closing_runs_retries_a_conflict_with_another_thread_merging_the_same_run(store, monkeypatch):
    """The worker's reconcile and a page's (two threads of one process) close the same dead job:
    the loser's merge meets DuckDB's 'Conflict on update' and must retry, not raise."""
    import duckdb
    from ctssl_core.results import write as W

    job_id = running_job(store, here(), None, None)
    W.start_run(store, "run-x", "finetune", "tick", "random", "none", {})
    lines = "".join(f'{{"step": {s}, "epoch": null, "wall_s": 0.1, "train/loss": 1.0}}\n' for s in range(4))
    (store_paths(store).run_dir("run-x") / "metrics.jsonl").write_text(lines)  # written, never merged (killed)
    (queue.job_dir(store, job_id)).mkdir(parents=True, exist_ok=True)
    (queue.job_dir(store, job_id) / "runs.txt").write_text("run-x\n")
    real_merge, calls = queue.merge_pending, []

    def conflicting_once(root, rid):
        calls.append(rid)
        if len(calls) == 1:
            raise duckdb.TransactionException("TransactionContext Error: Conflict on update!")
        return real_merge(root, rid)

    monkeypatch.setattr(queue, "merge_pending", conflicting_once)
    queue.close_runs(store, job_id, "failed", "gone")
    assert calls == ["run-x", "run-x"]
    assert q(store, "SELECT count(*) FROM metrics WHERE run_id = 'run-x'") == [(4,)]
    assert q(store, "SELECT status FROM runs WHERE run_id = 'run-x'") == [("failed",)]
