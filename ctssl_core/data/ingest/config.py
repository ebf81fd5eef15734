"""What an ingest is asked to do (``IngestConfig``) and what it reports (``IngestSummary``).

Why its own module: both are read by every stage and by the CLI, and neither depends on any
stage, so keeping them here lets each stage import them without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctssl_core.config import ConfigError
from ctssl_core.data.dicom import REASONS


@dataclass
class IngestConfig:
    size: int = 256                      # stored in-plane size (H = W)
    workers: int = 2                     # decode processes; 1 = in this process
    format: Literal["auto", "generic", "rsna-pe", "lidc"] = "auto"
    agreement: float = 0.5               # LIDC consensus: fraction of readers that must agree
    demographics: str | None = None      # CSV keyed by PatientID or StudyInstanceUID; None = auto-detect in root

    def __post_init__(self):
        if not 16 <= int(self.size) <= 2048:
            raise ConfigError(f"ingest size={self.size}: choose an in-plane size between 16 and 2048 (default 256)")
        if int(self.workers) < 1:
            raise ConfigError(f"ingest workers={self.workers}: use 1 or more worker processes")
        if not 0.0 < float(self.agreement) <= 1.0:
            raise ConfigError(f"ingest agreement={self.agreement}: use a fraction in (0, 1], e.g. 0.5")
        if self.format not in ("auto", "generic", "rsna-pe", "lidc"):
            raise ConfigError(f"ingest format={self.format!r}: choose auto, generic, rsna-pe or lidc")


@dataclass
class IngestSummary:
    files_found: int = 0
    files_new: int = 0
    files_already_done: int = 0
    files_ok: int = 0
    series: int = 0
    slices: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    slices_per_s: float = 0.0
    dataset: str = "generic"
    sidecars: list[str] = field(default_factory=list)
    labelled_slices: int = 0              # slices that got a pe label from train.csv
    nodule_series: int = 0                # series that got LIDC masks
    demographics_rows: int = 0
    demographics_unmatched_lines: list[int] = field(default_factory=list)  # CSV line numbers, never keys
    patients_without_demographics: int = 0
    demographics_dropped_columns: list[str] = field(default_factory=list)  # identifier-like, not stored
    mixed_datasets: list[str] = field(default_factory=list)  # set when the store now holds synthetic and real studies
    stage_seconds: dict[str, float] = field(default_factory=dict)  # scan / plan / build (incl. catalog)

    def table(self) -> str:
        lines = [
            f"files: {self.files_found} found, {self.files_new} new, {self.files_already_done} already ingested",
            f"ingested: {self.series} series, {self.slices} slices in {self.seconds:.1f} s "
            f"({self.slices_per_s:.0f} slices/s); dataset={self.dataset}",
        ]
        if self.stage_seconds:
            lines.append("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items()))
        if self.sidecars:
            lines.append(f"sidecars: {', '.join(self.sidecars)}")
        if self.labelled_slices:
            lines.append(f"pe labels on {self.labelled_slices} slices")
        if self.nodule_series:
            lines.append(f"nodule masks for {self.nodule_series} series")
        if self.demographics_rows:
            lines.append(f"demographics: {self.demographics_rows} rows; "
                         f"{len(self.demographics_unmatched_lines)} matched no ingested patient"
                         + (f" (CSV lines {', '.join(map(str, self.demographics_unmatched_lines[:10]))}"
                            f"{' ...' if len(self.demographics_unmatched_lines) > 10 else ''})"
                            if self.demographics_unmatched_lines else "")
                         + f"; {self.patients_without_demographics} patients had no row")
        if self.demographics_dropped_columns:
            lines.append("demographics: identifier-like columns not stored: "
                         + ", ".join(self.demographics_dropped_columns)
                         + " (rename a column that really is an attribute)")
        if self.mixed_datasets:
            lines.append(f"NOTE: this store mixes synthetic and real studies ({', '.join(self.mixed_datasets)}); "
                         f"results from it do not describe real patients alone. Keep real data in its own store.")
        if self.errors_by_reason:
            lines.append(f"{'reason':<22} {'files':>7}  what to do")
            for reason, n in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]):
                lines.append(f"{reason:<22} {n:>7}  {REASONS.get(reason, '')}")
        return "\n".join(lines)
