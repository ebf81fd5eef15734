"""experiments/fault_injection.py: its row check finds what is missing, and a quick run finds no fault."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from ctssl_core.paths import REPO_ROOT, store_paths
from ctssl_core.results.runfolder import METRICS_FILE, RunLogger
from ctssl_core.results.write import finish_run, start_run, write_results

SCRIPT = REPO_ROOT / "experiments" / "fault_injection.py"


@pytest.fixture(scope="module")
def fi():
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_injection"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("fault_injection", None)


def test_rows_lost_counts_lines_not_in_the_store_and_missing_results(tmp_path, fi):
    store = tmp_path / "store"
    start_run(store, "run-a", "finetune", "tick", "random", "none", {})
    log = RunLogger(store, "run-a")
    for s in range(3):
        log({"step": s, "train/loss": 1.0 / (1 + s), "lr": 0.1})
    log.close()
    write_results(store, [{"run_id": "run-a", "task": "tick", "init": "random", "split": "test",
                           "metric": "final_loss", "value": 0.25, "n": 3}])
    finish_run(store, "run-a", "succeeded")
    assert fi.rows_lost(store, ["run-a"]) == (0, [])
    path = store_paths(store).run_dir("run-a") / METRICS_FILE
    with open(path, "a") as f:  # written after the last merge and never merged: 2 values lost
        f.write(json.dumps({"step": 3, "epoch": None, "wall_s": 1.0, "train/loss": 0.2, "lr": 0.1}) + "\n")
        f.write('{"step": 4, "train/lo')  # a line cut by kill -9 is no row at all
    n, notes = fi.rows_lost(store, ["run-a", "run-a"])
    assert n == 2 and "run-a: 2 rows missing" in notes[0]
    # a succeeded run without its results row
    start_run(store, "run-b", "finetune", "tick", "random", "none", {})
    finish_run(store, "run-b", "succeeded")
    assert fi.rows_lost(store, ["run-b"])[0] == 1


def test_table_lists_every_scenario_and_column(fi):
    t = fi.Tally(trials=3, double_run=2)
    t.add(fi.Tally(trials=1, lost=1))
    assert (t.trials, t.lost, t.double_run) == (4, 1, 2)
    table = fi.format_table({"kill9_worker": t, "store_busy": fi.Tally(trials=4)})
    lines = table.splitlines()
    assert lines[0].split() == ["scenario", "trials", *fi.COLUMNS]
    assert lines[2].split() == ["kill9_worker", "4", "1", "2", "0", "0"]
    assert lines[3].split() == ["store_busy", "4", "0", "0", "0", "0"]
    assert set(fi.SCENARIOS) == {"kill9_worker", "kill9_runner", "kill9_training", "store_busy",
                                 "cancel_during_eval", "disk_full_ingest", "disk_full_checkpoint"}
    with pytest.raises(SystemExit):
        fi.main(["--trials", "0"])


PROCESS_SCENARIOS = ("kill9_worker", "kill9_runner", "kill9_training", "store_busy", "cancel_during_eval")


@pytest.mark.slow
def test_quick_fault_injection_run_finds_no_lost_double_run_wrong_state_or_lost_rows(tmp_path):
    out = tmp_path / "fi.json"
    picks = [a for name in PROCESS_SCENARIOS for a in ("--scenario", name)]
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", *picks, "--json", str(out), "--tmp", str(tmp_path)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    got = json.loads(out.read_text())
    assert set(got) == set(PROCESS_SCENARIOS)
    for name, t in got.items():
        assert t["trials"] == 3, name
        assert (t["lost"], t["double_run"], t["wrong_state"], t["rows_lost"]) == (0, 0, 0, 0), (name, t["notes"])
    assert "cancel_during_eval" in r.stdout and "rows_lost" in r.stdout


def test_a_commands_own_child_is_not_a_second_command(tmp_path, fi):
    """Between fork and exec a child shows its parent's argv: one job, not a double run. Two
    separate commands of the store are two."""
    import os
    import signal

    store = tmp_path / "store"
    script = (f"# {fi.TICK_MARK.decode()}\n"
              "import os, sys, time\nif os.fork():\n    print('forked', flush=True)\ntime.sleep(120)\n")
    started = []
    try:
        for n in (1, 2):
            p = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "CTSSL_STORE": str(store)},
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
            started.append(p)
            assert p.stdout.readline().strip() == "forked"
            assert fi.commands_alive(store) == n
        assert len(fi.store_processes(store)) == 4  # two commands, each with its child
    finally:
        for p in started:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def mount_prefix() -> list[str]:
    """How to run a command that mounts tmpfs: as it is when root, else in an unprivileged user and
    mount namespace (``unshare -rm``). Raises, never skips, where neither works: the disk-full
    scenarios then cannot run on this machine, and the failure says so."""
    import os
    import shutil

    if os.geteuid() == 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rm"]
    raise AssertionError("the disk-full scenarios need tmpfs mounts: run the tests as root, or enable "
                         "unprivileged user namespaces (`unshare -rm true` must work)")


@pytest.mark.slow
def test_quick_disk_full_run_ingest_and_checkpoint_lose_nothing(tmp_path):
    """A real full disk (a tmpfs shrunk under the store): ingest and a pretraining checkpoint."""
    out = tmp_path / "fi.json"
    r = subprocess.run([*mount_prefix(), sys.executable, str(SCRIPT), "--quick", "--scenario", "disk_full_ingest",
                        "--scenario", "disk_full_checkpoint", "--json", str(out), "--tmp", str(tmp_path)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    got = json.loads(out.read_text())
    assert set(got) == {"disk_full_ingest", "disk_full_checkpoint"}
    for name, t in got.items():
        assert t["trials"] == 3, name
        assert (t["lost"], t["double_run"], t["wrong_state"], t["rows_lost"]) == (0, 0, 0, 0), (name, t["notes"])
    # the disk did fill: every checkpoint trial failed for the full disk (on its checkpoint write, or, on a disk
    # left with no space at all, wherever it first wrote), ingest said so each time
    seen = got["disk_full_checkpoint"]["seen"]
    assert set(seen) <= {"failed: checkpoint not written, disk full", "failed: disk full elsewhere"}, seen
    assert sum(seen.values()) == 3
    assert "ingest exit 0, disk did not fill" not in got["disk_full_ingest"]["seen"]
    assert sum(got["disk_full_ingest"]["seen"].values()) == 3
    assert "tmpfs" not in subprocess.run(["sh", "-c", f"grep {tmp_path} /proc/mounts || true"],
                                         capture_output=True, text=True).stdout  # every mount undone


def test_a_pretraining_needs_no_results_row_other_runs_do(tmp_path, fi):
    """A pretraining's product is its checkpoint: a succeeded one without results rows loses nothing."""
    store = tmp_path / "store"
    start_run(store, "pre-a", "pretrain", "rotation", "random", "tiny", {})
    finish_run(store, "pre-a", "succeeded")
    start_run(store, "fin-a", "finetune", "pe", "random", "tiny", {})
    finish_run(store, "fin-a", "succeeded")
    assert fi.rows_lost(store, ["pre-a"]) == (0, [])
    assert fi.rows_lost(store, ["fin-a"])[0] == 1


def test_a_pretrain_job_command_counts_as_a_job_command(tmp_path, fi):
    """disk_full_checkpoint runs real pretrain jobs: the monitor must see them to count overlaps."""
    import os
    import signal

    store = tmp_path / "store"
    started = []
    try:
        for argv in (["-c", "import time; time.sleep(120)", "ctssl_core.cli", "pretrain", "--resume", "r"],
                     ["-c", "import time; time.sleep(120)", "ctssl_core.cli", "worker"]):
            p = subprocess.Popen([sys.executable, *argv], env={**os.environ, "CTSSL_STORE": str(store)},
                                 start_new_session=True)
            started.append(p)
        assert fi.wait_for(lambda: len(fi.store_processes(store)) == 2, 30)
        assert fi.commands_alive(store) == 1  # the pretrain, not the worker
    finally:
        for p in started:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def test_the_harness_lookup_retries_a_short_read_and_nothing_else(tmp_path, fi, monkeypatch):
    """DuckDB's "Could not read enough bytes" (also its message for a truncated file, so the product's
    readers do not retry it) was seen once by the harness's own lookup while a job failed to write the
    store on a full disk; the harness retries that one message, a few times, and raises anything else."""
    import duckdb

    import ctssl_core.jobs.testing  # noqa: F401 - registers "tick"
    from ctssl_core import jobs

    store = tmp_path / "store"
    job_id = jobs.submit(store, "tick", {"steps": 1})
    real, calls = jobs.get_job, []

    def flaky(errors):
        def get_job(*a, **k):
            calls.append(1)
            if len(calls) <= len(errors):
                raise duckdb.IOException(errors[len(calls) - 1])
            return real(*a, **k)
        return get_job

    short = f'IO Error: {fi.SHORT_READ} from file "ctssl.duckdb": attempted to read 262144 bytes from location 6828032'
    monkeypatch.setattr(jobs, "get_job", flaky([short, short]))
    assert fi.job_row(store, job_id, every_s=0.0)["state"] == "queued" and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(jobs, "get_job", flaky(['IO Error: Could not write file "x.wal": No space left on device']))
    with pytest.raises(duckdb.IOException, match="No space left"):
        fi.job_row(store, job_id, every_s=0.0)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(jobs, "get_job", flaky([short] * 5))
    with pytest.raises(duckdb.IOException, match=fi.SHORT_READ):
        fi.job_row(store, job_id, tries=3, every_s=0.0)
    assert len(calls) == 3


def test_a_jobs_command_counts_as_ended_once_seen_alive_and_gone(tmp_path, fi):
    """disk_full_checkpoint frees space only after the resumed job's command has exited."""
    import os

    import ctssl_core.jobs.testing  # noqa: F401
    from ctssl_core import jobs

    store = tmp_path / "store"
    job_id = jobs.submit(store, "tick", {"steps": 1})  # queued: not final
    seen = {"alive": False}
    assert not fi._command_ended(store, job_id, seen) and not seen["alive"]  # not started yet is not ended
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ctssl_core.cli", "pretrain"],
                         env={**os.environ, "CTSSL_STORE": str(store), "CTSSL_JOB_ID": job_id},
                         start_new_session=True)
    try:
        assert fi.wait_for(lambda: seen.update(probe=fi._command_ended(store, job_id, seen)) or seen["alive"], 30)
        assert seen["probe"] is False
    finally:
        p.kill()
        p.wait(timeout=10)
    assert fi._command_ended(store, job_id, seen)
