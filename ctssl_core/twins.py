"""Counterfactual twins: each PE-positive test exam rendered again without its emboli.

Why: an unpaired exam AUROC on a few dozen patients has a standard error near 0.1 and
rewards any shortcut that correlates with the label (slice level, heart size, site). A
twin is the *same* patient, the same anatomy, the same noise draw and the same slice
positions, with the filling defects left out (``phantom_volume`` takes its random detail
from the rng and everything that is ground truth from ``PatientParams``, so dropping
``pe_defects`` changes exactly the embolus pixels). The paired score difference between an
exam and its twin can only come from the emboli, and a paired comparison needs far fewer
patients than an unpaired one (DESIGN.md, "Counterfactual twins").

Metrics, per PE-positive test patient i with exam scores s_i+ (with emboli) and s_i-
(its twin): ``twin_exam`` = mean of 1[s+ > s-] + 0.5 * 1[s+ = s-] (chance 0.5: the
probability that the model ranks the exam above its own embolus-free twin); ``twin_delta``
= mean of s+ - s- (probability units); ``twin_slice`` = the same concordance over the
slices that carry an embolus, averaged per patient. Patient-bootstrap CIs use the same
draws for every init (same patients, same seed), so differences between inits are paired.

Only for synthetic cohorts made by ``ctssl synth`` (the renderer must be at hand) whose
stored slice size equals the rendered one; otherwise ``TwinUnavailable`` says why.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctssl_core.config import ConfigError

TWIN_METRICS = {"twin_exam": True, "twin_slice": True, "twin_delta": True}   # name -> higher is better


class TwinUnavailable(ConfigError):
    """The store's patients cannot be re-rendered (not a synthetic cohort, or another geometry)."""


def cohort_config(cohort_dir: str | Path):
    """The ``SynthConfig`` a cohort was generated with (from its ``truth.json``)."""
    from ctssl_core.config import build
    from ctssl_core.data.synth import SynthConfig

    p = Path(cohort_dir) / "truth.json"
    if not p.is_file():
        raise TwinUnavailable(f"no truth.json in {cohort_dir}: twins need a cohort made by `ctssl synth`")
    cfg = json.loads(p.read_text()).get("config") or {}
    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    return build(SynthConfig, {k: v for k, v in cfg.items() if k in fields})


def patient_indices(cohort_dir: str | Path, secret_path: str | Path) -> dict[str, int]:
    """Store patient key -> cohort patient index, by pseudonymising the cohort's ids with the
    store's own key (the mapping never leaves this process and stores no identifier)."""
    from ctssl_core.data.pseudonym import Pseudonymiser
    from ctssl_core.data.synth import sample_demographics

    cfg = cohort_config(cohort_dir)
    key = Pseudonymiser.for_store(secret_path)
    return {key("patient", sample_demographics(cfg, i)["patient_id"]): i for i in range(cfg.n_patients)}


def render_stored(cfg, index: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """(hu int16 (S, H, W), PE slice mask bool (S,)) of cohort patient ``index`` as the store holds it:
    the generator's own render (same rng stream) in the store's slice order (ascending z, as ingest
    orders a series by ImagePositionPatient). ``params`` replaces ``sample_patient(cfg, index)`` for a
    counterfactual render of the same patient (twins without emboli; another race-effect strength)."""
    from ctssl_core.data.phantom import phantom_volume, slice_z
    from ctssl_core.data.synth import STREAM_RENDER, _rng, sample_patient

    p = sample_patient(cfg, index) if params is None else params
    hu, _, pe = phantom_volume(p, _rng(cfg, index, STREAM_RENDER))
    order = np.argsort(slice_z(p), kind="stable")                                  # (S,) ascending z
    return hu[order], pe[order]


def render_pair(cfg, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hu with emboli, hu without, PE slice mask) int16 (S, H, W) x 2 and bool (S,), for one patient,
    in the store's slice order (``render_stored``)."""
    from ctssl_core.data.synth import sample_patient

    p = sample_patient(cfg, index)
    hu_with, pe = render_stored(cfg, index, p)
    hu_without, pe0 = render_stored(cfg, index, dataclasses.replace(p, pe_defects=[]))
    assert not pe0.any()
    return hu_with, hu_without, pe


class ArrayStore:
    """The read side of ``SliceStore`` over in-memory volumes, so twins go through the very
    loader, windowing and scoring path (``scoring.collect_outputs``) the stored exams use."""

    def __init__(self, volumes: list[np.ndarray], pe: list[np.ndarray], patient_idx: list[int]):
        self._vol = np.concatenate(volumes).astype(np.int16)                       # (N, H, W)
        self.n_slices = int(self._vol.shape[0])
        self.slice_ids = np.arange(self.n_slices, dtype=np.int64)
        self.series_of = np.repeat(np.arange(len(volumes)), [len(v) for v in volumes]).astype(np.int32)
        self.idx_in_series = np.concatenate([np.arange(len(v)) for v in volumes]).astype(np.int32)
        self.patient_idx = np.repeat(np.asarray(patient_idx, np.int64), [len(v) for v in volumes])
        self._pe = np.concatenate(pe).astype(np.float32)
        self.patients = pd.DataFrame({"patient_key": [str(i) for i in range(max(patient_idx) + 1)]})

    def read(self, slice_ids) -> np.ndarray:
        return self._vol[np.asarray(slice_ids, np.int64)]

    def labels(self, name: str) -> np.ndarray:
        if name != "pe":
            raise KeyError(name)
        return self._pe

    def read_mask(self, slice_ids) -> np.ndarray:
        return np.zeros((len(slice_ids), *self._vol.shape[1:]), np.uint8)


@dataclass
class TwinSet:
    """Both renders of every PE-positive test patient, as one ``ArrayStore``: exam 2j is patient
    j with emboli, exam 2j + 1 its twin."""

    store: ArrayStore
    patient_keys: list[str]


def build_twins(cohort_dir: str | Path, store_root: str | Path, patient_keys, stored_size: int) -> TwinSet:
    """Render the twins of the PE-positive patients among ``patient_keys`` (test patients)."""
    from ctssl_core.paths import store_paths

    cfg = cohort_config(cohort_dir)
    if cfg.image_size != stored_size:
        raise TwinUnavailable(f"twins are rendered at {cfg.image_size} px but the store holds {stored_size}-px "
                              f"slices; build the store with ingest.size = synth.image_size")
    index = patient_indices(cohort_dir, store_paths(store_root).secret)
    vols, pes, pidx, keys = [], [], [], []
    for k in sorted(set(map(str, patient_keys))):
        if k not in index:
            raise TwinUnavailable(f"test patient {k} is not in the cohort at {cohort_dir}: the store holds other data")
        hu_with, hu_without, pe = render_pair(cfg, index[k])
        if not pe.any():
            continue
        j = len(keys)
        vols += [hu_with, hu_without]
        pes += [pe, np.zeros_like(pe)]
        pidx += [j, j]
        keys.append(k)
    if not keys:
        raise TwinUnavailable("no PE-positive test patient to render twins of")
    return TwinSet(ArrayStore(vols, pes, pidx), keys)


def twin_stat(out: dict[str, np.ndarray], exam_agg: str = "topk", topk: int = 3):
    """drawn twin-patient positions -> {twin_exam, twin_slice, twin_delta}, for ``bootstrap_multi``.

    ``out`` holds per-slice ``prob`` and ``exam`` (even = with emboli, odd = twin), ``order``
    (slice index) and ``target`` (1 on embolus slices of the with-emboli exam).
    """
    from ctssl_core import evaluate as ev

    prob = np.asarray(out["prob"], np.float64)
    exams, score = ev.aggregate_exam(out["exam"], prob, exam_agg, topk)
    by_exam = dict(zip(exams.tolist(), score.tolist()))
    n = int(exams.max()) // 2 + 1
    s_with = np.array([by_exam[2 * j] for j in range(n)])
    s_without = np.array([by_exam[2 * j + 1] for j in range(n)])
    exam_conc = (s_with > s_without) + 0.5 * (s_with == s_without)                # (P,)
    delta = s_with - s_without                                                    # (P,)
    # slice level: each embolus slice against the same slice of the twin
    key = {(int(e), int(o)): p for e, o, p in zip(out["exam"], out["order"], prob)}
    slice_conc = np.full(n, np.nan)
    for j in range(n):
        rows = [(o, p) for e, o, p, t in zip(out["exam"], out["order"], prob, out["target"]) if e == 2 * j and t > 0.5]
        if rows:
            c = [(p > key[(2 * j + 1, int(o))]) + 0.5 * (p == key[(2 * j + 1, int(o))]) for o, p in rows]
            slice_conc[j] = float(np.mean(c))
    per = {"twin_exam": exam_conc, "twin_slice": slice_conc, "twin_delta": delta}

    def stat(idx: np.ndarray) -> dict[str, float]:
        return {m: float(np.nanmean(v[idx])) if np.isfinite(v[idx]).any() else float("nan") for m, v in per.items()}

    def batch(counts: np.ndarray) -> dict[str, np.ndarray]:
        res = {}
        for m, v in per.items():
            ok = np.isfinite(v)
            w = counts[:, ok]                                                     # (R, P_ok)
            res[m] = (w @ v[ok]) / np.maximum(w.sum(1), 1e-12)
            res[m][w.sum(1) == 0] = np.nan
        return res

    stat.batch = batch  # type: ignore[attr-defined]
    return stat, n


def score_twins(task, encoder, head, twins: TwinSet, batch_size: int, device, image_size: int = 0,
                n_boot: int = 1000, seed: int | None = None):
    """(metric -> CI, metric -> replicates) of the twin metrics for one trained PE model."""
    from ctssl_core import evaluate as ev
    from ctssl_core.scoring import BOOT_SEED, collect_outputs

    out = collect_outputs(task, encoder, head, twins.store, twins.store.slice_ids, batch_size, device, image_size)
    stat, n = twin_stat(out, getattr(task, "exam_agg", "topk"), getattr(task, "topk", 3))
    return ev.bootstrap_multi(stat, n, n_boot=n_boot, seed=BOOT_SEED if seed is None else seed)
