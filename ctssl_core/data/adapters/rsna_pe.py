"""RSNA STR Pulmonary Embolism Detection labels (``train.csv``), streamed.

One row per image: StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
pe_present_on_image, then 13 exam-level columns repeated on every row. The real
file has 1.8M rows, so it goes into an in-memory DuckDB table and is queried per
batch of committed slices; no Python object per row. Also the competition's weighted log loss (Kaggle 2020), which
the ``pe`` task can report next to AUROC.
"""

from __future__ import annotations

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


class RsnaLabels:
    """``train.csv`` loaded into an in-memory DuckDB (columnar, ~100 MB for the full 1.8M rows)
    and queried per commit batch, so no Python object per row is ever held.
    Raw UIDs live only in this process's memory, never in the store."""

    def __init__(self, csv_path: str | Path):
        import csv

        from ctssl_core.config import ConfigError

        self.path = Path(csv_path)
        with open(self.path, newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise ConfigError(f"{self.path} is empty; expected the RSNA-PE train.csv with columns {', '.join(KEY_COLUMNS)}")
        cols = [c.strip() for c in header]
        missing = [c for c in KEY_COLUMNS if c not in cols]
        if missing:
            raise ConfigError(f"{self.path} lacks column(s) {', '.join(missing)}; is it the RSNA-PE train.csv? "
                              f"Use --format generic to ingest without it.")
        self.exam_columns = [c for c in EXAM_COLUMNS if c in cols]
        self.con = None  # loaded on first lookup: after ingest's worker processes have forked

    def _load(self):
        import duckdb

        src = "read_csv('" + str(self.path).replace("'", "''") + "', header=true, all_varchar=true)"
        self.con = duckdb.connect(":memory:")
        flag = "(lower(trim({0})) IN ('1', '1.0', 'true', 'yes'))"
        self.con.execute(f"CREATE TABLE img AS SELECT trim(SOPInstanceUID) AS sop, "
                         f"{flag.format('pe_present_on_image')} AS pe FROM {src}")
        exam_sel = ", ".join(f"CAST({flag.format(c)} AS INTEGER) AS {c}" for c in self.exam_columns)
        self.con.execute(f"CREATE TABLE exam AS SELECT DISTINCT ON (trim(StudyInstanceUID)) trim(StudyInstanceUID) AS study"
                         f"{', ' + exam_sel if exam_sel else ''} FROM {src}")
        return self.con

    def pe_of(self, sops: list[str]) -> dict[str, bool]:
        """SOPInstanceUID -> pe_present_on_image, for the given SOPs that are in the csv."""
        if not sops:
            return {}
        return dict((self.con or self._load()).execute("SELECT sop, pe FROM img WHERE sop IN (SELECT unnest(?::TEXT[]))",
                                     [list(sops)]).fetchall())

    def exams_of(self, studies: list[str]) -> dict[str, dict[str, int]]:
        """StudyInstanceUID -> exam-level columns."""
        if not studies:
            return {}
        rows = (self.con or self._load()).execute("SELECT * FROM exam WHERE study IN (SELECT unnest(?::TEXT[]))",
                                [list(studies)]).fetchall()
        return {r[0]: dict(zip(self.exam_columns, r[1:])) for r in rows}

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None


def load_labels(csv_path: str | Path) -> RsnaLabels:
    """Open ``train.csv`` for per-batch label lookups (see :class:`RsnaLabels`)."""
    return RsnaLabels(csv_path)


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
