#!/usr/bin/env python
"""What does an engine cost per benchmark unit? A trivial unit (returns its argument) run N times
through the benchmark's own scheduler (``executors.run_in_order``) on:

  (a) local  the spawned process pool (``benchmark.executor=local``, ``workers``)
  (b) ray    a local Ray instance (``benchmark.executor=ray``), every unit one Ray task
  and the in-process loop (``workers = 1``) as the floor. Start-up (spawning the pool, ``ray.init``)
  and the first round (starting the workers) are reported apart from the per-unit time, which is the
  median wall of N units on warm workers / N.
  A real unit trains for seconds (smoke) to hours (paper), so the per-unit overhead is what decides
  whether Ray costs anything; the output prints ray/local per unit.

    python experiments/bench_executor.py               # N=20, 2 workers / 2 Ray CPUs
    python experiments/bench_executor.py --n 100 --cpus 4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def trivial_unit(i: int) -> int:
    """A unit with no work: what is measured is the engine's round trip."""
    return i


def run_units(engine, n: int) -> float:
    from ctssl_core.executors import Resources, run_in_order

    t = time.perf_counter()
    got = [r for _, r in run_in_order(engine, list(range(n)), {}, trivial_unit, args=lambda u, ids: (u,),
                                      needs=lambda u: None, provides=lambda u: None,
                                      resources=lambda u: Resources(1, "cpu"))]
    wall = time.perf_counter() - t
    assert sorted(got) == list(range(n))
    return wall


class _Kept:
    """An engine kept open across rounds (``run_in_order`` closes what it is given): warm workers."""

    def __init__(self, engine):
        self.engine, self.name, self.slots = engine, engine.name, engine.slots

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def close(self) -> None:
        pass


def warm_rounds(engine, n: int, rounds: int) -> tuple[float, list[float]]:
    """(first round's wall: worker start-up included, [walls of the warm rounds])."""
    kept = _Kept(engine)
    first = run_units(kept, n)
    walls = [run_units(kept, n) for _ in range(rounds)]
    engine.close()
    return first, walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="units per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="pool workers, and the local Ray instance's CPUs")
    args = ap.parse_args()

    import ray

    from ctssl_core.executors import PoolEngine, RayEngine

    t = time.perf_counter()
    for _ in range(args.rounds):
        [trivial_unit(i) for i in range(args.n)]
    inproc = (time.perf_counter() - t) / args.rounds / args.n

    pool_first, pool_walls = warm_rounds(PoolEngine(args.cpus), args.n, args.rounds)
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t
    ray_first, ray_walls = warm_rounds(RayEngine(), args.n, args.rounds)
    ray.shutdown()

    pool_unit = statistics.median(pool_walls) / args.n
    ray_unit = statistics.median(ray_walls) / args.n
    print(f"{args.n} trivial units x {args.rounds} rounds, {args.cpus} workers/CPUs (median round)")
    print(f"  in-process      {inproc * 1e6:9.1f} us/unit")
    print(f"  local pool      {pool_unit * 1e3:9.2f} ms/unit  (first round, spawning {args.cpus} processes: "
          f"{pool_first:.2f} s; warm rounds {', '.join(f'{w:.3f}' for w in pool_walls)} s)")
    print(f"  ray             {ray_unit * 1e3:9.2f} ms/unit  (ray.init {ray_init:.1f} s; first round, starting "
          f"workers: {ray_first:.2f} s; warm rounds {', '.join(f'{w:.3f}' for w in ray_walls)} s)")
    print(f"  ray / local per unit: {ray_unit / pool_unit:.2f}")


if __name__ == "__main__":
    main()
