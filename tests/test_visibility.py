"""The planted findings are visible in what the model sees (issue "A benchmark with power", item 1).

Each finding is switched off in a re-render of the same patient (same anatomy, same noise: only the
knob changes) and both renders go through ``ops.model_input`` with the study profile's windows. A
finding the input does not show cannot be learned, whatever the strategy; these tests measure the
input, not a model. The paper's single soft-tissue window is measured beside it, because that is
why the study profile uses the lung / PE / mediastinal windows as channels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ctssl_core import ops
from ctssl_core.plan import input_windows, resolve_profile
from ctssl_core.config import build
from ctssl_core.data.phantom import nodule_masks_by_slice, phantom_volume
from ctssl_core.data.synth import STREAM_RENDER, SynthConfig, _rng, sample_patient

PATIENTS = range(6)          # of the study cohort: 4 with PE, 5 with nodules, ages 30-79


@pytest.fixture(scope="module")
def study():
    cfg = resolve_profile("study", [])
    return build(SynthConfig, cfg["synth"], where="synth."), input_windows(cfg)


def _render(sc: SynthConfig, p) -> np.ndarray:
    return phantom_volume(p, _rng(sc, p.index, STREAM_RENDER))[0]                    # (S, H, W) int16 HU


def _change(a: np.ndarray, b: np.ndarray, windows) -> np.ndarray:
    """Largest change over the input channels, per pixel: (S, H, W)."""
    xa = ops.model_input(torch.from_numpy(a)[:, None], windows)
    xb = ops.model_input(torch.from_numpy(b)[:, None], windows)
    d = (xa - xb).abs()                                                               # (S, 1, [C,] H, W)
    return (d.amax(2) if d.dim() == 5 else d)[:, 0].numpy()


def test_the_study_profile_feeds_several_windows_and_the_paper_profile_one(study):
    assert len(ops.resolve_windows(study[1])) == 3
    assert ops.resolve_windows(input_windows(resolve_profile("paper", []))) == ops.WINDOWS["paper"]


def test_every_pe_labelled_slice_shows_its_embolus(study):
    sc, windows = study
    seen = []
    for i in PATIENTS:
        p = sample_patient(sc, i)
        if not p.pe_defects:
            continue
        with_pe, _, label = phantom_volume(p, _rng(sc, i, STREAM_RENDER))
        without = _render(sc, dataclasses.replace(p, pe_defects=[]))
        d = _change(with_pe, without, windows)                                        # (S, H, W)
        changed, peak = (d > 0.02).sum((1, 2)), d.max((1, 2))                        # (S,) each
        assert changed[label].min() >= 1 and peak[label].min() >= 0.1, \
            f"patient {i}: a PE-labelled slice does not show its embolus"
        # thick slices (z_blur) let an embolus bleed ~30 HU into its neighbours: faint partial volume,
        # never the full-contrast clot, which only labelled slices hold
        assert (peak[~label] < 0.1).all(), f"patient {i}: an unlabelled slice shows an embolus"
        seen += changed[label].tolist()
    assert len(seen) >= 5 and np.median(seen) >= 3


def test_nodules_are_visible_in_the_lung_window_that_the_soft_tissue_window_clips(study):
    sc, windows = study
    fractions = {"study": [], "paper": []}
    for i in PATIENTS:
        p = sample_patient(sc, i)
        if not p.nodules:
            continue
        mask = np.zeros((p.n_slices, p.image_size, p.image_size), bool)
        for nod in p.nodules:
            for k, m in nodule_masks_by_slice(p, nod).items():
                mask[k] |= m
        with_nod, without = _render(sc, p), _render(sc, dataclasses.replace(p, nodules=[]))
        for name, ws in (("study", windows), ("paper", "paper")):
            fractions[name].append(float((_change(with_nod, without, ws)[mask] > 0.05).mean()))
    assert len(fractions["study"]) >= 4
    assert min(fractions["study"]) >= 0.95          # every labelled nodule pixel changes the input
    assert min(fractions["paper"]) < 0.5            # the single window hides most of some nodules


def test_the_age_effect_reaches_the_input_through_the_lung_window(study):
    sc, windows = study
    for i in PATIENTS:
        p = sample_patient(sc, i)
        aged, ageless = _render(sc, p), _render(sc, sample_patient(dataclasses.replace(sc, age_effect=0.0), i))
        lung = (ageless > -950) & (ageless < -650)                                     # parenchyma
        planted = 1.5 * abs(p.age - 55.0)                                              # HU (synth: -1.5 HU/year)
        lung_level, lung_width = ops.resolve_windows(windows)[0]
        got = _change(aged, ageless, windows)[lung].mean()
        assert got >= 0.5 * planted / lung_width, (i, p.age, got)
        assert _change(aged, ageless, "paper")[lung].max() == 0.0                      # clipped to 0 HU-free
