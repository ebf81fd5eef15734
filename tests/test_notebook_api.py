"""The Python API a notebook user gets from ``import ctssl_core`` (issue 17 item 3), run as they would run it:
a fresh interpreter, on a store made by the real smoke benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ctssl_core.paths import REPO_ROOT


def test_import_ctssl_core_is_light_and_names_its_api():
    code = ("import sys, ctssl_core as ct; print(sorted(ct.__all__)); "
            "print('torch' in sys.modules); print(ct.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT).stdout.splitlines()
    assert out[0] == str(sorted(["__version__", "SliceDataset", "SliceStore", "load_encoder", "read", "run_benchmark"]))
    assert out[1] == "False"                                  # the dashboard imports ctssl_core without torch
    import ctssl_core

    with pytest.raises(AttributeError, match="the API is"):
        ctssl_core.no_such_thing  # noqa: B018


def test_a_notebook_reads_the_store_trains_on_it_and_loads_an_export(smoke_store, tmp_path):
    """What the README's notebook paragraph promises, in a fresh interpreter: a DataLoader over the test split
    in the encoder's own windows, an exported encoder applied to a batch, the benchmark's table read back."""
    from ctssl_core.plan import make_plan
    from ctssl_core.export import export_run

    plan = make_plan("smoke")
    pre = next(u for u in plan.units if u.kind == "pretrain")
    from ctssl_core.benchmark import find_pretrain

    run_id = find_pretrain(pre, smoke_store)
    export_run(run_id, tmp_path / "export", smoke_store)
    b = plan.bench
    script = textwrap.dedent(f"""
        import json, torch, ctssl_core as ct
        enc, cfg = ct.load_encoder({str(tmp_path / "export")!r})
        ds = ct.SliceDataset({str(smoke_store)!r}, split="test", windows=enc, split_seed={b.split_seed},
                             pool={b.pool}, split_fractions={list(b.split_fractions)})
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
        with torch.no_grad():
            feats = enc(batch["image"])[-1]
        table = ct.read.headline_table({str(smoke_store)!r})
        print(json.dumps({{"n": len(ds), "shape": list(batch["image"].shape), "feat": list(feats.shape),
                          "keys": sorted(batch), "patients": sorted(set(ds[i]["patient_key"] for i in range(len(ds)))),
                          "inits": sorted(set(table.init))}}))
    """)
    got = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                    cwd=tmp_path).stdout.strip().splitlines()[-1])
    from ctssl_core.checkpoint import load_encoder
    from ctssl_core.data.store import SliceStore
    from ctssl_core.finetune import patient_keys, split_patient_idx

    store = SliceStore.open(smoke_store)
    test = split_patient_idx(store, smoke_store, b.split_seed, b.pool, b.split_fractions)["test"]
    keys = patient_keys(store)
    assert got["patients"] == sorted(keys[i] for i in test)                    # the benchmark's test split
    assert got["n"] == int(np.isin(np.asarray(store.patient_idx), test).sum())
    enc, _ = load_encoder(tmp_path / "export")
    size = int(store.read([0]).shape[-1])
    assert got["shape"] == [4, len(enc.windows), size, size]                   # one channel per encoder window
    assert got["feat"][0] == 4 and got["keys"] == ["image", "index", "nodule_mask", "patient_key", "pe", "slice_id"]
    assert {"random", pre.init} <= set(got["inits"])


def test_slice_dataset_items_are_the_stores_slices_windowed_with_their_labels(smoke_store):
    import ctssl_core as ct
    from ctssl_core import ops
    from ctssl_core.config import ConfigError
    from ctssl_core.data.store import SliceStore

    store = SliceStore.open(smoke_store)
    ds = ct.SliceDataset(store, windows="rsna3")
    assert len(ds) == len(store)
    pe = store.labels("pe")
    k = int(np.flatnonzero(pe == 1)[0])
    item = ds[k]
    want = ops.model_input(torch.from_numpy(store.read([k]).astype(np.float32))[:, None], "rsna3")[0, 0]
    assert torch.equal(item["image"], want) and item["image"].shape[0] == 3
    assert item["pe"] == 1.0 and item["nodule_mask"].dtype == torch.uint8
    assert torch.equal(item["nodule_mask"], torch.from_numpy(store.read_mask([k])[0]))
    one = ct.SliceDataset(store)[k]["image"]                                    # default: the paper's one window
    assert one.shape[0] == 1 and torch.equal(one[0], ops.window(torch.from_numpy(store.read([k])[0].astype(np.float32))))
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ConfigError, match="split must be one of"):
        ct.SliceDataset(store, split="tset")
    with pytest.raises(ConfigError, match="needs pool > 0"):
        ct.SliceDataset(store, split="pool")


def test_slice_dataset_pairs_each_image_with_its_own_labels_when_a_series_was_left_out(smoke_store, tmp_path):
    """A damaged series (here the first one, truncated) is left out by SliceStore.open, so slice ids no longer
    equal store positions: every item's image must still be its own slice's, with that slice's labels."""
    import shutil

    import ctssl_core as ct
    from ctssl_core import ops
    from ctssl_core.data.store import SliceStore

    root = tmp_path / "store"
    shutil.copytree(smoke_store, root, ignore=shutil.ignore_patterns("runs", "embeddings"))
    store0 = SliceStore.open(root)
    rel = store0.series["array_path"].iloc[0]                      # the series holding slice ids 0..n-1
    with open(root / rel, "r+b") as f:
        f.truncate(64)
    store = SliceStore.open(root)
    assert store.unreadable and int(np.asarray(store.slice_ids)[0]) > 0    # ids start after the gap
    ds = ct.SliceDataset(store)
    assert len(ds) == len(store)
    for pos in (0, len(ds) // 2, len(ds) - 1):
        sid = int(np.asarray(store.slice_ids)[pos])
        item = ds[pos]
        want = ops.window(torch.from_numpy(store.read([sid])[0].astype(np.float32)))
        assert item["slice_id"] == sid and torch.equal(item["image"][0], want)
        assert item["pe"] == pytest.approx(store.labels("pe")[pos], nan_ok=True)
