"""RSNA STR Pulmonary Embolism Detection labels (``train.csv``), streamed.

One row per image: StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
pe_present_on_image, then 13 exam-level columns repeated on every row. The real
file has 1.8M rows, so it is read row by row and only the SOPs and studies being
ingested are kept. Also the competition's weighted log loss (Kaggle 2020), which
the ``pe`` task can report next to AUROC.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EXAM_COLUMNS = (
    "negative_exam_for_pe", "qa_motion", "qa_contrast", "flow_artifact", "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1", "leftsided_pe", "chronic_pe", "true_filling_defect_not_pe", "rightsided_pe",
    "acute_and_chronic_pe", "central_pe", "indeterminate",
)
KEY_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image")
# competition weights (exam-level labels scored; qa_* and flow_artifact are not)
EXAM_WEIGHTS = {
    "negative_exam_for_pe": 0.0736196319, "indeterminate": 0.09202453988, "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785, "central_pe": 0.1877300613, "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712, "rv_lv_ratio_gte_1": 0.2346625767, "rv_lv_ratio_lt_1": 0.0782208589,
}
IMAGE_WEIGHT = 0.07361963


@dataclass
class RsnaLabels:
    pe: dict[str, bool] = field(default_factory=dict)            # SOPInstanceUID -> pe_present_on_image
    exams: dict[str, dict[str, int]] = field(default_factory=dict)  # StudyInstanceUID -> exam columns
    rows: int = 0


def load_labels(csv_path: str | Path, sops: set[str], studies: set[str]) -> RsnaLabels:
    """Stream ``train.csv``; keep labels only for ``sops``/``studies`` (those being ingested)."""
    from ctssl_core.config import ConfigError

    out = RsnaLabels()
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{csv_path} is empty; expected the RSNA-PE train.csv with columns {', '.join(KEY_COLUMNS)}")
        col = {name.strip(): i for i, name in enumerate(header)}
        missing = [c for c in KEY_COLUMNS if c not in col]
        if missing:
            raise ConfigError(f"{csv_path} lacks column(s) {', '.join(missing)}; is it the RSNA-PE train.csv? "
                              f"Use --format generic to ingest without it.")
        i_sop, i_study, i_pe = col["SOPInstanceUID"], col["StudyInstanceUID"], col["pe_present_on_image"]
        exam_idx = [(c, col[c]) for c in EXAM_COLUMNS if c in col]
        for row in reader:
            out.rows += 1
            if len(row) <= max(i_sop, i_study, i_pe):
                continue
            sop = row[i_sop].strip()
            if sop in sops:
                out.pe[sop] = _flag(row[i_pe])
            study = row[i_study].strip()
            if study in studies and study not in out.exams:
                out.exams[study] = {c: int(_flag(row[i])) for c, i in exam_idx if i < len(row) and row[i].strip() != ""}
    return out


def _flag(v: str) -> bool:
    v = v.strip().lower()
    return v in ("1", "1.0", "true", "yes")


def weighted_log_loss(image_pred: np.ndarray, image_true: np.ndarray, exam_of_image: np.ndarray,
                      exam_pred: dict[str, np.ndarray], exam_true: dict[str, np.ndarray], eps: float = 1e-15) -> float:
    """RSNA STR PE competition metric: exam-weighted image log loss + weighted exam-label log loss.

    ``exam_of_image`` maps each image to its exam index 0..E-1; ``exam_pred``/``exam_true`` hold (E,) arrays
    per exam column in ``EXAM_WEIGHTS``. Each exam's image term is weighted by its fraction of positive images.
    """
    p = np.clip(np.asarray(image_pred, np.float64), eps, 1 - eps)
    y = np.asarray(image_true, np.float64)
    ex = np.asarray(exam_of_image, np.int64)
    n_exams = int(ex.max()) + 1 if ex.size else 0
    n_img = np.bincount(ex, minlength=n_exams).astype(np.float64)  # (E,)
    q = np.bincount(ex, weights=y, minlength=n_exams) / np.maximum(n_img, 1)  # positive fraction per exam
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))  # (N,)
    image_loss = IMAGE_WEIGHT * np.sum(q[ex] * bce)
    image_w = IMAGE_WEIGHT * np.sum(q * n_img)
    exam_loss, exam_w = 0.0, 0.0
    for name, w in EXAM_WEIGHTS.items():
        if name not in exam_pred:
            continue
        pe_ = np.clip(np.asarray(exam_pred[name], np.float64), eps, 1 - eps)
        ye = np.asarray(exam_true[name], np.float64)
        exam_loss += w * np.sum(-(ye * np.log(pe_) + (1 - ye) * np.log(1 - pe_)))
        exam_w += w * len(ye)
    return float((image_loss + exam_loss) / (image_w + exam_w))
