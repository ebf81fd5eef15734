"""Exported weights others can load (issue 17 item 1): a ctssl ResNet's torchvision/timm-named export loads
strictly into torchvision's and timm's model and gives the same features; an architecture without an exact
counterpart gets no such file and says why; an export folder works wherever a checkpoint does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ctssl_core.checkpoint import CheckpointError, load_encoder, read_checkpoint, save_checkpoint
from ctssl_core.cli import main
from ctssl_core.export import export_run, load_exported
from ctssl_core.interop import WEIGHTS as TV_WEIGHTS, InteropError, to_torchvision, torchvision_mismatch
from ctssl_core.models import build_encoder

torch.set_num_threads(1)


def _import_torchvision_and_timm():
    """torchvision and timm, importable with a CPU-only torch.

    PyPI's torchvision wheels are built against CUDA torch: with the CPU torch of this venv its C
    extension (detection ops: nms, roi_align...) cannot load, and torchvision 0.28 then fails at import
    registering a fake kernel for ``torchvision::nms``, an op that was never defined. The models are
    pure Python and never call those ops, so when (and only when) that happens the two op schemas are
    declared here and the import is retried; with a working extension nothing is touched."""
    import sys

    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_torchvision_and_timm.keep = lib   # a Library object unregisters its ops when collected
        import torchvision
    import timm

    return torchvision, timm


def _checkpoint(tmp_path, name, windows=None, **kw):
    """A saved checkpoint (the production writer) of encoder ``name`` whose every weight and BN statistic is
    random: with the default init (zero last-BN gamma, unit running stats) a wrongly mapped key could hide."""
    torch.manual_seed(0)
    enc = build_encoder(name, windows=windows, **kw)
    with torch.no_grad():
        for k, t in enc.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var") else torch.randn_like(t) * 0.1)
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", enc, None, None, None, step=7, rng=None,
                           config={"task": "rotation", "encoder": name, "encoder_params": kw})
    return enc.eval(), path


@pytest.mark.parametrize("name, windows", [("resnet18", None), ("resnet50", "rsna3")])
def test_torchvision_and_timm_load_the_export_and_give_the_same_features(tmp_path, name, windows):
    from safetensors.torch import load_file

    torchvision, timm = _import_torchvision_and_timm()

    enc, ckpt = _checkpoint(tmp_path, name, windows)
    _, card_path = export_run(ckpt, tmp_path / "exp", store_root=tmp_path)
    card = json.loads(card_path.read_text())
    inter = card["interop"]
    in_chans = enc.in_chans
    assert inter["file"] == TV_WEIGHTS and inter["in_chans"] == in_chans == (1 if windows is None else 3)
    state = load_file(str(tmp_path / "exp" / TV_WEIGHTS))
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state
    assert not any(k.startswith("fc.") for k in state)

    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(1))   # (B, C, H, W)
    with torch.no_grad():
        want = enc.embed(x)                                               # (B, 512 or 2048)
        deepest = enc.forward_features(x)[-1]                            # (B, D, 2, 2)

        tv = getattr(torchvision.models, name)(weights=None)
        tv.conv1 = torch.nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        tv.fc = torch.nn.Identity()
        tv.load_state_dict(state, strict=True)
        got_tv = tv.eval()(x)                                            # (B, D)

        tm = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
        tm.load_state_dict(state, strict=True)
        tm.eval()
        got_timm, maps_timm = tm(x), tm.forward_features(x)
    assert want.shape == (2, enc.embed_dim) and want.abs().max() > 1e-3   # a real signal, not zeros
    torch.testing.assert_close(got_tv, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_timm, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps_timm, deepest, atol=1e-5, rtol=1e-5)
    # the card tells a user what to run, with the right channel count
    assert f"in_chans={in_chans}" in inter["timm"]["load"] and f"Conv2d({in_chans}, 64" in inter["torchvision"]["load"]


@pytest.mark.parametrize("name, kw, reason", [
    ("tiny", {}, "encoder 'tiny' has no torchvision/timm counterpart"),
    ("resnet18", {"width": 0.5}, "width=0.5"),
    ("resnet34", {"stem_pool": False}, "stem_pool=False"),
    ("paper", {}, "encoder 'paper' has no torchvision/timm counterpart"),
])
def test_an_architecture_without_an_exact_counterpart_is_refused_plainly(name, kw, reason):
    assert reason in torchvision_mismatch(name, kw)
    with pytest.raises(InteropError, match=reason.replace("(", r"\(")):
        to_torchvision({"stem.0.weight": torch.zeros(1)}, name, kw)


def test_the_mapping_names_every_key_and_refuses_foreign_ones():
    state = build_encoder("resnet34").state_dict()
    mapped = to_torchvision(state, "resnet34", {})
    assert len(mapped) == len(state)
    assert mapped["layer2.0.downsample.0.weight"] is state["stages.1.0.down.0.weight"]
    assert mapped["bn1.num_batches_tracked"] is state["stem.1.num_batches_tracked"]
    assert "layer4.2.conv2.weight" in mapped and not any(k.startswith(("stem", "stages")) for k in mapped)
    with pytest.raises(InteropError, match="'head.weight' has no torchvision/timm name"):
        to_torchvision({**state, "head.weight": torch.zeros(1)}, "resnet34", {})


def test_cli_export_of_tiny_says_there_is_no_torchvision_file_and_removes_a_stale_one(tmp_path, capsys):
    _, r18 = _checkpoint(tmp_path / "a", "resnet18")
    _, tiny = _checkpoint(tmp_path / "b", "tiny")
    out = tmp_path / "exp"
    assert main(["export", str(r18), "--out", str(out), "--store", str(tmp_path)]) == 0
    assert f"wrote {out / TV_WEIGHTS} (torchvision/timm key names" in capsys.readouterr().out
    assert main(["export", str(tiny), "--out", str(out), "--store", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "no torchvision/timm weights: encoder 'tiny' has no torchvision/timm counterpart" in printed
    assert not (out / TV_WEIGHTS).exists()   # the resnet18 file of the first export is not left beside tiny's card
    card = json.loads((out / "card.json").read_text())
    assert card["interop"]["file"] is None and "tiny" in card["interop"]["reason"]


def test_an_export_folder_reads_as_a_checkpoint_and_refuses_a_changed_file(tmp_path):
    enc, ckpt = _checkpoint(tmp_path, "tiny")
    exp = tmp_path / "exp"
    export_run(ckpt, exp, store_root=tmp_path)
    got = read_checkpoint(exp)
    assert got["encoder_name"] == "tiny" and got["step"] == 7 and got["config"]["task"] == "rotation"
    assert got["head"] is None and got["_path"] == str(exp / "encoder.safetensors")
    for path in (exp, exp / "encoder.safetensors"):
        loaded, cfg = load_encoder(path)
        assert cfg["task"] == "rotation"
        for k, v in enc.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    loaded, card = load_exported(exp)
    assert card["encoder"]["name"] == "tiny"
    assert torch.equal(loaded.state_dict()["stem.0.weight"], enc.state_dict()["stem.0.weight"])
    # re-exporting an export keeps the run's id
    export_run(exp, tmp_path / "again", store_root=tmp_path)
    assert json.loads((tmp_path / "again" / "card.json").read_text())["run_id"] == "run"

    damaged = (tmp_path / "again" / "encoder.safetensors").read_bytes()[:-4] + b"\0\0\0\0"
    (exp / "encoder.safetensors").write_bytes(damaged)
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        read_checkpoint(exp)
    (exp / "card.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint found .* an export folder"):
        read_checkpoint(exp)


def test_a_torchvision_named_file_is_not_taken_for_ctssl_weights(tmp_path):
    _, ckpt = _checkpoint(tmp_path, "resnet18")
    export_run(ckpt, tmp_path / "exp", store_root=tmp_path)
    with pytest.raises(CheckpointError, match="pass the export folder"):
        read_checkpoint(tmp_path / "exp" / TV_WEIGHTS)


def test_an_export_folder_works_as_init_and_as_checkpoint(smoke_store, tmp_path, capsys):
    """On runs the real smoke benchmark wrote: export a pretraining, fine-tune from the folder, embed with it."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    with connect(store_paths(smoke_store).db, read_only=True) as con:
        rid, task = con.execute("SELECT run_id, task FROM runs WHERE kind = 'pretrain' AND status = 'succeeded' "
                                "ORDER BY run_id LIMIT 1").fetchone()
    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    exp = tmp_path / "exp"
    assert main(["export", rid, "--out", str(exp), "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["finetune", "--task", "pe", "--init", str(exp), "--profile", "smoke", "--store", str(store),
                 "--quiet"]) == 0
    assert f"pe from {task}" in capsys.readouterr().out
    with connect(store_paths(store).db, read_only=True) as con:
        init, cfg = con.execute("SELECT init, config FROM runs WHERE kind = 'finetune' ORDER BY created_at DESC "
                                "LIMIT 1").fetchone()
    assert init == task and json.loads(cfg)["init_checkpoint"].endswith("encoder.safetensors")
    assert main(["embed", "--checkpoint", str(exp), "--store", str(store), "--no-umap", "--no-progress",
                 "--set", "embed.max_per_series=2"]) == 0
    assert "exam embeddings: ckpt-" in capsys.readouterr().out


def _edited_export(tmp_path, edit):
    """An export the production writer made, with its card then changed by ``edit(card)``."""
    _, ckpt = _checkpoint(tmp_path, "tiny")
    exp = tmp_path / "exp"
    export_run(ckpt, exp, store_root=tmp_path)
    card = json.loads((exp / "card.json").read_text())
    edit(card)
    (exp / "card.json").write_text(json.dumps(card))
    return exp


def test_an_export_whose_card_has_no_sha256_is_refused(tmp_path):
    """Without the digest the weights cannot be checked: refused, with what to do, not loaded unchecked."""
    exp = _edited_export(tmp_path, lambda c: c["weights"].pop("sha256"))
    with pytest.raises(CheckpointError, match=r"card\.json: field 'weights\.sha256' is missing .* `ctssl export RUN_ID"):
        read_checkpoint(exp)
    with pytest.raises(CheckpointError, match="weights.sha256"):
        load_exported(exp)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["encoder"].pop("name"), "encoder.name"),
    (lambda c: c.__setitem__("encoder", "tiny"), "encoder"),
    (lambda c: c.pop("encoder"), "encoder"),
    (lambda c: c["encoder"].__setitem__("kwargs", ["width", 1]), "encoder.kwargs"),
    (lambda c: c.__setitem__("weights", "abc"), "weights.sha256"),
    (lambda c: c["weights"].__setitem__("sha256", 12), "weights.sha256"),
    (lambda c: c["metrics"].__setitem__("step", "seven"), "metrics.step"),
    (lambda c: c.__setitem__("metrics", [1, 2]), "metrics"),
    (lambda c: c.__setitem__("config", "rotation"), "config"),
    (lambda c: c.__setitem__("run_id", 5), "run_id"),
])
def test_a_malformed_card_names_the_file_and_the_field(tmp_path, edit, field):
    exp = _edited_export(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(exp)
    assert f"{exp / 'card.json'}: field {field!r}" in str(e.value) and "ctssl export" in str(e.value)


def test_a_card_that_is_not_an_object_or_not_json_is_refused_plainly(tmp_path):
    exp = _edited_export(tmp_path, lambda c: None)
    (exp / "card.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"field '\(top level\)' must be a JSON object, not list"):
        read_checkpoint(exp)
    (exp / "card.json").write_text('{"encoder": ')
    with pytest.raises(CheckpointError, match=r"card\.json is not readable JSON"):
        read_checkpoint(exp)


def test_re_exporting_an_export_keeps_its_metrics_and_run(smoke_store, tmp_path):
    """A smoke pretraining exported, then its export folder exported again (without the store, as someone who
    was sent the folder would): the second card holds the first card's metrics and run row."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    with connect(store_paths(smoke_store).db, read_only=True) as con:
        rid = con.execute("SELECT run_id FROM runs WHERE kind = 'pretrain' AND status = 'succeeded' "
                          "ORDER BY run_id LIMIT 1").fetchone()[0]
    _, first = export_run(rid, tmp_path / "exp", smoke_store)
    _, again = export_run(tmp_path / "exp", tmp_path / "again", tmp_path / "elsewhere")
    one, two = json.loads(first.read_text()), json.loads(again.read_text())
    assert len(one["metrics"]) > 1 and "train/loss" in one["metrics"] and one["run"]["status"] == "succeeded"
    assert two["metrics"] == one["metrics"] and two["run"] == one["run"] and two["run_id"] == rid
