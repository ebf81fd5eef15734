"""Stored pixel values -> HU at the store's in-plane size: the one resample path of ingest.

Two implementations of one result: ``hu_box`` (exact integer block means in numpy, for the
power-of-two ratios such as 512 -> 256) and ``_hu_chunk_torch`` / ``resize_square_pixels``
(torch, any ratio); ``box_factors`` says when the first applies, and tests pin that both give the
same int16 values bit for bit. ``fit_square`` resamples LIDC masks through the same geometry.
Why its own module: every choice about the stored geometry (square pixels, padding with air,
rounding and clipping) is made here once.
"""

from __future__ import annotations

import numpy as np

from ctssl_core.data.dicom import HU_MAX, HU_MIN


def square_geometry(h: int, w: int, spacing: tuple[float, float] | None, size: int
                    ) -> tuple[int, int, float | None]:
    """(nh, nw, stored spacing mm or None): the in-plane size an (h, w) image with ``spacing``
    gets so that its longer physical side spans ``size`` pixels with square pixels."""
    sy, sx = spacing if spacing else (1.0, 1.0)
    ph, pw = h * sy, w * sx
    scale = size / max(ph, pw)
    nh, nw = max(1, min(size, round(ph * scale))), max(1, min(size, round(pw * scale)))
    return nh, nw, ((max(ph, pw) / size) if spacing else None)


def box_factors(h: int, w: int, spacing: tuple[float, float] | None, size: int) -> tuple[int, int] | None:
    """(fy, fx) when ``resize_square_pixels`` reduces to exact fy x fx box averages, else None.

    That is the case when its 2x halving steps alone reach the target size (512 -> 256 and
    other power-of-two ratios, or no resize at all). Then ``build_series`` sums blocks of the
    stored integers exactly in numpy instead (same values, a fraction of the cost). Capped at
    64 pixels per block so every block sum stays exact in float32.
    """
    nh, nw, _ = square_geometry(h, w, spacing, size)
    hh, ww = h, w
    while True:  # the same halving rule as resize_square_pixels
        half_h, half_w = hh >= 2 * nh and hh % 2 == 0, ww >= 2 * nw and ww % 2 == 0
        if not (half_h or half_w):
            break
        hh, ww = (hh // 2 if half_h else hh), (ww // 2 if half_w else ww)
    if (hh, ww) != (nh, nw) or (h // hh) * (w // ww) > 64:
        return None
    return h // hh, w // ww


def box_sum(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Exact int32 sums over fy x fx blocks of a 2-D integer image (fy, fx powers of two, fy*fx <= 64).

    Pairs of rows first: in a C-contiguous image rows 2i and 2i+1 are the two contiguous
    halves of one row of the (H/2, 2W) view, so that add streams memory; columns after, on
    half the data. ~3x cheaper than torch's float bilinear halving, and exact.
    """
    s = np.ascontiguousarray(a)
    while fy > 1:
        hh, w = s.shape[0] // 2, s.shape[1]
        r = s.reshape(hh, 2 * w)
        s = np.add(r[:, :w], r[:, w:], dtype=np.int32)
        fy //= 2
    while fx > 1:
        r = s.reshape(s.shape[0], s.shape[1] // 2, 2)
        s = np.add(r[..., 0], r[..., 1], dtype=np.int32)
        fx //= 2
    return s


def hu_box(a: np.ndarray, slope: float, intercept: float, fy: int, fx: int) -> np.ndarray | None:
    """One slice's stored integers (H, W) -> float32 HU (H/fy, W/fx), rounded and clipped; None
    where only the float path (``_hu_chunk_torch``) reproduces the result exactly.

    Same arithmetic as the torch path, bit for bit: clamp padding below air in stored units,
    block mean (an exact integer sum times 1/(fy*fx), a power of two), then slope and intercept
    in float32. The clamp is done on the integers, so it must be at an integer value.
    """
    if a.dtype.kind not in "iu":
        return None
    s32, i32 = np.float32(slope), np.float32(intercept)
    if not s32 > 0:
        return None
    lo = (np.float32(HU_MIN) - i32) / s32  # air in stored units (float32, as the torch path computes it)
    bits = 8 * a.dtype.itemsize  # the dtype's range (np.iinfo costs ~15 us a call)
    lowest, highest = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if a.dtype.kind == "i" else (0, (1 << bits) - 1)
    if lo > lowest:
        if not (float(lo).is_integer() and lo <= highest):
            return None
        a = np.maximum(a, a.dtype.type(int(lo)))
    f = box_sum(a, fy, fx).astype(np.float32)  # exact: |sum| < 2^24
    scale = np.float32(float(s32) / (fy * fx))
    if scale != 1:
        f *= scale
    f += i32
    np.rint(f, out=f)
    return np.clip(f, HU_MIN, HU_MAX, out=f)


def resize_square_pixels(t, spacing: tuple[float, float] | None, size: int):
    """Resize (C, H, W) float tensor so the longer physical side spans ``size`` pixels with square pixels.

    Shrinking uses box averaging ("area": anti-aliased, ~5x cheaper than bilinear+antialias);
    enlarging uses bilinear. Returns (tensor (C, nh, nw), stored spacing in mm or None).
    """
    import torch.nn.functional as F

    _, h, w = t.shape
    nh, nw, out_spacing = square_geometry(h, w, spacing, size)
    x = t[:, None]  # (C, 1, H, W)
    # exact 2x2 box averages while at least 2x too big: bilinear at exactly half size samples the
    # centre of each 2x2 block, which is their mean, and runs ~3x faster than "area" or antialias.
    while True:
        hh, ww = x.shape[2], x.shape[3]
        half_h, half_w = hh >= 2 * nh and hh % 2 == 0, ww >= 2 * nw and ww % 2 == 0
        if not (half_h or half_w):
            break
        x = F.interpolate(x, size=(hh // 2 if half_h else hh, ww // 2 if half_w else ww), mode="bilinear",
                          align_corners=False)
    if tuple(x.shape[2:]) != (nh, nw):
        down = nh < x.shape[2] or nw < x.shape[3]
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=down)
    return x[:, 0], out_spacing


def pad_square(t, size: int, fill: float):
    """Centre (C, nh, nw) in (C, size, size), filling with ``fill``."""
    import torch.nn.functional as F

    _, nh, nw = t.shape
    if (nh, nw) == (size, size):
        return t
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(t, (left, size - nw - left, top, size - nh - top), value=fill)


def fit_square(x: np.ndarray, spacing: tuple[float, float] | None, size: int, fill: float) -> tuple[np.ndarray, float | None]:
    """Resample (S, H, W) to (S, size, size) keeping the physical aspect ratio (pad with ``fill``)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t, out_spacing = resize_square_pixels(t, spacing, size)
    return pad_square(t, size, fill).numpy(), out_spacing


def _hu_chunk_torch(raw: np.ndarray, slope: np.ndarray, icpt: np.ndarray, spacing, size: int) -> np.ndarray:
    """Stored values (C, H, W) float32 -> int16 HU (C, size, size): the general resample path.

    ``raw`` may be modified (it is the reused chunk buffer).
    """
    import torch

    # HU = slope * stored + intercept is affine, so it commutes with resampling: clamp padding below air
    # in stored units first, resample the stored values, then rescale the (4x smaller) result.
    t = torch.from_numpy(raw)
    s_t, i_t = torch.from_numpy(slope)[:, None, None], torch.from_numpy(icpt)[:, None, None]
    lo = (HU_MIN - icpt) / slope  # (C,) air in stored units
    if (slope > 0).all() and np.all(lo == lo[0]):
        t.clamp_min_(float(lo[0]))
    else:
        for j in range(len(slope)):
            t[j] = t[j].clamp_min(float(lo[j])) if slope[j] > 0 else t[j].clamp_max(float(lo[j]))
    t, _ = resize_square_pixels(t, spacing, size)
    if t.data_ptr() == raw.ctypes.data:
        t = t.clone()  # no resize happened: don't rescale the reused buffer in place
    if np.all(slope == slope[0]) and np.all(icpt == icpt[0]):  # usual case: scalar in-place ops
        if slope[0] != 1.0:
            t.mul_(float(slope[0]))
        t.add_(float(icpt[0]))
    else:
        t.mul_(s_t).add_(i_t)
    t = t.round_().clamp_(HU_MIN, HU_MAX)
    return pad_square(t, size, float(HU_MIN)).to(torch.int16).numpy()
