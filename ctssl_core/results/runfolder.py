"""A run's folder, the only thing a training process writes: ``runs/<run_id>/metrics.jsonl``.

Why: DuckDB lets one process write *or* many read (DESIGN.md §5), and a training process that wrote the
store - even in short merges from a background thread, as it once did - competed with the dashboard, the
worker and every other unit for the lock, and on a cluster would write one DuckDB file from many nodes.
So the training loop only appends JSON lines here (cheap, crash-safe, never blocks on a lock), and the
store merges them: ``results.write.finish_run`` when the run ends, ``merge_pending`` from whoever holds
the store (the job runner's heartbeat, the worker's reconcile), and until then ``results.read`` shows
the lines not merged yet beside the merged ones, so a live curve needs no writer at all.

No DuckDB here (``tests/test_import_rules.py``): this module reads and writes files only.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from ctssl_core.config import ConfigError
from ctssl_core.paths import store_paths

METRICS_FILE = "metrics.jsonl"
RESERVED = ("step", "epoch", "wall_s")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """Run ids become folder names: refuse anything that could escape ``runs/``."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ConfigError(
            f"invalid run id {run_id!r}: use letters, digits, '_', '-', '.' only "
            f"(make one with results.write.new_run_id)")
    return run_id


def as_number(value: Any) -> float | None:
    """Metric values: python/numpy/torch scalars -> float; anything else -> None (skipped)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            v = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        return float(v) if isinstance(v, (int, float, bool)) else None
    return None


def parse_lines(run_id: str, chunk: bytes) -> list[tuple]:
    """Whole JSONL lines -> long rows (run_id, step, epoch, wall_s, name, value).

    A line that is not valid JSON (disk corruption, a foreign writer) is skipped
    rather than blocking every later line of the run forever.
    """
    rows: list[tuple] = []
    for raw in chunk.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        step, epoch, wall = rec.get("step"), rec.get("epoch"), rec.get("wall_s")
        for name, value in rec.items():
            if name in RESERVED:
                continue
            v = as_number(value)
            if v is None:
                continue
            rows.append((run_id, None if step is None else int(step),
                         None if epoch is None else float(epoch),
                         None if wall is None else float(wall), str(name), v))
    return rows


def metrics_path(store_root: str | Path, run_id: str) -> Path:
    return store_paths(store_root).run_dir(check_run_id(run_id)) / METRICS_FILE


def whole_lines_after(path: Path, offset: int) -> bytes:
    """The whole lines of ``path`` after byte ``offset`` (a half-written last line is left for later);
    b"" when there are none or no file."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return b""
    end = chunk.rfind(b"\n")
    return chunk[: end + 1] if end >= 0 else b""


def tail_metrics(store_root: str | Path, run_id: str, max_bytes: int = 16384) -> dict[str, Any] | None:
    """The last whole JSON line of a run's metrics file (for live progress), or None."""
    path = metrics_path(store_root, run_id)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            chunk = f.read()
    except OSError:
        return None
    for raw in reversed(chunk.split(b"\n")):
        if raw.strip():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # a half-written last line
            if isinstance(rec, dict):
                return rec
    return None


class RunLogger:
    """``log(dict)`` callback for ``train.fit``: one JSON line per call in the run's folder, nothing else.

    The line reaches the OS at once (line-buffered: a crash loses at most the line being written);
    ``close()`` fsyncs and closes. It never opens the store: see the module docstring for who merges.
    """

    def __init__(self, store_root: str | Path, run_id: str):
        self.store_root = Path(store_root)
        self.run_id = check_run_id(run_id)
        self.path = metrics_path(self.store_root, run_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")  # line-buffered
        self._t0 = time.monotonic()
        self.lines = 0

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        if self._f is None:
            raise ConfigError(f"RunLogger for {self.run_id} is closed; create a new one to log more")
        rec: dict[str, Any] = {
            "step": int(metrics["step"]) if metrics.get("step") is not None else None,
            "epoch": float(metrics["epoch"]) if metrics.get("epoch") is not None else None,
            "wall_s": float(metrics["wall_s"]) if metrics.get("wall_s") is not None
            else round(time.monotonic() - self._t0, 4),
        }
        for k, v in metrics.items():
            if k in RESERVED:
                continue
            num = as_number(v)
            if num is not None:
                rec[str(k)] = num if math.isfinite(num) else None
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.lines += 1

    def close(self) -> None:
        """fsync and close the file (idempotent)."""
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
