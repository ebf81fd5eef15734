"""Tracker bridge (issue 17 item 2): runs of the real smoke benchmark mirrored to a local MLflow file store, to
TensorBoard event files and to offline W&B runs hold the run's params (its resolved config), its metric series
(as the store merged them) and its results, tags and export; read back with mlflow's client, tensorboard's
EventAccumulator and wandb's own record reader. No test touches the network: W&B targets are folders, and a
W&B target that would go online is refused before wandb is imported."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ctssl_core.cli import main
from ctssl_core.db import connect
from ctssl_core.paths import store_paths
from ctssl_core.trackers import RUN_ID_TAG, TrackerError, benchmark_runs, flatten, parse_target, wandb_runs


def _store_run(store, where: str) -> tuple[str, dict, dict[str, list[tuple[int, float]]], dict[str, float]]:
    """(run_id, config, metric series as merged into DuckDB, test results) of the first run matching ``where``."""
    with connect(store_paths(store).db, read_only=True) as con:
        rid, cfg = con.execute(f"SELECT run_id, config FROM runs WHERE {where} ORDER BY run_id LIMIT 1").fetchone()
        rows = con.execute("SELECT name, step, value FROM metrics WHERE run_id = ? ORDER BY name, step",
                           [rid]).fetchall()
        res = con.execute("SELECT split || '/' || metric, value FROM results WHERE run_id = ?", [rid]).fetchall()
    series: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in rows:
        series.setdefault(name, []).append((step, value))
    return rid, json.loads(cfg), series, dict(res)


def _mlflow_run(uri: str, rid: str):
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"   # reading a file store back (trackers sets it only while writing)
    try:
        client = MlflowClient(tracking_uri=uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string=f"tags.`{RUN_ID_TAG}` = '{rid}'")
        return client, runs
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


def test_mlflow_mirror_holds_params_series_results_tags_and_the_export(smoke_store, tmp_path, capsys):
    rid, cfg, series, results = _store_run(smoke_store, "kind = 'finetune' AND task = 'pe' AND init = 'rotation'")
    assert len(series["train/loss"]) >= 2 and "test/exam_auroc" in results
    target = tmp_path / "mlruns"
    assert main(["track", rid, "--to", f"mlflow:{target}", "--store", str(smoke_store)]) == 0
    assert f"{rid}: mirrored to MLflow file:" in capsys.readouterr().out
    client, runs = _mlflow_run(target.as_uri(), rid)
    (run,) = runs
    data = run.data
    assert data.params["train.steps"] == str(cfg["train"]["steps"]) and data.params["task"] == "pe"
    assert data.params == {k: v for k, v in flatten(cfg).items() if not v.startswith("/")}   # no absolute paths here
    for name, points in series.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert hist == points, name
    assert data.metrics["test/exam_auroc"] == pytest.approx(results["test/exam_auroc"])
    assert data.tags["task"] == "pe" and data.tags["init"] == "rotation" and data.tags["status"] == "succeeded"
    assert data.tags["benchmark_id"].startswith("bench-smoke-") and run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "card.json", "encoder.safetensors"} <= arts and "last.pt" not in arts
    # mirroring again finds the run instead of adding a second one
    assert main(["track", rid, "--to", f"mlflow:{target}", "--store", str(smoke_store)]) == 0
    assert f"{rid}: already in MLflow" in capsys.readouterr().out
    assert len(_mlflow_run(target.as_uri(), rid)[1]) == 1


def test_tensorboard_mirror_holds_params_and_series(smoke_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rid, cfg, series, _ = _store_run(smoke_store, "kind = 'pretrain' AND task = 'rotation'")
    assert main(["track", rid, "--to", f"tensorboard:{tmp_path / 'tb'}", "--store", str(smoke_store)]) == 0
    acc = EventAccumulator(str(tmp_path / "tb" / rid), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert set(series) <= set(acc.Tags()["scalars"])
    for name, points in series.items():
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name   # float32 in events
    params = json.loads(acc.Tensors("params_json/text_summary")[0].tensor_proto.string_val[0])
    assert params["pretrain.train.steps"] == str(cfg["pretrain"]["train"]["steps"]) and params["task"] == "rotation"
    tags = json.loads(acc.Tensors("tags/text_summary")[0].tensor_proto.string_val[0])
    assert tags["kind"] == "pretrain" and tags[RUN_ID_TAG] == rid


def test_a_benchmarks_runs_include_the_pretrainings_it_started_from(smoke_store):
    with connect(store_paths(smoke_store).db, read_only=True) as con:
        bid = con.execute("SELECT run_id FROM runs WHERE kind = 'benchmark'").fetchone()[0]
        pre = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE kind = 'pretrain'").fetchall()}
        own = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE benchmark_id = ?", [bid]).fetchall()}
    got = benchmark_runs(smoke_store, bid)
    assert set(got) == own | pre and len(got) == len(set(got)) and set(got[:len(pre)]) == pre


@pytest.mark.parametrize("spec, message", [
    ("wandb", "write mlflow:<folder>"),
    ("wandb:offline", "write wandb:<folder>"),
    ("mlflow:", "write mlflow:<folder>"),
    ("tensorboard", "write mlflow:<folder>"),
])
def test_a_bad_target_is_a_clear_error(spec, message):
    with pytest.raises(TrackerError, match=message):
        parse_target(spec)


def test_bad_input_on_the_command_line(smoke_store, tmp_path, capsys, monkeypatch):
    assert main(["track", "no-such-run", "--to", f"tensorboard:{tmp_path}", "--store", str(smoke_store)]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert main(["track", "--to", f"tensorboard:{tmp_path}", "--store", str(smoke_store)]) == 2
    assert "nothing to mirror" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["track", "x", "--to", f"mlflow:{tmp_path}", "--store", str(smoke_store)]) == 2
    assert "pip install ctssl[trackers]" in capsys.readouterr().err


def test_finetune_track_mirrors_the_new_run_and_a_bad_target_stops_it_before_training(smoke_store, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    argv = ["finetune", "--task", "pe", "--profile", "smoke", "--store", str(store), "--quiet"]
    n_runs = len(_runs(store))
    assert main([*argv, "--track", "tensorboard"]) == 2
    assert "write mlflow:" in capsys.readouterr().err and len(_runs(store)) == n_runs   # nothing trained
    assert main([*argv, "--track", f"tensorboard:{tmp_path / 'tb'}"]) == 0
    out = capsys.readouterr().out
    (rid,) = set(_runs(store)) - set(_runs(smoke_store))
    assert f"{rid}: mirrored to TensorBoard" in out
    acc = EventAccumulator(str(tmp_path / "tb" / rid))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "test/exam_auroc" in acc.Tags()["scalars"]


def _runs(store) -> list[str]:
    with connect(store_paths(store).db, read_only=True) as con:
        return [r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()]


def test_annotations_are_stored_shown_and_carried_to_mlflow(smoke_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    rid, *_ = _store_run(store, "kind = 'pretrain' AND task = 'rotation'")
    assert main(["annotate", rid, "--store", str(store), "--name", "rot baseline", "--tag", "owner=ana",
                 "--tag", "lab=ct-1", "--note", "first try"]) == 0
    # tags merge; an empty value removes one
    assert main(["annotate", rid, "--store", str(store), "--tag", "lab=", "--tag", "round=2"]) == 0
    assert "name 'rot baseline', tags {\"owner\": \"ana\", \"round\": \"2\"}" in capsys.readouterr().out
    with connect(store_paths(store).db, read_only=True) as con:
        name, tags, notes = con.execute("SELECT name, tags, notes FROM runs WHERE run_id = ?", [rid]).fetchone()
    assert (name, json.loads(tags), notes) == ("rot baseline", {"owner": "ana", "round": "2"}, "first try")
    assert main(["track", rid, "--to", f"mlflow:{tmp_path / 'ml'}", "--store", str(store)]) == 0
    (run,) = _mlflow_run((tmp_path / "ml").as_uri(), rid)[1]
    assert run.info.run_name == "rot baseline" and run.data.tags["owner"] == "ana" and run.data.tags["round"] == "2"
    assert run.data.tags["mlflow.note.content"].startswith("first try") and run.data.tags["task"] == "rotation"
    # bad input
    for argv, message in ((["--tag", "owner"], "must look like KEY=VALUE"), ([], "nothing to change"),
                          (["--tag", "a b=1"], "tag key 'a b'")):
        assert main(["annotate", rid, "--store", str(store), *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["annotate", "no-such-run", "--store", str(store), "--name", "x"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err

    # the dashboard's run table shows them, and its text filter finds the run by its name or a tag
    from streamlit.testing.v1 import AppTest

    from ctssl_core.paths import REPO_ROOT

    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.session_state["ctssl_store"] = str(store)
    at.run()
    at.switch_page("pages/curves.py").run()
    table = at.dataframe[0].value.set_index("run_id")
    assert (table.loc[rid, "name"], table.loc[rid, "tags"], table.loc[rid, "notes"]) == \
        ("rot baseline", "owner=ana, round=2", "first try")
    for text in ("rot baseline", "owner=ana"):
        at.text_input(key="lc_text").set_value(text).run()
        assert at.dataframe[0].value.run_id.tolist() == [rid] and not at.exception


def test_benchmark_track_mirrors_its_runs_and_pretrainings(smoke_store, tmp_path, monkeypatch, capsys):
    """`ctssl benchmark --track`: the study itself is the smoke store's (a re-run reuses every unit)."""
    import ctssl_core.benchmark as bm

    with connect(store_paths(smoke_store).db, read_only=True) as con:
        bid = con.execute("SELECT run_id FROM runs WHERE kind = 'benchmark'").fetchone()[0]
    monkeypatch.setattr(bm, "run_benchmark",
                        lambda *a, **k: {"benchmark_id": bid, "ran": 0, "skipped": 1, "wall_s": 0.0})
    tb = tmp_path / "tb"
    assert main(["benchmark", "--profile", "smoke", "--store", str(smoke_store), "--quiet",
                 "--track", f"tensorboard:{tb}"]) == 0
    want = benchmark_runs(smoke_store, bid)
    assert sorted(p.name for p in tb.iterdir()) == sorted(want)
    assert capsys.readouterr().out.count("mirrored to TensorBoard") == len(want)


def test_pretrain_track_mirrors_the_new_run(store_copy, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["pretrain", "--store", str(store_copy), "--profile", "smoke", "--no-progress", "--task", "rotation",
                 "--set", "train.image_size=32", "--set", "train.batch_size=8", "--set", "train.steps=2",
                 "--track", f"tensorboard:{tmp_path / 'tb'}"]) == 0
    (rid,) = _runs(store_copy)
    assert f"{rid}: mirrored to TensorBoard" in capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path / "tb" / rid))
    acc.Reload()
    series = _store_run(store_copy, f"run_id = '{rid}'")[2]
    assert [e.step for e in acc.Scalars("train/loss")] == [s for s, _ in series["train/loss"]] and series["train/loss"]


def test_a_tracker_failure_keeps_the_run_and_says_how_to_retry(smoke_store, tmp_path, monkeypatch, capsys):
    """An outage of the tracker after training: the finished run is kept, the user is told how to retry, and
    `ctssl track` exits non-zero (nothing is reported as mirrored)."""
    from ctssl_core import trackers

    rid = _runs(smoke_store)[0]

    def down(*a, **k):
        raise ConnectionError("tracker unreachable")

    monkeypatch.setattr(trackers, "mirror", down)
    said: list[str] = []
    assert trackers.mirror_many(smoke_store, [rid], [f"tensorboard:{tmp_path}"], say=said.append) == 0
    assert f"run {rid} is finished and kept" in said[0] and f"ctssl track {rid} --to tensorboard:" in said[0]
    assert main(["track", rid, "--to", f"tensorboard:{tmp_path}", "--store", str(smoke_store)]) == 1
    assert "ConnectionError: tracker unreachable" in capsys.readouterr().out


# ------------------------------------------------------------------ review fixes: targets, tags, interrupted mirrors


@pytest.mark.parametrize("spec, backend", [
    ("mlflow:databricks", "databricks"),
    ("mlflow:databricks://my-profile", "databricks"),
    ("mlflow:databricks-uc", "databricks-uc"),
    ("mlflow:sqlite:///mlflow.db", "sqlite"),
    ("mlflow:postgresql://db/mlflow", "postgresql"),
    ("tensorboard:s3://bucket/tb", "s3"),
])
def test_an_unsupported_backend_is_refused_with_the_supported_ones(spec, backend):
    with pytest.raises(TrackerError) as e:
        parse_target(spec)
    msg = str(e.value)
    assert f"target {backend!r} is not supported" in msg
    assert "mlflow:<folder>" in msg and "mlflow:http(s)://host" in msg and "tensorboard:<local log dir>" in msg


@pytest.mark.parametrize("spec", [
    "mlflow:http://ana:s3cr3t-pw@tracker.example:5000",
    "mlflow:https://tracker.example/mlflow?token=s3cr3t-pw",
    "mlflow:https://ana:s3cr3t-pw@tracker.example/?access_token=s3cr3t-pw",
    "mlflow:ana:s3cr3t-pw@tracker.example",
])
def test_credentials_in_a_target_are_refused_and_never_echoed(spec, smoke_store, capsys):
    with pytest.raises(TrackerError) as e:
        parse_target(spec)
    assert "s3cr3t" not in str(e.value) and "***" in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    rid = _runs(smoke_store)[0]
    assert main(["track", rid, "--to", spec, "--store", str(smoke_store)]) == 2
    out, err = capsys.readouterr()
    assert "s3cr3t" not in out + err and "carries no credentials" in err


def test_supported_targets_parse_and_redact_masks_any_uri_secret():
    from ctssl_core.trackers import redact

    assert parse_target("mlflow:./mlruns") == ("mlflow", "./mlruns")
    assert parse_target("mlflow:file:///tmp/mlruns") == ("mlflow", "file:///tmp/mlruns")
    assert parse_target("mlflow:http://tracker:5000") == ("mlflow", "http://tracker:5000")
    assert parse_target("mlflow:https://tracker.example/mlflow") == ("mlflow", "https://tracker.example/mlflow")
    assert parse_target("mlflow:C:\\mlruns") == ("mlflow", "C:\\mlruns")          # a Windows folder, not a scheme
    assert parse_target("tensorboard:./tb@v2") == ("tensorboard", "./tb@v2")      # a plain folder may hold an @
    assert redact("failed on http://u:p@ss@h:5000/x?token=abc&x=1 now") == "failed on http://***@h:5000/x?token=***&x=*** now"


def test_a_user_tag_cannot_pose_as_a_ctssl_tag(smoke_store, tmp_path, capsys):
    """`ctssl annotate` refuses ctssl's and MLflow's own tag keys (a pretraining has no benchmark_id, and that
    tag would move its mirror into another benchmark's experiment); a reserved tag left by an older store is
    not mirrored, and ctssl's own tags win."""
    from ctssl_core.trackers import read_run

    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    rid, *_ = _store_run(store, "kind = 'pretrain' AND task = 'rotation'")
    for key in ("benchmark_id", "kind", "ctssl.run_id", "ctssl.mirror", "mlflow.runName", "MLflow.user", "name"):
        assert main(["annotate", rid, "--store", str(store), "--tag", f"{key}=x"]) == 2
        err = capsys.readouterr().err
        assert f"tag key {key!r} is reserved for ctssl's own tags" in err and "choose another key" in err
    assert main(["annotate", rid, "--store", str(store), "--tag", "owner=ana"]) == 0
    # an older store holding reserved user tags: ctssl's own tags win, the others are not mirrored
    with connect(store_paths(store).db) as con:
        con.execute("UPDATE runs SET tags = ? WHERE run_id = ?",
                    [json.dumps({"owner": "ana", "benchmark_id": "evil", "kind": "finetune", "mlflow.runName": "x",
                                 RUN_ID_TAG: "other"}), rid])
    tags = read_run(store, rid).tags
    assert tags["owner"] == "ana" and tags["kind"] == "pretrain" and tags[RUN_ID_TAG] == rid
    assert "benchmark_id" not in tags and "mlflow.runName" not in tags
    assert main(["track", rid, "--to", f"mlflow:{tmp_path / 'ml'}", "--store", str(store)]) == 0
    assert "(experiment ctssl," in capsys.readouterr().out
    (run,) = _mlflow_run((tmp_path / "ml").as_uri(), rid)[1]
    assert run.data.tags["kind"] == "pretrain" and "benchmark_id" not in run.data.tags and run.info.run_name == rid
    # removing a reserved tag an older store holds is allowed (that is how such a store is cleaned)
    assert main(["annotate", rid, "--store", str(store), "--tag", "benchmark_id="]) == 0
    assert "benchmark_id" not in capsys.readouterr().out


class _Killed(BaseException):
    """Stands in for the process being killed mid-mirror: nothing after the raise runs."""


def test_an_mlflow_mirror_cut_short_is_replaced_whole_by_the_next_track(smoke_store, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from ctssl_core import trackers

    rid, cfg, series, _ = _store_run(smoke_store, "kind = 'pretrain' AND task = 'rotation'")
    target = tmp_path / "mlruns"
    calls = []

    def killed(self, *a, **k):   # the first artifact upload: metrics and params are in, the run is RUNNING
        calls.append(a)
        raise _Killed()

    monkeypatch.setattr(MlflowClient, "log_artifact", killed)
    with pytest.raises(_Killed):
        trackers.mirror(smoke_store, rid, f"mlflow:{target}")
    monkeypatch.undo()
    (stale,) = _mlflow_run(target.as_uri(), rid)[1]
    assert stale.info.status == "RUNNING" and calls   # what a killed process leaves
    assert main(["track", rid, "--to", f"mlflow:{target}", "--store", str(smoke_store)]) == 0
    out = capsys.readouterr().out
    assert f"{rid}: mirrored to MLflow" in out and "replaced 1 incomplete mirror(s)" in out
    client, runs = _mlflow_run(target.as_uri(), rid)
    (run,) = runs                                      # one run: the stale one is gone, not duplicated
    assert run.info.run_id != stale.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags[trackers.MIRROR_TAG] == "complete"
    assert {"metrics.jsonl", "card.json", "encoder.safetensors"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    for name, points in series.items():                # whole, and nothing logged twice
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)) == points, name
    assert run.data.params["pretrain.train.steps"] == str(cfg["pretrain"]["train"]["steps"])
    assert main(["track", rid, "--to", f"mlflow:{target}", "--store", str(smoke_store)]) == 0
    assert f"{rid}: already in MLflow" in capsys.readouterr().out and len(_mlflow_run(target.as_uri(), rid)[1]) == 1


def test_a_finished_mirror_from_before_the_completion_tag_is_kept(smoke_store, tmp_path, capsys):
    """A mirror written before ``ctssl.mirror`` existed ended with set_terminated: FINISHED means whole."""
    import os

    from mlflow.tracking import MlflowClient

    rid, *_ = _store_run(smoke_store, "kind = 'pretrain'")   # a pretraining: experiment "ctssl" (no benchmark)
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=(tmp_path / "ml").as_uri())
        run = client.create_run(client.create_experiment("ctssl"), tags={RUN_ID_TAG: rid})
        client.set_terminated(run.info.run_id, status="FINISHED")
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    assert main(["track", rid, "--to", f"mlflow:{tmp_path / 'ml'}", "--store", str(smoke_store)]) == 0
    assert f"{rid}: already in MLflow" in capsys.readouterr().out


def test_a_tensorboard_mirror_cut_short_is_written_whole_by_the_next_track(smoke_store, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from ctssl_core import trackers

    rid, _, series, _ = _store_run(smoke_store, "kind = 'pretrain' AND task = 'rotation'")

    def killed(self, *a, **k):   # the scalars are written, the params are not
        raise _Killed()

    monkeypatch.setattr(SummaryWriter, "add_text", killed)
    with pytest.raises(_Killed):
        trackers.mirror(smoke_store, rid, f"tensorboard:{tmp_path / 'tb'}")
    monkeypatch.undo()
    assert not (tmp_path / "tb" / rid).exists()        # nothing that looks like a finished mirror
    assert main(["track", rid, "--to", f"tensorboard:{tmp_path / 'tb'}", "--store", str(smoke_store)]) == 0
    assert f"{rid}: mirrored to TensorBoard" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "tb").iterdir()] == [rid]   # the partial folder is gone
    acc = EventAccumulator(str(tmp_path / "tb" / rid), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert set(series) <= set(acc.Tags()["scalars"]) and "params_json/text_summary" in acc.Tags()["tensors"]
    assert [e.step for e in acc.Scalars("train/loss")] == [s for s, _ in series["train/loss"]]


# ------------------------------------------------------------------ Weights & Biases (offline)


def _records(run_dir: Path) -> dict:
    """What an offline W&B run folder holds, from its ``.wandb`` record file (wandb's DataStore + protobuf
    records): run (id, name, notes, tags, group, config), history rows, summary, artifacts, exit code."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = run_dir.glob("run-*.wandb")
    ds = datastore.DataStore()
    ds.open_for_scan(str(path))
    out: dict = {"run": None, "config": {}, "history": [], "summary": {}, "artifacts": [], "exit": None}
    while (data := ds.scan_data()) is not None:
        r = pb.Record()
        r.ParseFromString(data)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_key(u): json.loads(u.value_json) for u in r.summary.update})
        elif kind == "artifact":
            out["artifacts"].append(r.artifact)
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    ds.close()
    return out


def _key(item) -> str:
    """A history/summary item's key (wandb writes ``train/loss`` as a one-element ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


def _wandb_children() -> list[str]:
    """wandb-core processes started by this test process (wandb's service); a mirror must leave none."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and "wandb-core" in cmd:
            found.append(cmd)
    return found


def test_wandb_offline_run_holds_params_series_results_tags_and_the_export(smoke_store, tmp_path, capsys):
    rid, cfg, series, results = _store_run(smoke_store, "kind = 'finetune' AND task = 'pe' AND init = 'rotation'")
    assert len(series["train/loss"]) >= 2 and "test/exam_auroc" in results
    target = tmp_path / "wb"
    assert main(["track", rid, "--to", f"wandb:{target}", "--store", str(smoke_store)]) == 0
    out, err = capsys.readouterr()
    (run_dir,) = (target / "wandb").iterdir()
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(f"-{rid}")
    assert out == f"{rid}: mirrored to W&B (offline) {run_dir}; upload it with `wandb sync {run_dir}`\n" and not err
    assert not _wandb_children()                                   # wandb-core was shut down, its socket folder gone
    assert not list(Path(tempfile.gettempdir()).glob(f"wandb-{os.getpid()}-*"))
    got = _records(run_dir)
    run = got["run"]
    assert run.run_id == rid and run.project == "ctssl" and run.display_name == rid and run.job_type == "finetune"
    assert run.run_group.startswith("bench-smoke-") and run.notes == f"mirrored from ctssl run {rid}"
    tags = dict(t.split("=", 1) for t in run.tags)
    assert tags["task"] == "pe" and tags["init"] == "rotation" and tags["status"] == "succeeded"
    assert tags["kind"] == "finetune" and tags[RUN_ID_TAG] == rid
    params = {k: v for k, v in got["config"].items() if k not in ("_wandb", "ctssl.tags")}
    assert params["train.steps"] == str(cfg["train"]["steps"]) and params["task"] == "pe"
    assert params == {k: v for k, v in flatten(cfg).items() if not v.startswith("/")}   # no absolute paths here
    assert got["config"]["ctssl.tags"]["benchmark_id"] == run.run_group
    for name, points in series.items():                            # every point, at its step
        hist = [(row["_step"], row[name]) for row in got["history"] if name in row]
        assert hist == points, name
    assert got["summary"]["test/exam_auroc"] == pytest.approx(results["test/exam_auroc"])
    (art,) = got["artifacts"]
    files = {c.path for c in art.manifest.contents}
    assert art.type == "model" and {"metrics.jsonl", "card.json", "encoder.safetensors"} <= files
    assert "last.pt" not in files and got["exit"] == 0
    for c in art.manifest.contents:                                # staged inside the target, for `wandb sync`
        assert Path(c.local_path).is_file() and Path(c.local_path).is_relative_to(target)
    # mirroring again finds the run instead of adding a second one
    assert main(["track", rid, "--to", f"wandb:{target}", "--store", str(smoke_store)]) == 0
    assert capsys.readouterr().out == f"{rid}: already in W&B (offline) {run_dir}\n"
    assert wandb_runs(target, rid) == [run_dir] and not _wandb_children()


def test_a_wandb_mirror_cut_short_is_written_whole_by_the_next_track(smoke_store, tmp_path, monkeypatch, capsys):
    """The process killed mid-mirror (after the history, before the artifact): nothing in ``<dir>/wandb`` looks
    like a finished run; the next `ctssl track` writes the run whole, once, and clears what was left."""
    import wandb

    from ctssl_core import trackers

    rid, _, series, _ = _store_run(smoke_store, "kind = 'pretrain' AND task = 'rotation'")
    target = tmp_path / "wb"

    def killed(self, *a, **k):
        raise _Killed()

    monkeypatch.setattr(wandb.Artifact, "add_file", killed)
    with pytest.raises(_Killed):
        trackers.mirror(smoke_store, rid, f"wandb:{target}")
    monkeypatch.undo()
    assert wandb_runs(target, rid) == [] and not (target / "wandb").exists()
    assert (target / ".ctssl-wandb" / f"{rid}.partial").is_dir() and not _wandb_children()
    assert main(["track", rid, "--to", f"wandb:{target}", "--store", str(smoke_store)]) == 0
    assert f"{rid}: mirrored to W&B (offline)" in capsys.readouterr().out
    (run_dir,) = (target / "wandb").iterdir()                       # one run, no duplicate
    assert wandb_runs(target, rid) == [run_dir] and not (target / ".ctssl-wandb" / f"{rid}.partial").exists()
    got = _records(run_dir)
    assert [(r["_step"], r["train/loss"]) for r in got["history"] if "train/loss" in r] == series["train/loss"]
    assert len(got["artifacts"]) == 1 and got["exit"] == 0 and not _wandb_children()


def test_wandb_track_on_finetune_and_labels_and_reserved_tags(smoke_store, tmp_path, capsys):
    """`--track wandb:DIR` on a command mirrors the new run; `ctssl annotate`'s name, note and tags are carried,
    and a reserved tag key left by an older store is not (ctssl's own tags win), as for MLflow."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    argv = ["finetune", "--task", "pe", "--profile", "smoke", "--store", str(store), "--quiet",
            "--name", "pe baseline", "--tag", "owner=ana", "--notes", "first try"]
    assert main([*argv, "--track", f"wandb:{tmp_path / 'wb'}"]) == 0
    (rid,) = set(_runs(store)) - set(_runs(smoke_store))
    assert f"{rid}: mirrored to W&B (offline)" in capsys.readouterr().out
    run = _records(wandb_runs(tmp_path / "wb", rid)[0])["run"]
    assert run.display_name == "pe baseline" and run.notes == f"first try\n\nmirrored from ctssl run {rid}"
    assert "owner=ana" in run.tags and "kind=finetune" in run.tags
    # an older store's reserved user tags: not mirrored, ctssl's own win
    pre, *_ = _store_run(store, "kind = 'pretrain' AND task = 'rotation'")
    with connect(store_paths(store).db) as con:
        con.execute("UPDATE runs SET tags = ? WHERE run_id = ?",
                    [json.dumps({"owner": "bo", "benchmark_id": "evil", "kind": "finetune", RUN_ID_TAG: "x"}), pre])
    assert main(["track", pre, "--to", f"wandb:{tmp_path / 'wb'}", "--store", str(store)]) == 0
    got = _records(wandb_runs(tmp_path / "wb", pre)[0])
    assert sorted(got["run"].tags) == sorted(f"{k}={v}" for k, v in got["config"]["ctssl.tags"].items())
    assert "owner=bo" in got["run"].tags and "kind=pretrain" in got["run"].tags
    assert f"{RUN_ID_TAG}={pre}" in got["run"].tags and not any(t.startswith("benchmark_id=") for t in got["run"].tags)
    assert got["run"].run_group == "" and not _wandb_children()


@pytest.mark.parametrize("spec", [
    "wandb:online",
    "wandb:offline",
    "wandb:https://api.wandb.ai",
    "wandb:https://ana:s3cr3t-pw@wandb.example/?api_key=s3cr3t-pw",
    "wandb:wandb://entity/project",
])
def test_a_wandb_target_that_would_go_online_is_refused(spec, smoke_store, capsys):
    with pytest.raises(TrackerError, match="offline mode only") as e:
        parse_target(spec)
    assert "write wandb:<folder>" in str(e.value) and "s3cr3t" not in str(e.value)
    rid = _runs(smoke_store)[0]
    assert main(["track", rid, "--to", spec, "--store", str(smoke_store)]) == 2
    out, err = capsys.readouterr()
    assert "s3cr3t" not in out + err and "wandb sync" in err


def test_wandb_bad_input_exits_2(smoke_store, tmp_path, capsys, monkeypatch):
    assert parse_target("wandb:./wandb-runs") == ("wandb", "./wandb-runs")
    assert main(["track", "no-such-run", "--to", f"wandb:{tmp_path}", "--store", str(smoke_store)]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err and not (tmp_path / "wandb").exists()
    assert main(["track", "x", "--to", "wandb:", "--store", str(smoke_store)]) == 2
    assert "wandb:<local folder>" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["track", _runs(smoke_store)[0], "--to", f"wandb:{tmp_path}", "--store", str(smoke_store)]) == 2
    assert "the wandb package is not installed" in capsys.readouterr().err


def test_a_wandb_failure_keeps_the_run_and_says_how_to_retry(smoke_store, tmp_path, monkeypatch, capsys):
    import wandb

    rid = _runs(smoke_store)[0]

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", broken)
    assert main(["track", rid, "--to", f"wandb:{tmp_path / 'wb'}", "--store", str(smoke_store)]) == 1
    out = capsys.readouterr().out
    assert f"run {rid} is finished and kept" in out and "OSError: disk full" in out
    assert f"retry with `ctssl track {rid} --to wandb:{tmp_path / 'wb'}`" in out
    assert wandb_runs(tmp_path / "wb", rid) == [] and not _wandb_children()
