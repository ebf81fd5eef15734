"""`ctssl pretrain` / `ctssl export` end to end on the tiny store: run row, metrics, checkpoint, falling loss,
resume, and the clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ctssl_core.checkpoint import load_encoder, read_checkpoint
from ctssl_core.cli import main
from ctssl_core.db import connect
from ctssl_core.paths import store_paths

torch.set_num_threads(1)

FAST = ["--profile", "smoke", "--no-progress", "--set", "image_size=32", "--set", "batch_size=8",
        "--set", "lr=3e-3", "--set", "log_every=2", "--set", "ckpt_every=4"]


def pretrain(store, *extra):
    return main(["pretrain", "--store", str(store), *FAST, *extra])


def run_ids(store):
    with connect(store_paths(store).db, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT run_id FROM runs WHERE kind = 'pretrain' ORDER BY created_at").fetchall()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store):
    """One masked_region run of 16 steps on a private copy of the tiny store."""
    import shutil

    store = tmp_path_factory.mktemp("pre") / "store"
    shutil.copytree(tiny_store, store)
    assert pretrain(store, "--task", "masked_region", "--set", "steps=16", "--set", "probe_every=8") == 0
    (rid,) = run_ids(store)
    return store, rid


def test_pretrain_writes_run_metrics_checkpoint_and_loss_falls(trained):
    store, rid = trained
    with connect(store_paths(store).db, read_only=True) as con:
        status, task, enc, cfg, code, wall, ckpt = con.execute(
            "SELECT status, task, encoder, config, code_version, wall_s, checkpoint FROM runs WHERE run_id = ?", [rid]).fetchone()
        loss = con.execute("SELECT step, value FROM metrics WHERE run_id = ? AND name = 'train/loss' ORDER BY step", [rid]).fetchall()
        names = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE run_id = ?", [rid]).fetchall()}
    assert (status, task, enc) == ("succeeded", "masked_region", "tiny")
    assert code and wall > 0 and ckpt.endswith("checkpoints/last.pt")
    assert json.loads(cfg)["pretrain"]["train"]["steps"] == 16
    assert {"lr", "grad_norm", "throughput"} <= names
    with connect(store_paths(store).db, read_only=True) as con:
        probe = con.execute("SELECT step, value FROM metrics WHERE run_id = ? AND name = 'probe/pe_auroc' ORDER BY step",
                            [rid]).fetchall()
    assert [s for s, _ in probe] == [8, 16] and all(0.0 <= v <= 1.0 for _, v in probe)  # online probe on held-out slices
    steps = [s for s, _ in loss]
    assert steps[0] == 1 and steps[-1] == 16
    vals = [v for _, v in loss]
    # the reconstruction loss falls: compare averages, one logged batch of a 5% square is noisy
    assert sum(vals[-4:]) / 4 < sum(vals[:4]) / 4
    ck = read_checkpoint(rid, store)
    assert ck["step"] == 16 and ck["config"]["task"] == "masked_region"
    assert ck["loader"]["position"] >= 1
    # the pretraining used only train-split patients
    assert ck["config"]["data"]["split"] == "train"


def test_resume_extends_a_finished_run(trained, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(trained[0], store)
    rid = trained[1]
    assert main(["pretrain", "--store", str(store), "--resume", rid, "--no-progress", "--set", "steps=20"]) == 0
    assert read_checkpoint(rid, store)["step"] == 20
    with connect(store_paths(store).db, read_only=True) as con:
        steps = [r[0] for r in con.execute("SELECT step FROM metrics WHERE run_id = ? AND name = 'train/loss' "
                                           "ORDER BY step", [rid]).fetchall()]
        status = con.execute("SELECT status FROM runs WHERE run_id = ?", [rid]).fetchone()[0]
    assert steps[-1] == 20 and steps.count(16) == 1 and status == "succeeded"
    assert run_ids(store) == [rid]  # no new run


def test_export_round_trips_the_encoder(trained, tmp_path):
    from ctssl_core.export import load_exported

    store, rid = trained
    assert main(["export", rid, "--out", str(tmp_path / "exp"), "--store", str(store)]) == 0
    card = json.loads((tmp_path / "exp" / "card.json").read_text())
    assert card["strategy"] == "masked_region" and card["encoder"]["name"] == "tiny"
    assert card["metrics"]["step"] == 16 and "train/loss" in card["metrics"]
    assert card["data"]["n_slices"] > 0 and card["run"]["status"] == "succeeded"
    enc, _ = load_exported(tmp_path / "exp")
    ref, _ = load_encoder(rid, store)
    for (k, a), (_, b) in zip(enc.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    text = (tmp_path / "exp" / "card.json").read_text()
    assert "PatientID" not in text and "PatientName" not in text


@pytest.mark.parametrize("args, message", [
    (["--task", "rotaton"], "unknown task 'rotaton'. Did you mean 'rotation'?"),
    (["--task", "rotation", "--set", "stepz=3"], "Did you mean 'steps'"),
    (["--task", "rotation", "--set", "encoder=vgg"], "unknown encoder 'vgg'"),
    ([], "give --task"),
])
def test_bad_input_is_a_clear_error(trained, capsys, args, message):
    assert main(["pretrain", "--store", str(trained[0]), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_store_says_how_to_make_one(tmp_path, capsys):
    assert main(["pretrain", "--store", str(tmp_path / "none"), "--task", "rotation", "--no-progress"]) == 2
    assert "ctssl ingest" in capsys.readouterr().err


def test_resume_with_another_architecture_is_refused(trained, capsys):
    store, rid = trained
    assert main(["pretrain", "--store", str(store), "--resume", rid, "--no-progress", "--set", "encoder=resnet18"]) == 2
    assert "checkpoint is tiny, you asked for resnet18" in capsys.readouterr().err


def test_a_full_disk_under_the_stores_end_of_run_does_not_hide_the_error_that_stopped_training(
        store_copy, monkeypatch, capsys):
    """Fault injection (seed 19 of disk_full_checkpoint): the checkpoint write fails on a full disk, then the
    store's record of the run's end fails on the same disk. The command must still end with the first error
    (StoreFull: exit 2, what to do), the second one reported beside it, not a traceback that replaces it."""
    import ctssl_core.pretrain as pretrain_mod
    import ctssl_core.results.runfolder as rf
    from ctssl_core.db import StoreFull

    def full_fit(*a, **k):
        raise StoreFull("no space left on the disk of the store while saving a checkpoint; free space and run "
                        "`ctssl pretrain --resume RUN`")

    def broken_end(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ctssl_core.train.fit", full_fit)
    monkeypatch.setattr(rf, "record_end", broken_end)
    assert pretrain_mod  # the module reads train.fit at call time
    assert pretrain(store_copy, "--task", "rotation", "--set", "steps=4") == 2
    err = capsys.readouterr().err
    assert "no space left on the disk of the store while saving a checkpoint" in err
    assert "could not record its end in its run folder (OSError: [Errno 28] No space left" in err
    assert "Traceback" not in err


def test_end_run_after_keeps_the_original_error_and_notes_the_second():
    from ctssl_core.results.runfolder import record_end_after as end_run_after

    original = OSError(28, "No space left on device")
    calls = []

    def close():
        calls.append("close")
        raise RuntimeError("metrics merge failed")

    end_run_after(original, "/nonexistent/store", "pt-x", "failed", close=close)
    notes = getattr(original, "__notes__", [])
    assert calls == ["close"] and len(notes) == 2
    assert "could not close its log in its run folder (RuntimeError: metrics merge failed)" in notes[0]
    assert "could not record its end in its run folder" in notes[1]
