"""Lesion-level nodule detection scoring (LUNA16 style FROC / CPM) and per-exam Dice.

Slice Dice rewards painting the right pixels on the slices that have them; a
reader of a screening CT wants to know how many nodules are found and at what
cost in false alarms. LUNA16 (Setio et al., Med. Image Anal. 2017) answers
with the FROC curve (lesion sensitivity vs mean false positives per scan) and
its summary, the CPM: mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per
scan.

Candidates. A segmentation network gives a probability volume, not a list of
points, so candidates are the 3-D connected components (26-connectivity) of
``prob >= cand_threshold``, each scored by its maximum probability and located
at its centroid. Why components rather than local maxima: a nodule's
probability plateau often has several near-equal maxima (one per slice), which
would be counted as extra hits or, next to the lesion border, as false
positives; a component is one detection by construction, which is also how a
reader would count it. ``cand_threshold`` is low (0.05 by default) so the curve
spans many operating points; each point of the curve is "keep the candidates
whose score >= t".

Hits. A candidate hits GT lesion k (3-D component of the mask) when its
component overlaps it; a candidate overlapping several lesions is assigned to
the one it overlaps most, so one huge blob can never be credited with more
than one lesion. (The centroid-inside-lesion rule would miss a correct
detection whose component is non-convex or slightly larger than the lesion.)
As in LUNA16, a lesion counts once: its score is that of its best hit, and
further hits on it are neither true nor false positives. Candidates hitting no
lesion are false positives.

Per-exam summaries (``ExamDetections``: lesion scores, FP scores) are all the
FROC needs, so a patient bootstrap resamples exams and recomputes the curve
from their lists (``froc_batch``), without touching the volumes again.

Interpolation follows the LUNA16 evaluation script: sensitivity at a given FP
rate is read off the FROC curve by linear interpolation between operating
points (the curve starts at (0, 0); where several points share one FP rate the
most sensitive is kept, since lowering the threshold there only adds hits), and beyond the last operating point it
stays at the final (maximum) sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class ExamDetections:
    """One exam's detections: enough to compute any FROC point on any resampled set of exams."""

    lesion_scores: np.ndarray   # (L,) best hit score per GT lesion; 0.0 = never hit (missed at every t > 0)
    fp_scores: np.ndarray       # (F,) scores of the candidates that hit no lesion
    centroids: np.ndarray       # (C, 3) candidate centroids (z, y, x), all candidates, for inspection

    @property
    def n_lesions(self) -> int:
        return int(self.lesion_scores.size)


def _structure():
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, 3)   # 26-connectivity: a diagonal step is one object


def exam_detections(prob, target, cand_threshold: float = 0.05) -> ExamDetections:
    """Candidates of one exam's probability volume (S, H, W) matched to the lesions of its mask."""
    from scipy import ndimage

    p = np.asarray(prob, dtype=np.float64)
    t = np.asarray(target).astype(bool)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"need a probability and a mask volume of one (S, H, W) shape, got {p.shape} and {t.shape}")
    if not 0.0 < cand_threshold <= 1.0:
        raise ValueError(f"cand_threshold must lie in (0, 1], got {cand_threshold}")
    st = _structure()
    t_lab, n_les = ndimage.label(t, structure=st)
    c_lab, n_cand = ndimage.label(p >= cand_threshold, structure=st)
    lesion_scores = np.zeros(n_les)
    if n_cand == 0:
        return ExamDetections(lesion_scores, np.zeros(0), np.zeros((0, 3)))
    # per-candidate max and centroid from the foreground voxels only (ndimage.maximum sorts the whole volume)
    fg = np.nonzero(c_lab)                                                         # 3 x (V,) coordinates
    lab = c_lab[fg] - 1                                                            # (V,) candidate index
    score = np.full(n_cand, -np.inf)
    np.maximum.at(score, lab, p[fg])                                               # (C,)
    size = np.bincount(lab, minlength=n_cand).astype(np.float64)
    cent = np.stack([np.bincount(lab, weights=c, minlength=n_cand) / size for c in fg], 1)   # (C, 3) z, y, x
    # overlap counts (candidate, lesion) from the voxels labelled in both
    both = (c_lab > 0) & (t_lab > 0)
    ov = np.zeros((n_cand + 1, n_les + 1), dtype=np.int64)
    np.add.at(ov, (c_lab[both], t_lab[both]), 1)
    hit = np.where(ov[1:].max(1) > 0, ov[1:].argmax(1), 0)                         # (C,) lesion id, 0 = none
    for k in range(1, n_les + 1):
        s = score[hit == k]
        if s.size:
            lesion_scores[k - 1] = s.max()
    return ExamDetections(lesion_scores, score[hit == 0], cent)


def froc_batch(exams: list[ExamDetections], weights, fp_rates=CPM_FP_RATES) -> np.ndarray:
    """Sensitivity at each of ``fp_rates`` for many weightings of the exams at once.

    ``weights`` (R, E): how often each exam is drawn in each bootstrap
    replicate (all ones = the point estimate). One sort of all scores, then
    weighted cumulative sums give every replicate's curve: sensitivity(t) =
    weighted lesions with score >= t / weighted lesions, FPs per scan(t) =
    weighted FPs with score >= t / weighted exams. Returns (R, len(fp_rates));
    ``nan`` where a replicate holds no lesion.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != len(exams):
        raise ValueError(f"weights must be (R, {len(exams)}), got {w.shape}")
    rates = np.asarray(fp_rates, dtype=np.float64)
    les_s = [e.lesion_scores[e.lesion_scores > 0] for e in exams]    # a never-hit lesion is never found
    s = np.concatenate(les_s + [e.fp_scores for e in exams] + [np.zeros(0)])
    owner = np.concatenate([np.full(a.size, i) for i, a in enumerate(les_s)]
                           + [np.full(e.fp_scores.size, i) for i, e in enumerate(exams)] + [np.zeros(0)]).astype(np.int64)
    is_tp = np.r_[np.ones(sum(a.size for a in les_s)), np.zeros(s.size - sum(a.size for a in les_s))]
    n_les = w @ np.array([e.n_lesions for e in exams], dtype=np.float64)       # (R,) weighted lesions
    n_scan = w.sum(1)                                                           # (R,) weighted exams
    out = np.full((w.shape[0], rates.size), np.nan)
    ok = n_les > 0
    if s.size == 0:
        out[ok] = 0.0
        return out
    order = np.argsort(-s, kind="mergesort")
    last_of_tie = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]         # one operating point per distinct score
    ws = w[:, owner[order]]                                                     # (R, K) item weights, best first
    tp = np.cumsum(ws * is_tp[order], axis=1)[:, last_of_tie]                   # (R, T)
    fp = np.cumsum(ws * (1 - is_tp[order]), axis=1)[:, last_of_tie]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / n_les[:, None]
        fps = fp / n_scan[:, None]
    for r in np.flatnonzero(ok):
        x, y = np.r_[0.0, fps[r]], np.r_[0.0, sens[r]]
        last = np.r_[x[1:] != x[:-1], True]   # at one FP rate the lowest threshold has the most hits
        out[r] = np.interp(rates, x[last], y[last])                             # flat beyond the last point
    return out


def froc_curve(exams: list[ExamDetections]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean FPs per scan, lesion sensitivity, threshold) at every distinct candidate score, best first."""
    scores = np.unique(np.concatenate([e.lesion_scores[e.lesion_scores > 0] for e in exams]
                                      + [e.fp_scores for e in exams] + [np.zeros(0)]))[::-1]
    n_les = sum(e.n_lesions for e in exams)
    n_scan = max(len(exams), 1)
    fps = np.array([sum(int(np.sum(e.fp_scores >= t)) for e in exams) / n_scan for t in scores])
    sens = np.array([sum(int(np.sum(e.lesion_scores >= t)) for e in exams) / n_les if n_les else np.nan
                     for t in scores])
    return fps, sens, scores


def cpm(exams: list[ExamDetections], fp_rates=CPM_FP_RATES) -> float:
    """Competition performance metric: mean sensitivity at ``fp_rates`` FPs per scan (nan without lesions)."""
    sens = froc_batch(exams, np.ones((1, len(exams))), fp_rates)[0]
    return float(np.mean(sens))


def sensitivity_at_fp(exams: list[ExamDetections], fp_rate: float = 1.0) -> float:
    """Lesion sensitivity at ``fp_rate`` mean false positives per scan (interpolated as for CPM)."""
    return float(froc_batch(exams, np.ones((1, len(exams))), (fp_rate,))[0, 0])


def exam_dice(pred, target) -> float:
    """Dice of one exam's whole binary volume; ``nan`` when the exam has no nodule.

    An exam without a GT nodule has no Dice worth averaging (1 if nothing is
    predicted, 0 for a single false voxel: a coin that would swamp the mean),
    so it contributes nothing to ``exam_dice``; its false positives are what
    the FROC's FP-per-scan axis counts.
    """
    a = np.asarray(pred).astype(bool)
    b = np.asarray(target).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction {a.shape} and mask {b.shape} differ in shape")
    if not b.any():
        return float("nan")
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
