"""Job reliability defects (issue 13, Jobs items 1 and 5): deterministic, no sleeps.

- reconcile/cancel may signal a process group only when the recorded pid is verified to be
  this job's runner on this host; a job claimed on another host is never reconciled from here.
- a fine-tune stopped by a signal (``FitResult.stopped == 'signal'``) is recorded as cancelled
  and writes no results.
"""

from __future__ import annotations

import socket

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
    if stopped == "signal":
        with pytest.raises(KeyboardInterrupt, match="stopped by signal at step 3"):
            finetune(cfg, store_copy, run_id="ft-cancelled")
        assert q(store_copy, "SELECT status FROM runs WHERE run_id = 'ft-cancelled'") == [("cancelled",)]
        assert q(store_copy, "SELECT count(*) FROM results WHERE run_id = 'ft-cancelled'") == [(0,)]
    else:  # control: the same fake fit, completed, does score and succeed
        res = finetune(cfg, store_copy, run_id="ft-done")
        assert res.run_id == "ft-done" and res.metrics
        assert q(store_copy, "SELECT status FROM runs WHERE run_id = 'ft-done'") == [("succeeded",)]
        assert q(store_copy, "SELECT count(*) FROM results WHERE run_id = 'ft-done'")[0][0] == len(res.metrics)
