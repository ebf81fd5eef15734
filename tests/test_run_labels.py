"""Run names, tags and notes given at run start (`--name/--tag/--note` of pretrain, finetune and benchmark):
shown from the moment the run is recorded (the dashboard shows them for a running job; the store has them once
the run's folder is merged), mirrored by
`--track` like `ctssl annotate`'s, and checked by the same code as annotate (a bad tag: exit 2, no run row)."""

from __future__ import annotations

import json
import shutil

import pytest

from ctssl_core.cli import main
from ctssl_core.db import connect
from ctssl_core.paths import store_paths
from ctssl_core.results.runfolder import RunLogger


def _labels(store) -> dict[str, tuple]:
    """run_id -> (name, tags, notes) of every run in the store."""
    with connect(store_paths(store).db, read_only=True) as con:
        rows = con.execute("SELECT run_id, name, tags, notes FROM runs").fetchall()
    return {r[0]: (r[1], json.loads(r[2]) if r[2] else {}, r[3]) for r in rows}


@pytest.fixture
def smoke_copy(smoke_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    return store


def _shown(store, run_id) -> tuple:
    """(name, tags, notes) of a run as the dashboard's run table shows it (``read.run_table``: the store's rows
    and the records of runs whose process has not been merged yet, such as one still training)."""
    from ctssl_core.results import read

    row = read.run_table(store).set_index("run_id").loc[run_id]
    tags = dict(t.split("=", 1) for t in row.tags.split(", ")) if row.tags else {}
    return (row["name"], tags, row.notes)


@pytest.fixture
def seen_at_start(monkeypatch):
    """The labels of each run as the dashboard shows them when its RunLogger opens, i.e. after ``record_start``
    and before the first training step (the training process writes only its run folder, which the store merges
    later: the dashboard reads the run's record meanwhile)."""
    seen: dict[str, tuple] = {}
    real = RunLogger.__init__

    def spy(self, store_root, run_id, *a, **k):
        seen[run_id] = _shown(store_root, run_id)
        real(self, store_root, run_id, *a, **k)

    monkeypatch.setattr(RunLogger, "__init__", spy)
    return seen


def test_finetune_labels_are_stored_at_start_and_mirrored(smoke_copy, tmp_path, seen_at_start, capsys):
    from test_trackers import _mlflow_run

    before = set(_labels(smoke_copy))
    assert main(["finetune", "--task", "pe", "--profile", "smoke", "--store", str(smoke_copy), "--quiet",
                 "--name", "pe first look", "--tag", "owner=ana", "--tag", "round=1", "--notes", "baseline",
                 "--track", f"mlflow:{tmp_path / 'ml'}"]) == 0
    (rid,) = set(_labels(smoke_copy)) - before
    want = ("pe first look", {"owner": "ana", "round": "1"}, "baseline")
    assert seen_at_start[rid] == want          # already there while it trained
    assert _labels(smoke_copy)[rid] == want    # and still there once finished
    (run,) = _mlflow_run((tmp_path / "ml").as_uri(), rid)[1]
    assert run.info.run_name == "pe first look"
    assert (run.data.tags["owner"], run.data.tags["round"]) == ("ana", "1")
    assert run.data.tags["mlflow.note.content"].startswith("baseline")


def test_pretrain_labels_are_stored_at_start(smoke_copy, seen_at_start, capsys):
    before = set(_labels(smoke_copy))
    assert main(["pretrain", "--task", "rotation", "--profile", "smoke", "--store", str(smoke_copy), "--quiet",
                 "--set", "steps=2", "--name", "rot short", "--tag", "lab=ct-1", "--note", "two steps"]) == 0
    (rid,) = set(_labels(smoke_copy)) - before
    assert seen_at_start[rid] == _labels(smoke_copy)[rid] == ("rot short", {"lab": "ct-1"}, "two steps")


@pytest.mark.parametrize("command", [
    ["pretrain", "--task", "rotation", "--profile", "smoke"],
    ["finetune", "--task", "pe", "--profile", "smoke"],
    ["benchmark", "--profile", "smoke"],
])
@pytest.mark.parametrize("bad, message", [
    (["--tag", "owner"], "--tag 'owner' must look like KEY=VALUE"),
    (["--tag", "=ana"], "must look like KEY=VALUE"),
    (["--tag", "a b=1"], "tag key 'a b': use up to 64 letters"),
    (["--tag", "benchmark_id=other"], "tag key 'benchmark_id' is reserved for ctssl's own tags"),
])
def test_a_bad_tag_stops_before_a_run_row_exists(smoke_copy, tmp_path, command, bad, message, capsys):
    before = _labels(smoke_copy)
    assert main([*command, "--store", str(smoke_copy), "--quiet", *bad]) == 2
    assert message in capsys.readouterr().err
    assert _labels(smoke_copy) == before
    # on an empty folder the benchmark has not even begun making its data
    empty = tmp_path / "empty"
    assert main([*command, "--store", str(empty), "--quiet", *bad]) == 2
    assert not empty.exists() or not any(empty.iterdir())


def test_benchmark_labels_every_run_it_starts_and_names_itself(smoke_copy, seen_at_start, capsys):
    """A benchmark over the smoke store that fine-tunes only demographics (new units) and reuses the smoke
    pretrainings: the new runs carry the labels plus a `benchmark` tag; the reused ones are left as they were."""
    before = _labels(smoke_copy)
    small = ["--set", "benchmark.tasks=[demographics]", "--set", "benchmark.controls=[]",
             "--set", "benchmark.probes=false", "--set", "benchmark.bias=false"]
    assert main(["benchmark", "--profile", "smoke", "--store", str(smoke_copy), "--quiet", *small,
                 "--name", "demo only", "--tag", "owner=ana", "--note", "no controls"]) == 0
    after = _labels(smoke_copy)
    new = set(after) - set(before)
    (bid,) = [r for r in new if r.startswith("bench-")]
    finetunes = [r for r in new if r.startswith("ft-")]
    assert len(finetunes) == 3 and len(new) == 4        # random + two strategies, and the benchmark's own run
    want = ("demo only", {"owner": "ana", "benchmark": bid}, "no controls")
    assert all(after[r] == want for r in new)
    assert all(seen_at_start[r] == want for r in finetunes)
    assert all(after[r] == before[r] for r in before)   # reused pretrainings keep their own labels


def test_annotate_accepts_notes_as_well_as_note(smoke_copy, capsys):
    rid = next(r for r in _labels(smoke_copy) if r.startswith("ft-"))
    assert main(["annotate", rid, "--store", str(smoke_copy), "--notes", "checked"]) == 0
    assert _labels(smoke_copy)[rid][2] == "checked"
