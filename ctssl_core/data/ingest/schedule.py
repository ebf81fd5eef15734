"""How ingest spreads its work over processes: the worker pool, the shared map every stage uses
(``_shared``), a result-in-a-thread helper, and the progress bars.

Why its own module: the stages say *what* to compute per item; this module alone decides *where*
it runs, so the scheduling can be changed (or replaced) without touching a stage.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator

HANDOFF_SWITCH_S = 0.0005  # GIL switch interval while the main process works beside the pool (see _shared)


def _pool(workers: int):
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers - 1`` forked processes for every stage of an ingest, or None (all in this process).

    This process is the remaining worker (see ``_shared``): it would otherwise only wait, and
    each fork of it (it holds numpy and duckdb) costs ~15 ms plus as much again at exit. One
    pool for all stages, so that cost is paid once and even small folders scan in parallel.
    torch is not imported for the workers (~1.7 s): the usual 512 -> 256 build is numpy only,
    and a worker that needs the torch path imports it once itself.
    """
    if workers <= 1:
        yield None
        return
    with _pool(workers - 1) as ex:
        yield ex


def _shared(fn, items: list, ex: ProcessPoolExecutor | None, drained=None, ahead: int = 1, until=None
            ) -> Iterator[tuple[int, Any]]:
    """(index, fn(item)) for every item, as they finish, computed by the pool and this process together.

    The pool's workers take items from the front: the next one is submitted the moment one
    finishes (from the pool's result thread), ``ahead`` per worker while many are left and one
    each near the end, so few items wait in a queue where this process could not take them
    back. This process takes items from the back and hands over the pool's results between its
    own. So the stage ends about one item apart on each side. ``ahead=2`` suits small items
    (header chunks), whose hand-over latency would otherwise idle a worker between them.
    ``drained()``, if given, is called once every item has been handed out. With ``until``, items
    are only handed out while ``until()`` is true: the rest are left out (not yielded).
    """
    n = len(items)
    if ex is None or n <= 1:
        for i, it in enumerate(items):
            if until is not None and not until():
                return
            yield i, fn(it)
        return
    lock = threading.Lock()
    span = [0, n]  # items [span[0], span[1]) are not taken yet
    done: queue.SimpleQueue = queue.SimpleQueue()  # (index, future or the exception that stopped a submit)

    def take_back() -> int | None:
        with lock:
            if span[0] >= span[1]:
                return None
            span[1] -= 1
            return span[1]

    workers, inflight = ex._max_workers, [0]

    def top_up() -> None:
        while True:
            with lock:
                left = span[1] - span[0]
                want = ahead * workers if left > ahead * workers else workers
                if left <= 0 or inflight[0] >= want:
                    return
                i = span[0]
                span[0] += 1
                inflight[0] += 1
            try:
                ex.submit(fn, items[i]).add_done_callback(lambda fut, i=i: finished(i, fut))
            except Exception as e:  # noqa: BLE001 - pool broken or shut down: the consumer re-raises it
                done.put((i, e))
                return

    def finished(i: int, fut) -> None:
        done.put((i, fut))
        with lock:
            inflight[0] -= 1
        top_up()

    def result(got):
        if isinstance(got, BaseException):
            raise got
        return got.result()

    top_up()
    handed = 0
    switch = sys.getswitchinterval()
    # The pool's result thread hands a worker its next item; while this thread runs Python (header
    # parsing) it would wait up to the 5 ms GIL switch interval for that, and the worker idles meanwhile.
    sys.setswitchinterval(HANDOFF_SWITCH_S)
    try:
        while (until is None or until()) and (i := take_back()) is not None:
            yield i, fn(items[i])
            handed += 1
            while not done.empty():
                j, got = done.get()
                yield j, result(got)
                handed += 1
        with lock:
            taken = span[0] + n - span[1]  # stop handing out (``until`` may have ended it early)
            span[0] = span[1]
        if drained is not None:
            drained()
        while handed < taken:
            j, got = done.get()
            yield j, result(got)
            handed += 1
    finally:
        sys.setswitchinterval(switch)
        with lock:
            span[0] = span[1]  # stopped early (an error, ^C): submit nothing more


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
