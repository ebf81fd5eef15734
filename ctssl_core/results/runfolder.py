"""A run's folder, the only thing a training process writes: ``runs/<run_id>/``.

- ``run.json``: the run's record (what it is, its status, checkpoint, labels): ``record_start`` when it
  starts or resumes, ``record_end`` when it ends (``update_record``: atomic, under a lock);
- ``metrics.jsonl``: one JSON line per ``RunLogger`` call;
- ``results.json``: its results rows (``record_results``: a fine-tune's test scores).

Why: DuckDB lets one process write *or* many read (DESIGN.md §5), and a training process that wrote the
store - its run row, its results, even short merges from a background thread, as it once did - competed
with the dashboard, the worker and every other unit for the lock, failed when the store was held busy,
and on a cluster would write one DuckDB file from many nodes. So a unit's process only writes files here
(cheap, crash-safe, never blocks on a lock), and whoever drives it merges them into the store
(``results.write.merge_pending``): the benchmark after each unit, the job runner at each heartbeat and
when the command ends, the worker's reconcile after a crash, the CLI command once training returns.
Until then ``results.read`` shows the records and lines not merged yet beside the merged ones, so a
live run needs no writer at all.

No DuckDB here (``tests/test_import_rules.py``): this module reads and writes files only.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ctssl_core.config import ConfigError
from ctssl_core.paths import REPO_ROOT, store_paths

METRICS_FILE = "metrics.jsonl"
RUN_STATUSES = ("running", "succeeded", "failed", "cancelled")
# Env var set by the job runner: record_start appends each run id it starts to
# ``$CTSSL_JOB_DIR/runs.txt`` so a job can find the run(s) its command made
# without every command growing a ``--run-id`` flag.
JOB_DIR_ENV = "CTSSL_JOB_DIR"
# (store, run id) of every run this process started: the CLI hands them to the store when its command ends
STARTED: list[tuple[str, str]] = []
RESERVED = ("step", "epoch", "wall_s")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def utcnow() -> _dt.datetime:
    """Naive UTC timestamp (DuckDB TIMESTAMP has no zone; every writer uses UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe --always --dirty`` of the checkout, else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from ctssl_core import __version__
    return __version__


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", str(text).lower()).strip("_") or "x"


def new_run_id(kind: str, task: str, init: str) -> str:
    """Readable, sortable, unique: ``finetune-pe-masked_region-20261126-024501-3fa9c2``."""
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    return f"{_slug(kind)}-{_slug(task)}-{_slug(init)}-{stamp}-{secrets.token_hex(3)}"


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


# --------------------------------------------------------------------------- the run's record

RUN_FILE = "run.json"          # the run's row as its process knows it: what it is, its status, its labels
# store rows a unit makes, one file per table: a fine-tune's test scores, an embedding run's embeddings and
# their projections; the key says which earlier row a new one replaces (results: the run's whole set)
ROW_FILES = {"results": "results.json", "embeddings": "embedding_rows.json", "projections": "projection_rows.json"}
ROW_KEYS = {"results": ("run_id",), "embeddings": ("emb_id",), "projections": ("emb_id", "method")}
RESULTS_FILE = ROW_FILES["results"]
RUN_FIELDS = ("run_id", "kind", "task", "init", "encoder", "fraction", "seed", "profile", "benchmark_id", "dataset",
              "config", "code_version", "status", "created_at", "ended_at", "wall_s", "run_dir", "checkpoint",
              "error", "unit_hash")


def run_file(store_root: str | Path, run_id: str) -> Path:
    return store_paths(store_root).run_dir(check_run_id(run_id)) / RUN_FILE


def rows_file(store_root: str | Path, run_id: str, table: str) -> Path:
    return store_paths(store_root).run_dir(check_run_id(run_id)) / ROW_FILES[table]


def _write_json(path: Path, obj: Any) -> None:
    """Atomic replace: a reader (the merge, the dashboard) sees the old record or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, default=str, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def stamp(path: Path) -> str | None:
    """inode:mtime_ns:size of a file, or None when it does not exist (a new version has a new stamp: the
    record and results files are replaced, never edited in place)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def new_versions(run_dir: Path, names: Iterable[str], merged: Callable[[str], str | None]) -> dict[str, str]:
    """``name -> stamp`` of the files of ``run_dir`` whose version the store has not merged (``merged(name)``:
    the stamp the store keeps in ``merged_files``); what the merge takes and what the dashboard shows from the
    folder until then decide it the same way."""
    out = {}
    for name in names:
        st = stamp(run_dir / name)
        if st is not None and merged(name) != st:
            out[name] = st
    return out


def folder_run_ids(store_root: str | Path) -> list[str]:
    """Run ids of the store's run folders that hold something to merge (a record or metrics)."""
    runs_dir = store_paths(store_root).runs
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        return []
    out = []
    for e in entries:
        if e.is_dir() and (os.path.exists(os.path.join(e.path, RUN_FILE))
                           or os.path.exists(os.path.join(e.path, METRICS_FILE))):
            try:
                out.append(check_run_id(e.name))
            except ConfigError:
                continue
    return sorted(out)


def read_record(store_root: str | Path, run_id: str) -> dict[str, Any] | None:
    """The run's record (``run.json``), or None when it has none (a run of a store made before records)."""
    try:
        rec = json.loads(run_file(store_root, run_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("run_id") == run_id else None


def update_record(store_root: str | Path, run_id: str, change) -> dict[str, Any]:
    """Read, ``change(record) -> record``, write back, under an exclusive lock on the run's folder.

    Why a lock: the run's process writes its record at start and end, and another process may change
    it meanwhile (``ctssl annotate`` its labels, the job runner or the worker's reconcile its status once
    the process is gone); the lock keeps each read-modify-write whole."""
    import fcntl

    path = run_file(store_root, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".run.lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            new = change(read_record(store_root, run_id))
            _write_json(path, new)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return new


def compose_labels(first: Mapping[str, Any] | None, then: Mapping[str, Any] | None) -> dict[str, Any]:
    """Two label changes as one (``then`` after ``first``), keeping what they say: a tag of '' (remove it) and
    a name/notes of None (keep) or '' (clear). A run's record holds its labels this way, as a change of the
    labels the store has, so that a run the store knew before it had a record (made by an older ctssl) keeps
    its labels on resume, and a tag removed on resume stays removed: ``merge_labels(row, change)``."""
    first, then = dict(first or {}), dict(then or {})
    return {"name": first.get("name") if then.get("name") is None else then.get("name"),
            "tags": {**(first.get("tags") or {}), **(then.get("tags") or {})},
            "notes": first.get("notes") if then.get("notes") is None else then.get("notes")}


def merge_labels(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any]:
    """Labels after a change: tags merged (a tag set to '' is removed), a name/notes of None keeps the old
    value and '' clears it. One rule for ``ctssl annotate``, ``--name/--tag/--note`` and a resume."""
    old = dict(old or {})
    new = dict(new or {})
    tags = {**(old.get("tags") or {}), **(new.get("tags") or {})}
    return {"name": old.get("name") if new.get("name") is None else (new.get("name") or None),
            "tags": {k: v for k, v in tags.items() if v != ""},
            "notes": old.get("notes") if new.get("notes") is None else (new.get("notes") or None)}


def read_rows(store_root: str | Path, run_id: str, table: str) -> list[dict[str, Any]] | None:
    """The rows of ``table`` the run recorded, or None (none recorded, or the file is unreadable now)."""
    try:
        rows = json.loads(rows_file(store_root, run_id, table).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) else None


def record_start(store_root: str | Path, run_id: str, kind: str, task: str, init: str, encoder: str,
                 config: Mapping[str, Any] | Any, fraction: float | None = None, seed: int | None = None,
                 profile: str | None = None, benchmark_id: str | None = None, dataset: str | None = None,
                 labels: Mapping[str, Any] | None = None, unit_hash: str | None = None) -> Path:
    """Create ``runs/<run_id>/`` (config.json) and its record, status running. Returns the run dir.

    ``unit_hash``: the identity of the unit the run computes (``plan.py``; a pretraining's is
    ``pretrain.pretrain_hash``), by which a benchmark finds it again. Starting a run id again (resume)
    sets it back to running and keeps its created_at, checkpoint and labels; ``labels`` ({name, tags,
    notes}, as ``results.write.check_labels`` returns them) change them as ``ctssl annotate`` would.
    The store learns of it when its driver merges (module docstring)."""
    import dataclasses

    root = Path(store_root)
    check_run_id(run_id)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    cfg_json = json.dumps(config, default=str, sort_keys=True)
    run_dir = store_paths(root).run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg_json)
    fields = dict(run_id=run_id, kind=kind, task=task, init=init, encoder=encoder, fraction=fraction, seed=seed,
                  profile=profile, benchmark_id=benchmark_id, dataset=dataset, config=cfg_json,
                  code_version=code_version(), status="running", ended_at=None, wall_s=None, error=None,
                  run_dir=run_dir.relative_to(root).as_posix())

    def change(old: dict | None) -> dict:
        old = old or {}
        # metrics_id: this folder's metric lines, new with each new record: a run folder deleted and made
        # again under the same id (a benchmark unit rerun) starts its metrics afresh in the store too
        rec = {**old, **fields, "created_at": old.get("created_at") or utcnow().isoformat(),
               "metrics_id": old.get("metrics_id") or secrets.token_hex(8),
               "unit_hash": unit_hash or old.get("unit_hash"), "checkpoint": old.get("checkpoint")}
        if labels:
            rec["labels"] = compose_labels(old.get("labels"), labels)
        return rec

    update_record(root, run_id, change)
    STARTED.append((str(root), run_id))
    job_dir = os.environ.get(JOB_DIR_ENV)
    if job_dir:
        try:
            with open(Path(job_dir) / "runs.txt", "a", encoding="utf-8") as f:
                f.write(run_id + "\n")
        except OSError:
            pass  # progress display only; the run itself is recorded above
    return run_dir


def in_store_path(store_root: str | Path, path: str | Path | None) -> str | None:
    """A checkpoint path as the store records it: relative to the store when inside it."""
    if path is None:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(store_root).resolve()).as_posix() if p.is_absolute() else p.as_posix()
    except ValueError:
        return p.as_posix()


def record_end(store_root: str | Path, run_id: str, status: str, checkpoint: str | Path | None = None,
               error: str | None = None) -> dict[str, Any]:
    """Set the run's final status, end time, wall time and checkpoint in its record. Returns the record."""
    if status not in RUN_STATUSES:
        raise ConfigError(f"run status {status!r} is not one of {list(RUN_STATUSES)}")
    root = Path(store_root)
    ckpt = in_store_path(root, checkpoint)

    def change(old: dict | None) -> dict:
        if old is None:
            raise ConfigError(f"no run {run_id!r} recorded in {root}; call start_run first")
        now = utcnow()
        try:
            wall = (now - _dt.datetime.fromisoformat(str(old.get("created_at")))).total_seconds()
        except ValueError:
            wall = None
        return {**old, "status": status, "ended_at": now.isoformat(), "wall_s": wall, "error": error,
                "checkpoint": ckpt or old.get("checkpoint")}

    return update_record(root, run_id, change)


def record_end_after(original: BaseException, store_root: str | Path, run_id: str, status: str,
                     checkpoint: str | Path | None = None, error: str | None = None, close=None) -> None:
    """Record the end of a run that ``original`` stopped (close its logger, then ``record_end``) without
    letting a second failure replace ``original``.

    Why: a full disk that stops a checkpoint also stops the write of the run's end; raised from the
    except block, that second error hid the first (the disk is full, free space and resume), and the CLI
    exited 1 instead of 2 with what to do. The second failure becomes a note on ``original``, which the
    caller re-raises."""
    for what, step in (("close its log", close),
                       ("record its end", lambda: record_end(store_root, run_id, status, checkpoint=checkpoint,
                                                             error=error))):
        if step is None:
            continue
        try:
            step()
        except Exception as e2:  # noqa: BLE001 - reported on the original error, never raised over it
            note = (f"ctssl could not {what} in its run folder ({type(e2).__name__}: {str(e2)[:300]}); "
                    f"the run may show as running until it is resumed or the job is reconciled")
            try:
                original.__notes__ = [*getattr(original, "__notes__", ()), note]   # add_note is Python >= 3.11
            except Exception:  # noqa: BLE001 - an exception type that takes no attributes keeps its own message
                pass


def check_rows(table: str, rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a store table as dicts, refused (ConfigError) with unknown columns or a value that is not a
    number: checked where they are made, so a bad row stops its unit instead of a later merge."""
    from ctssl_core.schema import TABLES, _columns

    cols = [name for name, _ in _columns(TABLES[table])]
    out = [dict(r) for r in rows]
    for i, r in enumerate(out):
        unknown = sorted(set(r) - set(cols))
        if unknown:
            raise ConfigError(f"{table} row {i} has unknown columns {unknown}; valid: {cols}")
        if "value" in r and as_number(r["value"]) is None and r["value"] is not None:
            raise ConfigError(f"{table} row {i}: value {r['value']!r} is not a number")
    return out


def record_results(store_root: str | Path, run_id: str, rows: list[Mapping[str, Any]]) -> int:
    """The run's ``results`` rows (one per metric), replacing any it recorded before; merged with it."""
    rows = check_rows("results", rows)
    if any(r.get("run_id") != run_id for r in rows):
        raise ConfigError(f"record_results: every row must have run_id {run_id!r}")
    _write_json(rows_file(store_root, run_id, "results"), rows)
    return len(rows)


def record_rows(store_root: str | Path, run_id: str, table: str, rows: list[Mapping[str, Any]]) -> int:
    """Rows of ``table`` (``embeddings``, ``projections``) made by the run, each replacing an earlier one of
    the same key (``ROW_KEYS``), in the run's folder; the store replaces its rows of those keys when it
    merges the folder (an embedding's replacement also drops its old projections, as the store's does)."""
    if table == "results" or table not in ROW_FILES:
        raise ConfigError(f"record_rows: table {table!r} is not one of {sorted(set(ROW_FILES) - {'results'})}")
    rows = check_rows(table, rows)
    key = ROW_KEYS[table]
    new = {tuple(r.get(k) for k in key) for r in rows}
    kept = [r for r in (read_rows(store_root, run_id, table) or []) if tuple(r.get(k) for k in key) not in new]
    _write_json(rows_file(store_root, run_id, table), kept + rows)
    return len(rows)
