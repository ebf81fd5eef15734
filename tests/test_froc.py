"""Lesion-level FROC / CPM and per-exam Dice on hand-made volumes whose answer is worked out by hand."""

import numpy as np
import pytest

from ctssl_core.evaluate import froc


def _two_scans():
    """2 scans, 3 lesions, 3 false positives, one duplicate hit.

    Scan A: lesion A1 (slices 1-2) hit by a 0.9 blob and by a second 0.6 blob
    (a duplicate: neither TP nor FP); lesion A2 (slice 4) hit at 0.3; a 0.8
    false positive. Scan B: lesion B1 never hit; false positives 0.7 and 0.2.
    Sorted scores: 0.9 TP, 0.8 FP, 0.7 FP, 0.3 TP, 0.2 FP -> operating points
    (FPs/scan, sensitivity): (0, 1/3) (0.5, 1/3) (1, 1/3 -> 2/3) (1.5, 2/3).
    At 1/8, 1/4, 1/2: 1/3; at 1, 2, 4, 8: 2/3 -> CPM = (3/3 + 8/3) / 7 = 11/21.
    """
    pa, ta = np.zeros((6, 10, 10)), np.zeros((6, 10, 10), bool)
    ta[1:3, 2:6, 2:4] = True            # A1
    ta[4, 6:8, 6:8] = True              # A2
    pa[1, 2, 2] = 0.9                   # hit on A1
    pa[2, 5, 3] = 0.6                   # second, separate (not 26-connected) hit on A1: ignored
    pa[0, 0, 9] = 0.8                   # FP
    pa[4, 7, 7] = 0.3                   # hit on A2
    pb, tb = np.zeros((5, 10, 10)), np.zeros((5, 10, 10), bool)
    tb[2, 4:6, 4:6] = True              # B1, missed
    pb[0, 0, 0] = 0.7                   # FP
    pb[4, 9, 9] = 0.2                   # FP
    return (pa, ta), (pb, tb)


def test_exam_detections_match_candidates_to_lesions():
    (pa, ta), (pb, tb) = _two_scans()
    a = froc.exam_detections(pa, ta)
    b = froc.exam_detections(pb, tb)
    assert a.n_lesions == 2 and b.n_lesions == 1
    assert a.lesion_scores.tolist() == pytest.approx([0.9, 0.3])
    assert sorted(a.fp_scores.tolist()) == pytest.approx([0.8])
    assert b.lesion_scores.tolist() == [0.0]
    assert sorted(b.fp_scores.tolist()) == pytest.approx([0.2, 0.7])


def test_a_second_hit_on_one_lesion_is_neither_tp_nor_fp():
    (pa, ta), _ = _two_scans()
    d = froc.exam_detections(pa, ta)
    assert d.centroids.shape[0] == 4                      # 0.9, 0.6, 0.8, 0.3 are four candidates
    assert d.centroids[np.argmin(np.abs(d.centroids - [2, 5, 3]).sum(1))].tolist() == [2, 5, 3]
    assert d.lesion_scores[0] == pytest.approx(0.9)       # the lesion keeps its best hit
    assert 0.6 not in d.fp_scores.tolist()                # and the duplicate is no false positive
    without = pa.copy()
    without[2, 5, 3] = 0.0
    e = froc.exam_detections(without, ta)
    assert e.lesion_scores.tolist() == d.lesion_scores.tolist() and e.fp_scores.tolist() == d.fp_scores.tolist()


def test_a_blob_over_two_lesions_hits_only_the_one_it_overlaps_most():
    p, t = np.zeros((1, 6, 12)), np.zeros((1, 6, 12), bool)
    t[0, 1:3, 1:3] = True                                 # 4 voxels
    t[0, 1:4, 6:9] = True                                 # 9 voxels
    p[0, 1:4, 1:9] = 0.7                                  # one component over both
    d = froc.exam_detections(p, t)
    assert d.lesion_scores.tolist() == [0.0, 0.7]
    assert d.fp_scores.size == 0


def test_cpm_and_sensitivity_on_the_hand_case():
    (pa, ta), (pb, tb) = _two_scans()
    exams = [froc.exam_detections(pa, ta), froc.exam_detections(pb, tb)]
    assert froc.cpm(exams) == pytest.approx(11 / 21)
    assert froc.sensitivity_at_fp(exams, 1.0) == pytest.approx(2 / 3)
    assert froc.sensitivity_at_fp(exams, 0.25) == pytest.approx(1 / 3)
    assert froc.sensitivity_at_fp(exams, 0.75) == pytest.approx(0.5)   # linear between (0.5, 1/3) and (1, 2/3)
    fps, sens, thr = froc.froc_curve(exams)
    assert thr.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.3, 0.2])
    assert fps.tolist() == pytest.approx([0, 0.5, 1, 1, 1.5])
    assert sens.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_froc_batch_reweights_exams_like_a_resampled_set():
    (pa, ta), (pb, tb) = _two_scans()
    exams = [froc.exam_detections(pa, ta), froc.exam_detections(pb, tb)]
    w = np.array([[1, 1], [2, 0], [0, 3], [2, 1]], dtype=float)
    got = froc.froc_batch(exams, w)
    for row, weights in zip(got, w):
        resampled = [e for e, k in zip(exams, weights) for _ in range(int(k))]
        assert row.mean() == pytest.approx(froc.cpm(resampled))
    # scan A twice: points (0 FP, 1/2) at t=0.9, (1 FP/scan, 1/2 -> 1) at t=0.8 and 0.3;
    # linear between (0, 1/2) and (1, 1): 1/2 + r/2 at r = 1/8, 1/4, 1/2, then 1
    assert got[1].tolist() == pytest.approx([0.5625, 0.625, 0.75, 1, 1, 1, 1])
    # scan B only: its lesion is never found
    assert got[2].tolist() == [0.0] * 7


def test_no_lesion_gives_nan_and_perfect_detection_gives_one():
    p, t = np.zeros((3, 8, 8)), np.zeros((3, 8, 8), bool)
    p[1, 1, 1] = 0.9
    e = [froc.exam_detections(p, t)]
    assert np.isnan(froc.cpm(e))
    t[1, 1, 1] = True
    assert froc.cpm([froc.exam_detections(p, t)]) == pytest.approx(1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one .S, H, W. shape"):
        froc.exam_detections(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="cand_threshold"):
        froc.exam_detections(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), cand_threshold=0.0)
    with pytest.raises(ValueError, match="weights must be"):
        froc.froc_batch([], np.ones((1, 2)))


def test_exam_dice_is_the_volume_dice_and_undefined_without_a_nodule():
    (pa, ta), _ = _two_scans()
    pred = pa >= 0.5
    inter = np.logical_and(pred, ta).sum()
    assert froc.exam_dice(pred, ta) == pytest.approx(2 * inter / (pred.sum() + ta.sum()))
    assert np.isnan(froc.exam_dice(pred, np.zeros_like(ta)))
    assert froc.exam_dice(ta, ta) == 1.0
