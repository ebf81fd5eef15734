"""Procedural chest-CT phantom: anatomy, findings and acquisition physics in NumPy only.

Why a phantom: no real chest CT can be downloaded here, yet the five pretext
tasks and the three downstream tasks need images with real structure (and the
bias analysis needs *known* demographic correlates). Everything here is pure
NumPy so the GPU benchmark can import it on a machine without pydicom.

Coordinates follow DICOM LPS: x grows to the patient's left (image right), y grows
posterior (image down), z grows superior. Slice 0 is the most superior (lung apex);
``t`` in [0, 1] is the normalised position from the apex (0) to below the
diaphragm dome (1). All anatomy is an analytic function of ``t`` (and of the
per-patient parameters), so neighbouring slices are similar but not identical.

Anatomy (painted back to front): CT table, body outline (habitus), breasts,
subcutaneous fat, muscle, scapulae/clavicles, ribs (sloping, so they move with
z), the thoracic cavity with mediastinal fat, two lungs that grow from the apex
and are cut at the base by the liver dome (right, higher) and the spleen/stomach
dome (left, lower, with a gas bubble), lung parenchyma with a gravity gradient
and smooth texture, peripheral pulmonary vessel trees, trachea -> carina ->
main bronchi, oesophagus, heart left of midline with contrast-filled right and
left ventricles, ascending aorta -> arch -> descending aorta with arch branches,
contrast-filled pulmonary trunk -> left/right pulmonary arteries -> lobar
arteries, spine with canal, sternum. Findings: pulmonary-embolus filling defects
inside the contrast arteries and solid / part-solid lung nodules.

The acquisition model (per site) blurs with a Gaussian MTF, averages along z
for thicker slices, and adds spatially correlated noise whose power spectrum is
a windowed ramp (the texture of filtered back-projection noise), with a level
that grows with body size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ---------------------------------------------------------------- tissue values (HU)
AIR = -1000.0
FAT = -100.0
MUSCLE = 50.0
SOFT = 40.0
BLOOD_CONTRAST_PA = 320.0  # CT pulmonary angiography: the pulmonary arteries are brightest
BLOOD_CONTRAST_AO = 210.0
BLOOD_RV = 300.0
BLOOD_LV = 190.0
THROMBUS = 55.0  # acute clot; ~250 HU below the contrast column
CHRONIC_THROMBUS = 75.0
LIVER = 75.0
CSF = 10.0
CARTILAGE = 120.0
NODULE_SOLID = 35.0
NODULE_GGO = -480.0
TABLE = -250.0


@dataclass(frozen=True)
class Site:
    """One scanner/site: what differs between acquisitions in a multi-centre cohort."""

    name: str
    manufacturer: str
    model: str
    kernel: str
    institution: str
    noise_hu: float  # noise std in water for a 300 mm wide patient
    blur_mm: float  # Gaussian MTF sigma
    noise_cutoff: float  # relative cutoff of the noise power spectrum (sharper kernel -> higher)
    fov_mm: float  # reconstruction field of view -> PixelSpacing = fov / size
    thickness_factor: float  # SliceThickness / slice spacing (>= 1 means overlapping thick slices)
    signed_pixels: bool  # True: int16 with intercept 0; False: uint16 with intercept -1024


SITES: tuple[Site, ...] = (
    Site("site_a", "SynthCT Systems", "Helix 64", "STANDARD", "Synthetic General Hospital", 14.0, 0.55, 0.55, 380.0, 1.0, False),
    Site("site_b", "Phantom Medical", "Quantix 128", "B30f", "Synthetic University Clinic", 22.0, 0.75, 0.45, 420.0, 1.6, True),
    Site("site_c", "Voxelworks", "Aurora 16", "SOFT", "Synthetic Community Hospital", 30.0, 0.9, 0.40, 360.0, 2.0, False),
    Site("site_d", "SynthCT Systems", "Helix 256", "SHARP", "Synthetic Cancer Centre", 18.0, 0.45, 0.65, 400.0, 1.25, True),
    Site("site_e", "Phantom Medical", "Quantix 64", "B45f", "Synthetic Regional Hospital", 25.0, 0.6, 0.60, 440.0, 1.0, False),
    Site("site_f", "Voxelworks", "Aurora 64", "STANDARD", "Synthetic Veterans Hospital", 16.0, 0.7, 0.50, 350.0, 1.4, True),
)


@dataclass
class PatientParams:
    """Everything needed to render one exam. JSON-able (``dataclasses.asdict``); stored in truth.json."""

    index: int
    patient_id: str
    age: float
    sex: str  # 'F' | 'M'
    race: str
    control_group: str
    site: int
    # geometry
    n_slices: int
    image_size: int
    pixel_spacing_mm: float
    slice_spacing_mm: float
    slice_thickness_mm: float
    body_offset_mm: tuple[float, float]  # body centre relative to isocentre (x, y)
    chest_len_mm: float
    # habitus
    body_w_mm: float
    body_ap_mm: float
    fat_mm: float
    muscle_mm: float
    breast_mm: float
    # tissue values (carry the planted effects)
    lung_hu: float
    bone_cancellous_hu: float
    bone_cortical_hu: float
    fat_hu: float
    # anatomy variation
    t_carina: float
    t_arch: float
    heart_scale: float
    rv_scale: float  # RV/LV size ratio in the heart cross-section
    # acquisition
    noise_hu: float
    blur_mm: float
    noise_cutoff: float
    z_blur: float
    # findings
    pe_defects: list[dict[str, Any]] = field(default_factory=list)
    nodules: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- small geometry helpers


def _smoothstep(a: float, b: float, t: float) -> float:
    u = min(max((t - a) / (b - a), 0.0), 1.0)
    return u * u * (3 - 2 * u)


def _bump(t: float, a: float, b: float) -> float:
    """0 outside (a, b), a smooth hump of height 1 inside."""
    if t <= a or t >= b:
        return 0.0
    return math.sin(math.pi * (t - a) / (b - a)) ** 0.7


class Canvas:
    """One slice being painted, in mm relative to the body centre; paints only inside bounding boxes."""

    def __init__(self, n: int, ps: float, body_offset: tuple[float, float]):
        self.n, self.ps = n, ps
        coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * ps
        self.x = coords - np.float32(body_offset[0])  # (W,) mm, + = patient left
        self.y = coords - np.float32(body_offset[1])  # (H,) mm, + = posterior
        self._x0, self._y0 = float(self.x[0]), float(self.y[0])
        self.img = np.empty((n, n), np.float32)
        self.psi: np.ndarray | None = None  # (H, W) angle around the rib cage, set per volume
        self._cache: dict[tuple, Any] = {}

    def window(self, cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice]:
        """Pixel rows/cols whose centres may lie within (cx +- rx, cy +- ry) mm."""
        n, ps = self.n, self.ps
        c0 = max(int(math.ceil((cx - rx - self._x0) / ps)), 0)
        c1 = min(int(math.floor((cx + rx - self._x0) / ps)) + 1, n)
        r0 = max(int(math.ceil((cy - ry - self._y0) / ps)), 0)
        r1 = min(int(math.floor((cy + ry - self._y0) / ps)) + 1, n)
        return slice(r0, max(r1, r0)), slice(c0, max(c1, c0))

    def ellipse(self, cx: float, cy: float, a: float, b: float, rot: float = 0.0):
        """Region (window, bool mask in the window) of pixels whose centres lie inside the ellipse.

        Memoised per volume: much of the anatomy (body below the inlet, spine, aorta...) is the same
        ellipse on many slices. Regions are never mutated by their users.
        """
        key = (cx, cy, a, b, rot)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._ellipse(cx, cy, a, b, rot)
            if len(self._cache) < 512:
                self._cache[key] = hit
        return hit

    def full_ellipse(self, cx: float, cy: float, a: float, b: float, rot: float = 0.0) -> np.ndarray:
        """Full-size bool (H, W) mask of an ellipse, memoised like :meth:`ellipse`."""
        key = ("full", cx, cy, a, b, rot)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.full(self.ellipse(cx, cy, a, b, rot))
            if len(self._cache) < 512:
                self._cache[key] = hit
        return hit

    def _ellipse(self, cx: float, cy: float, a: float, b: float, rot: float = 0.0):
        a, b = max(a, 1e-3), max(b, 1e-3)
        r = max(a, b)
        win = self.window(cx, cy, r, r)
        dx = self.x[win[1]][None, :] - np.float32(cx)  # (1, w)
        dy = self.y[win[0]][:, None] - np.float32(cy)  # (h, 1)
        if rot:
            c, s = math.cos(rot), math.sin(rot)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        m = (dx * (1.0 / a)) ** 2 + (dy * (1.0 / b)) ** 2 <= 1.0  # (h, w)
        return win, m

    def capsule(self, p0: tuple[float, float], p1: tuple[float, float], r: float):
        """Region of a thick line segment (a vessel running in-plane)."""
        x0, y0 = p0
        x1, y1 = p1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = math.hypot(x1 - x0, y1 - y0) / 2 + r
        win = self.window(cx, cy, half, half)
        px = self.x[win[1]][None, :]
        py = self.y[win[0]][:, None]
        vx, vy = x1 - x0, y1 - y0
        ll = vx * vx + vy * vy or 1e-6
        u = np.clip(((px - x0) * vx + (py - y0) * vy) / ll, 0.0, 1.0)  # (h, w)
        m = (px - (x0 + u * vx)) ** 2 + (py - (y0 + u * vy)) ** 2 <= r * r
        return win, m

    def paint_disks(self, xs: np.ndarray, ys: np.ndarray, rs: np.ndarray, values: np.ndarray,
                    where: np.ndarray | None = None) -> None:
        """Paint K small disks at once (later disks win where they overlap); xs, ys, rs in mm, (K,)."""
        n, ps = self.n, self.ps
        rad = int(math.ceil(float(rs.max()) / ps)) + 1
        off = np.arange(-rad, rad + 1)
        ci = np.rint((xs - self._x0) / ps).astype(np.int64)
        ri = np.rint((ys - self._y0) / ps).astype(np.int64)
        cols = ci[:, None, None] + off[None, None, :]  # (K, 1, P)
        rows = ri[:, None, None] + off[None, :, None]  # (K, P, 1)
        dx = self._x0 + cols * ps - xs[:, None, None]
        dy = self._y0 + rows * ps - ys[:, None, None]
        m = (dx * dx + dy * dy <= (rs * rs)[:, None, None]) & (cols >= 0) & (cols < n) & (rows >= 0) & (rows < n)
        k, a, b = np.nonzero(m)  # (K, P, P) -> pixel list
        rr, cc = rows[k, a, 0], cols[k, 0, b]
        if where is not None:
            keep = where[rr, cc]
            rr, cc, k = rr[keep], cc[keep], k[keep]
        self.img[rr, cc] = values[k]

    def full(self, region) -> np.ndarray:
        win, m = region
        out = np.zeros((self.n, self.n), bool)
        out[win][m] = True
        return out

    def paint(self, region, value: float, where: np.ndarray | None = None, count: bool = False) -> int:
        """Set the region to ``value`` (optionally only where ``where`` is True); ``count``: return pixels painted."""
        win, m = region
        if where is not None:
            m = m & where[win]
        self.img[win][m] = value
        return int(m.sum()) if count else 0


# ---------------------------------------------------------------- anatomy as functions of t


def body_axes(p: PatientParams, t: float) -> tuple[float, float]:
    """Half width and half AP depth of the body outline at t (narrower at the thoracic inlet)."""
    g = 0.80 + 0.20 * _smoothstep(0.0, 0.35, t)
    return p.body_w_mm / 2 * g, p.body_ap_mm / 2 * (0.88 + 0.12 * _smoothstep(0.0, 0.35, t))


def cavity_axes(p: PatientParams, t: float) -> tuple[float, float, float]:
    """Half axes and y-centre of the thoracic cavity (inside fat, muscle and ribs)."""
    a, b = body_axes(p, t)
    wall = p.fat_mm + p.muscle_mm + 9.0
    ca = max(a - wall, 40.0)
    cb = max(b - wall * 0.8 - 6.0, 30.0)
    return ca, cb, -4.0


def lung_ellipses(p: PatientParams, t: float) -> list[tuple[float, float, float, float]]:
    """(cx, cy, a, b) of the right and left lung envelopes at t, before the domes and the heart cut them."""
    ca, cb, cy0 = cavity_axes(p, t)
    grow = 0.12 + 0.88 * math.sqrt(_smoothstep(-0.05, 0.38, t))  # apex -> full size
    out = []
    for side in (-1.0, 1.0):  # right lung (x < 0), left lung (x > 0)
        width = 0.47 if side < 0 else 0.44  # the right lung is a little larger
        cx = side * ca * (0.50 + 0.04 * (1 - grow))
        a = ca * width * grow
        b = cb * 0.88 * (0.35 + 0.65 * grow)
        cy = cy0 + cb * 0.10 * (1 - grow) + 4.0
        out.append((cx, cy, a, b))
    return out


def dome(p: PatientParams, t: float, side: float) -> tuple[float, float, float] | None:
    """Cross-section (cx, cy, r) of the liver (side -1) or spleen/stomach (side +1) dome at t, or None."""
    ca, cb, _ = cavity_axes(p, t)
    radius = 0.50 * ca + 25.0
    top = 0.74 if side < 0 else 0.80  # the right hemidiaphragm sits higher
    centre_t = top + radius / p.chest_len_mm
    dz = (centre_t - t) * p.chest_len_mm
    if dz >= radius:
        return None
    r = math.sqrt(radius * radius - dz * dz)
    return side * ca * 0.42, -0.15 * cb, r


def heart_geometry(p: PatientParams, t: float) -> tuple[float, float, float, float, float] | None:
    h = _bump(t, 0.44, 1.08) * p.heart_scale
    if h < 0.05:
        return None
    ca, cb, _ = cavity_axes(p, t)
    return ca * 0.14, -cb * 0.22, ca * 0.40 * h, cb * 0.46 * h, -0.5  # cx, cy, a, b, rotation


def central_arteries(p: PatientParams, t: float) -> dict[str, tuple[float, float, float]]:
    """Cross-sections (cx, cy, r) of the contrast-filled pulmonary arteries running along z at t.

    Lobar arteries run from the hilum towards the apex or the base; the trunk rises from
    the right ventricle to the bifurcation. Defects (emboli) live in these vessels.
    """
    ca, cb, _ = cavity_axes(p, t)
    tb = p.t_carina + 0.05  # bifurcation just below the carina
    out: dict[str, tuple[float, float, float]] = {}
    if tb <= t <= tb + 0.14:
        u = (t - tb) / 0.14
        out["trunk"] = (ca * (0.10 + 0.06 * u), -cb * (0.30 + 0.08 * u), 13.0)
    hila = {"r": (-ca * 0.30, cb * 0.02), "l": (ca * 0.32, cb * 0.06)}
    tracks = {
        "r_upper": ("r", tb, 0.12, (-ca * 0.55, -cb * 0.10)),
        "r_middle": ("r", tb, 0.62, (-ca * 0.45, -cb * 0.45)),
        "r_lower": ("r", tb, 0.90, (-ca * 0.55, cb * 0.40)),
        "l_upper": ("l", tb - 0.02, 0.13, (ca * 0.55, -cb * 0.05)),
        "l_lower": ("l", tb - 0.02, 0.92, (ca * 0.58, cb * 0.42)),
    }
    for name, (side, t0, t1, end) in tracks.items():
        lo, hi = min(t0, t1), max(t0, t1)
        if not lo <= t <= hi:
            continue
        u = (t - t0) / (t1 - t0)
        hx, hy = hila[side]
        bend = math.sin(math.pi * u) * 6.0
        out[name] = (hx + (end[0] - hx) * u + bend, hy + (end[1] - hy) * u, 8.0 - 5.0 * u)
    return out


def main_pa_segments(p: PatientParams, t: float) -> dict[str, tuple[tuple[float, float], tuple[float, float], float]]:
    """The right and left pulmonary arteries run in-plane at the bifurcation level: capsules."""
    ca, cb, _ = cavity_axes(p, t)
    tb = p.t_carina + 0.05
    out = {}
    trunk = (ca * 0.10, -cb * 0.30)
    if abs(t - (tb + 0.01)) <= 0.03:
        out["rpa"] = (trunk, (-ca * 0.30, cb * 0.02), 10.5)
    if abs(t - (tb - 0.015)) <= 0.025:
        out["lpa"] = (trunk, (ca * 0.32, cb * 0.06), 9.5)
    return out


VESSEL_SIDE = {
    "trunk": "central", "rpa": "right", "lpa": "left",
    "r_upper": "right", "r_middle": "right", "r_lower": "right",
    "l_upper": "left", "l_lower": "left",
}


def vessel_at(p: PatientParams, vessel: str, t: float) -> tuple[float, float, float] | None:
    """Centre and radius of a PE-bearing vessel at t (for capsules: the midpoint of the segment)."""
    cs = central_arteries(p, t)
    if vessel in cs:
        return cs[vessel]
    seg = main_pa_segments(p, t).get(vessel)
    if seg is None:
        return None
    (x0, y0), (x1, y1), r = seg
    return (x0 + x1) / 2, (y0 + y1) / 2, r


# ---------------------------------------------------------------- per-volume random detail


def _smooth_field(rng: np.random.Generator, n: int, scale_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ~scale_px (FFT-filtered noise)."""
    f = np.fft.rfftfreq(n)[None, :] ** 2 + np.fft.fftfreq(n)[:, None] ** 2
    spec = np.fft.rfft2(rng.standard_normal((n, n)).astype(np.float32)) * np.exp(-f * (2 * math.pi * scale_px) ** 2 / 2)
    out = np.fft.irfft2(spec, s=(n, n)).astype(np.float32)
    return out / (out.std() + 1e-6)


def _vessel_tracks(p: PatientParams, rng: np.random.Generator, per_lung: int) -> np.ndarray:
    """Peripheral pulmonary vessels: tracks from the hilum to a point in the lung, tapering.

    Returns (K, 7): side (-1 right, +1 left), t0, t1, end x and y (fractions of the lung
    envelope), start radius (mm), HU (contrast-filled artery or vein).
    """
    tracks = []
    for side in (-1.0, 1.0):
        for _ in range(per_lung):
            t0 = float(rng.uniform(0.30, 0.55))
            t1 = float(rng.uniform(0.05, 0.97))
            ex, ey = float(rng.uniform(0.15, 0.95)), float(rng.uniform(-0.85, 0.85))
            r0 = float(rng.uniform(2.0, 4.0))
            hu = BLOOD_CONTRAST_PA * 0.8 if rng.random() < 0.5 else 110.0  # arteries vs veins
            tracks.append((side, t0, t1, ex, ey, r0, hu))
    return np.array(tracks, dtype=np.float64)


# ---------------------------------------------------------------- painting


def _background(cv: Canvas, p: PatientParams) -> np.ndarray:
    """Air plus the curved CT table under the patient (posterior): a constant up/down cue."""
    cv.img.fill(AIR)
    ty = p.body_ap_mm / 2 + 12.0
    cv.paint(cv.ellipse(0.0, ty + 260.0, 520.0, 262.0), TABLE)
    cv.paint(cv.ellipse(0.0, ty + 262.0, 520.0, 259.0), AIR)
    cv.paint(cv.ellipse(0.0, ty + 268.0, 520.0, 262.0), TABLE + 150)
    cv.paint(cv.ellipse(0.0, ty + 276.0, 520.0, 262.0), AIR)
    return cv.img.copy()


def _paint_slice(cv: Canvas, p: PatientParams, t: float, z_mm: float, tex: np.ndarray, tracks: np.ndarray,
                 rib_phase: float, background: np.ndarray) -> dict[str, Any]:
    """Paint the noise-free anatomy of one slice into ``cv.img``; returns masks needed later."""
    img = cv.img
    img[:] = background  # air and the CT table (same on every slice)
    n = cv.n
    a, b = body_axes(p, t)

    # body: flattened posterior (patient lies on the back)
    body = cv.ellipse(0.0, 0.0, a, b)
    cv.paint(body, p.fat_hu)
    post = cv.ellipse(0.0, b * 0.15, a * 1.01, b * 0.85)
    cv.paint(post, p.fat_hu)
    if p.breast_mm > 1.0:
        bh = p.breast_mm * _bump(t, 0.25, 0.80)
        if bh > 1.0:
            for side in (-1.0, 1.0):
                reg = cv.ellipse(side * a * 0.42, -b * 0.78, bh * 1.5 + 12.0, bh * 0.75 + 5.0)
                cv.paint(reg, p.fat_hu + 15)
                cv.paint(cv.ellipse(side * a * 0.42, -b * 0.84, bh * 0.7 + 4.0, bh * 0.35 + 2.0), SOFT - 20)
    # muscle layer (thicker posteriorly: paraspinal muscles)
    ma, mb = a - p.fat_mm, b - p.fat_mm * 0.8
    cv.paint(cv.ellipse(0.0, 2.0, ma, mb), MUSCLE)
    cv.paint(cv.ellipse(0.0, b * 0.55, ma * 0.45, mb * 0.38), MUSCLE + 5)
    # scapulae (upper chest, posterior-lateral) and clavicles (top, anterior)
    if t < 0.55:
        for side in (-1.0, 1.0):
            sc = cv.ellipse(side * ma * 0.62, mb * 0.55, 34.0, 4.0, rot=side * 0.55)
            cv.paint(sc, p.bone_cortical_hu * 0.8)
    if t < 0.14:
        for side in (-1.0, 1.0):
            cv.paint(cv.capsule((side * 15.0, -mb * 0.85), (side * ma * 0.7, -mb * 0.6), 6.0), p.bone_cortical_hu * 0.85)

    # thoracic cavity and rib cage
    ca, cb, cy0 = cavity_axes(p, t)
    rib_outer = cv.ellipse(0.0, cy0, ca + 8.0, cb + 8.0)
    cav = cv.ellipse(0.0, cy0, ca, cb)
    win, m_out = rib_outer
    m_in = cv.full_ellipse(0.0, cy0, ca, cb)[win]
    ring = m_out & ~m_in
    psi = cv.psi[win]  # angle from the posterior midline: 0 posterior .. pi anterior
    phase = (z_mm / 24.0 + 3.5 * psi / math.pi + rib_phase) % 1.0  # ribs slope: several per side
    rib = ring & (phase < 0.38) & (psi < 0.86 * math.pi) & (psi > 0.10 * math.pi)
    cart = ring & (phase < 0.38) & (psi >= 0.86 * math.pi)
    img[win][ring] = MUSCLE
    img[win][rib] = p.bone_cortical_hu * 0.75
    img[win][cart] = CARTILAGE
    cv.paint(cav, FAT + 30)  # mediastinal fat fills what the organs don't

    # lungs
    lungs = np.zeros((n, n), bool)
    for cx, cy, la, lb in lung_ellipses(p, t):
        lungs |= cv.full_ellipse(cx, cy, la, lb)  # (H, W)
    for side in (-1.0, 1.0):
        d = dome(p, t, side)
        if d is not None:
            lungs &= ~cv.full_ellipse(d[0], d[1], d[2], d[2] * 0.95)
    hg = heart_geometry(p, t)
    if hg is not None:
        lungs &= ~cv.full_ellipse(hg[0], hg[1], hg[2] + 6.0, hg[3] + 6.0, hg[4])
    lungs &= ~cv.full_ellipse(0.0, cb * 0.55 + cy0, 26.0, 30.0)  # spine and paraspinal gutter
    lungs &= ~cv.full_ellipse(-3.0, -cb * 0.05, 14.0, cb * 0.95)  # mediastinal midline
    grav = (cv.y[:, None] / (cb + 1.0)).astype(np.float32)  # (H, 1) dependent lung is denser
    lung_val = p.lung_hu + 45.0 * grav + 18.0 * tex  # (H, W)
    img[lungs] = lung_val[lungs]

    # peripheral vessels (only inside the lungs), all tracks of this slice at once
    # tracks: (K, 7) side, t0, t1, ex, ey, r0, hu
    side, t0, t1, ex, ey, r0, hu = tracks.T
    act = (np.minimum(t0, t1) <= t) & (t <= np.maximum(t0, t1))
    if act.any():
        side, t0, t1, ex, ey, r0, hu = (v[act] for v in (side, t0, t1, ex, ey, r0, hu))
        u = (t - t0) / (t1 - t0 + 1e-9)
        env = np.array(lung_ellipses(p, t))  # (2, 4) right, left
        lcx, lcy, la, lb = env[(side > 0).astype(int)].T
        hx, hy = side * ca * 0.30, cb * 0.03
        x = hx + (lcx + side * ex * la - hx) * u
        y = hy + (lcy + ey * lb - hy) * u
        cv.paint_disks(x, y, np.maximum(r0 * (1.0 - 0.75 * u), 0.6), hu, where=lungs)

    # airways
    if t <= p.t_carina:
        cv.paint(cv.ellipse(-2.0, cb * 0.10, 11.0, 10.0), SOFT)
        cv.paint(cv.ellipse(-2.0, cb * 0.10, 9.0, 8.0), AIR)
    elif t <= p.t_carina + 0.16:
        u = (t - p.t_carina) / 0.16
        for side, reach in ((-1.0, 0.33), (1.0, 0.36)):
            x = -2.0 + side * ca * reach * u ** 0.8
            cv.paint(cv.ellipse(x, cb * (0.10 + 0.05 * u), 8.0 - 3 * u, 7.0 - 3 * u), SOFT)
            cv.paint(cv.ellipse(x, cb * (0.10 + 0.05 * u), 6.0 - 3 * u, 5.0 - 3 * u), AIR)
    cv.paint(cv.ellipse(8.0, cb * 0.36, 8.0, 6.0), SOFT)  # oesophagus, left-posterior of the trachea
    cv.paint(cv.ellipse(8.0, cb * 0.36, 2.0, 1.5), AIR)

    # heart with contrast-filled ventricles (RV anterior-right, LV posterior-left)
    if hg is not None:
        hx, hy, ha, hb, rot = hg
        cv.paint(cv.ellipse(hx, hy, ha, hb, rot), MUSCLE - 5)
        lv = 0.42 / math.sqrt(p.rv_scale)
        rv = 0.42 * math.sqrt(p.rv_scale)
        cv.paint(cv.ellipse(hx + ha * 0.28, hy + hb * 0.15, ha * lv, hb * lv, rot), BLOOD_LV)
        cv.paint(cv.ellipse(hx - ha * 0.30, hy - hb * 0.25, ha * rv, hb * rv * 0.8, rot), BLOOD_RV)
    # aorta: ascending (right-anterior), arch, descending (left-posterior)
    asc = (-ca * 0.08, -cb * 0.25)
    desc = (ca * 0.14, cb * 0.42)
    if t < p.t_arch - 0.02:
        for k, off in enumerate((-12.0, 2.0, 15.0)):  # brachiocephalic, carotid, subclavian
            cv.paint(cv.ellipse(off, -cb * 0.20 + 4 * k, 5.5, 5.5), BLOOD_CONTRAST_AO)
    if abs(t - p.t_arch) <= 0.03:
        mid = (30.0, cb * 0.08)  # the arch passes left of the trachea
        cv.paint(cv.capsule(asc, mid, 13.0), BLOOD_CONTRAST_AO)
        cv.paint(cv.capsule(mid, desc, 13.0), BLOOD_CONTRAST_AO)
    if p.t_arch < t <= 0.60:
        cv.paint(cv.ellipse(asc[0], asc[1], 15.0, 15.0), BLOOD_CONTRAST_AO)
    if t > p.t_arch:
        cv.paint(cv.ellipse(desc[0], desc[1], 12.0, 12.0), BLOOD_CONTRAST_AO)
    # pulmonary arteries (contrast column)
    for x, y, r in central_arteries(p, t).values():
        cv.paint(cv.ellipse(x, y, r, r), BLOOD_CONTRAST_PA)
    for p0, p1, r in main_pa_segments(p, t).values():
        cv.paint(cv.capsule(p0, p1, r), BLOOD_CONTRAST_PA)

    # spine (vertebral body, cortical rim, canal, spinous process) and sternum
    sy = cb * 0.55 + cy0 + 14.0
    cv.paint(cv.ellipse(0.0, sy, 19.0, 16.0), p.bone_cortical_hu)
    cv.paint(cv.ellipse(0.0, sy, 16.0, 13.0), p.bone_cancellous_hu)
    cv.paint(cv.ellipse(0.0, sy + 24.0, 8.0, 7.0), p.bone_cortical_hu * 0.9)
    cv.paint(cv.ellipse(0.0, sy + 24.0, 6.0, 5.0), CSF)
    cv.paint(cv.capsule((0.0, sy + 30.0), (0.0, sy + 48.0), 4.0), p.bone_cortical_hu * 0.85)
    if t > 0.10:
        sb = -(cb - cy0) - 3.0
        cv.paint(cv.ellipse(0.0, sb, 14.0, 6.0), p.bone_cortical_hu * 0.8)
        cv.paint(cv.ellipse(0.0, sb, 11.0, 3.5), p.bone_cancellous_hu)

    # abdominal domes: liver (right), spleen with stomach gas (left)
    d = dome(p, t, -1.0)
    if d is not None:
        cv.paint(cv.ellipse(d[0], d[1], d[2], d[2] * 0.95), LIVER)
    d = dome(p, t, 1.0)
    if d is not None:
        cv.paint(cv.ellipse(d[0], d[1], d[2], d[2] * 0.95), SOFT + 10)
        cv.paint(cv.ellipse(d[0] - d[2] * 0.2, d[1] - d[2] * 0.45, d[2] * 0.25, d[2] * 0.14), AIR)
    return {"lungs": lungs}


def nodule_slice_region(cv: Canvas, nod: dict[str, Any], z_mm: float, scale: float = 1.0):
    """Region of a nodule on the slice at ``z_mm`` (ellipsoid cross-section), or None.

    ``nod`` holds centre (x, y, z) in body mm, semi-axes (a, b, c) in mm; ``scale`` shrinks it
    (the solid core of a part-solid nodule). The in-plane radius never goes below 0.75 pixel so
    every nodule marks at least one pixel on its centre slice.
    """
    a, b, c = (s * scale for s in nod["axes_mm"])
    dz = (z_mm - nod["center_mm"][2]) / c
    if abs(dz) > 1.0:
        return None
    k = math.sqrt(max(1.0 - dz * dz, 0.0))
    floor = 0.75 * cv.ps if abs(z_mm - nod["center_mm"][2]) < 1e-3 else 0.0
    return cv.ellipse(nod["center_mm"][0], nod["center_mm"][1], max(a * k, floor), max(b * k, floor), nod.get("rot", 0.0))


def slice_z(p: PatientParams) -> np.ndarray:
    """z (mm, superior +) of each slice; slice 0 at the apex, going down."""
    return -np.arange(p.n_slices, dtype=np.float64) * p.slice_spacing_mm


def slice_t(p: PatientParams) -> np.ndarray:
    return (np.arange(p.n_slices) + 0.5) / p.n_slices


def _noise_filter(n: int, ps: float, cutoff: float) -> np.ndarray:
    """rfft2 filter whose output has unit variance: a windowed ramp (FBP-like noise texture)."""
    fr = np.sqrt(np.fft.rfftfreq(n)[None, :] ** 2 + np.fft.fftfreq(n)[:, None] ** 2)  # cycles/pixel
    h = (0.15 + fr) * np.exp(-((fr / (0.5 * cutoff)) ** 2))
    full = np.sqrt(np.fft.fftfreq(n)[None, :] ** 2 + np.fft.fftfreq(n)[:, None] ** 2)
    hf = (0.15 + full) * np.exp(-((full / (0.5 * cutoff)) ** 2))
    return (h / np.sqrt(np.mean(hf ** 2))).astype(np.float32)


def _blur_axis(vol: np.ndarray, sigma_px: float, axis: int) -> np.ndarray:
    """Gaussian blur along one axis with edge replication (a short separable kernel)."""
    rad = int(math.ceil(2.5 * sigma_px))
    if sigma_px < 0.05 or rad < 1:
        return vol
    w = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma_px) ** 2)
    w = (w / w.sum()).astype(np.float32)
    pad = [(0, 0)] * vol.ndim
    pad[axis] = (rad, rad)
    vp = np.pad(vol, pad, mode="edge")
    m = vol.shape[axis]

    def shifted(j: int) -> np.ndarray:
        sl = [slice(None)] * vol.ndim
        sl[axis] = slice(rad + j, rad + j + m)
        return vp[tuple(sl)]

    out = vol * w[rad]
    for j in range(1, rad + 1):
        out += w[rad + j] * (shifted(-j) + shifted(j))
    return out


def phantom_volume(
    params: PatientParams, rng: np.random.Generator, masks_out: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one exam.

    Returns ``hu`` int16 (S, H, W) clipped to [-1024, 3071], ``nodule_mask`` uint8 (S, H, W)
    (1 = nodule incl. ground glass) and ``pe_slices`` bool (S,) (a filling defect is painted
    on that slice). ``rng`` supplies only the fine random detail (vessel trees, texture, noise);
    everything that is ground truth lives in ``params``. Pass a dict as ``masks_out`` to also get
    ``"lungs"`` bool (S, H, W), the lung parenchyma (for measuring planted effects).
    """
    p = params
    n, s = p.image_size, p.n_slices
    cv = Canvas(n, p.pixel_spacing_mm, p.body_offset_mm)
    tracks = _vessel_tracks(p, rng, per_lung=36)
    tex_fields = [_smooth_field(rng, n, scale_px=max(6.0 / p.pixel_spacing_mm, 1.0)) for _ in range(3)]
    freqs = rng.uniform(1.0, 3.0, size=2) * 2 * math.pi  # texture evolves smoothly along z
    rib_phase = float(rng.uniform(0, 1))
    zs, ts = slice_z(p), slice_t(p)
    background = _background(cv, p)
    _, _, cy0 = cavity_axes(p, 0.5)
    dy = cv.y[:, None] - np.float32(cy0)  # (H, 1)
    cv.psi = np.arccos(np.clip(dy / (np.sqrt(cv.x[None, :] ** 2 + dy * dy) + 1e-3), -1, 1))  # (H, W)
    vol = np.empty((s, n, n), np.float32)  # (S, H, W)
    mask = np.zeros((s, n, n), np.uint8)
    pe = np.zeros(s, bool)
    for k in range(s):
        t, z = float(ts[k]), float(zs[k])
        chest_z = t * p.chest_len_mm
        tex = (tex_fields[0] * math.cos(freqs[0] * t) + tex_fields[1] * math.sin(freqs[0] * t)
               + 0.5 * tex_fields[2] * math.cos(freqs[1] * t))
        painted = _paint_slice(cv, p, t, chest_z, tex, tracks, rib_phase, background)
        if masks_out is not None:
            masks_out.setdefault("lungs", np.zeros((s, n, n), bool))[k] = painted["lungs"]
        for nod in p.nodules:
            reg = nodule_slice_region(cv, nod, z)
            if reg is None:
                continue
            if nod["kind"] == "part_solid":
                cv.paint(reg, NODULE_GGO)
                core = nodule_slice_region(cv, nod, z, scale=nod["core_fraction"])
                if core is not None:
                    cv.paint(core, NODULE_SOLID)
            else:
                cv.paint(reg, NODULE_SOLID)
            win, m = reg
            mask[k][win][m] = 1
        for d in p.pe_defects:
            if not d["t0"] <= t <= d["t1"]:
                continue
            v = vessel_at(p, d["vessel"], t)
            if v is None:
                continue
            vx, vy, vr = v
            r = max(d["radius_mm"], 0.75 * p.pixel_spacing_mm)
            off = (vr - r) * 0.8 if d["chronic"] else 0.0  # chronic clot is eccentric, wall-adherent
            ang = d["angle"]
            r2 = max(r * 0.85, 0.75 * p.pixel_spacing_mm)
            n_px = cv.paint(cv.ellipse(vx + off * math.cos(ang), vy + off * math.sin(ang), r, r2, ang),
                            CHRONIC_THROMBUS if d["chronic"] else THROMBUS, count=True)
            pe[k] |= n_px > 0
        vol[k] = cv.img
    # slice thickness: thicker slices average neighbouring anatomy along z
    if p.z_blur > 0 and s > 2:
        w = p.z_blur
        out = vol * (1 - 2 * w)
        out[1:] += w * vol[:-1]
        out[:-1] += w * vol[1:]
        out[0] += w * vol[0]
        out[-1] += w * vol[-1]
        vol = out
    # in-plane blur (Gaussian MTF, separable: far cheaper than an FFT for sigma of ~1 pixel)
    sigma_px = p.blur_mm / p.pixel_spacing_mm
    vol = _blur_axis(_blur_axis(vol, sigma_px, 1), sigma_px, 2)
    # correlated noise drawn directly in the frequency domain: one inverse FFT, no forward one.
    # White noise of unit variance has rfft2 coefficients with E|X|^2 = n^2.
    shape = (s, n, n // 2 + 1)
    spec = rng.standard_normal(shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]  # (S, H, W//2+1)
    spec *= _noise_filter(n, p.pixel_spacing_mm, p.noise_cutoff) * np.float32(p.noise_hu * n / math.sqrt(2.0))
    vol += np.fft.irfft2(spec, s=(n, n))
    # outside the reconstruction circle the scanner writes air
    rr = (np.arange(n) - (n - 1) / 2.0) ** 2
    np.copyto(vol, np.float32(-1024), where=((rr[:, None] + rr[None, :]) > (n / 2.0) ** 2)[None])
    np.rint(vol, out=vol)
    hu = np.clip(vol, -1024, 3071, out=vol).astype(np.int16)
    return hu, mask, pe


def reader_nodule(nod: dict[str, Any], rng: np.random.Generator, jitter: float) -> dict[str, Any]:
    """A reader's version of a nodule: axes and centre jittered by ``jitter`` (relative)."""
    a, b, c = nod["axes_mm"]
    r = (a + b) / 2
    return {
        **nod,
        "axes_mm": [float(a * (1 + jitter * rng.standard_normal())), float(b * (1 + jitter * rng.standard_normal())),
                    float(c * (1 + jitter * rng.standard_normal()))],
        "center_mm": [float(nod["center_mm"][0] + 0.3 * jitter * r * rng.standard_normal()),
                      float(nod["center_mm"][1] + 0.3 * jitter * r * rng.standard_normal()),
                      float(nod["center_mm"][2])],
    }


def nodule_masks_by_slice(p: PatientParams, nod: dict[str, Any]) -> dict[int, np.ndarray]:
    """{slice index: bool (H, W)} of one nodule (e.g. a reader's jittered version)."""
    cv = Canvas(p.image_size, p.pixel_spacing_mm, p.body_offset_mm)
    out = {}
    for k, z in enumerate(slice_z(p)):
        reg = nodule_slice_region(cv, nod, float(z))
        if reg is not None and reg[1].any():
            out[k] = cv.full(reg)
    return out
