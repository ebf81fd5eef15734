"""Dashboard speed at scale: 1,000 runs x 10,000 steps x 4 metrics (40M points) + 20,000 embedding points.

For every page we time what one Streamlit rerun does — the page's cached
loaders (``pages/common._load``, i.e. ``st.cache_data`` around
``results/read.py``) plus building its plotly figures:

- cold: empty cache (first visit after the store changed), DuckDB file already on disk; the median of
  ``--cold-repeats`` visits, the pages' caches cleared before each (one visit is too noisy on a shared
  2-core machine to compare two versions);
- warm: cache hit (any later rerun: a widget change that does not change the query);
- AppTest warm: a full script rerun of the real page under ``streamlit.testing`` (Streamlit overhead included).

It also checks the per-series point budget, and that a 1,000,000-step run
draws as fast as a 1,000-step one (downsampled in DuckDB).

Usage::

    python experiments/bench_dashboard.py [--store /tmp/ctssl_bench_store] [--runs 1000] [--steps 10000]

Targets on the 2-core dev machine: cold <= 1.5 s, warm <= 0.3 s per page, <= ~5,000 points per series.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import logging  # noqa: E402

logging.getLogger("streamlit").setLevel(logging.ERROR)

import numpy as np  # noqa: E402

from ctssl_core import charts  # noqa: E402
from ctssl_core.results import read  # noqa: E402
from ctssl_core.results.seed import SeedConfig, seed_store  # noqa: E402

CURVE_POINTS = 4000  # pages/curves.py MAX_POINTS
EMB_POINTS = 5000    # pages/embeddings.py MAX_POINTS


def build_store(root: Path, runs: int, steps: int, emb: int) -> dict:
    t = time.perf_counter()
    s = seed_store(root, SeedConfig(n_runs=runs, n_steps=steps, n_embed_points=emb, n_patients=200))
    seed_s = time.perf_counter() - t
    # two extra runs for the "1M steps draws as fast as 1k" check
    import duckdb

    con = duckdb.connect(str(root / "ctssl.duckdb"))
    for rid, n in [("long-1m", 1_000_000), ("short-1k", 1_000)]:
        con.execute("INSERT INTO runs (run_id, kind, task, init, status) VALUES (?, 'pretrain', 'rotation', "
                    "'random', 'succeeded')", [rid])
        con.execute("INSERT INTO metrics SELECT ?, i, i / 1000.0, i * 0.01, 'train/loss', "
                    "1.0 / (1 + i / 1000.0) + 0.05 * sin(i * 0.37) FROM range(?) t(i)", [rid, n])
    con.close()
    return dict(seed_s=seed_s, summary=s)


def page_work(store: str, load, load_many, s) -> dict:
    """One rerun's data + figures per page, mirroring pages/*.py (same batched, cached loaders)."""
    v = read.store_version(store)

    bench_id = read.latest_finished(read.benchmarks(store))   # the pages' default benchmark

    def q(fn, *args, **kw):                 # pages/common.query: the function itself, its name keys the cache
        return load(fn.__qualname__, fn, store, v, args, tuple(sorted(kw.items())))

    def many(*calls):                       # pages/common.query_many
        return load_many(store, v, tuple((fn.__qualname__, *args) for fn, *args in calls), tuple(calls))

    def overview():
        _, t, _, _, _, _, _, _ = many(
            (read.store_info,), (read.headline_table, bench_id), (read.benchmarks,), (read.run_overview,),
            (read.sensitivity, bench_id), (read.strategy_verdicts, bench_id), (read.competence, bench_id),
            (read.deltas, bench_id))
        read.verdicts(t)
        read.pivot_headline(t)
        return 0

    def compare():
        _, _, t, speed, _, _, _ = many(
            (read.store_info,), (read.task_metrics, bench_id), (read.headline_table, bench_id),
            (read.derived, "speed_ratio", bench_id), (read.derived, "labels_saved", bench_id),
            (read.sensitivity, bench_id), (read.competence, bench_id))
        q(read.forest, "pe", "slice_auroc", bench_id)
        c = q(read.fraction_curves, "pe", "slice_auroc", bench_id)
        figs = [charts.fraction_curves_fig(c, "pe", "slice_auroc")]
        for task, g in t.groupby("task"):
            g = g[g.metric == g.metric.iloc[0]]
            figs.append(charts.bars_fig(g, task, g.metric.iloc[0]))
        figs.append(charts.bars_fig(speed, "speed", "ratio", 1.0))
        figs.append(charts.pairwise_fig(q(read.pairwise, "pe", "slice_auroc", "masked_region", "random", bench_id),
                                        "masked_region", "random", "slice_auroc"))
        return max(charts.max_points_per_trace(f) for f in figs)

    sel = tuple(s.run_ids[:3])

    def curves():
        _, runs = many((read.store_info,), (read.run_table,))
        names = q(read.metric_names, sel)
        data = q(read.curves, sel, tuple(n for n in names if "loss" in n), "step", CURVE_POINTS)
        q(read.run_configs, sel)
        fig = charts.curves_fig(data, "step", False, 0.6)
        return charts.max_points_per_trace(fig)

    def embeddings():
        _, emb = many((read.store_info,), (read.embeddings,))
        e = emb[emb.init != "random"].emb_id.iloc[0]
        view = q(read.embedding_view, e, EMB_POINTS)   # the page draws every projection of both, side by side
        figs = [charts.scatter_fig(pts, "race", f"{m} {e}") for side in ("points", "ref_points")
                for m, pts in view[side].items() if pts is not None]
        q(read.point_slice, e, 0)                     # the point -> slice viewer
        q(read.bias_scorecard, bench_id)
        q(read.bias_dose, bench_id)
        b = view["bias"]
        figs += [charts.probe_fig(b[b.analysis == "probe"]), charts.ks_fig(b[b.analysis == "ks"]),
                 charts.subgroup_fig(b[b.analysis == "subgroup"], "auroc")]
        return max(charts.max_points_per_trace(f) for f in figs)

    def data():
        _, _, demo, prev, series, _ = many((read.store_info,), (read.cohort_summary,), (read.demographics,),
                                           (read.label_prevalence,), (read.series_list,), (read.ingest_errors,))
        figs = [charts.histogram_fig(demo[a], a) for a in ["age", "sex", "race", "site", "control_group"]]
        figs.append(charts.prevalence_fig(prev))
        view = q(read.load_slice, series.series_key.iloc[0], 2)
        charts.overlay(charts.apply_window(view.hu, -600, 1500), view.mask)
        return max(charts.max_points_per_trace(f) for f in figs)

    return dict(overview=overview, compare=compare, curves=curves, embeddings=embeddings, data=data)


def timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    pts = fn()
    return time.perf_counter() - t, pts


def apptest_warm(store: str, page: str, repeats: int = 3) -> float:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state["ctssl_store"] = store
    at.run()
    if page != "overview":
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="/tmp/ctssl_bench_store")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--emb", type=int, default=20000)
    ap.add_argument("--reuse", action="store_true", help="reuse an existing benchmark store")
    ap.add_argument("--no-apptest", action="store_true")
    ap.add_argument("--cold-repeats", type=int, default=5, help="cold visits per page (median reported)")
    args = ap.parse_args()

    root = Path(args.store)
    if not (args.reuse and (root / "ctssl.duckdb").exists()):
        shutil.rmtree(root, ignore_errors=True)
        info = build_store(root, args.runs, args.steps, args.emb)
        print(f"seeded {args.runs} runs x {args.steps} steps x 4 metrics + {args.emb} embedding points "
              f"in {info['seed_s']:.1f} s; db {(root / 'ctssl.duckdb').stat().st_size / 2**20:.0f} MiB")
        s = info["summary"]
    else:
        runs = read.run_table(root)
        from types import SimpleNamespace

        s = SimpleNamespace(run_ids=sorted(r for r in runs.run_id if r.startswith("run-")))
    n_points = None
    import duckdb

    with duckdb.connect(str(root / "ctssl.duckdb"), read_only=True) as con:
        n_points = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
    print(f"metrics rows: {n_points:,}")

    from pages.common import _load, _load_many  # the pages' own st.cache_data loaders

    store = str(root)
    work = page_work(store, _load, _load_many, s)
    rows = []
    for page, fn in work.items():
        colds = []
        for _ in range(max(1, args.cold_repeats)):
            _load.clear()
            _load_many.clear()
            colds.append(timed(fn))
        cold, pts = statistics.median(t for t, _ in colds), colds[-1][1]
        warm = statistics.median(timed(fn)[0] for _ in range(5))
        at_warm = float("nan") if args.no_apptest else apptest_warm(store, page)
        rows.append((page, cold, warm, at_warm, pts))

    print()
    print(f"{'page':<12}{'cold s':>9}{'target':>8}{'warm s':>9}{'target':>8}{'AppTest warm s':>16}"
          f"{'max pts/series':>16}")
    ok = True
    for page, cold, warm, at_warm, pts in rows:
        good = cold <= 1.5 and warm <= 0.3 and pts <= 5000
        ok &= good
        print(f"{page:<12}{cold:>9.3f}{'1.5':>8}{warm:>9.3f}{'0.3':>8}{at_warm:>16.3f}{pts:>16,}"
              f"  {'ok' if good else 'MISSED'}")

    # 1M-step vs 1k-step run: both reduced in DuckDB, so drawing costs the same
    res = {}
    for rid in ("long-1m", "short-1k"):
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            d = read.curves(store, [rid], ["train/loss"], "step", CURVE_POINTS)
            fig = charts.curves_fig(d)
            ts.append(time.perf_counter() - t)
        res[rid] = (statistics.median(ts), charts.max_points_per_trace(fig))
    print()
    print(f"{'run':<12}{'steps':>12}{'query+figure s':>16}{'points drawn':>14}")
    for rid, steps in (("short-1k", 1_000), ("long-1m", 1_000_000)):
        print(f"{rid:<12}{steps:>12,}{res[rid][0]:>16.3f}{res[rid][1]:>14,}")
    print(f"ratio 1M / 1k: {res['long-1m'][0] / res['short-1k'][0]:.1f}x time for 1000x the steps")
    print("\nall pages within target" if ok else "\nsome page missed its target (see MISSED)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
