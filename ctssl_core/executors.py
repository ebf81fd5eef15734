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

The same engines run a job's command (``ctssl worker --executor ray``): the job's runner stays on the
worker's machine (it outlives the worker, and the queue signals it by process group) and hands the command
to the engine as one call of ``run_command``, watched through ``EngineCommand`` as it watches a local child
(``jobs/runner.py``, ``jobs/backends.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from ctssl_core.config import ConfigError

CANCEL_GRACE_S = 10.0   # a cancelled Ray task gets this long to unwind (KeyboardInterrupt) before it is killed


class UnitProcessDied(ConfigError):
    """A unit's process ended without a result (killed, out of memory); the message says how to resume."""


@dataclass(frozen=True)
class Resources:
    """What one unit declares: CPU threads and the device its config asks for ('cpu', 'cuda', 'auto')."""

    cpus: int = 1
    device: str = "cpu"


class Engine(Protocol):
    name: str
    slots: int | None   # calls the scheduler keeps started at once; None = every ready unit (the engine queues)

    @classmethod
    def from_config(cls, bench: Any, root: Any, term_guard: bool = True) -> "Engine":
        """The engine for a ``BenchmarkConfig`` (or ``EngineSettings``) and a store root (it reads its own
        settings: workers, ...). ``term_guard``: turn SIGTERM into a stop of the scheduler (a benchmark);
        False where the caller handles SIGTERM itself (the job runner)."""

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any: ...

    def wait(self, handles: list) -> list:
        """Block until at least one handle has ended; return those that have."""

    def result(self, handle: Any) -> Any:
        """The call's return value; raises the call's exception."""

    def done(self, handle: Any) -> bool:
        """True once the call has ended (without blocking)."""

    def interrupt(self, handle: Any) -> None:
        """Ask a running call to stop (KeyboardInterrupt in it, or SIGINT/SIGTERM); drop a queued one."""

    def kill(self, handle: Any) -> None:
        """Stop it now."""

    def cancel(self, handles: list, stop: BaseException | None = None) -> None:
        """Stop the started calls; ``stop``: what stopped the scheduler (None: asked)."""

    def close(self) -> None: ...


class _TermGuard:
    """While an engine is open, SIGTERM (the job queue's cancel) becomes KeyboardInterrupt, so the scheduler
    cancels the units it handed out rather than the process dying with them still queued on a cluster.

    It is raised only where the scheduler blocks, in ``wait``: between waits the benchmark merges a finished
    unit's run folder into DuckDB, which turns an exception raised by a signal handler mid-query into
    ``RuntimeError: Query interrupted`` (a cancel then read as a failure). A SIGTERM that arrives there is
    kept and raised as the scheduler next waits or starts a unit."""

    _prev_term: Any = None
    _term = False
    _waiting = False

    def _guard_term(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._prev_term = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        """Raise once. A cancel usually delivers two SIGTERMs (``ctssl jobs cancel`` signals the job's
        process group, and the job's runner forwards one to its command); a second raise would land in
        the scheduler's own ``cancel`` and leave the units it had not cancelled yet running on the
        cluster, so later ones are ignored: the process is already stopping."""
        if self._term:
            return
        self._term = True
        if self._waiting:
            raise _stopped_by_term()

    def check_stop(self) -> None:
        """Raise the stop a SIGTERM asked for while the scheduler was not waiting."""
        if self._term:
            raise _stopped_by_term()

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """The blocking part of ``wait``: a SIGTERM raises in here at once."""
        self._waiting = True
        try:
            self.check_stop()
            yield
        finally:
            self._waiting = False

    def _restore_term(self) -> None:
        if self._prev_term is not None:
            signal.signal(signal.SIGTERM, self._prev_term)
            self._prev_term = None


class PoolEngine(_TermGuard):
    """A spawned process pool (spawn: no forked torch/DuckDB state). Cancel stops the calls not started
    yet and sends SIGTERM to the pool's processes, so a running unit saves its checkpoint and ends (its
    run stays resumable); the pool then shuts down once they have. Ctrl-C reaches them directly, being
    in the terminal's process group."""

    name = "local"

    def __init__(self, workers: int, term_guard: bool = True):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.slots = workers
        self._ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_pool_init)
        if term_guard:
            self._guard_term()

    @classmethod
    def from_config(cls, bench: Any, root: Any, term_guard: bool = True) -> "PoolEngine":
        return cls(bench.workers, term_guard)

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any:
        return self._ex.submit(_pool_call, fn, args)

    def wait(self, handles: list) -> list:
        from concurrent.futures import FIRST_COMPLETED, wait

        with self._interruptible():
            return list(wait(handles, return_when=FIRST_COMPLETED)[0])

    def result(self, handle: Any) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return handle.result()
        except BrokenProcessPool as e:
            raise UnitProcessDied("a process of the benchmark's pool died while it ran a unit (killed, or out of "
                                  "memory: see the kernel log); re-run the same command to resume: finished "
                                  "units are kept, and fewer benchmark.workers need less memory") from e

    def done(self, handle: Any) -> bool:
        return handle.done()

    def interrupt(self, handle: Any) -> None:
        handle.cancel()   # only a call not started yet; a running one ends with the pool

    kill = interrupt

    def cancel(self, handles: list, stop: BaseException | None = None) -> None:
        """Drop the calls not started; stop the running ones with SIGTERM (a unit saves, records its end and
        ends), whatever stopped the scheduler - a SIGTERM to this process alone, an error of the consumer -
        except Ctrl-C, which the terminal already sent to the whole process group."""
        running = [h for h in handles if not h.cancel()]     # cancel() is False for a call already running
        ctrl_c = isinstance(stop, KeyboardInterrupt) and getattr(stop, "signal", None) is None
        if running and not ctrl_c:
            # the pool has no API for its processes; ``_processes`` (pid -> Process) has been there since 3.2
            for pid in list(getattr(self._ex, "_processes", None) or {}):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)

    def close(self) -> None:
        try:
            self._ex.shutdown(wait=True, cancel_futures=True)
        finally:
            self._restore_term()


_POOL_UNIT: bool | None = False   # in a pool process: False idle, True running a unit, None its unit was stopped


def _pool_init() -> None:
    """A pool process: SIGTERM stops the unit it runs as a SIGTERM stop, so that a unit outside its training
    loop (embedding, scoring, writing a control; training has its own handler) records its end, cancelled,
    rather than dying with its record saying running."""
    signal.signal(signal.SIGTERM, _pool_term)


def _pool_term(signum: int, frame: Any) -> None:
    """Raise once per unit: a cancel may deliver SIGTERM twice (to the group, and from ``PoolEngine.cancel``),
    and a second raise would cut short the unit's recording of its end."""
    global _POOL_UNIT
    if _POOL_UNIT is True:
        _POOL_UNIT = None
        raise _stopped_by_term()
    # else idle, or its unit stopped already and recording its end: nothing to do. An idle process ends with
    # the pool's shutdown (or when the benchmark's process is gone: its queue closes); exiting here would
    # break the pool and fail the other units' results


def _pool_call(fn: Callable, args: tuple) -> Any:
    global _POOL_UNIT
    _POOL_UNIT = True
    try:
        return fn(*args)
    finally:
        if _POOL_UNIT is True:
            _POOL_UNIT = False


class RayEngine(_TermGuard):
    """Units as Ray tasks. Joins the Ray instance this process already has (tests, notebooks), else
    starts a local one (``address`` empty) or connects to ``address``; it shuts down only what it started.
    """

    name = "ray"
    slots = None

    def __init__(self, address: str = "", term_guard: bool = True):
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
        if term_guard:
            self._guard_term()

    @classmethod
    def from_config(cls, bench: Any, root: Any, term_guard: bool = True) -> "RayEngine":
        return cls(bench.ray_address, term_guard)

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
            with self._interruptible():
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

    def done(self, handle: Any) -> bool:
        return bool(self._ray.wait([handle], num_returns=1, timeout=0)[0])

    def interrupt(self, handle: Any) -> None:
        self._ray.cancel(handle, force=False)   # KeyboardInterrupt in the task's Python code

    def kill(self, handle: Any) -> None:
        self._ray.cancel(handle, force=True)    # its worker process is killed

    def cancel(self, handles: list, stop: BaseException | None = None) -> None:
        """Interrupt the running tasks (their runs are marked failed/stopped: resumable), drop the queued
        ones, and kill what has not ended after ``CANCEL_GRACE_S``."""
        if not handles:
            return
        for h in handles:
            self.interrupt(h)
        _, left = self._ray.wait(handles, num_returns=len(handles), timeout=CANCEL_GRACE_S)
        for h in left:
            self.kill(h)

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

    def __init__(self, folder: Any, partition: str = "", timeout_min: int = 240, cluster: str | None = None,
                 term_guard: bool = True):
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
        if term_guard:
            self._guard_term()

    @classmethod
    def from_config(cls, bench: Any, root: Any, term_guard: bool = True) -> "SlurmEngine":
        from pathlib import Path

        return cls(Path(root) / "slurm", bench.slurm_partition, bench.slurm_timeout_min, term_guard=term_guard)

    def submit(self, fn: Callable, args: tuple, res: Resources) -> Any:
        self._ex.update_parameters(cpus_per_task=max(1, res.cpus), gpus_per_node=int(res.device.startswith("cuda")))
        return self._ex.submit(fn, *args)

    def wait(self, handles: list) -> list:
        with self._interruptible():
            while True:
                done = [h for h in handles if h.done()]
                if done:
                    return done
                time.sleep(self.poll_s)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def done(self, handle: Any) -> bool:
        return handle.done()

    def interrupt(self, handle: Any) -> None:
        if not handle.done():
            handle.cancel(check=False)

    kill = interrupt   # scancel: Slurm itself kills the job after its KillWait

    def cancel(self, handles: list, stop: BaseException | None = None) -> None:
        """scancel (SIGINT for a local job): a running unit unwinds and its run is left resumable."""
        for h in handles:
            self.interrupt(h)

    def close(self) -> None:
        self._restore_term()


@dataclass(frozen=True)
class EngineSettings:
    """What the engines read, for a caller without a ``BenchmarkConfig`` (which has the same fields): the job
    runner, from ``ctssl worker --executor ...``."""

    executor: str = "local"
    workers: int = 1
    ray_address: str = ""
    slurm_partition: str = ""
    slurm_timeout_min: int = 240


THIS_PYTHON = "<python>"   # argv[0] of a command: the Python of the process that runs it (a cluster node's)


def run_command(argv: list[str], env: dict[str, str], log_path: str, grace_s: float,
                started_path: str | None = None) -> int:
    """Engine side (a Ray worker, a Slurm job): a job's command, run as the job runner runs it on this machine,
    output appended to the job's log (a path every node sees, as the store is); returns its exit status.

    An interrupt (``ray.cancel``'s KeyboardInterrupt, scancel's signal) becomes SIGTERM to the command, which
    saves its checkpoint, then SIGKILL after ``grace_s``; the interrupt is re-raised. It polls rather than
    blocking in ``wait``: Ray's cancel lands only between Python bytecodes."""
    import os
    import subprocess
    import sys

    from ctssl_core.paths import REPO_ROOT

    argv = [sys.executable if a == THIS_PYTHON and i == 0 else a for i, a in enumerate(argv)]
    with open(log_path, "ab", buffering=0) as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, cwd=REPO_ROOT)
        if started_path:   # the runner's hang clock starts now, not while the call waited in the engine's queue
            with contextlib.suppress(OSError):
                open(started_path, "w").close()
        try:
            while (rc := proc.poll()) is None:
                time.sleep(0.05)
            return rc
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


class EngineCommand:
    """A job's command handed to an engine, seen as the ``Popen`` the job runner's ``Supervisor`` watches:
    ``poll``, ``send_signal`` (any signal: the engine's interrupt, so the command gets SIGTERM and its
    grace), ``kill``. ``error`` says why the engine call failed, if it did (a cancelled call exits -15)."""

    def __init__(self, engine: Any, argv: list[str], env: dict[str, str], log_path: Any, grace_s: float,
                 res: Resources, started_path: Any = None):
        import sys

        self._engine = engine
        argv = [THIS_PYTHON, *argv[1:]] if argv and argv[0] == sys.executable else list(argv)
        self._started_path = None if started_path is None else str(started_path)
        self._handle = engine.submit(run_command, (argv, dict(env), str(log_path), float(grace_s),
                                                   self._started_path), res)
        self._rc: int | None = None
        self._started = started_path is None
        self._interrupted = False
        self.error: str | None = None

    @property
    def started(self) -> bool:
        """True once the engine has started the command (``started_path`` written), or when not watched."""
        if not self._started and self._started_path is not None:
            import os

            self._started = os.path.exists(self._started_path)
        return self._started

    def poll(self) -> int | None:
        if self._rc is None and self._engine.done(self._handle):
            try:
                self._rc = int(self._engine.result(self._handle))
            except BaseException as e:  # noqa: BLE001 - a cancelled task, a lost node: the job ends with it
                self.error = f"{type(e).__name__}: {str(e)[:300] or 'the call was cancelled'}"
                self._rc = -int(signal.SIGTERM) if self._interrupted else 1
        return self._rc

    def send_signal(self, sig: int) -> None:
        self._interrupted = True
        self._engine.interrupt(self._handle)

    def kill(self) -> None:
        self._interrupted = True
        self._engine.kill(self._handle)


EXECUTORS: dict[str, type] = {"local": PoolEngine, "ray": RayEngine, "slurm": SlurmEngine}
NO_RAY = ("the ray executor (benchmark.executor=ray, ctssl worker --executor ray) needs Ray, which is not "
          "installed: pip install 'ctssl[ray]' (or use the local executor)")
NO_SUBMITIT = ("the slurm executor (benchmark.executor=slurm, ctssl worker --executor slurm) needs submitit, which "
               "is not installed: pip install 'ctssl[slurm]' (or use the local executor)")


def check_executor(name: str) -> None:
    """ConfigError for an unknown engine or one whose package is missing (found without importing it)."""
    import importlib.util

    if name not in EXECUTORS:
        raise ConfigError(f"executor: unknown {name!r}; choose from {sorted(EXECUTORS)}")
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
            if hasattr(engine, "check_stop"):
                engine.check_stop()      # a SIGTERM that came while the consumer merged a unit's folder
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
        if hasattr(engine, "check_stop"):
            engine.check_stop()          # one that came while the consumer merged the last unit
    except BaseException as stop:
        engine.cancel(list(running), stop)
        raise
    finally:
        engine.close()
    if failed is not None:
        raise failed
