"""How ingest spreads its work over processes: a standard ``ProcessPoolExecutor`` and an in-order map
over it (``_imap``) that every stage uses, a result-in-a-thread helper, and the progress bars.

Why its own module: the stages say *what* to compute per item; this module alone decides *where*
it runs, so the scheduling can be changed without touching a stage.

Why a plain executor: until 2026-12-03 ingest had a hand-written work-sharing scheduler (this
process worked beside ``workers - 1`` forked ones, taking items from the back while the pool took
them from the front, with the GIL switch interval lowered to 0.5 ms so the pool's result thread
could hand a worker its next item at once). Measured against this executor with
``experiments/bench_ingest.py --repeats 3`` on the shared 2-core CPU (interleaved runs,
``experiments/results/bench_ingest_cpu2_2026-12-03.txt``, load average 2-9 from other work), the
2-worker ingest rate did not differ beyond the machine's noise: median 1042 slices/s for this
executor vs 950 for the hand-written one over 16 rounds each (final pair: best 2310 vs 1580,
median 1005 vs 1021), so the simpler one stayed. Results come back in item order, so a store's
slice ids follow the plan whatever the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator


def _pool(workers: int):
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` forked processes for every stage of an ingest, or None for 1 (all in this process).

    One pool for all stages, so each fork (~15 ms, plus as much again at exit: this process holds
    numpy and duckdb) is paid once and even small folders scan in parallel. This process plans and
    writes the catalog meanwhile. torch is not imported for the workers (~1.7 s): the usual
    512 -> 256 build is numpy only, and a worker that needs the torch path imports it once itself.
    """
    if workers <= 1:
        yield None
        return
    with _pool(workers) as ex:
        yield ex


def _imap(fn, items: list, ex: ProcessPoolExecutor | None, drained=None, ahead: int = 2, until=None
          ) -> Iterator[tuple[int, Any]]:
    """(index, fn(item)) for every item, in item order, computed by the pool (here, without a pool or
    with one item).

    At most ``ahead`` items per worker are submitted and not yet yielded: enough that a worker
    finds its next item queued, few enough that an early stop (an error, ^C, ``until``) leaves
    little work behind. ``drained()``, if given, is called once every item has been submitted to the pool.
    With ``until``, items are only submitted while ``until()`` is true: the rest are left out
    (not yielded). A worker's exception is raised here, and the items not yet started are cancelled.
    """
    n = len(items)
    if ex is None or n <= 1:
        for i, it in enumerate(items):
            if until is not None and not until():
                return
            yield i, fn(it)
        return
    window = max(1, ahead) * ex._max_workers
    pending: collections.deque = collections.deque()  # (index, future), oldest first
    nxt = 0
    try:
        while True:
            while nxt < n and len(pending) < window and (until is None or until()):
                pending.append((nxt, ex.submit(fn, items[nxt])))
                nxt += 1
                if nxt == n and drained is not None:
                    drained()
            if not pending:
                return
            i, fut = pending.popleft()
            yield i, fut.result()
    finally:
        for _, fut in pending:  # stopped early: nothing more runs for this map
            fut.cancel()


def _in_thread(fn, *args):
    """Start ``fn(*args)`` in a thread; returns a function that joins it and returns (or raises) its
    result, with ``.running()`` to ask whether it is still at work."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="ctssl-ingest-catalog", daemon=True)
    t.start()

    def result():
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    result.running = t.is_alive  # type: ignore[attr-defined]
    return result


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file" if "scan" in desc else "slice", dynamic_ncols=True)
