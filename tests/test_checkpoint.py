"""Checkpoints: atomic save, encoder/head apart, strict loading with loud, specific errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from _fit_fakes import TinyEncoder
from ctssl_core.checkpoint import (
    CheckpointError,
    load_encoder,
    load_encoder_state,
    read_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ctssl_core.models import build_encoder
from ctssl_core.paths import store_paths

torch.set_num_threads(1)


def save_tiny(path, name="tiny", width=0.25, **kw):
    enc = build_encoder(name, width=width)
    head = nn.Linear(enc.embed_dim, 4)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-3)
    cfg = {"encoder": name, "encoder_params": {"width": width}, "task": "rotation"}
    save_checkpoint(path, enc, head, opt, None, step=7, rng=rng_state(), config=cfg, **kw)
    return enc, head


def test_save_then_load_encoder_round_trips_weights_and_config(tmp_path):
    enc, head = save_tiny(tmp_path / "ck" / "last.pt", loader={"epoch": 1, "position": 3})
    loaded, cfg = load_encoder(tmp_path / "ck" / "last.pt")
    assert type(loaded) is type(enc) and cfg["task"] == "rotation"
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    raw = read_checkpoint(tmp_path / "ck" / "last.pt")
    assert raw["step"] == 7 and raw["loader"] == {"epoch": 1, "position": 3}
    assert set(raw["head"]) == {"weight", "bias"}
    assert not any(k.startswith("head") for k in raw["encoder"])  # encoder saved on its own
    assert not list((tmp_path / "ck").glob(".*tmp*"))  # atomic write left no temp file


def test_load_by_run_id_from_the_store(tmp_path):
    store = tmp_path / "store"
    run_ckpt = store_paths(store).run_dir("pretrain-rot-1") / "checkpoints" / "last.pt"
    save_tiny(run_ckpt)
    assert resolve_checkpoint("pretrain-rot-1", store) == run_ckpt
    enc, _ = load_encoder("pretrain-rot-1", store_root=store)
    assert enc.embed_dim == build_encoder("tiny", width=0.25).embed_dim


def test_architecture_mismatch_names_both(tmp_path):
    save_tiny(tmp_path / "r.pt", name="resnet18", width=0.125)
    with pytest.raises(CheckpointError, match="checkpoint is resnet18, you asked for tiny"):
        load_encoder(tmp_path / "r.pt", expected="tiny")
    ck = read_checkpoint(tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="checkpoint is resnet18, you asked for tiny"):
        load_encoder_state(build_encoder("tiny", width=0.25), ck, expected_name="tiny")


def test_strict_load_lists_missing_unexpected_and_shape_keys(tmp_path):
    save_tiny(tmp_path / "t.pt", width=0.25)
    ck = read_checkpoint(tmp_path / "t.pt")
    ck["encoder"].pop(next(iter(ck["encoder"])))
    ck["encoder"]["extra.weight"] = torch.zeros(1)
    ck["encoder_name"] = None  # no name: only the key comparison speaks
    with pytest.raises(CheckpointError, match=r"missing keys \[stem.*unexpected keys \[extra.weight\]"):
        load_encoder_state(build_encoder("tiny", width=0.25), ck)
    ck2 = read_checkpoint(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_encoder_state(build_encoder("tiny", width=0.5), ck2, expected_name="tiny")


def test_missing_or_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found for 'nope'"):
        resolve_checkpoint("nope", tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ctssl checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip_including_named_generators():
    g = torch.Generator().manual_seed(5)
    state = rng_state({"task": g})
    a = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g))
    set_rng_state(state, {"task": g})
    b = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_fake_encoder_name_from_attribute(tmp_path):
    enc = TinyEncoder()
    save_checkpoint(tmp_path / "f.pt", enc, None, None, None, 1, None, None)
    ck = read_checkpoint(tmp_path / "f.pt")
    assert ck["encoder_name"] == "tiny_fake" and ck["encoder_kwargs"] == {"width": 8}
    load_encoder_state(TinyEncoder(), ck)  # same architecture loads strictly


def test_rng_state_round_trips_through_a_saved_checkpoint(tmp_path):
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian: has_gauss=1 must survive too
    save_tiny(tmp_path / "r.pt")
    a = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    set_rng_state(read_checkpoint(tmp_path / "r.pt")["rng"])
    b = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_checkpoint_with_a_legacy_numpy_state_tuple_still_loads_and_restores(tmp_path):
    """Checkpoints written before the plain numpy state held np.random.get_state() (an ndarray) as is."""
    path = tmp_path / "old.pt"
    np.random.seed(11)
    legacy = {**rng_state(), "numpy": np.random.get_state()}
    enc = build_encoder("tiny", width=0.25)
    save_checkpoint(path, enc, None, None, None, step=1, rng=legacy, config={"encoder": "tiny"})
    want = np.random.rand(4)
    np.random.seed(0)
    set_rng_state(read_checkpoint(path)["rng"])
    assert np.array_equal(np.random.rand(4), want)


MARKER_NAME = "pwned.txt"


def _write_marker(path: str) -> str:
    """What a malicious pickle would run on load: here it only leaves a marker file."""
    with open(path, "w") as f:
        f.write("code ran during torch.load")
    return path


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_write_marker, (self.path,))


def test_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pt"
    save_tiny(path, extra={"note": _Payload(str(marker))})   # otherwise a perfectly valid checkpoint
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refused to load checkpoint .*evil\.pt.*_write_marker"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused to load checkpoint"):
        load_encoder(path)
    assert not marker.exists()   # the payload never ran


def _torch_save_on_a_full_disk(obj, f):
    """What torch.save does when the disk fills (seen on a 1 MiB tmpfs): part of the file is
    written, then a RuntimeError from its C++ writer; the OSError (ENOSPC) of the Python file
    it was writing is its context. Given a path, it is the same minus that context."""
    import errno
    import os

    fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    fh.write(b"PK\x03\x04" + b"\0" * 4096)
    if fh is not f:  # a path: torch's own C++ writer, no Python error to chain
        fh.close()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """experiments/fault_injection.py disk_full_checkpoint: the half-written temp file stayed,
    kept the disk full, and the run could not even record its failure (its job never ended);
    the error was torch's "unexpected pos", nothing about space."""
    from ctssl_core.db import StoreFull

    ckdir = tmp_path / "runs" / "pretrain-rotation-x" / "checkpoints"
    save_tiny(ckdir / "last.pt")
    good = (ckdir / "last.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    with pytest.raises(StoreFull) as e:
        save_tiny(ckdir / "last.pt")
    msg = str(e.value)
    assert "no space left on the disk holding" in msg and "the previous checkpoint there is unchanged" in msg
    assert "Free space on that disk" in msg and "ctssl pretrain --resume pretrain-rotation-x" in msg
    assert [p.name for p in ckdir.iterdir()] == ["last.pt"] and (ckdir / "last.pt").read_bytes() == good
    assert read_checkpoint(ckdir / "last.pt")["step"] == 7


def test_a_full_disk_before_any_checkpoint_says_none_was_kept(tmp_path, monkeypatch):
    from ctssl_core.db import StoreFull

    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    with pytest.raises(StoreFull, match="no earlier checkpoint was kept.*run the command again"):
        save_tiny(tmp_path / "out" / "model.pt")
    assert list((tmp_path / "out").iterdir()) == []


def test_another_write_error_is_raised_as_it_is_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def broken(obj, f):
        f.write(b"partial")
        raise RuntimeError("cannot pickle this")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        save_tiny(tmp_path / "ck" / "last.pt")
    assert list((tmp_path / "ck").iterdir()) == []
