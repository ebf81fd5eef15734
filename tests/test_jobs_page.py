"""pages/jobs.py under AppTest: reruns never kill or duplicate a job; bad form input queues nothing."""

from __future__ import annotations

import threading
import time

import pytest
from streamlit.testing.v1 import AppTest

import ctssl_core.jobs.testing  # noqa: F401 - registers the "tick" kind in this process
from ctssl_core import jobs
from ctssl_core.jobs import procs
from ctssl_core.paths import REPO_ROOT
from ctssl_core.results import write as W


def wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_jobs_page(store) -> AppTest:
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.session_state["ctssl_store"] = str(store)
    at.run()
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def all_text(at) -> str:
    kinds = ("markdown", "caption", "info", "warning", "error", "success", "subheader", "title")
    return "\n".join(str(e.value) for k in kinds for e in getattr(at, k))


def choose_kind(at, kind: str) -> AppTest:
    at.selectbox(key="jobs_kind").set_value(kind).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def submit_form(at, kind: str, **values) -> AppTest:
    for name, v in values.items():
        key = f"jobs_f_{kind}_{name}"
        widget = next(w for w in list(at.number_input) + list(at.selectbox) + list(at.text_input) if w.key == key)
        widget.set_value(v)
    at.checkbox(key=f"jobs_autostart_{kind}").uncheck()  # no detached worker from a test
    at.button[[b.label for b in at.button].index("Queue job")].click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


def test_empty_store_page_explains_and_form_queues_a_valid_job(store):
    at = open_jobs_page(store)
    assert "No jobs yet" in all_text(at)
    assert "Worker: not running" in all_text(at)
    choose_kind(at, "tick")
    submit_form(at, "tick", steps=3, interval_s=0.0)
    assert any("Queued" in s.value for s in at.success)
    df = jobs.list_jobs(store)
    assert len(df) == 1 and df.iloc[0]["state"] == "queued"
    assert df.iloc[0]["spec"]["params"]["steps"] == 3
    assert at.session_state["jobs_selected"] == df.iloc[0]["job_id"]
    assert jobs.worker_running(store) is None  # nothing started behind our back


def test_invalid_form_input_shows_message_and_queues_nothing(store):
    # a real checkpoint, so the form offers it; then it disappears before submit
    rid = "pretrain-masked_region-random-1"
    run_dir = W.start_run(store, rid, "pretrain", "masked_region", "random", "tiny", {})
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    W.finish_run(store, rid, "succeeded", checkpoint=ckpt)
    at = choose_kind(open_jobs_page(store), "finetune")
    assert rid in at.selectbox(key="jobs_f_finetune_init").options
    submit_form(at, "finetune", fraction=-0.05)
    assert any("fraction must be >" in e.value for e in at.error)
    submit_form(at, "finetune", fraction=0.05, steps=0)
    assert any("steps must be >= 1" in e.value for e in at.error)
    assert jobs.list_jobs(store).empty
    # a checkpoint that vanished is no longer offered, and the queue refuses it if posted anyway
    ckpt.unlink()
    at.run()
    assert rid not in at.selectbox(key="jobs_f_finetune_init").options
    with pytest.raises(jobs.JobSpecError, match=f"unknown checkpoint '{rid}'"):
        jobs.submit(store, "finetune", {"task": "pe", "init": rid})
    assert jobs.list_jobs(store).empty
    assert not at.success


def test_reruns_during_a_running_job_neither_kill_nor_duplicate_it_and_cancel_works(store):
    w = jobs.Worker(store, poll_s=0.1, reconcile_every_s=0.5)
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        job_id = jobs.submit(store, "tick", {"steps": 5000, "interval_s": 0.05})
        job = wait_for(lambda: (j := jobs.get_job(store, job_id))["pid"] and (j["step"] or 0) >= 2 and j,
                       what="job running")
        at = open_jobs_page(store)
        for _ in range(3):  # reruns: what every click and every refresh does
            at.run()
            assert not at.exception
        assert "Worker: running" in all_text(at)
        df = jobs.list_jobs(store)
        assert len(df) == 1  # not duplicated
        now = jobs.get_job(store, job_id)
        assert now["state"] == "running" and now["pid"] == job["pid"] and now["attempts"] == 1
        assert procs.is_alive(job["pid"]) and now["step"] > job["step"]  # still making progress
        bar = at.get("progress")
        assert bar and job_id in bar[0].proto.text and "running" in bar[0].proto.text
        # the page's Cancel button ends it
        at.button(key=f"jobs_cancel_{job_id}").click().run()
        assert not at.exception
        wait_for(lambda: jobs.get_job(store, job_id)["state"] == "cancelled", 30, what="cancel from the page")
        wait_for(lambda: not procs.group_members(job["pgid"], include_zombies=True), 15, what="group gone")
        at.run()
        assert any(b.key == f"jobs_resume_{job_id}" for b in at.button)
    finally:
        stop.set()
        t.join(timeout=10)
        for h, _ in list(w.handles.values()):
            procs.kill_group(h.pgid)


def test_finished_job_shows_result_log_and_links_to_its_learning_curves(store):
    job_id = jobs.submit(store, "tick", {"steps": 4, "interval_s": 0.0})
    jobs.Worker(store, poll_s=0.1).run(once=True)
    run_id = jobs.get_job(store, job_id)["run_id"]
    at = open_jobs_page(store)
    bar = at.get("progress")[0].proto
    assert bar.value == 100 and f"{job_id} · succeeded · 100% (step 3/4)" in bar.text
    table = at.table[0].value
    assert table["metric"].tolist() == ["final_loss"] and table["value"].tolist() == [pytest.approx(0.25)]
    assert any("done" in c.value for c in at.code)  # the log tail
    at.button(key=f"jobs_curves_{job_id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Learning curves"
    assert at.text_input(key="lc_text").value == run_id
    assert at.multiselect(key="lc_runs").value == [run_id]
