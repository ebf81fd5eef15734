"""Synthetic chest-CT cohort (CT pulmonary angiograms) with known ground truth, written as real DICOM.

Why: no real chest CT can be downloaded here, yet pretraining, PE detection,
nodule segmentation and the bias analysis all need images whose content and
demographic correlates are *known*. ``generate_cohort`` samples patients,
renders each with the NumPy phantom (``phantom.py``) and writes:

- ``dicom/<PatientID>/<StudyUID>/<SeriesUID>/<n>.dcm`` (or ``train/<Study>/<Series>/<SOP>.dcm``
  with ``layout="rsna-pe"``): CT Image Storage, one file per slice;
- ``train.csv``: RSNA STR PE columns, one row per slice;
- ``lidc_xml/<SeriesUID>.xml``: LIDC-IDRI style reads by 1-4 simulated readers who
  disagree a little (jittered contours; a reader may miss a nodule under 8 mm);
- ``nodule_masks/<SeriesUID>.npz``: the generator's own nodule masks (``mask`` uint8 (S, H, W));
- ``demographics.csv`` (PatientID, age, sex, race, control_group, site);
- ``truth.json``: config, planted effects, per-patient truth; ``manifest.json`` last.

THESE DATA ARE SYNTHETIC. The demographic "effects" below are knobs planted so
that the bias analysis has a known answer. They are not claims about real
people, real anatomy or any real population; the race labels are abstract
groups (RaceA, RaceB, ...), and the race effect is arbitrary by construction.

Planted effects (``a`` = age - 55 years; ``sgn`` = +1 male, -1 female; ``c`` = race
code: first label 0, second +1, third -1, then +-0.5, ...), each multiplied by its knob:

======================  ===============================================  =============
attribute               imaging correlate                                 default knob
======================  ===============================================  =============
age (age_effect)        lung parenchyma  -1.5 HU per year                 1.0
                        vertebral cancellous bone  -2.0 HU per year
                        cortical bone  -3.0 HU per year
sex (sex_effect)        body width +-15 mm, AP depth +-8 mm, chest        1.0
                        length +-12 mm, muscle +-3 mm, subcutaneous fat
                        -+5 mm (female more), breasts (female, ~35 mm)
race (race_effect)      subcutaneous fat +12*c HU, body AP/width ratio    0.5 (small)
                        x (1 + 0.04*c), cancellous bone +10*c HU
control_group           none at all (drawn from its own random stream,    -
                        never read by the renderer)
======================  ===============================================  =============

Sex also changes the image noise indirectly (noise grows with body width), as on real
scanners. Site (scanner) is independent of every demographic attribute. With a knob at 0
the attribute has no imaging correlate: the rendered volume is byte-identical whatever
the label (each attribute is drawn from its own seeded stream, so changing one never
shifts another's random draws).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import ConfigError, to_dict
from .phantom import (
    SITES,
    VESSEL_SIDE,
    PatientParams,
    central_arteries,
    dome,
    heart_geometry,
    lung_ellipses,
    main_pa_segments,
    phantom_volume,
    reader_nodule,
    nodule_masks_by_slice,
    slice_t,
    slice_z,
)

SYNTHETIC_NOTICE = (
    "Synthetic data. Demographic imaging correlates are planted knobs for testing bias analysis; "
    "they are not claims about real people or populations."
)

PLANTED_EFFECTS: dict[str, dict[str, Any]] = {
    "age": {"knob": "age_effect", "lung_hu_per_year": -1.5, "cancellous_bone_hu_per_year": -2.0,
            "cortical_bone_hu_per_year": -3.0, "reference_age": 55},
    "sex": {"knob": "sex_effect", "body_width_mm_male_minus_female": 30.0, "body_ap_mm_male_minus_female": 16.0,
            "chest_length_mm_male_minus_female": 24.0, "muscle_mm_male_minus_female": 6.0,
            "fat_mm_male_minus_female": -10.0, "breast_mm_female": 35.0},
    "race": {"knob": "race_effect", "fat_hu_per_code": 12.0, "ap_ratio_per_code": 0.04,
             "cancellous_bone_hu_per_code": 10.0, "codes": "first label 0, second +1, third -1, then +-0.5"},
    "control_group": {"knob": None, "effect": "none"},
    "site": {"effect": "noise level, blur, slice thickness, field of view, pixel encoding; independent of demographics"},
}

VESSEL_WEIGHTS = {"trunk": 0.08, "rpa": 0.12, "lpa": 0.12, "r_upper": 0.10, "r_middle": 0.10,
                  "r_lower": 0.18, "l_upper": 0.12, "l_lower": 0.18}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic cohort. ``workers`` changes speed only, never the output."""

    n_patients: int = 100
    slices_per_exam: int = 48
    image_size: int = 256
    seed: int = 0
    pe_fraction: float = 0.4
    nodule_fraction: float = 0.4
    n_sites: int = 4
    age_effect: float = 1.0
    sex_effect: float = 1.0
    race_effect: float = 0.5
    age_range: tuple[float, float] = (25.0, 85.0)
    race_labels: tuple[str, ...] = ("RaceA", "RaceB", "RaceC")
    race_weights: tuple[float, ...] = (0.55, 0.25, 0.20)
    control_labels: tuple[str, ...] = ("A", "B")
    max_readers: int = 4
    reader_jitter: float = 0.08
    reader_miss_prob: float = 0.25
    layout: Literal["nested", "rsna-pe"] = "nested"
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("n_patients", "slices_per_exam", "n_sites", "max_readers", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synth.{name} must be >= 1 (got {getattr(self, name)})")
        if self.slices_per_exam < 4:
            raise ConfigError(f"synth.slices_per_exam must be >= 4 to span apex to diaphragm (got {self.slices_per_exam})")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"synth.image_size must be between 32 and 1024 pixels (got {self.image_size})")
        if self.n_sites > len(SITES):
            raise ConfigError(f"synth.n_sites must be <= {len(SITES)} (got {self.n_sites})")
        for name in ("pe_fraction", "nodule_fraction", "reader_miss_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"synth.{name} must be between 0 and 1 (got {v})")
        for name in ("age_effect", "sex_effect", "race_effect", "reader_jitter"):
            if getattr(self, name) < 0:
                raise ConfigError(f"synth.{name} must be >= 0 (got {getattr(self, name)})")
        lo, hi = self.age_range
        if not 0 <= lo < hi <= 110:
            raise ConfigError(f"synth.age_range must be (low, high) years with 0 <= low < high <= 110 (got {self.age_range})")
        if len(self.race_labels) != len(self.race_weights) or not self.race_labels:
            raise ConfigError("synth.race_labels and synth.race_weights must have the same, non-zero length")
        if any(w < 0 for w in self.race_weights) or sum(self.race_weights) <= 0:
            raise ConfigError("synth.race_weights must be non-negative with a positive sum")
        if any(len(r) > 16 for r in self.race_labels):
            raise ConfigError("synth.race_labels must be at most 16 characters (DICOM EthnicGroup is SH)")
        if len(set(self.control_labels)) < 2:
            raise ConfigError("synth.control_labels needs at least two distinct labels")
        if self.layout not in ("nested", "rsna-pe"):
            raise ConfigError(f"synth.layout must be 'nested' or 'rsna-pe' (got {self.layout!r})")


TINY = SynthConfig(n_patients=8, slices_per_exam=16, image_size=64, n_sites=2, pe_fraction=0.5,
                   nodule_fraction=0.5, workers=1)
DEFAULT = SynthConfig()
PRESETS: dict[str, SynthConfig] = {"tiny": TINY, "default": DEFAULT}


def output_config(cfg: SynthConfig) -> dict[str, Any]:
    """The config fields that determine the output bytes (``workers`` does not)."""
    d = to_dict(cfg)
    d.pop("workers")
    return d


# ---------------------------------------------------------------- sampling


def _rng(cfg: SynthConfig, index: int, stream: int) -> np.random.Generator:
    """One independent stream per (patient, purpose): changing one attribute never shifts another's draws."""
    return np.random.default_rng([cfg.seed, index, stream])


STREAM_DEMO, STREAM_RACE, STREAM_CONTROL, STREAM_SITE, STREAM_ANAT, STREAM_FINDINGS, STREAM_RENDER, STREAM_READERS = range(8)


def sample_demographics(cfg: SynthConfig, index: int) -> dict[str, Any]:
    r = _rng(cfg, index, STREAM_DEMO)
    age = float(r.uniform(*cfg.age_range))
    sex = "M" if r.random() < 0.5 else "F"
    w = np.asarray(cfg.race_weights, float)
    race = cfg.race_labels[int(_rng(cfg, index, STREAM_RACE).choice(len(w), p=w / w.sum()))]
    control = cfg.control_labels[int(_rng(cfg, index, STREAM_CONTROL).integers(len(cfg.control_labels)))]
    site = int(_rng(cfg, index, STREAM_SITE).integers(cfg.n_sites))
    return {"patient_id": f"SYN{index + 1:04d}", "age": age, "sex": sex, "race": race,
            "control_group": control, "site": site}


def race_code(cfg: SynthConfig, race: str) -> float:
    i = cfg.race_labels.index(race) if race in cfg.race_labels else 0
    return 0.0 if i == 0 else (1.0 if i % 2 else -1.0) / (1 + (i - 1) // 2)


def _in_lung(p: PatientParams, t: float, x: float, y: float, margin: float) -> bool:
    inside = False
    for cx, cy, a, b in lung_ellipses(p, t):
        if ((x - cx) / max(a - margin, 1)) ** 2 + ((y - cy) / max(b - margin, 1)) ** 2 <= 1:
            inside = True
    if not inside:
        return False
    for side in (-1.0, 1.0):
        d = dome(p, t, side)
        if d is not None and (x - d[0]) ** 2 + (y - d[1]) ** 2 <= (d[2] + margin) ** 2:
            return False
    hg = heart_geometry(p, t)
    if hg is not None:
        c, s = math.cos(hg[4]), math.sin(hg[4])
        dx, dy = x - hg[0], y - hg[1]
        u, v = c * dx + s * dy, -s * dx + c * dy
        if (u / (hg[2] + 6 + margin)) ** 2 + (v / (hg[3] + 6 + margin)) ** 2 <= 1:
            return False
    return abs(x) > 20 + margin


def sample_patient(cfg: SynthConfig, index: int, demographics: dict[str, Any] | None = None) -> PatientParams:
    """All rendering parameters of patient ``index``. Pass ``demographics`` to re-render with changed labels."""
    demo = demographics or sample_demographics(cfg, index)
    site = SITES[demo["site"]]
    r = _rng(cfg, index, STREAM_ANAT)
    a = demo["age"] - 55.0
    sgn = 1.0 if demo["sex"] == "M" else -1.0
    c = race_code(cfg, demo["race"]) * cfg.race_effect
    # draws in fixed order, independent of the effect sizes
    z = r.standard_normal(12)
    u = r.uniform(0.6, 1.4)
    n = cfg.image_size
    ps = round(site.fov_mm / n, 6)
    body_w = 315.0 + 15.0 * cfg.sex_effect * sgn + 20.0 * z[0]
    body_ap = (225.0 + 8.0 * cfg.sex_effect * sgn + 14.0 * z[1]) * (1 + 0.04 * c)
    body_w = float(np.clip(body_w, 230.0, site.fov_mm - 30.0))
    body_ap = float(np.clip(body_ap, 170.0, min(0.85 * body_w, site.fov_mm - 80.0)))
    chest_len = 280.0 + 12.0 * cfg.sex_effect * sgn + 15.0 * z[2]
    spacing = round(chest_len / cfg.slices_per_exam, 3)
    chest_len = spacing * cfg.slices_per_exam
    p = PatientParams(
        index=index, patient_id=demo["patient_id"], age=float(demo["age"]), sex=demo["sex"], race=demo["race"],
        control_group=demo["control_group"], site=demo["site"],
        n_slices=cfg.slices_per_exam, image_size=n, pixel_spacing_mm=ps, slice_spacing_mm=spacing,
        slice_thickness_mm=round(spacing * site.thickness_factor, 2),
        body_offset_mm=(float(6.0 * z[3]), float(-15.0 + 5.0 * z[4])), chest_len_mm=chest_len,
        body_w_mm=body_w, body_ap_mm=body_ap,
        fat_mm=float(max(20.0 - 5.0 * cfg.sex_effect * sgn + 5.0 * z[5], 6.0)),
        muscle_mm=float(max(12.0 + 3.0 * cfg.sex_effect * sgn + 2.0 * z[6], 5.0)),
        breast_mm=float(35.0 * cfg.sex_effect * u) if sgn < 0 else 0.0,
        lung_hu=float(-845.0 - 1.5 * cfg.age_effect * a + 12.0 * z[7]),
        bone_cancellous_hu=float(max(230.0 - 2.0 * cfg.age_effect * a + 15.0 * z[8] + 10.0 * c, 60.0)),
        bone_cortical_hu=float(max(850.0 - 3.0 * cfg.age_effect * a + 30.0 * z[9], 400.0)),
        fat_hu=float(-100.0 + 12.0 * c + 6.0 * z[10]),
        t_carina=float(0.36 + 0.02 * np.clip(z[11], -2, 2)),
        t_arch=0.27, heart_scale=1.0, rv_scale=1.0,
        noise_hu=float(site.noise_hu * (body_w / 300.0) ** 1.5), blur_mm=site.blur_mm,
        noise_cutoff=site.noise_cutoff, z_blur=float(min(0.12 * (site.thickness_factor - 1.0), 0.25)),
    )
    f = _rng(cfg, index, STREAM_FINDINGS)
    p.t_arch = float(0.27 + 0.015 * np.clip(f.standard_normal(), -2, 2))
    p.heart_scale = float(1.0 + 0.05 * np.clip(f.standard_normal(), -2, 2))
    ts, zs = slice_t(p), slice_z(p)
    positive = f.random() < cfg.pe_fraction
    gte = positive and f.random() < 0.45
    p.rv_scale = float(f.uniform(1.25, 1.6) if gte else f.uniform(0.7, 0.9))
    if positive:
        kind = f.choice(["acute", "chronic", "acute_and_chronic"], p=[0.8, 0.1, 0.1])
        n_def = int(f.integers(1, 4))
        for j in range(n_def):
            names = list(VESSEL_WEIGHTS)
            w = np.array([VESSEL_WEIGHTS[v] for v in names])
            for _ in range(20):
                vessel = names[int(f.choice(len(names), p=w / w.sum()))]
                ks = [k for k in range(p.n_slices) if _vessel_r(p, vessel, float(ts[k])) is not None]
                if ks:
                    break
            else:
                continue
            k = int(f.choice(ks))
            vr = _vessel_r(p, vessel, float(ts[k]))
            length = float(f.uniform(8.0, 30.0))
            half_t = length / 2 / p.chest_len_mm
            chronic = kind == "chronic" or (kind == "acute_and_chronic" and j % 2 == 1)
            p.pe_defects.append({
                "vessel": vessel, "side": VESSEL_SIDE[vessel], "center_slice": k,
                "t0": float(ts[k] - half_t), "t1": float(ts[k] + half_t), "length_mm": length,
                "radius_mm": float(np.clip(f.uniform(0.35, 0.75) * vr, 2.0, min(6.0, max(vr - 0.5, 2.0)))),
                "chronic": bool(chronic), "angle": float(f.uniform(0, 2 * math.pi)),
            })
        if kind == "acute_and_chronic" and not any(d["chronic"] for d in p.pe_defects) and p.pe_defects:
            p.pe_defects[-1]["chronic"] = True
    if f.random() < cfg.nodule_fraction:
        for j in range(int(f.integers(1, 4))):
            d = float(math.exp(f.uniform(math.log(3.0), math.log(30.0))))
            kind = "part_solid" if d >= 6.0 and f.random() < 0.3 else "solid"
            lo, hi = int(0.15 * p.n_slices), max(int(0.80 * p.n_slices), int(0.15 * p.n_slices) + 1)
            for _ in range(50):
                k = int(f.integers(lo, hi))
                t = float(ts[k])
                side = 0 if f.random() < 0.5 else 1
                cx, cy, la, lb = lung_ellipses(p, t)[side]
                rad, ang = math.sqrt(f.random()) * 0.8, f.uniform(0, 2 * math.pi)
                x, y = cx + rad * la * math.cos(ang), cy + rad * lb * math.sin(ang)
                if _in_lung(p, t, x, y, margin=d / 2):
                    break
            else:
                continue
            p.nodules.append({
                "id": f"Nodule {j + 1:03d}", "kind": kind, "diameter_mm": d, "center_slice": k,
                "center_mm": [float(x), float(y), float(zs[k])],
                "axes_mm": [d / 2, d / 2 * float(f.uniform(0.85, 1.15)), d / 2 * float(f.uniform(0.85, 1.15))],
                "rot": float(f.uniform(0, math.pi)),
                "core_fraction": float(f.uniform(0.35, 0.6)) if kind == "part_solid" else 1.0,
            })
    return p


def _vessel_r(p: PatientParams, vessel: str, t: float) -> float | None:
    if vessel in ("rpa", "lpa"):
        seg = main_pa_segments(p, t).get(vessel)
        return None if seg is None else seg[2]
    v = central_arteries(p, t).get(vessel)
    return None if v is None else v[2]


# ---------------------------------------------------------------- one patient (runs in a worker)


def _series_dir(cfg: SynthConfig, out_dir: Path, p: PatientParams, uids: dict[str, Any]) -> Path:
    if cfg.layout == "rsna-pe":
        return out_dir / "train" / uids["study"] / uids["series"]
    return out_dir / "dicom" / p.patient_id / uids["study"] / uids["series"]


def render_patient(cfg: SynthConfig, index: int, out_dir: str | Path) -> dict[str, Any]:
    """Render and write one exam; returns its csv rows, demographics row and truth record."""
    from .synth_writers import (
        birth_and_study_dates,
        exam_labels,
        lidc_xml,
        make_uid,
        write_series_dicom,
    )

    cpu0 = time.process_time()
    out_dir = Path(out_dir)
    p = sample_patient(cfg, index)
    hu, mask, pe = phantom_volume(p, _rng(cfg, index, STREAM_RENDER))
    uids = {
        "study": make_uid(cfg.seed, index, "study"),
        "series": make_uid(cfg.seed, index, "series"),
        "frame": make_uid(cfg.seed, index, "frame"),
        "sops": [make_uid(cfg.seed, index, "sop", k) for k in range(p.n_slices)],
    }
    study_date, birth_date = birth_and_study_dates(cfg.seed, index, p.age)
    sdir = _series_dir(cfg, out_dir, p, uids)
    if cfg.layout == "rsna-pe":
        sdir.mkdir(parents=True, exist_ok=True)
        paths = write_series_dicom(p, hu, sdir, uids, study_date, birth_date)
        for k, path in enumerate(paths):  # RSNA names files by SOPInstanceUID
            path.replace(sdir / f"{uids['sops'][k]}.dcm")
    else:
        write_series_dicom(p, hu, sdir, uids, study_date, birth_date)

    # LIDC reads: 1..max_readers readers, jittered, small nodules sometimes missed
    rr = _rng(cfg, index, STREAM_READERS)
    n_readers = int(rr.integers(1, cfg.max_readers + 1))
    reads, reader_truth = [], {nod["id"]: [] for nod in p.nodules}
    for j in range(n_readers):
        marks = []
        for nod in p.nodules:
            missed = nod["diameter_mm"] < 8.0 and rr.random() < cfg.reader_miss_prob
            rn = reader_nodule(nod, rr, cfg.reader_jitter)
            if missed:
                continue
            slices = nodule_masks_by_slice(p, rn)
            if not slices:
                continue
            marks.append({"id": nod["id"], "texture": 5 if nod["kind"] == "solid" else 3, "slices": slices})
            reader_truth[nod["id"]].append({"reader": f"reader_{j + 1}", "axes_mm": rn["axes_mm"],
                                            "center_mm": rn["center_mm"], "slices": sorted(slices)})
        reads.append({"reader": f"reader_{j + 1}", "nodules": marks})
    xml_dir = out_dir / "lidc_xml"
    xml_dir.mkdir(parents=True, exist_ok=True)
    (xml_dir / f"{uids['series']}.xml").write_text(lidc_xml(uids["series"], uids["study"], uids["sops"], slice_z(p), reads))
    if p.nodules:
        mdir = out_dir / "nodule_masks"
        mdir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(mdir / f"{uids['series']}.npz", mask=mask)

    labels = exam_labels(p, pe)
    exam_vals = [labels[c] for c in labels]
    rows = [[uids["study"], uids["series"], uids["sops"][k], int(pe[k])] + exam_vals for k in range(p.n_slices)]
    site = SITES[p.site]
    truth = {
        "patient_id": p.patient_id,
        "study_uid": uids["study"], "series_uid": uids["series"],
        "series_dir": str(sdir.relative_to(out_dir)),
        "age": p.age, "sex": p.sex, "race": p.race, "control_group": p.control_group, "site": site.name,
        "pe_slices": [int(k) for k in np.nonzero(pe)[0]],
        "exam_labels": labels,
        "nodule_slices": [int(k) for k in np.nonzero(mask.reshape(p.n_slices, -1).any(1))[0]],
        "n_readers": n_readers, "reader_marks": reader_truth,
        "params": dataclasses.asdict(p),
    }
    demo = [p.patient_id, f"{p.age:.1f}", p.sex, p.race, p.control_group, site.name]
    return {"index": index, "rows": rows, "demographics": demo, "truth": truth, "n_slices": p.n_slices,
            "cpu_s": time.process_time() - cpu0}


# ---------------------------------------------------------------- the cohort


@dataclass
class CohortManifest:
    """What ``generate_cohort`` wrote (also saved as ``manifest.json``, last, as the completion mark)."""

    out_dir: Path
    config: dict[str, Any]
    n_patients: int
    n_slices: int
    n_pe_exams: int
    n_nodule_exams: int
    seconds: float
    cpu_seconds: float = 0.0  # summed over workers: what the cohort costs on idle cores
    reused: bool = False
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d.pop("reused")
        return d

    @classmethod
    def load(cls, out_dir: Path) -> CohortManifest | None:
        path = Path(out_dir) / "manifest.json"
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            d["out_dir"] = Path(out_dir)
            return cls(**d, reused=True)
        except (ValueError, TypeError):
            return None


MARKER = ".ctssl_synth"
OWNED = ("dicom", "train", "lidc_xml", "nodule_masks", "train.csv", "demographics.csv", "truth.json", "manifest.json")


def _prepare_out_dir(out_dir: Path, overwrite: bool, cfg_out: dict[str, Any]) -> CohortManifest | None:
    """Reuse a complete cohort with the same config (unless ``overwrite``); otherwise clear our own earlier
    output (partial, or made with another config) and regenerate; never touch a folder we did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; pass a folder as --out")
    existing = CohortManifest.load(out_dir)
    if existing is not None and existing.config == cfg_out and not overwrite:
        return existing
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise ConfigError(
                f"{out_dir} is not empty and was not written by `ctssl synth`; choose an empty or new --out folder"
            )
        for name in OWNED:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by ctssl synth; safe to delete with the folder\n")
    return None


def generate_cohort(cfg: SynthConfig, out_dir: str | Path, progress: bool = True, overwrite: bool = False) -> CohortManifest:
    """Generate the cohort into ``out_dir`` (see the module docstring), or reuse a complete identical one."""
    import csv

    out_dir = Path(out_dir)
    cfg_out = output_config(cfg)
    reused = _prepare_out_dir(out_dir, overwrite, cfg_out)
    if reused is not None:
        return reused
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.n_patients, unit="exam", desc="synth")
    if cfg.workers > 1 and cfg.n_patients > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(cfg.workers, cfg.n_patients), mp_context=mp.get_context("forkserver")) as ex:
            futures = [ex.submit(render_patient, cfg, i, str(out_dir)) for i in range(cfg.n_patients)]
            for fut in as_completed(futures):
                results.append(fut.result())
                if bar is not None:
                    bar.update(1)
    else:
        for i in range(cfg.n_patients):
            results.append(render_patient(cfg, i, out_dir))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r["index"])

    from .synth_writers import RSNA_COLUMNS

    with open(out_dir / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(RSNA_COLUMNS)
        for r in results:
            w.writerows(r["rows"])
    with open(out_dir / "demographics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "age", "sex", "race", "control_group", "site"])
        w.writerows(r["demographics"] for r in results)
    truth = {
        "notice": SYNTHETIC_NOTICE,
        "config": cfg_out,
        "planted_effects": PLANTED_EFFECTS,
        "effect_sizes": {"age_effect": cfg.age_effect, "sex_effect": cfg.sex_effect, "race_effect": cfg.race_effect},
        "sites": [dataclasses.asdict(s) for s in SITES[: cfg.n_sites]],
        "conventions": {
            "coordinates": "DICOM LPS; params in mm relative to the body centre; slice 0 = apex (most superior)",
            "lidc_contours": "edgeMap pixels are boundary pixels that belong to the nodule (pylidc convention)",
            "pe_vessels": "trunk -> central; rpa/lpa -> central + side; lobar arteries -> side",
        },
        "patients": [r["truth"] for r in results],
    }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=1))
    manifest = CohortManifest(
        out_dir=out_dir, config=cfg_out, n_patients=len(results), n_slices=sum(r["n_slices"] for r in results),
        n_pe_exams=sum(1 for r in results if r["truth"]["pe_slices"]),
        n_nodule_exams=sum(1 for r in results if r["truth"]["params"]["nodules"]),
        seconds=round(time.perf_counter() - t0, 2),
        cpu_seconds=round(sum(r["cpu_s"] for r in results), 2),
        files={"dicom": "train" if cfg.layout == "rsna-pe" else "dicom", "train_csv": "train.csv",
               "lidc_xml": "lidc_xml", "nodule_masks": "nodule_masks", "demographics": "demographics.csv",
               "truth": "truth.json"},
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=1))
    return manifest
