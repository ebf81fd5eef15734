"""Pretext task contract, parametrised over the PRETEXT registry: batch shapes/dtypes,
determinism, finite loss, gradients into the encoder, single-batch overfitting, and the
per-task invariants (rotation/flip invert, mask fraction, next-slice target)."""

from __future__ import annotations

import pytest
import torch

from ctssl_core.config import ConfigError
from ctssl_core.models import build_encoder
from ctssl_core.ops import flip_batch, mask_side, rot90_batch
from ctssl_core.pretext import PRETEXT, CompositeBatch, make_pretext
from ctssl_core.tasks import Task, TaskBatch

torch.set_num_threads(1)

B, H = 4, 32
ALL_FIVE = [n for n in PRETEXT if n != "composite"]
# Non-default settings worth covering for some keys; every key is also tested with its defaults.
VARIANTS = {
    "composite": {"tasks": ALL_FIVE, "weights": [1.0, 0.5, 1.0, 1.0, 2.0]},
}
PAPER_SMALL = {"dims": (16, 32), "n_res": 1, "latent_dim": 8, "n_codes": 16}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def floats(logs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def task_of(name: str, variant: bool = False):
    return make_pretext(name, **(VARIANTS.get(name, {}) if variant else {}))


def raw_for(task, seed: int = 0, b: int = B, h: int = H) -> dict[str, torch.Tensor]:
    x = torch.rand(b, task.context, h, h, generator=gen(100 + seed))
    return {"x": x, "slice_id": torch.arange(b), "patient_idx": torch.zeros(b, dtype=torch.long)}


def encoder(name: str = "tiny"):
    torch.manual_seed(0)
    return build_encoder(name, **(PAPER_SMALL if name == "paper" else {}))


def check_batch(name: str, batch: TaskBatch) -> None:
    assert batch.inputs.shape == (B, 1, H, H) and batch.inputs.dtype == torch.float32
    if name in ("rotation", "flip"):
        assert batch.targets.shape == (B,) and batch.targets.dtype == torch.long
        assert ((batch.targets >= 0) & (batch.targets < 4)).all()
        assert batch.mask is None
    else:
        assert batch.targets.shape == (B, 1, H, H) and batch.targets.dtype == torch.float32
        if name == "masked_region":
            assert batch.mask is not None and batch.mask.shape == (B, 1, H, H)
        else:
            assert batch.mask is None


def adam_step(state: dict, params, grads, step: int, lr: float, b1: float = 0.9, b2: float = 0.999) -> None:
    """Plain Adam, inline: a torch.optim optimiser would import torch._dynamo (~5-10 s) here."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + 1e-8))

TASK_CASES = [(n, False) for n in PRETEXT] + [(n, True) for n in VARIANTS]
IDS = [f"{n}{'-variant' if v else ''}" for n, v in TASK_CASES]


@pytest.mark.parametrize("name,variant", TASK_CASES, ids=IDS)
def test_batch_shapes_dtypes_and_protocol(name, variant):
    task = task_of(name, variant)
    assert isinstance(task, Task) and task.name == name and task.label_keys == ()
    batch = task.make_batch(raw_for(task), gen())
    if isinstance(batch, CompositeBatch):
        assert list(batch.parts) == list(task.tasks)
        for sub, part in batch.parts.items():
            check_batch(sub, part)
        assert task.context == (2 if "next_slice" in task.tasks else 1)
    else:
        check_batch(name, batch)


@pytest.mark.parametrize("name,variant", TASK_CASES, ids=IDS)
def test_make_batch_is_deterministic_for_a_fixed_generator(name, variant):
    task = task_of(name, variant)
    raw = raw_for(task)
    b1, b2 = task.make_batch(raw, gen(7)), task.make_batch(raw, gen(7))
    parts1 = getattr(b1, "parts", None) or {name: b1}
    parts2 = getattr(b2, "parts", None) or {name: b2}
    for k in parts1:
        assert torch.equal(parts1[k].inputs, parts2[k].inputs)
        assert torch.equal(parts1[k].targets, parts2[k].targets)
    if name != "next_slice":   # next_slice is deterministic by design: nothing random to vary
        b3 = task.make_batch(raw, gen(8))
        parts3 = getattr(b3, "parts", None) or {name: b3}
        assert any(not torch.equal(parts1[k].inputs, parts3[k].inputs) for k in parts1)


@pytest.mark.parametrize("enc_name", ["tiny", "paper"])
@pytest.mark.parametrize("name,variant", TASK_CASES, ids=IDS)
def test_loss_finite_and_gradients_reach_encoder(name, variant, enc_name):
    task = task_of(name, variant)
    enc = encoder(enc_name)
    head = task.build_head(enc)
    batch = task.make_batch(raw_for(task), gen())
    loss, logs = task.loss(task.forward(enc, head, batch), batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # metrics stay on the device as detached 0-d float32 tensors (no sync per step)
    assert all(v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad for v in logs.values())
    assert "loss" not in logs       # the loop logs the total as train/loss
    loss.backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    head_grads = [p.grad for p in head.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in head_grads)


@pytest.mark.parametrize("name", list(PRETEXT))
def test_overfitting_one_batch_drops_the_loss(name):
    # a 5% square of a 16^2 image is one pixel: hide a 4x4 square so the fit is not trivial
    task = make_pretext(name, **({"frac_side": 0.25} if name == "masked_region" else {}))
    enc = encoder("tiny")
    head = task.build_head(enc)
    batch = task.make_batch(raw_for(task, b=4, h=16), gen())   # 16^2 keeps 15 steps cheap
    params = list(enc.parameters()) + list(head.parameters())
    losses, state = [], {}
    for step in range(1, 16):
        loss, _ = task.loss(task.forward(enc, head, batch), batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        adam_step(state, params, grads, step, lr=3e-3)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_rotation_batch_rotates_back_to_the_input():
    task = make_pretext("rotation")
    raw = raw_for(task, b=16)
    batch = task.make_batch(raw, gen(3))
    assert len(batch.targets.unique()) > 1
    assert torch.equal(rot90_batch(batch.inputs, (4 - batch.targets) % 4), raw["x"])


def test_flip_batch_flips_back_to_the_input():
    task = make_pretext("flip")
    raw = raw_for(task, b=16)
    batch = task.make_batch(raw, gen(3))
    assert len(batch.targets.unique()) > 1
    assert torch.equal(flip_batch(batch.inputs, batch.targets), raw["x"])


@pytest.mark.parametrize("frac,n", [(0.05, 1), (0.2, 1), (0.1, 4)])
def test_masked_region_hides_the_requested_fraction(frac, n):
    task = make_pretext("masked_region", frac_side=frac, n_patches=n)
    raw = raw_for(task)
    x = raw["x"]
    batch = task.make_batch(raw, gen(4))
    side = mask_side(H, H, frac)
    hidden = batch.mask.sum(dim=(1, 2, 3))
    if n == 1:
        assert torch.equal(hidden, torch.full((B,), float(side * side)))
    else:
        assert (hidden >= side * side).all() and (hidden <= n * side * side).all()
    m = batch.mask.bool()
    assert (batch.inputs[m] == 0).all()
    assert torch.equal(batch.inputs[~m], x[~m])
    assert torch.equal(batch.targets, x)


def test_masked_region_loss_counts_only_hidden_pixels_by_default():
    task = make_pretext("masked_region", frac_side=0.25)
    batch = task.make_batch(raw_for(task), gen(5))
    pred = batch.targets.clone()
    pred[~batch.mask.bool()] += 0.5          # wrong everywhere except the hidden squares
    loss, logs = task.loss(pred, batch)
    logs = floats(logs)
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and logs["mse"] > 0.1
    loss_w, _ = make_pretext("masked_region", frac_side=0.25, whole_weight=1.0).loss(pred, batch)
    assert loss_w.item() == pytest.approx(logs["mse"], rel=1e-5)


@pytest.mark.parametrize("gap", [1, 3, 5])
def test_next_slice_targets_are_the_right_slice(gap):
    task = make_pretext("next_slice", gap=gap)
    assert task.context == 2 and task.gap == gap
    raw = raw_for(task)
    x = raw["x"]
    batch = task.make_batch(raw, gen())
    assert torch.equal(batch.inputs, x[:, 0:1])
    assert torch.equal(batch.targets, x[:, 1:2] - x[:, 0:1])
    plain = make_pretext("next_slice", gap=gap, target="slice").make_batch(raw, gen())
    assert torch.equal(plain.targets, x[:, 1:2])


def test_next_slice_copying_the_neighbour_earns_no_credit():
    task = make_pretext("next_slice")
    batch = task.make_batch(raw_for(task), gen())
    copy_pred = torch.zeros_like(batch.targets)       # residual of "slice n+gap == slice n"
    loss, logs = task.loss(copy_pred, batch)
    logs = floats(logs)
    assert loss.item() == pytest.approx(logs["copy_mse"], rel=1e-6) and loss.item() > 0.05
    plain = make_pretext("next_slice", target="slice")
    pb = plain.make_batch(raw_for(plain), gen())
    loss_p, logs_p = plain.loss(pb.inputs.clone(), pb)   # copy the input slice
    logs_p = floats(logs_p)
    assert loss_p.item() == pytest.approx(logs_p["copy_mse"], rel=1e-6)


@pytest.mark.parametrize("noise", ["salt_pepper", "gaussian"])
def test_denoise_corrupts_inputs_and_targets_the_clean_slice(noise):
    task = make_pretext("denoise", noise=noise, amount=0.1, sigma=0.1)
    raw = raw_for(task, b=8)
    batch = task.make_batch(raw, gen(6))
    assert torch.equal(batch.targets, raw["x"])
    changed = (batch.inputs != raw["x"]).float().mean().item()
    if noise == "salt_pepper":
        assert abs(changed - 0.1) < 0.03
        extremes = batch.inputs[batch.inputs != raw["x"]]
        assert ((extremes == 0) | (extremes == 1)).all()
    else:
        assert changed > 0.9 and batch.inputs.min() >= 0 and batch.inputs.max() <= 1


def test_paper_loss_is_the_released_composite_with_vq_term():
    task = make_pretext("masked_region", loss_type="paper")
    enc = encoder("paper")
    head = task.build_head(enc)
    batch = task.make_batch(raw_for(task), gen())
    loss, logs = task.loss(task.forward(enc, head, batch), batch)
    logs = floats(logs)
    assert {"mse", "mse_masked", "vq", "ssim"} <= set(logs)
    expected = 0.2 * logs["mse"] + 0.2 * logs["mse_masked"] + 0.8 * logs["vq"] - 0.1 * logs["ssim"]
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_vq_loss_travels_with_the_prediction_and_enters_every_dense_loss():
    enc = encoder("paper")
    for name in ("masked_region", "next_slice", "denoise"):
        task = make_pretext(name, vq_weight=0.5)
        head = task.build_head(enc)
        batch = task.make_batch(raw_for(task), gen())
        out = task.forward(enc, head, batch)
        assert isinstance(out, tuple) and out[0].shape == (B, 1, H, H) and out[1].dim() == 0
        loss, logs = task.loss(out, batch)
        logs = floats(logs)
        recon = logs["mse_masked"] if name == "masked_region" else logs["mse"]
        assert loss.item() == pytest.approx(recon + 0.5 * logs["vq"], rel=1e-5)
    with pytest.raises(ConfigError, match="pred, aux_loss"):
        make_pretext("denoise").loss((out[0], out[1], out[1]), batch)


def test_composite_logs_each_member_and_weights_the_sum():
    task = make_pretext("composite", **VARIANTS["composite"])
    enc = encoder("tiny")
    head = task.build_head(enc)
    batch = task.make_batch(raw_for(task), gen())
    loss, logs = task.loss(task.forward(enc, head, batch), batch)
    logs = floats(logs)
    assert {f"loss/{t}" for t in ALL_FIVE} <= set(logs)
    weights = dict(zip(ALL_FIVE, VARIANTS["composite"]["weights"]))
    expected = sum(weights[t] * logs[f"loss/{t}"] for t in ALL_FIVE)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert task.gap == 1 and set(head.keys()) == set(ALL_FIVE)


def test_composite_member_params_reach_the_members():
    kw = dict(tasks=["masked_region", "next_slice"], params={"masked_region": {"frac_side": 0.25}, "next_slice": {"gap": 3}})
    task = make_pretext("composite", **kw)
    assert task.members["masked_region"].frac_side == 0.25 and task.gap == 3 and task.context == 2
    twin = make_pretext("composite", **kw)
    assert twin == task and hash(twin) == hash(task) and twin != make_pretext("composite")


def test_unknown_names_keys_and_values_raise_config_errors():
    with pytest.raises(ConfigError, match="masked_region"):
        make_pretext("inpainting")
    with pytest.raises(ConfigError, match="Valid keys"):
        make_pretext("rotation", angle=90)
    with pytest.raises(ConfigError, match="frac_side"):
        make_pretext("masked_region", frac_side=0.0)
    with pytest.raises(ConfigError, match="gap"):
        make_pretext("next_slice", gap=0)
    with pytest.raises(ConfigError, match="not one of"):
        make_pretext("denoise", noise="poisson")
    with pytest.raises(ConfigError, match="unknown or nested"):
        make_pretext("composite", tasks=["rotation", "composite"])
    with pytest.raises(ConfigError, match="one weight per task"):
        make_pretext("composite", tasks=["rotation", "flip"], weights=[1.0])
    with pytest.raises(ConfigError, match="not in composite.tasks"):
        make_pretext("composite", tasks=["rotation"], params={"flip": {}})
    with pytest.raises(ConfigError, match="Valid keys"):
        make_pretext("composite", tasks=["rotation"], params={"rotation": {"bogus": 1}})


def test_bad_raw_batches_say_what_to_do():
    with pytest.raises(ConfigError, match="key 'x'"):
        make_pretext("rotation").make_batch({}, gen())
    with pytest.raises(ConfigError, match="float"):
        make_pretext("flip").make_batch({"x": torch.zeros(2, 1, 8, 8, dtype=torch.int16)}, gen())
    with pytest.raises(ConfigError, match="context=2"):
        make_pretext("next_slice").make_batch({"x": torch.rand(2, 1, 8, 8)}, gen())
    with pytest.raises(ConfigError, match="square"):
        make_pretext("rotation").make_batch({"x": torch.rand(2, 1, 8, 12)}, gen())


@pytest.mark.parametrize("enc_name", ["tiny", "paper"])
def test_bf16_autocast_forward_and_float32_loss(enc_name):
    task = make_pretext("composite", tasks=ALL_FIVE)
    enc = encoder(enc_name)
    head = task.build_head(enc)
    batch = task.make_batch(raw_for(task, h=16), gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = task.loss(task.forward(enc, head, batch), batch)
        logs = floats(logs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert next(enc.parameters()).grad is not None


def test_model_and_pretext_modules_import_only_torch_numpy_stdlib():
    """They must run on a bare GPU machine with torch alone: every module-level import of
    ops/models/pretext (and of the ctssl_core modules they use) is torch, numpy, stdlib or one
    of those modules. Checked on the source, so no fresh interpreter is needed."""
    import ast
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "ctssl_core"
    files = [root / "ops.py", root / "config.py", root / "tasks.py", *root.glob("models/*.py"), *root.glob("pretext/*.py")]
    allowed_own = {"ctssl_core.ops", "ctssl_core.config", "ctssl_core.tasks"}
    bad = []
    for f in files:
        for node in ast.parse(f.read_text()).body:          # module level only: lazy imports are fine
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                top = m.split(".")[0]
                ok = (top in ("torch", "numpy", "__future__") or top in sys.stdlib_module_names
                      or m in allowed_own or m.startswith(("ctssl_core.models", "ctssl_core.pretext")))
                if not ok:
                    bad.append(f"{f.name}: {m}")
    assert len(files) >= 15 and bad == []
