#!/usr/bin/env python
"""What does ``read.store_version`` cost on a store with many run folders?

Pages call it on every rerun (their cached loaders are keyed by it), and it looks at every run folder's
record, since a unit's process writes only its folder (``results/runfolder.py``). This builds ``--runs``
folders with the real writers (``record_start``/``record_end``) and times, side by side and alternating,
the current ``store_version`` (one ``scandir`` and one ``stat`` per folder) against the listing it replaced
(``folder_run_ids``, then a checked id and a ``stat`` per run: kept below as the reference), and checks
that both give the same number.

    python experiments/bench_store_version.py               # 2,000 run folders, 7 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path


def listed_version(store: Path) -> int:
    """The previous ``store_version`` (until 2026-12-03): the same sum, via ``folder_run_ids``."""
    from ctssl_core.config import ConfigError
    from ctssl_core.paths import store_paths
    from ctssl_core.results import runfolder as rf

    db = store_paths(store).db
    v = 0
    for p in (db, db.with_name(db.name + ".wal")):
        with contextlib.suppress(OSError):
            v += p.stat().st_mtime_ns
    for rid in rf.folder_run_ids(store):
        with contextlib.suppress(OSError, ConfigError):
            v += rf.run_file(store, rid).stat().st_mtime_ns
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    from ctssl_core.results import read
    from ctssl_core.results import runfolder as rf

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for i in range(args.runs):
            rid = f"ft-bench-pe-random-{i:05d}"
            rf.record_start(store, rid, "finetune", "pe", "random", "tiny", {"i": i})
            rf.record_end(store, rid, "succeeded")
        assert read.store_version(store) == listed_version(store) > 0
        times: dict[str, list[float]] = {"listed (before)": [], "scandir (now)": []}
        for _ in range(args.rounds):
            for name, fn in zip(times, (listed_version, read.store_version)):
                t = time.perf_counter()
                fn(store)
                times[name].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:16s} {args.runs} run folders: median {med[k]:.1f} ms (min {min(v):.1f}, max {max(v):.1f})")
    before, now = med.values()
    print(f"before/now: {before / now:.1f}x")


if __name__ == "__main__":
    main()
