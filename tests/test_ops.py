"""Invariants of the batched tensor transforms in ctssl_core.ops (tiny CPU tensors)."""

from __future__ import annotations

import pytest
import torch

from ctssl_core import ops
from ctssl_core.config import ConfigError

torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_window_maps_paper_window_to_unit_range():
    hu = torch.tensor([[[-1000, -125, 50, 225, 3000]]], dtype=torch.int16)   # (1, 1, 5)
    x = ops.window(hu)
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))


def test_window_minmax_spans_each_slice_and_constant_slice_is_zero():
    hu = torch.stack([torch.linspace(-50, 100, 16).view(4, 4), torch.full((4, 4), 40.0)])  # (2, 4, 4)
    x = ops.window(hu, minmax=True)
    assert x[0].min().item() == 0.0 and x[0].max().item() == pytest.approx(1.0)
    assert torch.equal(x[1], torch.zeros(4, 4))
    with pytest.raises(ConfigError, match="width"):
        ops.window(hu, width=0)


def test_rot90_batch_matches_torch_rot90_per_sample_and_inverts():
    x = torch.rand(8, 2, 6, 6, generator=gen())
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    y = ops.rot90_batch(x, k)
    for i in range(8):
        assert torch.equal(y[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    assert torch.equal(ops.rot90_batch(y, (4 - k) % 4), x)


def test_rot90_batch_rejects_non_square_and_bad_k():
    with pytest.raises(ConfigError, match="square"):
        ops.rot90_batch(torch.rand(2, 1, 4, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="k must have shape"):
        ops.rot90_batch(torch.rand(2, 1, 4, 4), torch.zeros(3, dtype=torch.long))


def test_flip_batch_matches_torch_flip_and_is_an_involution():
    x = torch.rand(4, 1, 5, 7, generator=gen(1))
    code = torch.tensor([0, 1, 2, 3])
    y = ops.flip_batch(x, code)
    assert torch.equal(y[0], x[0])
    assert torch.equal(y[1], x[1].flip(-1))
    assert torch.equal(y[2], x[2].flip(-2))
    assert torch.equal(y[3], x[3].flip(-1).flip(-2))
    assert torch.equal(ops.flip_batch(y, code), x)
    with pytest.raises(ConfigError, match="code must have shape"):
        ops.flip_batch(x, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("H,W,frac", [(32, 32, 0.05), (40, 40, 0.25), (20, 30, 0.33)])
def test_square_mask_single_patch_hides_one_square_of_requested_side(H, W, frac):
    m = ops.square_mask((16, 1, H, W), frac, 1, gen(2))
    side = ops.mask_side(H, W, frac)
    assert side == max(1, round(frac * min(H, W)))
    assert m.shape == (16, 1, H, W) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.sum(dim=(1, 2, 3)), torch.full((16,), float(side * side)))
    for b in range(16):   # the hidden pixels form one side x side square
        rows = m[b, 0].any(1).nonzero().flatten()
        cols = m[b, 0].any(0).nonzero().flatten()
        assert rows.numel() == side and cols.numel() == side
        assert rows[-1] - rows[0] == side - 1 and cols[-1] - cols[0] == side - 1


def test_square_mask_multi_patch_fraction_and_determinism():
    shape = (64, 1, 32, 32)
    m = ops.square_mask(shape, 0.25, 3, gen(3))
    side = ops.mask_side(32, 32, 0.25)
    hidden = m.sum(dim=(1, 2, 3))
    assert (hidden >= side * side).all() and (hidden <= 3 * side * side).all()
    assert (hidden > side * side).float().mean() > 0.5            # most squares do not coincide
    assert torch.equal(m, ops.square_mask(shape, 0.25, 3, gen(3)))
    assert not torch.equal(m, ops.square_mask(shape, 0.25, 3, gen(4)))


def test_square_mask_bad_input_messages():
    with pytest.raises(ConfigError, match="frac_side"):
        ops.square_mask((1, 1, 8, 8), 0.0, 1, gen())
    with pytest.raises(ConfigError, match="n_patches"):
        ops.square_mask((1, 1, 8, 8), 0.1, 0, gen())
    with pytest.raises(ConfigError, match="torch.Generator"):
        ops.square_mask((1, 1, 8, 8), 0.1, 1, 123)  # type: ignore[arg-type]


def test_salt_pepper_corrupts_requested_fraction_with_extremes():
    x = torch.full((8, 1, 64, 64), 0.5)
    y = ops.salt_pepper(x, 0.2, gen(5))
    changed = y != x
    assert abs(changed.float().mean().item() - 0.2) < 0.01
    assert set(y[changed].unique().tolist()) == {0.0, 1.0}
    assert abs((y == 1).float().mean().item() - 0.1) < 0.01
    assert torch.equal(ops.salt_pepper(x, 0.0, gen(5)), x)
    assert torch.equal(y, ops.salt_pepper(x, 0.2, gen(5)))
    with pytest.raises(ConfigError, match="amount"):
        ops.salt_pepper(x, 1.5, gen())


def test_gaussian_noise_std_and_clipping():
    x = torch.full((4, 1, 64, 64), 0.5)
    y = ops.gaussian_noise(x, 0.05, gen(6), clip=None)
    assert abs((y - x).std().item() - 0.05) < 0.003
    z = ops.gaussian_noise(x, 2.0, gen(6))
    assert z.min().item() == 0.0 and z.max().item() == 1.0
    with pytest.raises(ConfigError, match="sigma"):
        ops.gaussian_noise(x, -1.0, gen())


def test_ssim_identity_symmetry_and_degradation():
    a = torch.rand(3, 1, 24, 24, generator=gen(7))
    b = (a + 0.2 * torch.randn(3, 1, 24, 24, generator=gen(8))).clamp(0, 1)
    assert ops.ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    s_ab, s_ba = ops.ssim(a, b), ops.ssim(b, a)
    assert s_ab.item() == pytest.approx(s_ba.item(), abs=1e-6)
    assert s_ab.item() < 0.9
    per = ops.ssim(a, b, reduction="none")
    assert per.shape == (3,) and per.mean().item() == pytest.approx(s_ab.item(), abs=1e-6)
    with pytest.raises(ConfigError, match="equal shapes"):
        ops.ssim(a, b[:, :, :20])


def test_resize_shapes_and_constant_preserved():
    x = torch.full((2, 1, 32, 32), 0.25)
    y = ops.resize(x, 16)
    assert y.shape == (2, 1, 16, 16) and torch.allclose(y, torch.full_like(y, 0.25))
    assert ops.resize(x, (48, 40)).shape == (2, 1, 48, 40)
    assert ops.resize(x, 32) is x
    with pytest.raises(ConfigError, match="size"):
        ops.resize(x, 0)


def test_ssim_stays_float32_under_bf16_autocast():
    a = torch.rand(2, 1, 16, 16, generator=gen(9))
    b = (a + 0.05 * torch.randn(2, 1, 16, 16, generator=gen(10))).clamp(0, 1)
    ref = ops.ssim(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ssim(a, b)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), abs=1e-6)
    with pytest.raises(ConfigError, match="reduction"):
        ops.ssim(a, b, reduction="sum")


def test_crop_takes_each_samples_own_window():
    x = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).view(2, 2, 8, 8)
    out = ops.crop(x, torch.tensor([0, 4]), torch.tensor([1, 2]), 4)
    assert out.shape == (2, 2, 4, 4)
    assert torch.equal(out[0], x[0, :, 0:4, 1:5]) and torch.equal(out[1], x[1, :, 4:8, 2:6])
    with pytest.raises(ConfigError, match="crop size"):
        ops.crop(x, torch.tensor([0, 0]), torch.tensor([0, 0]), 9)


def test_crop_offsets_stay_inside_and_focus_lands_on_the_mask():
    B, H = 64, 40
    m = torch.zeros(B, 1, H, H)
    ys, xs = torch.randint(0, H, (B,), generator=gen(1)), torch.randint(0, H, (B,), generator=gen(2))
    m[torch.arange(B), 0, ys, xs] = 1.0                       # one foreground pixel per sample
    m[-8:] = 0                                                 # ... except the last eight (empty slices)
    top, left = ops.crop_offsets(m.shape, 16, gen(3), focus=m, focus_prob=1.0)
    assert ((top >= 0) & (top <= H - 16) & (left >= 0) & (left <= H - 16)).all()
    crops = ops.crop(m, top, left, 16)
    assert (crops[:-8].flatten(1).sum(1) == 1).all()           # every focused crop holds its pixel
    # without focus the pixel is mostly outside a 16-px window of a 40-px slice
    top0, left0 = ops.crop_offsets(m.shape, 16, gen(3))
    assert ops.crop(m, top0, left0, 16)[:-8].flatten(1).sum(1).mean() < 0.5
    # same generator seed -> same corners; focus_prob 0.5 focuses about half
    again = ops.crop_offsets(m.shape, 16, gen(3), focus=m, focus_prob=1.0)
    assert torch.equal(again[0], top) and torch.equal(again[1], left)
    many = torch.zeros(2000, 1, H, H)
    many[:, 0, 0, 0] = 1
    t, l = ops.crop_offsets(many.shape, 16, gen(4), focus=many, focus_prob=0.5)
    assert 0.4 < ((t == 0) & (l == 0)).float().mean().item() < 0.6
    with pytest.raises(ConfigError, match="focus_prob"):
        ops.crop_offsets(m.shape, 16, gen(0), focus=m, focus_prob=1.5)


def test_center_crop_and_whole_slice_passthrough():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    assert torch.equal(ops.center_crop(x, 4), x[..., 2:6, 2:6])
    assert ops.center_crop(x, 0) is x and ops.center_crop(x, 8) is x


def test_global_pool_modes():
    f = torch.zeros(2, 3, 4, 4)
    f[0, 1, 2, 3] = 8.0                                      # one strong local response
    torch.testing.assert_close(ops.global_pool(f, "avg")[0], torch.tensor([0.0, 0.5, 0.0]))
    torch.testing.assert_close(ops.global_pool(f, "max")[0], torch.tensor([0.0, 8.0, 0.0]))
    both = ops.global_pool(f, "avgmax")
    assert both.shape == (2, 6) and torch.equal(both[:, :3], ops.global_pool(f, "avg"))
    with pytest.raises(ConfigError, match="unknown pool"):
        ops.global_pool(f, "sum")


# ---------------- window_stack: several HU windows as channels ----------------
from ctssl_core.ops import WINDOWS, resolve_windows, window, window_stack  # noqa: E402


@pytest.mark.parametrize("preset", ["paper", "rsna3"])
def test_window_stack_equals_each_window_per_channel(preset):
    hu = torch.randint(-1200, 1500, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.int16)
    x = window_stack(hu, preset)
    ws = WINDOWS[preset]
    assert x.shape == (2, 3, len(ws), 8, 8) and x.dtype == torch.float32
    for c, (level, width) in enumerate(ws):
        assert torch.equal(x[:, :, c], window(hu, level, width))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_window_stack_lung_window_keeps_what_the_soft_tissue_window_clips():
    hu = torch.tensor([[-900, -500], [0, 300]], dtype=torch.int16)   # lung, ground glass, water, contrast
    x = window_stack(hu, "rsna3")                                     # (3, 2, 2)
    assert torch.equal(window_stack(hu, "paper")[0, 0], torch.zeros(2))   # soft tissue: lung all 0
    assert float(x[0, 0, 0]) < float(x[0, 0, 1])                     # lung window tells them apart


@pytest.mark.parametrize("bad", ["lung", [], [[50]], [[50, 0]], [["a", 1]], 5])
def test_resolve_windows_rejects_bad_sets_with_advice(bad):
    with pytest.raises(ConfigError, match="window"):
        resolve_windows(bad)


def test_resolve_windows_normalises_json_lists():
    assert resolve_windows([[50, 350], [-600, 1500]]) == ((50.0, 350.0), (-600.0, 1500.0))
