"""The Jobs page in a real browser: launch a small job, watch it reach 100%, see its result.

The dashboard (a real ``streamlit run``) starts the worker itself, detached,
exactly as a user's click would; the job is the ``tick`` test kind, known to
the dashboard and its worker through ``CTSSL_JOB_PLUGINS``.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from browser_harness import exceptions_on_page, goto_page, shot, start_dashboard, wait_script_done  # noqa: F401
from ctssl_core import jobs
from ctssl_core.jobs import procs

pytestmark = pytest.mark.browser
TIMEOUT = 60_000


def test_launch_watch_and_see_result(start_dashboard, page, tmp_path):
    store = tmp_path / "store"
    url = start_dashboard(store, env={"CTSSL_JOB_PLUGINS": "ctssl_core.jobs.testing"})
    try:
        goto_page(page, url, "jobs", timeout_ms=TIMEOUT)
        page.get_by_text("No jobs yet").first.wait_for(state="visible", timeout=TIMEOUT)
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Kind").first.click()
        page.get_by_role("option", name=re.compile(r"^tick")).click()
        wait_script_done(page, TIMEOUT)
        page.get_by_role("spinbutton", name="interval_s").wait_for(state="visible", timeout=TIMEOUT)  # tick's form
        steps = page.get_by_role("spinbutton", name="steps")
        steps.fill("30")
        steps.press("Tab")
        page.get_by_role("button", name="Queue job").click()
        page.get_by_text(re.compile(r"Queued job-")).first.wait_for(state="visible", timeout=TIMEOUT)
        # the live fragment shows progress, then 100% and the result, without any reload
        page.get_by_text(re.compile(r"running · \d+%")).or_(page.get_by_text(re.compile(r"succeeded · 100%"))) \
            .first.wait_for(state="visible", timeout=3 * TIMEOUT)
        page.get_by_text(re.compile(r"succeeded · 100% \(step 29/30\)")).first.wait_for(
            state="visible", timeout=3 * TIMEOUT)
        page.get_by_text("final_loss").first.wait_for(state="visible", timeout=TIMEOUT)
        shot(page, "jobs_succeeded")
        assert exceptions_on_page(page) == []
        body = page.inner_text("body")
        assert "Traceback" not in body and "lock" not in body.lower()
        df = jobs.list_jobs(store)
        assert len(df) == 1 and df.iloc[0]["state"] == "succeeded"
        assert df.iloc[0]["spec"]["params"]["steps"] == 30
        assert jobs.job_results(store, df.iloc[0]["job_id"])["value"].tolist() == [pytest.approx(1 / 30)]
    finally:
        pid = jobs.worker_running(store)
        if pid and pid > 0 and procs.is_alive(pid, marker="worker"):
            os.kill(pid, signal.SIGTERM)  # the detached worker the page started
