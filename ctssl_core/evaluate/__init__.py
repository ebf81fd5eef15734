"""Metrics, patient-level bootstrap CIs and label-fraction curves (pure NumPy; no I/O).

Split by concept: ``metrics`` (AUROC, AUPRC, Dice, RSNA log loss ...),
``bootstrap`` (patient resampling, paired differences), ``curves``
(labels saved, learning-speed ratio), ``froc`` (lesion-level nodule detection:
FROC, CPM, per-exam Dice). Everything is re-exported here.
"""

from ctssl_core.evaluate.bootstrap import (
    CI,
    RowIndex,
    bootstrap_ci,
    bootstrap_multi,
    bootstrap_stat,
    ci_from_samples,
    draw_patients,
    paired_diff_ci,
)
from ctssl_core.evaluate.froc import CPM_FP_RATES, ExamDetections, exam_detections, exam_dice, froc_batch, froc_curve
from ctssl_core.evaluate.curves import NOT_REACHED, fraction_curve, labels_needed, speed_ratio, steps_to_reach
from ctssl_core.evaluate.metrics import (
    RSNA_EXAM_WEIGHTS,
    RSNA_IMAGE_WEIGHT,
    aggregate_exam,
    auprc,
    auroc,
    dice,
    dice_iou_per_slice,
    iou,
    macro_ovr_auroc,
    mae,
    per_nodule_dice,
    position_strata,
    r2,
    rsna_weighted_log_loss,
    sensitivity_at_specificity,
    stratified_auroc,
    weighted_ranking_metrics,
)

__all__ = [
    "CI", "RowIndex", "bootstrap_ci", "bootstrap_multi", "ci_from_samples", "bootstrap_stat", "draw_patients", "paired_diff_ci",
    "CPM_FP_RATES", "ExamDetections", "exam_detections", "exam_dice", "froc_batch", "froc_curve",
    "NOT_REACHED", "fraction_curve", "labels_needed", "speed_ratio", "steps_to_reach",
    "RSNA_EXAM_WEIGHTS", "RSNA_IMAGE_WEIGHT", "aggregate_exam", "auprc", "auroc", "dice",
    "dice_iou_per_slice", "iou", "macro_ovr_auroc", "mae", "per_nodule_dice", "position_strata", "r2",
    "rsna_weighted_log_loss", "sensitivity_at_specificity", "stratified_auroc", "weighted_ranking_metrics",
]
