"""Pure batched tensor transforms for building pretext batches on the device.

Why here and not in a DataLoader: the transforms run on whole batches already on
the training device (GPU or CPU). On an H100 they ran at 330k-675k slices/s,
against ~555 slices/s per CPU core for the same transforms in NumPy (DESIGN.md),
so the data path copies int16 slices once and builds every pretext batch here.

Rules every function keeps:
- the output lives on the input's device; nothing is hard-coded to a device, and no
  host->device copy happens inside (it would stall the GPU stream: no ``torch.tensor(list,
  device=...)``, scalars enter through ``masked_fill``/``where``);
- randomness comes only from an explicit ``torch.Generator`` that lives on the
  input's device (no global RNG), so a fixed generator gives a fixed batch;
- no Python loop over the samples of a batch.

Shapes: images are ``(B, C, H, W)`` (C = 1 for a grey CT slice) unless stated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ctssl_core.config import ConfigError

# Paper preprocessing: one soft-tissue window, level 50 / width 350 HU (-125..225 HU).
PAPER_LEVEL = 50.0
PAPER_WIDTH = 350.0

# Window sets (level, width) in HU, one model input channel each. "paper" is the paper's single
# soft-tissue window; "rsna3" the lung / PE (contrast-filled vessels) / mediastinal windows that
# RSNA-PE solutions stack as RGB: a single soft-tissue window clips lung (where nodules and the
# age effect live) to 0 and bone to 1.
Windows = tuple[tuple[float, float], ...]
WINDOWS: dict[str, Windows] = {
    "paper": ((PAPER_LEVEL, PAPER_WIDTH),),
    "rsna3": ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0)),
}
DEFAULT_WINDOWS: Windows = WINDOWS["paper"]


def _check_generator(generator: torch.Generator, device: torch.device | str | None) -> None:
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"expected a torch.Generator, got {type(generator).__name__}; "
                          f"create one with torch.Generator(device=x.device).manual_seed(seed)")
    if device is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ConfigError(
            f"generator is on {generator.device} but the tensor is on {device}; "
            f"create it with torch.Generator(device=x.device)"
        )


def _check_image(x: Tensor, what: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{what} must be a (B, C, H, W) tensor, got {shape}")


def window(hu: Tensor, level: float = PAPER_LEVEL, width: float = PAPER_WIDTH,
           minmax: bool = False, eps: float = 1e-6) -> Tensor:
    """Map Hounsfield units to [0, 1] through a CT window; optionally min-max each slice.

    ``hu`` may be any integer/float tensor ``(..., H, W)``; the result is float32.
    ``minmax=True`` rescales each slice (last two dims) to span [0, 1], as the
    paper's loader did after windowing; a constant slice maps to all zeros.
    """
    if width <= 0:
        raise ConfigError(f"window width must be > 0 HU, got {width}")
    lo = level - width / 2.0
    x = ((hu.float() - lo) / width).clamp_(0.0, 1.0)
    if minmax:
        mn = x.amin(dim=(-2, -1), keepdim=True)
        mx = x.amax(dim=(-2, -1), keepdim=True)
        x = (x - mn) / (mx - mn).clamp_min(eps)
    return x


def resolve_windows(windows: Any) -> Windows:
    """A preset name (``WINDOWS``) or a sequence of (level, width) pairs -> a tuple of float pairs.

    Configs, checkpoints and the loader all go through here, so a window set is spelled one way
    everywhere (JSON turns the tuples into lists; this turns them back).
    """
    if isinstance(windows, str):
        if windows not in WINDOWS:
            raise ConfigError(f"unknown window preset {windows!r}; choose one of {sorted(WINDOWS)} "
                              f"or give (level, width) pairs, e.g. [[50, 350], [-600, 1500]]")
        return WINDOWS[windows]
    example = "e.g. windows=[[50, 350]] (one soft-tissue window) or windows=rsna3"
    try:
        pairs = [tuple(w) for w in windows]
    except TypeError:
        raise ConfigError(f"windows must be a list of (level, width) HU pairs, got {windows!r}; {example}") from None
    if not pairs:
        raise ConfigError(f"windows is empty; give at least one (level, width) pair, {example}")
    out = []
    for w in pairs:
        if len(w) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w):
            raise ConfigError(f"each window is a (level, width) pair of numbers in HU, got {w!r}; {example}")
        if not w[1] > 0:
            raise ConfigError(f"window width must be > 0 HU, got {w[1]} in {w!r}")
        out.append((float(w[0]), float(w[1])))
    return tuple(out)


def window_stack(hu: Tensor, windows: Any = DEFAULT_WINDOWS) -> Tensor:
    """Hounsfield units ``(..., H, W)`` -> ``(..., C, H, W)`` float32 in [0, 1], one channel per window.

    ``C = len(windows)``. Channel ``c`` is exactly ``window(hu, *windows[c])``: the loop runs over
    the (few) windows, not the samples, and every op stays on ``hu``'s device.
    """
    ws = resolve_windows(windows)
    if not isinstance(hu, Tensor) or hu.dim() < 2:
        shape = tuple(hu.shape) if isinstance(hu, Tensor) else type(hu).__name__
        raise ConfigError(f"window_stack needs a (..., H, W) HU tensor, got {shape}")
    return torch.stack([window(hu, level, width) for level, width in ws], dim=-3)   # (..., C, H, W)


def model_input(hu: Tensor, windows: Any = DEFAULT_WINDOWS) -> Tensor:
    """HU slices ``(B, S, H, W)`` -> the model input ``raw["x"]``: ``(B, S, H, W)`` with one window,
    ``(B, S, C, H, W)`` with C > 1 windows (one channel each), float32 in [0, 1].

    Why two shapes: one window keeps the layout every task and checkpoint has always used (the
    paper's grey slice); several windows add a channel axis per slice, so a two-slice task still
    finds slice n at ``x[:, 0]``. ``slice_at`` reads either layout.
    """
    ws = resolve_windows(windows)
    if len(ws) == 1:
        return window(hu, *ws[0])                                                     # (B, S, H, W)
    return window_stack(hu, ws)                                                       # (B, S, C, H, W)


def slice_at(x: Tensor, s: int) -> Tensor:
    """Slice ``s`` of a model input (``model_input``'s layouts) as an image batch ``(B, C, H, W)``:
    ``C`` = 1 for one window, the number of windows otherwise."""
    if not isinstance(x, Tensor) or x.dim() not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"model input must be (B, S, H, W) or (B, S, C, H, W), got {shape}")
    return x[:, s] if x.dim() == 5 else x[:, s:s + 1]                                # (B, C, H, W)


def flip_batch(x: Tensor, code: Tensor) -> Tensor:
    """Flip each image by its own code: 0 none, 1 left-right, 2 up-down, 3 both.

    ``code`` is a (B,) integer tensor. Bit 0 flips the width axis, bit 1 the
    height axis, so every code is its own inverse.
    """
    _check_image(x)
    if code.shape != (x.shape[0],):
        raise ConfigError(f"code must have shape ({x.shape[0]},), got {tuple(code.shape)}")
    code = code.to(x.device).long().view(-1, 1, 1, 1)           # (B, 1, 1, 1)
    y = torch.where((code & 1).bool(), x.flip(-1), x)           # left-right
    return torch.where((code & 2).bool(), y.flip(-2), y)        # up-down


def rot90_batch(x: Tensor, k: Tensor) -> Tensor:
    """Rotate each square image by ``k[b] * 90`` degrees counter-clockwise (as ``torch.rot90``).

    Vectorised as a conditional transpose followed by flips:
    rot90(x, 1) = flip_ud(x^T), rot90(x, 2) = flip_both(x), rot90(x, 3) = flip_lr(x^T).
    """
    _check_image(x)
    if x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"rotation needs square images, got H={x.shape[-2]} W={x.shape[-1]}; "
                          f"resize or crop the slices to a square first")
    if k.shape != (x.shape[0],):
        raise ConfigError(f"k must have shape ({x.shape[0]},), got {tuple(k.shape)}")
    k = k.to(x.device).long().view(-1, 1, 1, 1) % 4              # (B, 1, 1, 1)
    y = torch.where(k % 2 == 1, x.transpose(-2, -1), x)          # transpose for k = 1, 3
    y = torch.where((k == 1) | (k == 2), y.flip(-2), y)          # up-down for k = 1, 2
    return torch.where(k >= 2, y.flip(-1), y)                    # left-right for k = 2, 3


def square_mask(shape: tuple[int, int, int, int] | torch.Size, frac_side: float, n_patches: int,
                generator: torch.Generator, device: torch.device | str | None = None) -> Tensor:
    """Random square masks ``(B, 1, H, W)`` float, 1 = hidden.

    Each image gets ``n_patches`` squares of side ``max(1, round(frac_side * min(H, W)))``
    at independent uniform positions fully inside the image (squares may overlap
    when ``n_patches > 1``). The paper hid one square of 5% of the side.
    """
    if len(shape) != 4:
        raise ConfigError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    if not 0.0 < frac_side <= 1.0:
        raise ConfigError(f"mask frac_side must be in (0, 1], got {frac_side}")
    if n_patches < 1:
        raise ConfigError(f"n_patches must be >= 1, got {n_patches}")
    B, _, H, W = shape
    _check_generator(generator, device)
    device = torch.device(device) if device is not None else torch.device(generator.device)
    side = mask_side(H, W, frac_side)
    top = torch.randint(0, H - side + 1, (B, 1, n_patches), generator=generator, device=device)
    left = torch.randint(0, W - side + 1, (B, n_patches, 1), generator=generator, device=device)
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    in_rows = ((rows >= top) & (rows < top + side)).float()      # (B, H, n)
    in_cols = ((cols >= left) & (cols < left + side)).float()    # (B, n, W)
    # patches covering each pixel, as one batched matmul: memory O(B*H*W), not O(B*n*H*W)
    covered = torch.bmm(in_rows, in_cols)                        # (B, H, W)
    return (covered > 0).float().unsqueeze(1)                    # (B, 1, H, W)


def mask_side(H: int, W: int, frac_side: float) -> int:
    """Side in pixels of a square covering ``frac_side`` of the shorter image side (at least 1)."""
    return max(1, min(min(H, W), int(round(frac_side * min(H, W)))))


def salt_pepper(x: Tensor, amount: float, generator: torch.Generator,
                low: float = 0.0, high: float = 1.0) -> Tensor:
    """Set a fraction ``amount`` of pixels to ``low`` (pepper) or ``high`` (salt), half each."""
    if not 0.0 <= amount <= 1.0:
        raise ConfigError(f"salt-and-pepper amount must be in [0, 1], got {amount}")
    _check_generator(generator, x.device)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    # masked_fill with Python scalars: no host->device copy, so no stream sync on a GPU
    return x.masked_fill(u < amount / 2, low).masked_fill((u >= amount / 2) & (u < amount), high)


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator,
                   clip: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """Add i.i.d. N(0, sigma^2) noise; clip to ``clip`` (the windowed range) unless None."""
    if sigma < 0:
        raise ConfigError(f"gaussian sigma must be >= 0, got {sigma}")
    _check_generator(generator, x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    y = x + sigma * noise.to(x.dtype)
    return y.clamp(*clip) if clip is not None else y


def _gaussian_kernel1d(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         reduction: str = "mean") -> Tensor:
    """Structural similarity with a Gaussian window (Wang et al. 2004), per channel.

    Used by the paper's reconstruction loss (``- 0.1 * SSIM``). Computed in float32
    with a separable Gaussian and 'valid' borders (the window shrinks for images
    smaller than ``window_size``). ``reduction``: 'mean' -> scalar, 'none' -> (B,).
    """
    _check_image(a, "a")
    if a.shape != b.shape:
        raise ConfigError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if reduction not in ("mean", "none"):
        raise ConfigError(f"ssim reduction must be 'mean' or 'none', got {reduction!r}")
    # variances as E[x^2] - E[x]^2 cancel badly in bf16: keep the blurs in float32 under autocast
    with torch.autocast(device_type=a.device.type, enabled=False):
        per_image = _ssim_per_image(a.float(), b.float(), data_range, window_size, sigma)
    return per_image.mean() if reduction == "mean" else per_image


def _ssim_per_image(a: Tensor, b: Tensor, data_range: float, window_size: int, sigma: float) -> Tensor:
    C = a.shape[1]
    size = min(window_size, a.shape[-1], a.shape[-2])
    if size % 2 == 0:
        size -= 1
    g = _gaussian_kernel1d(size, sigma, a.device, torch.float32)
    gh = g.view(1, 1, size, 1).expand(C, 1, size, 1)
    gw = g.view(1, 1, 1, size).expand(C, 1, 1, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=C), gw, groups=C)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a ** 2
    s_bb = blur(b * b) - mu_b ** 2
    s_ab = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
    return (num / den).flatten(1).mean(1)                        # (B,)


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` (antialiased when shrinking).

    The one resize of model inputs: the loader and the pretraining online probe both call it, so
    training and probing see the same pixels. (Ingest's ``data/ingest/resample.py`` is another job:
    stored HU at the store's geometry, square pixels, exact block means where it can.)
    """
    _check_image(x)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"resize size must be a positive int or (H, W), got {size!r}")
    if tuple(x.shape[-2:]) == hw:
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x.float() if not x.is_floating_point() else x, size=hw, mode="bilinear",
                         align_corners=False, antialias=shrink)


def crop(x: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Per-sample square crops: ``x[b, :, top[b]:top[b]+size, left[b]:left[b]+size]``.

    Gather by index rather than a Python loop so it stays one kernel on the
    device; ``top``/``left`` are integer tensors (B,) that keep the crop inside
    the image (``crop_offsets`` makes them).
    """
    _check_image(x)
    B, C, H, W = x.shape
    if not 1 <= size <= min(H, W):
        raise ConfigError(f"crop size must be in [1, {min(H, W)}] for {H}x{W} slices, got {size}")
    ar = torch.arange(size, device=x.device)
    rows = (top.to(x.device).long().view(B, 1) + ar).clamp_(0, H - 1)      # (B, size)
    cols = (left.to(x.device).long().view(B, 1) + ar).clamp_(0, W - 1)     # (B, size)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]     # (B, size, size, C)
    return out.permute(0, 3, 1, 2).contiguous()                              # (B, C, size, size)


def crop_offsets(shape: tuple[int, int, int, int] | torch.Size, size: int, generator: torch.Generator,
                 focus: Tensor | None = None, focus_prob: float = 0.0) -> tuple[Tensor, Tensor]:
    """Top-left corners (B,) of random ``size`` crops of ``(B, C, H, W)`` slices.

    Uniform over valid positions, except that a sample whose ``focus`` mask
    (B, 1, H, W) has a foreground pixel is, with probability ``focus_prob``,
    cropped around one of those pixels (picked uniformly, placed uniformly in
    the crop's middle half). Why: a nodule covers <1% of a slice, so uniform
    crops would show a segmentation decoder almost nothing to segment; the
    uniform crops that remain keep it honest about the background.
    """
    B, _, H, W = shape
    if not 1 <= size <= min(H, W):
        raise ConfigError(f"crop size must be in [1, {min(H, W)}] for {H}x{W} slices, got {size}")
    if not 0.0 <= focus_prob <= 1.0:
        raise ConfigError(f"focus_prob must be in [0, 1], got {focus_prob}")
    dev = generator.device
    top = torch.randint(0, H - size + 1, (B,), generator=generator, device=dev)
    left = torch.randint(0, W - size + 1, (B,), generator=generator, device=dev)
    if focus is None or focus_prob == 0.0:
        return top, left
    fg = (focus.reshape(B, H * W) > 0.5).float()                           # (B, H*W)
    has = fg.sum(1) > 0
    pick = torch.multinomial(fg + (~has).float()[:, None], 1, generator=generator).squeeze(1)  # (B,) pixel
    py, px = pick // W, pick % W
    u = torch.rand(3, B, generator=generator, device=dev)
    # the picked pixel lands in the middle half of the crop: offset in [size/4, 3*size/4)
    ft = (py - size // 4 - (u[0] * (size // 2)).long()).clamp(0, H - size)
    fl = (px - size // 4 - (u[1] * (size // 2)).long()).clamp(0, W - size)
    use = has & (u[2] < focus_prob)
    return torch.where(use, ft, top), torch.where(use, fl, left)


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size`` x ``size`` square of ``(B, C, H, W)``; ``size`` >= the image returns it whole."""
    _check_image(x)
    H, W = x.shape[-2:]
    if size <= 0 or size >= min(H, W):
        return x
    t, l = (H - size) // 2, (W - size) // 2
    return x[..., t:t + size, l:l + size]


POOLS = ("avg", "max", "avgmax")


def global_pool(feat: Tensor, mode: str = "avg") -> Tensor:
    """``(B, C, h, w)`` feature map -> ``(B, C)`` (avg, max) or ``(B, 2C)`` (avgmax: both, concatenated).

    Average pooling is the encoders' ``embed``; a focal finding (an embolus a few pixels wide)
    is diluted by it, and max pooling keeps the strongest local response instead.
    """
    if mode not in POOLS:
        raise ConfigError(f"unknown pool {mode!r}; choose one of {list(POOLS)}")
    f = feat.float()
    if mode == "avg":
        return f.mean(dim=(-2, -1))
    if mode == "max":
        return f.amax(dim=(-2, -1))
    return torch.cat([f.mean(dim=(-2, -1)), f.amax(dim=(-2, -1))], dim=1)       # (B, 2C)


__all__ = [
    "PAPER_LEVEL", "PAPER_WIDTH", "WINDOWS", "DEFAULT_WINDOWS", "Windows", "resolve_windows", "window_stack",
    "model_input", "slice_at",
    "window", "flip_batch", "rot90_batch", "square_mask", "mask_side",
    "salt_pepper", "gaussian_noise", "ssim", "resize", "crop", "crop_offsets", "center_crop",
    "POOLS", "global_pool",
]
