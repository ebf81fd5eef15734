"""Where a benchmark's units run: engines, and the one dependency-ordered scheduler that feeds them.

The benchmark knows what each unit needs (its pretraining, its positive control) and what it
provides; an engine knows only how to start a picklable call with the unit's declared resources,
wait until some calls end, and cancel the rest. So a new engine (a cluster) is one class here and one
registry line, and every engine runs the units in the same order with the same skip/resume rules.

* ``local``: ``workers`` spawned processes (``benchmark.workers = 1`` never gets here: the benchmark
  then runs its units in-process, one after the other).
* ``ray``: each unit one Ray task with ``num_cpus`` = the unit's threads (or 1) and ``num_gpus`` from
  its device, on a local Ray instance or the cluster at ``benchmark.ray_address``. Ray queues tasks by
  resources, so the scheduler hands it every ready unit at once. The store must be a path every
  node sees (a shared filesystem) and ``ctssl`` must be installed on every node.
* ``slurm``: each unit one Slurm job through submitit (``cpus_per_task`` = threads or 1, one GPU when
  its device is ``cuda``), submitted from a login node; pickles and logs in ``<store>/slurm/``.

The job queue (``jobs/backends.py``) runs whole commands - a process group with a log and a
heartbeat; these engines run function calls inside one benchmark command.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from ctssl_core.config import ConfigError

CANCEL_GRACE_S = 10.0   # a cancelled Ray task gets this long to unwind (KeyboardInterrupt) before it is killed


@dataclass(frozen=True)
class Resources:
    """What one unit declares: CPU threads and the device its config asks for ('cpu', 'cuda', 'auto')."""

    cpus: int = 1
    device: str = "cpu"


class Engine(Protocol):
    name: str
    slots: int | None   # calls the scheduler keeps started at once; None = every ready unit (the engine queues)

    @classmethod
    def from_config(cls, bench: Any, root: Any) -> "Engine":
        """The engine for a ``BenchmarkConfig`` and a store root (it reads its own settings: workers, ...)."""

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any: ...

    def wait(self, handles: list) -> list:
        """Block until at least one handle has ended; return those that have."""

    def result(self, handle: Any) -> Any:
        """The call's return value; raises the call's exception."""

    def cancel(self, handles: list) -> None: ...

    def close(self) -> None: ...


class PoolEngine:
    """A spawned process pool (spawn: no forked torch/DuckDB state). Cancel stops the calls not started
    yet; running ones end with the pool (Ctrl-C reaches them too, being in the terminal's process group)."""

    name = "local"

    def __init__(self, workers: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.slots = workers
        self._ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    @classmethod
    def from_config(cls, bench: Any, root: Any) -> "PoolEngine":
        return cls(bench.workers)

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any:
        return self._ex.submit(fn, *args)

    def wait(self, handles: list) -> list:
        from concurrent.futures import FIRST_COMPLETED, wait

        return list(wait(handles, return_when=FIRST_COMPLETED)[0])

    def result(self, handle: Any) -> Any:
        return handle.result()

    def cancel(self, handles: list) -> None:
        for h in handles:
            h.cancel()

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


class _TermGuard:
    """While an engine is open, SIGTERM (the job queue's cancel) becomes KeyboardInterrupt, so the scheduler
    cancels the units it handed out rather than the process dying with them still queued on a cluster."""

    _prev_term: Any = None
    _term = False

    def _guard_term(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._prev_term = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        self._term = True
        raise _stopped_by_term()

    def _restore_term(self) -> None:
        if self._prev_term is not None:
            signal.signal(signal.SIGTERM, self._prev_term)
            self._prev_term = None


class RayEngine(_TermGuard):
    """Units as Ray tasks. Joins the Ray instance this process already has (tests, notebooks), else
    starts a local one (``address`` empty) or connects to ``address``; it shuts down only what it started.
    """

    name = "ray"
    slots = None

    def __init__(self, address: str = ""):
        try:
            import ray
        except ImportError as e:
            raise ConfigError(NO_RAY) from e
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"could not start or reach Ray at {address or 'a new local instance'!r}: {e}; "
                                  f"check benchmark.ray_address ('' starts a local instance)") from e
        self.gpus = float(ray.cluster_resources().get("GPU", 0))
        self._remotes: dict[Callable, Any] = {}
        self._guard_term()

    @classmethod
    def from_config(cls, bench: Any, root: Any) -> "RayEngine":
        return cls(bench.ray_address)

    def num_gpus(self, res: Resources) -> float:
        """'cuda' asks for one GPU; 'auto' takes one when the cluster has any (Ray hides the GPUs of a
        task that asked for none, so 'auto' then trains on the CPU); 'cpu' none."""
        if res.device.startswith("cuda"):
            return 1.0
        return 1.0 if res.device == "auto" and self.gpus > 0 else 0.0

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any:
        if fn not in self._remotes:     # one Ray function per call target: exported to the workers once
            self._remotes[fn] = self._ray.remote(fn)
        return self._remotes[fn].options(num_cpus=max(1, res.cpus), num_gpus=self.num_gpus(res),
                                         max_retries=0).remote(*args)

    def wait(self, handles: list) -> list:
        try:
            return self._ray.wait(handles, num_returns=1)[0]
        except KeyboardInterrupt:
            if self._term:   # Ray re-raises a signal handler's exception as a plain KeyboardInterrupt
                raise _stopped_by_term() from None
            raise

    def result(self, handle: Any) -> Any:
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None   # the unit's own exception type (ConfigError, ...)

    def cancel(self, handles: list) -> None:
        """Interrupt the running tasks (their runs are marked failed/stopped: resumable), drop the queued
        ones, and kill what has not ended after ``CANCEL_GRACE_S``."""
        if not handles:
            return
        for h in handles:
            self._ray.cancel(h, force=False)
        _, left = self._ray.wait(handles, num_returns=len(handles), timeout=CANCEL_GRACE_S)
        for h in left:
            self._ray.cancel(h, force=True)

    def close(self) -> None:
        self._restore_term()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def _stopped_by_term() -> KeyboardInterrupt:
    stop = KeyboardInterrupt("stopped by SIGTERM; re-run the same command to resume (finished units are kept)")
    stop.signal = "SIGTERM"  # type: ignore[attr-defined]  # the CLI exits 143
    return stop


class SlurmEngine(_TermGuard):
    """Units as Slurm jobs through submitit, polled every ``poll_s``. ``cluster`` is submitit's: None means
    Slurm (refused where ``sbatch`` is missing); 'local' runs each job as a subprocess here (tests)."""

    name = "slurm"
    slots = None
    poll_s = 2.0

    def __init__(self, folder: Any, partition: str = "", timeout_min: int = 240, cluster: str | None = None):
        try:
            import submitit
        except ImportError as e:
            raise ConfigError(NO_SUBMITIT) from e
        if cluster is None and submitit.SlurmExecutor.affinity() <= 0:   # submitit would fall back to 'local'
            raise ConfigError("benchmark.executor=slurm: no Slurm on this machine (sbatch not found); run the "
                              "benchmark from a Slurm login node, or use benchmark.executor=local or ray")
        self._ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster or "slurm")
        self._ex.update_parameters(timeout_min=int(timeout_min),
                                   **({"slurm_partition": partition} if partition and self._ex.cluster == "slurm"
                                      else {}))
        self._guard_term()

    @classmethod
    def from_config(cls, bench: Any, root: Any) -> "SlurmEngine":
        from pathlib import Path

        return cls(Path(root) / "slurm", bench.slurm_partition, bench.slurm_timeout_min)

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any:
        self._ex.update_parameters(cpus_per_task=max(1, res.cpus), gpus_per_node=int(res.device.startswith("cuda")))
        return self._ex.submit(fn, *args)

    def wait(self, handles: list) -> list:
        while True:
            done = [h for h in handles if h.done()]
            if done:
                return done
            time.sleep(self.poll_s)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def cancel(self, handles: list) -> None:
        """scancel (SIGINT for a local job): a running unit unwinds and its run is left resumable."""
        for h in handles:
            if not h.done():
                h.cancel(check=False)

    def close(self) -> None:
        self._restore_term()


EXECUTORS: dict[str, type] = {"local": PoolEngine, "ray": RayEngine, "slurm": SlurmEngine}
NO_RAY = ("benchmark.executor=ray needs Ray, which is not installed: pip install 'ctssl[ray]' "
          "(or run with benchmark.executor=local)")
NO_SUBMITIT = ("benchmark.executor=slurm needs submitit, which is not installed: pip install 'ctssl[slurm]' "
               "(or run with benchmark.executor=local)")


def check_executor(name: str) -> None:
    """ConfigError for an unknown engine or one whose package is missing (found without importing it)."""
    import importlib.util

    if name not in EXECUTORS:
        raise ConfigError(f"benchmark.executor: unknown {name!r}; choose from {sorted(EXECUTORS)}")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(NO_RAY)
    if name == "slurm" and importlib.util.find_spec("submitit") is None:
        raise ConfigError(NO_SUBMITIT)


def run_in_order(engine: Engine, todo: list, ids: dict[str, Any], call: Callable, args: Callable[[Any, dict], tuple],
                 needs: Callable[[Any], str | None], provides: Callable[[Any], str | None],
                 resources: Callable[[Any], Resources],
                 on_running: Callable[[list], None] | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield ``(unit, result)`` as units end, each started once the unit it ``needs`` has a result.

    Units start in ``todo`` order (pretrainings first, so they unblock the others soonest), at most
    ``engine.slots`` at once. The first failure stops new starts, lets the started units end (their
    results are kept) and is raised. An interrupt (Ctrl-C, SIGTERM, the consumer closing this
    generator) cancels every started unit and is re-raised: the store keeps what finished, and a
    re-run skips it. The engine is closed either way.
    """
    pending = list(todo)
    ids = dict(ids)
    failed: BaseException | None = None
    running: dict[Any, Any] = {}
    try:
        while pending or running:
            while failed is None and (engine.slots is None or len(running) < engine.slots):
                ready = next((u for u in pending if needs(u) is None or needs(u) in ids), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[engine.submit(call, args(ready, dict(ids)), resources(ready))] = ready
            if not running:
                if failed is None:
                    missing = sorted({str(needs(u)) for u in pending})
                    failed = ConfigError(f"units wait for pretraining(s) that never ran: {missing}")
                break
            if on_running is not None:
                on_running(list(running.values()))
            for h in engine.wait(list(running)):
                u = running.pop(h)
                try:
                    result = engine.result(h)
                except Exception as e:  # noqa: BLE001 - re-raised once the started units end
                    failed = failed or e
                    continue
                if provides(u):
                    ids[provides(u)] = result
                yield u, result
    except BaseException:
        engine.cancel(list(running))
        raise
    finally:
        engine.close()
    if failed is not None:
        raise failed
