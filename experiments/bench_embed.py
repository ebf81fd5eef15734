"""Benchmark the embedding-analysis costs: UMAP (numba compile vs fit), PCA, probes, KS, separability.

Target (issue 5): UMAP of 20,000 x 512 embeddings in < 60 s on the 2-core CPU,
excluding the one-time numba compile. Wall and CPU seconds are both printed:
on a shared machine wall time includes waiting for cores, CPU time does not.

    python experiments/bench_embed.py [--n 20000] [--dim 512] [--patients 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


class Timer:
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *a):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--patients", type=int, default=1000, help="patients for the probe/KS benchmark (pooled rows)")
    args = ap.parse_args()
    from ctssl_core.bias import knn_separability, ks_tests, pca_modes
    from ctssl_core.embed import project_pca, project_umap
    from ctssl_core.probes import probe

    rng = np.random.default_rng(0)
    # clustered data (like real embeddings) rather than isotropic noise: 20 centres in a 32-d subspace
    centres = rng.normal(size=(20, 32)) * 3
    basis = rng.normal(size=(32, args.dim)) / np.sqrt(32)
    lab = rng.integers(0, 20, args.n)
    E = ((centres[lab] + rng.normal(size=(args.n, 32))) @ basis + 0.1 * rng.normal(size=(args.n, args.dim))).astype(np.float32)
    print(f"machine: {os.cpu_count()} CPU cores visible, load average {os.getloadavg()[0]:.1f}")
    rows = []

    with Timer() as t:
        import umap  # noqa: F401  (numba-jitted module import)
    rows.append(("import umap", t))
    with Timer() as t:
        project_umap(E[:500], pca_dims=50, random_state=0)       # first fit pays the numba compile
    rows.append(("UMAP first fit, 500 pts (numba compile)", t))
    with Timer() as t:
        xy, params, _ = project_umap(E, pca_dims=50, random_state=0)
    rows.append((f"UMAP fit {args.n} x {args.dim} (PCA->50, n_neighbors 15)", t))
    with Timer() as t:
        project_pca(E)
    rows.append((f"PCA 2D fit {args.n} x {args.dim}", t))

    P = args.patients
    Xp = rng.normal(size=(P, args.dim)).astype(np.float32)
    sex = rng.integers(0, 2, P)
    Xp[:, 0] += sex
    race = rng.choice(["A", "B", "C"], P)
    age = rng.uniform(25, 85, P)
    g = np.arange(P)
    with Timer() as t:
        probe(Xp, sex, g, "binary", n_boot=1000)
    rows.append((f"sex probe, {P} patients x {args.dim}, 5-fold + 1000 boot", t))
    with Timer() as t:
        probe(Xp, race, g, "multiclass", n_boot=1000)
    rows.append((f"race probe (3 classes), {P} x {args.dim}", t))
    with Timer() as t:
        probe(Xp, age, g, "regression", n_boot=1000)
    rows.append((f"age probe (ridge), {P} x {args.dim}", t))
    with Timer() as t:
        probe(Xp, sex, g, "binary", n_boot=10, n_perm=10)
    rows.append(("sex probe + 10 permutations (per-permutation cost x10)", t))
    with Timer() as t:
        Z, _ = pca_modes(Xp, 5)
        ks_tests(Z, {"sex": sex.astype(str), "race": race})
    rows.append((f"PCA-5 + KS tests (sex, 3 race pairs), {P} patients", t))
    with Timer() as t:
        knn_separability(pca_modes(Xp, 50)[0], race, k=10, n_perm=500)
    rows.append((f"k-NN separability + 500 permutations, {P} patients", t))

    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'wall s':>8}  {'CPU s':>8}")
    for name, t in rows:
        print(f"{name:<{w}}  {t.wall:8.2f}  {t.cpu:8.2f}")
    fit = rows[2][1]
    print(f"UMAP {args.n} x {args.dim}: {fit.wall:.1f} s wall, {fit.cpu:.1f} s CPU vs 60 s target -> ratio "
          f"{fit.wall / 60:.2f} wall, {fit.cpu / 60:.2f} CPU (single-threaded by the fixed random_state, so CPU s "
          f"~ wall s on an idle machine); numba compile paid separately: {rows[1][1].wall:.1f} s wall, "
          f"{rows[1][1].cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
