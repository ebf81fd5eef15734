"""The whole study in one resumable command: data -> pretraining x strategies -> downstream x
inits x label fractions x seeds -> probes + embeddings -> summaries.

The plan (``plan.py``) is a deterministic list of typed *units* (pretraining, control,
fine-tuning, embedding, then the analysis), each with its resolved config and identity
(``unit_hash``). This module runs it: it skips every unit whose run already succeeded with the
same identity (resume after an interruption; a pretraining is reused by any benchmark, or hand
run, that resolves to the same config), runs the rest in order of what they need (in-process or
on an engine of ``executors.py``), and then analyses what the store holds.

Summaries (``summaries`` table, plus ``summary.csv``/``summary.md`` in the
benchmark's run folder), all with 95% patient-bootstrap CIs:
* headline metric per (task, init) at the full label fraction, mean over seeds;
* ``delta_<metric>``: init minus random init, paired (same bootstrap draws);
* ``labels_needed``/``labels_saved`` for pe and nodule (see ``evaluate.curves``);
* ``speed_ratio`` for nodule (steps to 90% of random init's best val Dice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctssl_core.config import ConfigError, build, config_hash, to_dict
from ctssl_core.controls import CONTROLS, NEGATIVE, POSITIVE
from ctssl_core.plan import (Plan, Unit, label, make_plan, needs, pretrain_encoder, provides, unit_resources)

PERCENT = 100.0


# ------------------------------------------------------------------ store helpers


def ensure_data(plan: Plan, store_root: Path, say: Callable[[str], None], progress: bool = False) -> None:
    """Generate the synthetic cohort and ingest it when the store has no slices yet and the profile
    asks for synthetic data (``benchmark.data``); with ``data: store`` an empty store is refused, so a
    mistyped --store never fills up with a synthetic cohort in place of the user's data.

    A store that already holds slices is used as it is, unless its slice size differs from
    the profile's ``ingest.size`` (e.g. a store left by an older profile): that is refused with
    what to do, rather than training the profile on data it was not written for.
    """
    from ctssl_core.data.catalog import has_slices, series_heights, store_dataset

    if has_slices(store_root):
        want = plan.ingest.size
        have = series_heights(store_root)
        if have and have != {want}:
            raise ConfigError(f"the store at {store_root} holds {'/'.join(map(str, sorted(have)))}-px slices but "
                              f"profile {plan.profile!r} is set up for {want}-px slices; use another --store "
                              f"(or delete this one to rebuild it), or --set ingest.size={min(have)}")
        dataset = store_dataset(store_root) or "unlabelled"
        if "synthetic" not in dataset.split(","):
            say(f"using the {dataset} data already in {store_root} (the profile's synth section is not used)")
        elif not holds_plan_cohort(plan, store_root):
            raise ConfigError(
                f"the store at {store_root} holds a synthetic cohort other than the one profile {plan.profile!r} is "
                f"set up for ({plan.cohort.name}, {plan.synth.n_patients} patients), or only "
                f"part of it (an ingest that was stopped): its "
                f"results would describe that cohort, not this profile's design. Use another store, e.g. "
                f"--store {Path(store_root).parent / ('store-' + plan.profile)}, or delete this one to rebuild it")
        return
    if plan.bench.data == "store":
        raise ConfigError(f"the store at {store_root} holds no slices, and benchmark.data is 'store': ingest your "
                          f"data first (ctssl ingest DIR --store {store_root} --size "
                          f"{plan.ingest.size}), or "
                          f"--set benchmark.data=synthetic to generate the profile's synthetic cohort there")
    from ctssl_core.data.ingest import ingest
    from ctssl_core.data.pseudonym import create_secret
    from ctssl_core.data.synth import generate_cohort
    from ctssl_core.paths import store_paths

    say(f"the store is empty and benchmark.data is 'synthetic': generating the profile's synthetic cohort "
        f"-> {plan.cohort} (reused when its config matches)")
    generate_cohort(plan.synth, plan.cohort, progress=progress)
    # synthetic patients have no real identity: a key derived from the cohort config makes the
    # seeded patient splits (and so every result) the same in any store built from this cohort
    create_secret(store_paths(store_root).secret, synthetic_key(plan.synth))
    say(f"ingesting {plan.cohort} -> {store_root}")
    ingest(plan.cohort, store_root, plan.ingest, progress=progress)


def synthetic_key(synth_cfg) -> bytes:
    """The pseudonym key of a store built from the synthetic cohort ``synth_cfg`` (never real data)."""
    return hashlib.sha256(f"ctssl-synthetic-cohort:{config_hash(to_dict(synth_cfg), 64)}".encode()).digest()


def holds_plan_cohort(plan: Plan, store_root: Path) -> bool:
    """Does the store hold exactly the plan's synthetic cohort? Why: `--profile study` on a store that
    `quick` built would otherwise run the study's design on quick's patients, and say nothing.
    Yes when the benchmark built it (its key is the one derived from the plan's synth config), or when
    its patients are exactly the plan's cohort's (a cohort made with `ctssl synth` and ingested by hand)."""
    from ctssl_core import twins
    from ctssl_core.data.catalog import patients_table
    from ctssl_core.data.pseudonym import load_or_create_secret
    from ctssl_core.data.synth import output_config
    from ctssl_core.paths import store_paths

    secret = store_paths(store_root).secret
    synth_cfg = plan.synth
    stored = set(patients_table(store_root).patient_key)
    if secret.is_file() and load_or_create_secret(secret) == synthetic_key(synth_cfg):
        # the benchmark built it; all of it? (an ingest stopped by a full disk or Ctrl-C keeps what it stored)
        return len(stored) == synth_cfg.n_patients
    if not (plan.cohort / "truth.json").is_file() or not secret.is_file():
        return False
    if output_config(twins.cohort_config(plan.cohort)) != output_config(synth_cfg):
        return False                  # the folder holds a cohort made with other settings
    return stored == set(twins.patient_indices(plan.cohort, secret))


# ------------------------------------------------------------------ units


def find_pretrain(unit: Unit, store_root: Path) -> str | None:
    """Run id of a finished pretraining with the unit's identity (its resolved config's hash, stored by
    ``run_pretrain`` for every pretraining, by hand or by a benchmark) whose checkpoint exists, else None."""
    from ctssl_core.paths import store_paths
    from ctssl_core.results.store_api import runs_with_hash

    sp = store_paths(store_root)
    for run_id, ckpt in runs_with_hash(store_root, "pretrain", unit.unit_hash):
        if ckpt and (sp.root / ckpt).is_file():
            return run_id
    return None


def run_pretrain_unit(plan: Plan, unit: Unit, store_root: Path) -> str:
    """Pretrain one strategy with its resolved ``PretrainConfig``; returns the run id."""
    from ctssl_core import pretrain as pre_mod

    res = pre_mod.run_pretrain(unit.task, store_root, config=unit.config, progress=False, echo=lambda m: None,
                               labels=plan.labels)
    if res.status != "succeeded":
        raise ConfigError(f"pretraining {unit.task} ended {res.status}; re-run the same command: finished units "
                          f"are reused and this pretraining starts again")
    return res.run_id


def run_finetune_unit(plan: Plan, unit: Unit, store_root: Path, store, pretrain_ids: dict[str, str],
                      progress=None) -> None:
    from ctssl_core.finetune import finetune

    fc = unit.config
    if unit.init != "random":
        fc = dataclasses.replace(fc, init=pretrain_ids[needs(unit)])   # the run id of what it starts from
    finetune(fc, store_root, run_id=unit.run_id, benchmark_id=plan.benchmark_id, profile=plan.profile,
             progress=progress, store=store, init_label=unit.init, labels=plan.labels, unit_hash=unit.unit_hash,
             twin_cohort=twin_cohort(plan, store_root) if unit.task == "pe" else None)


def twin_cohort(plan: Plan, store_root: Path) -> Path | None:
    """The synthetic cohort to render PE twins from, when the benchmark asks for twins and the
    store was built from it (``twins.TwinUnavailable`` otherwise: said once in the summary)."""
    if not plan.bench.twins or not (plan.cohort / "truth.json").is_file():
        return None
    return plan.cohort


def run_control_unit(plan: Plan, unit: Unit, store_root: Path, store, pretrain_ids: dict[str, str]) -> str:
    """Positive control: supervised training on the pool's labels (a fine-tune with train_split='pool');
    negative control: that encoder shuffled within each layer. Returns the run id holding the checkpoint."""
    from ctssl_core import controls
    from ctssl_core.finetune import finetune
    from ctssl_core.results import runfolder as rf

    if unit.init == controls.POSITIVE:
        finetune(unit.config, store_root, run_id=unit.run_id, benchmark_id=plan.benchmark_id, profile=plan.profile,
                 store=store, init_label=f"{controls.POSITIVE}-source", labels=plan.labels, unit_hash=unit.unit_hash,
                 twin_cohort=twin_cohort(plan, store_root) if unit.task == "pe" else None)
        return unit.run_id
    source = pretrain_ids[f"{controls.POSITIVE}:{unit.task}"]
    enc_name = pretrain_encoder(plan.config)[0]
    run_dir = rf.record_start(store_root, unit.run_id, "control", unit.task, controls.NEGATIVE, enc_name,
                           {"kind": "control", "control": controls.NEGATIVE, "source_run": source, "seed": 0},
                              profile=plan.profile, benchmark_id=plan.benchmark_id, labels=plan.labels,
                              unit_hash=unit.unit_hash)
    try:
        ckpt = controls.write_negative_control(source, run_dir / "checkpoints" / "last.pt", store_root, seed=0)
    except BaseException as e:
        rf.record_end_after(e, store_root, unit.run_id, _ended(e), error=f"{type(e).__name__}: {e}"[:2000])
        raise
    rf.record_end(store_root, unit.run_id, "succeeded", checkpoint=ckpt)
    return unit.run_id


def _ended(e: BaseException) -> str:
    """A unit's status after ``e``: cancelled when it was stopped (Ctrl-C, SIGTERM), else failed."""
    return "cancelled" if isinstance(e, KeyboardInterrupt) else "failed"


def run_embed_unit(plan: Plan, unit: Unit, store_root: Path, pretrain_ids: dict[str, str]) -> dict[str, str]:
    """Embed the evaluation split with one init (embed.run_embed); returns its embedding ids."""
    from ctssl_core import embed as emb
    from ctssl_core.paths import store_paths
    from ctssl_core.results import runfolder as rf

    ecfg = unit.config
    ref = "random" if unit.init == "random" else pretrain_ids[unit.init]
    rf.record_start(store_root, unit.run_id, "embed", "embed", unit.init, ecfg.encoder, to_dict(ecfg),
                    profile=plan.profile, benchmark_id=plan.benchmark_id, labels=plan.labels, unit_hash=unit.unit_hash)
    try:
        ids = emb.run_embed(store_root, ref, ecfg, record_run=unit.run_id)   # rows in its folder, merged by the driver
    except BaseException as e:
        rf.record_end_after(e, store_root, unit.run_id, _ended(e), error=f"{type(e).__name__}: {e}"[:2000])
        raise
    (store_paths(store_root).run_dir(unit.run_id) / "embeddings.json").write_text(json.dumps(ids))
    rf.record_end(store_root, unit.run_id, "succeeded")
    return ids


# ------------------------------------------------------------------ runner


def run_benchmark(profile: str, store_root: str | Path | None = None, overrides=(), progress: bool = True,
                  log: Callable[[str], None] = print, labels: dict | None = None) -> dict[str, Any]:
    """Run (or resume) a benchmark; returns {'benchmark_id', 'table' (DataFrame), 'wall_s', 'ran', 'skipped'}.

    ``labels`` (``results.write.check_labels``) go on every run it starts, with a ``benchmark`` tag naming
    it unless the caller set one (a pretraining is shared between benchmarks and has no benchmark_id)."""
    from tqdm import tqdm

    from ctssl_core.data.catalog import store_dataset
    from ctssl_core.data.store import SliceStore
    from ctssl_core.paths import default_store, store_paths
    from ctssl_core.results import write as rw
    from ctssl_core.results.store_api import succeeded_units

    t0 = time.perf_counter()
    root = Path(store_root) if store_root is not None else default_store()
    plan = make_plan(profile, overrides)
    if labels:
        plan.labels = {**labels, "tags": {"benchmark": plan.benchmark_id, **(labels.get("tags") or {})}}
    if plan.bench.threads:
        import torch

        torch.set_num_threads(plan.bench.threads)
    ensure_data(plan, root, log, progress=progress)
    dataset = store_dataset(root)  # the store's own data (a user's rsna-pe/lidc/generic store), not assumed synthetic
    rw.start_benchmark(root, plan.benchmark_id, profile=plan.profile, dataset=dataset, config=plan.config)
    rw.start_run(root, plan.benchmark_id, "benchmark", "benchmark", "-", pretrain_encoder(plan.config)[0],
                 plan.config, profile=plan.profile, benchmark_id=plan.benchmark_id, labels=plan.labels,
                 dataset=dataset, unit_hash=plan.analyse.unit_hash)
    rw.merge_pending(root)           # what units of an earlier, interrupted run left in their folders
    make_splits_for(plan, root)      # the units then only read the store
    stored = succeeded_units(root)   # run_id -> (checkpoint, unit_hash) of every succeeded run
    pretrain_ids: dict[str, str] = {}
    done: set[str] = set()
    for u in plan.runs:
        if u.kind == "pretrain":
            found = find_pretrain(u, root)
            if found:
                pretrain_ids[u.task] = found
                done.add(u.run_id)
        elif u.run_id in stored:
            had = stored[u.run_id][1]
            if had is not None and had != u.unit_hash:   # stored before the code's defaults changed it
                log(f"{label(u)}: its resolved config changed since run {u.run_id} was made; running it again")
                continue
            done.add(u.run_id)
            if u.kind == "control":
                pretrain_ids[provides(u)] = u.run_id
    todo = [u for u in plan.runs if u.run_id not in done]
    n = len(plan.runs)
    log(f"benchmark {plan.benchmark_id}: {n} units, {n - len(todo)} already done")
    bar = tqdm(total=n, initial=n - len(todo), disable=not progress, desc="benchmark", unit="run",
               dynamic_ncols=True)
    embeddings: dict[str, dict[str, str]] = {}
    for u in plan.of_kind("embed"):
        p = store_paths(root).run_dir(u.run_id) / "embeddings.json"
        if u.run_id in done and p.exists():
            embeddings[u.init] = json.loads(p.read_text())
    status = "failed"
    try:
        with closing(run_units(plan, todo, root, pretrain_ids, bar)) as finished:  # closing: an interrupt
            for u, result in finished:                                              # cancels the engine's units
                _merge_unit(root, log)   # the unit's run folder (it never writes the store): seen by the next
                if provides(u):
                    pretrain_ids[provides(u)] = result
                elif u.kind == "embed":
                    embeddings[u.init] = result
                bar.update(1)
        bar.close()
        rw.merge_pending(root)           # all of them, waiting out a busy store: the summary reads the store
        table = summarise(plan, root, embeddings, log)
        status = "succeeded"
    except KeyboardInterrupt:
        status = "cancelled"             # Ctrl-C or SIGTERM: its units were cancelled too, and a re-run resumes
        raise
    finally:
        bar.close()
        if status != "succeeded":     # a unit that failed or was interrupted: its folder says how it ended
            _merge_after_failure(root, log)
        rw.finish_benchmark(root, plan.benchmark_id, status)
        rw.finish_run(root, plan.benchmark_id, status)
    return {"benchmark_id": plan.benchmark_id, "table": table, "wall_s": time.perf_counter() - t0,
            "ran": len(todo), "skipped": n - len(todo)}


def make_splits_for(plan: Plan, root: Path) -> None:
    """Create the patient splits of every scheme the plan's units use, before they start: a unit's process
    then finds them and reads the store only (it never writes it: ``results/runfolder.py``)."""
    from ctssl_core.data.splits import get_or_create_splits

    schemes = {(c.split_seed, tuple(c.split_fractions), c.pool) for u in plan.runs
               if (c := getattr(u, "config", None)) is not None and hasattr(c, "split_seed")}
    for seed, fractions, pool in sorted(schemes):
        get_or_create_splits(root, seed, fractions, pool=pool)


def _merge_unit(root: Path, log: Callable[[str], None]) -> None:
    """Merge what a finished unit left in its folder, giving up after 2 s on a store another process holds:
    the next merge takes it (after the next unit, or before the summary), and meanwhile the scheduler is not
    held up, nor is a cancel, which an engine raises only once this returns (``executors._TermGuard``)."""
    from ctssl_core.db import StoreBusy
    from ctssl_core.results import write as rw

    try:
        rw.merge_pending(root, timeout_s=2.0)
    except StoreBusy as e:
        log(f"the store is busy ({str(e)[:120]}); this unit's results are merged later")


def _merge_after_failure(root: Path, log: Callable[[str], None]) -> None:
    """Merge the run folders of units that ended without a result, never raising over the error that ended
    the benchmark (a store held busy: the next run merges them, ``merge_pending`` at its start)."""
    from ctssl_core.results import write as rw

    try:
        rw.merge_pending(root)
    except Exception as e:  # noqa: BLE001 - the benchmark's own error is the one to report
        log(f"could not merge the units' run folders into the store now ({type(e).__name__}: {str(e)[:200]}); "
            f"the next benchmark run merges them")


def run_unit(plan: Plan, u: Unit, root: Path, pretrain_ids: dict[str, str], store=None):
    """Run one unit; returns the pretraining/control run id, the embedding ids, or None (fine-tuning)."""
    if u.kind == "pretrain":
        return run_pretrain_unit(plan, u, root)
    if u.kind == "control":
        if store is None:
            from ctssl_core.data.store import SliceStore

            store = SliceStore.open(root)
        return run_control_unit(plan, u, root, store, pretrain_ids)
    if u.kind == "finetune":
        run_finetune_unit(plan, u, root, store, pretrain_ids)
        return None
    return run_embed_unit(plan, u, root, pretrain_ids)


def _run_serial(plan: Plan, todo: list[Unit], root: Path, pretrain_ids: dict[str, str], bar):
    from ctssl_core.data.store import SliceStore

    store = None
    for u in todo:
        bar.set_postfix_str(label(u))
        if u.kind in ("finetune", "control"):
            store = store or SliceStore.open(root)
        yield u, run_unit(plan, u, root, pretrain_ids, store)


def run_units(plan: Plan, todo: list[Unit], root: Path, pretrain_ids: dict[str, str], bar):
    """``(unit, result)`` for each unit of ``todo`` as it ends: in this process, one after the other, for the
    local executor with one worker (or a single unit); else on the configured engine (``executors``)."""
    if plan.bench.executor == "local" and (plan.bench.workers == 1 or len(todo) <= 1):
        return _run_serial(plan, todo, root, pretrain_ids, bar)
    return _run_on_engine(plan, todo, root, pretrain_ids, bar)


def _run_on_engine(plan: Plan, todo: list[Unit], root: Path, pretrain_ids: dict[str, str], bar):
    """Units on ``plan.bench.executor``'s engine, each once the pretraining (or positive control) it needs
    exists. Each unit writes its run folder only; ``run_benchmark`` merges it into the store as the unit
    ends (``results.write.merge_pending``). See ``executors.run_in_order`` for failures and cancel."""
    from ctssl_core.executors import EXECUTORS, run_in_order

    if not todo:
        return
    engine = EXECUTORS[plan.bench.executor].from_config(plan.bench, root.resolve())
    root_s = str(root.resolve())   # the path every worker (or cluster node) opens
    yield from run_in_order(engine, todo, pretrain_ids, _worker_unit,
                            args=lambda u, ids: (plan, u, root_s, ids, plan.bench.threads),
                            needs=needs, provides=provides, resources=lambda u: unit_resources(plan, u),
                            on_running=lambda us: bar.set_postfix_str(" | ".join(label(u) for u in us)))


_WORKER_STORE: dict[str, Any] = {}


def _worker_unit(plan: Plan, u: Unit, root: str, pretrain_ids: dict[str, str], threads: int = 0):
    """Engine-side entry (a pool process or a Ray worker): one unit, with this process's memory-mapped
    store reused across the units it runs."""
    from ctssl_core.data.store import SliceStore

    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    store = _WORKER_STORE.get(root)
    if store is None and u.kind in ("finetune", "control"):
        store = _WORKER_STORE[root] = SliceStore.open(Path(root))
    return run_unit(plan, u, Path(root), pretrain_ids, store)


# ------------------------------------------------------------------ summaries


def _unit_boot(root: Path, unit: Unit) -> dict[str, np.ndarray]:
    from ctssl_core.finetune import read_boot
    from ctssl_core.paths import store_paths

    return read_boot(store_paths(root).run_dir(unit.run_id))


def _quantile_ci(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """(1 - alpha) percentile interval that tolerates inf ("not reached") replicates."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return float(lo), float(hi)


SEED_DRAWS = 2718         # the seed resampling is the same for every init, so deltas stay paired


def seed_mean(boots: dict, init: str, frac: float, key: str) -> np.ndarray | float:
    """Mean over the seeds of one (init, fraction): the point value for ``point/<m>`` keys; for
    replicate arrays, a two-level bootstrap: each replicate averages a resample (with replacement)
    of the seeds, so the CI carries the spread between seeds as well as between patients.
    Seeds are matched by their number across inits (same label subset), which keeps deltas paired."""
    got = sorted((s, b[key]) for (i, f, s), b in boots.items() if i == init and f == frac and key in b)
    if not got:
        return np.nan
    vals = np.stack([np.asarray(v, np.float64) for _, v in got])                   # (k, R) or (k,)
    if vals.ndim == 1 or len(got) == 1:
        return vals.mean(axis=0)
    k, r = vals.shape
    pick = np.random.default_rng([SEED_DRAWS, k, r]).integers(0, k, size=(r, k))   # (R, k) seed draws
    return vals[pick, np.arange(r)[:, None]].mean(axis=1)                         # (R,)


# what the sensitivity check and the verdicts read, in order of preference (the first present)
SENSITIVITY_METRICS = {"pe": ("twin_exam", "exam_auroc"), "nodule": ("cpm", "dice")}


def ceiling_line(plan: Plan, root: Path | None, task: str, metric: str) -> tuple[dict | None, str | None]:
    """Is the task learnable at this scale at all? The positive control's source model (trained with
    every label of the pool) scored on the test split -> (summary row, line); (None, None) when the plan
    has no positive control, (None, line saying so) when it has no test scores. When even full
    supervision on the pool does not score above ``LEARNED_FLOOR`` (its CI includes the floor),
    no pretraining can show a gain on this endpoint: the insensitivity is in the task at this
    resolution and budget, not in the number of test patients."""
    unit = next((u for u in plan.units if u.kind == "control" and u.task == task and u.init == POSITIVE), None)
    if unit is None or root is None:
        return None, None
    try:
        boot = _unit_boot(root, unit)
    except FileNotFoundError:
        return None, f"  Task ceiling: unknown (the positive control's source {unit.run_id} has no test scores)."
    # the sensitivity metric, else the task's next one (a source scored without twins has no twin_exam)
    metric = next((m for m in (metric, *SENSITIVITY_METRICS[task]) if m in boot and f"point/{m}" in boot), None)
    if metric is None:
        return None, None
    from ctssl_core.evaluate.bootstrap import percentile_ci   # the CI of the run's own results row

    ci = percentile_ci(float(boot[f"point/{metric}"]), boot[metric], 0.05)
    v, lo, hi = ci.value, ci.low, ci.high
    floor = LEARNED_FLOOR[metric]      # one definition of "learned" (also used for labels saved / speed)
    learned = bool(np.isfinite(lo) and lo > floor)
    word = "above the learned floor" if learned else "NOT above the learned floor"
    line = (f"  Task ceiling: the positive control's source (supervised on all pool labels) scores {metric} "
            f"{_fmt(v, lo, hi)} on the test split, {word} ({floor:g})"
            + ("." if learned else " - the task is not learned at this resolution and budget even with full "
               "supervision, so no pretraining strategy can show a gain on this endpoint here."))
    row = {"benchmark_id": plan.benchmark_id, "task": task, "init": POSITIVE, "metric": f"ceiling_{metric}",
           "value": _n(v), "ci_low": _n(lo), "ci_high": _n(hi),
           "note": f"positive control's source model on the test split; {word} ({floor:g})"}
    return row, line


def sensitivity_rows(plan: Plan, all_boots: dict[str, dict], table: dict[str, dict[str, str]],
                     root: Path | None = None):
    """Can this benchmark detect a gain, and does each strategy give one? -> (summary rows, lines).

    At the smallest label fraction, per task: the positive control minus random init (paired,
    95% CI) decides *sensitive* (its CI excludes 0 above) or *insensitive*; the half-width of that
    CI is the minimum detectable effect (the smallest delta whose CI would exclude 0 at this
    sample size). The negative control must not "gain". Each strategy's delta gets a verdict with
    Bonferroni-adjusted intervals; on an insensitive task the verdict is "insensitive", never "no gain".

    Where the task ran its negative control, each strategy is also compared with it (``ncverdict_<m>``
    rows): shuffled pretrained weights keep every layer's weight statistics and lose the learned
    structure, so "strategy minus negative control" is the gain from *features*, which "minus random
    init" cannot separate from the weight scale (measured: under a frozen readout the shuffled weights
    alone beat random init on nodule CPM). The Bonferroni family is every comparison made here: each
    strategy x task against random init, plus each strategy x task against its negative control.
    """
    bench, bid = plan.bench, plan.benchmark_id
    f0 = min(bench.fractions)
    tasks = [t for t in bench.tasks if t in SENSITIVITY_METRICS]
    n_refs = len(tasks) + sum(t in bench.controls for t in tasks)       # random init + each negative control
    n_tests = max(1, len(bench.strategies) * n_refs)
    adj = bench.alpha / n_tests
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    if tasks:
        lines.append(f"Sensitivity and verdicts at the smallest label fraction ({f0 * PERCENT:g}%): paired "
                     f"differences from random init (and, where it ran, from the negative control), patient x "
                     f"seed bootstrap; strategy verdicts use Bonferroni-adjusted {100 * (1 - adj):.2f}% intervals "
                     f"({n_tests} comparisons, family alpha {bench.alpha:g}).")
    for task in tasks:
        boots = all_boots.get(task) or {}
        metric = next((m for m in SENSITIVITY_METRICS[task]
                       if any(m in b for (i, f, _), b in boots.items() if i == "random" and f == f0)), None)
        if metric is None:
            continue

        def delta(init: str, alpha: float, reference: str = "random"):
            """(point, low, high) of init minus reference at f0: paired replicates, (1 - alpha) interval."""
            reps, ref = seed_mean(boots, init, f0, metric), seed_mean(boots, reference, f0, metric)
            if not isinstance(reps, np.ndarray) or not isinstance(ref, np.ndarray):
                return None
            lo, hi = _quantile_ci(reps - ref, alpha)
            return (float(seed_mean(boots, init, f0, f"point/{metric}"))
                    - float(seed_mean(boots, reference, f0, f"point/{metric}")), lo, hi)

        sensitive: bool | None = None
        mde = float("nan")
        if task in bench.controls:
            d = delta(POSITIVE, bench.alpha)
            if d is not None and np.isfinite(d[1]):
                sensitive = bool(d[1] > 0)
                mde = (d[2] - d[1]) / 2
                word = "SENSITIVE" if sensitive else "INSENSITIVE"
                note = (f"positive control minus random init at {f0 * PERCENT:g}% labels: {_fmt(*d)}; "
                        f"minimum detectable effect ~{mde:.3f} ({metric})")
                rows.append({"benchmark_id": bid, "task": task, "init": POSITIVE, "metric": f"sensitivity_{metric}",
                             "value": 1.0 if sensitive else 0.0, "ci_low": _n(d[1]), "ci_high": _n(d[2]),
                             "note": f"{word}: {note}"})
                rows.append({"benchmark_id": bid, "task": task, "init": POSITIVE, "metric": f"mde_{metric}",
                             "value": _n(mde), "ci_low": None, "ci_high": None,
                             "note": "half-width of the 95% CI of the positive control's paired delta"})
                lines.append(f"- {task}: {word}. {note}.")
                crow, cline = ceiling_line(plan, root, task, metric)
                rows += [crow] if crow is not None else []
                lines += [cline] if cline is not None else []
            nd = delta(NEGATIVE, bench.alpha)
            if nd is not None and np.isfinite(nd[1]):
                bad = nd[1] > 0
                lines.append(f"  Negative control (shuffled weights) minus random: {_fmt(*nd)}"
                             + (" - it 'gains' too: the benchmark rewards weight statistics; read gains with care."
                                if bad else " - no invented gain."))
        else:
            lines.append(f"- {task}: no controls ran, so a null result cannot be told from an insensitive benchmark.")
        for init in bench.strategies:
            d = delta(init, adj)
            if d is None or not np.isfinite(d[1]):
                continue
            verdict = judge(d, sensitive, "gain", "loss", f"no detectable gain (MDE ~{mde:.3f})")
            rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": f"verdict_{metric}",
                         "value": _n(d[0]), "ci_low": _n(d[1]), "ci_high": _n(d[2]),
                         "note": f"{verdict}: minus random init at {f0 * PERCENT:g}% labels, "
                                 f"{100 * (1 - adj):.2f}% Bonferroni-adjusted CI"})
            table.setdefault(init, {})[f"{task} verdict @{f0 * PERCENT:g}%"] = verdict
        if task in bench.controls:
            rows += nc_verdicts(bench, bid, task, metric, f0, adj, sensitive, delta, table, lines)
    return rows, lines


def judge(d: tuple[float, float, float], sensitive: bool | None, gain: str, loss: str, no_gain: str) -> str:
    """The verdict word(s) of one adjusted paired difference (point, low, high) against a reference:
    ``gain`` / ``loss`` when the interval excludes 0; otherwise "insensitive" on a task the positive
    control could not show sensitive, ``no_gain`` on a sensitive one, and "sensitivity unknown" without
    controls, so a null is never read as "no gain" where the benchmark could not have seen one."""
    if d[1] > 0:
        return gain
    if d[2] < 0:
        return loss
    if sensitive is False:
        return "insensitive"
    return no_gain if sensitive else "no detectable difference (sensitivity unknown)"


def nc_verdicts(bench, bid: str, task: str, metric: str, f0: float, adj: float, sensitive: bool | None,
                delta: Callable, table: dict[str, dict[str, str]], lines: list[str]) -> list[dict[str, Any]]:
    """Each strategy minus the negative control (shuffled weights of the positive control's source) at
    f0, with the same adjusted level as the verdicts against random init -> ``ncverdict_<m>`` rows.
    A gain here is a gain from learned features, not from the weights' scale alone."""
    rows, gains = [], []
    for init in bench.strategies:
        d = delta(init, adj, NEGATIVE)
        if d is None or not np.isfinite(d[1]):
            continue
        verdict = judge(d, sensitive, "gain beyond weight statistics", "below the negative control",
                        "no detectable gain beyond weight statistics")
        if d[1] > 0:
            gains.append(init)
        rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": f"ncverdict_{metric}",
                     "value": _n(d[0]), "ci_low": _n(d[1]), "ci_high": _n(d[2]),
                     "note": f"{verdict}: minus the negative control (shuffled weights) at {f0 * PERCENT:g}% "
                             f"labels, {100 * (1 - adj):.2f}% Bonferroni-adjusted CI"})
        table.setdefault(init, {})[f"{task} vs shuffled @{f0 * PERCENT:g}%"] = verdict
    if rows:
        lines.append(f"  Against the negative control (same weight statistics, no learned structure): "
                     + (f"{', '.join(gains)} gain beyond weight statistics." if gains
                        else "no strategy shows a detectable gain beyond weight statistics." if sensitive
                        else "no conclusion (the benchmark is not shown sensitive on this task)."))
    return rows


# Below these, random init has not learned the task at all: "labels saved" and "learns N x faster"
# relative to it would be artefacts of noise (0 >= 0 is "reached" at the first fraction and step).
LEARNED_FLOOR = {"dice": 0.05, "cpm": 0.1, "exam_auroc": 0.55, "race_auroc": 0.55, "twin_exam": 0.5}


def _learned(metric: str, value: float) -> bool:
    return bool(np.isfinite(value)) and value >= LEARNED_FLOOR.get(metric, -np.inf)


def _n(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def summarise(plan: Plan, root: Path, embeddings: dict[str, dict[str, str]], log=print):
    """Write summaries (+ probes, bias) and the summary table; returns it as a DataFrame."""
    import pandas as pd

    from ctssl_core import evaluate as ev
    from ctssl_core.downstream import DOWNSTREAM
    from ctssl_core.finetune import read_curve
    from ctssl_core.paths import store_paths
    from ctssl_core.results import write as rw

    from ctssl_core.twins import TWIN_METRICS

    bench = plan.bench
    bid = plan.benchmark_id
    inits = ["random", *bench.strategies]
    ft = [u for u in plan.units if u.kind == "finetune"]
    rows: list[dict[str, Any]] = []
    table: dict[str, dict[str, str]] = {i: {} for i in [*inits, *(CONTROLS if bench.controls else ())]}
    all_boots: dict[str, dict] = {}
    for task in bench.tasks:
        tcls = DOWNSTREAM[task]
        task_inits = [*inits, *(CONTROLS if task in bench.controls else ())]
        boots = {(u.init, u.fraction, u.seed): _unit_boot(root, u) for u in ft if u.task == task}
        all_boots[task] = boots
        metrics = dict(tcls().metric_fns())
        if task == "pe":  # twin metrics exist when the store could be re-rendered (see twins.py)
            metrics.update({m: hi for m, hi in TWIN_METRICS.items() if any(m in b for b in boots.values())})
        full = max(bench.demographics_fractions) if task == "demographics" else 1.0

        def mean_over_seeds(init: str, frac: float, key: str) -> np.ndarray | float:
            return seed_mean(boots, init, frac, key)

        for init in task_inits:
            for m, higher in metrics.items():
                point = float(mean_over_seeds(init, full, f"point/{m}"))
                reps = mean_over_seeds(init, full, m)
                lo, hi = _quantile_ci(reps) if isinstance(reps, np.ndarray) else (np.nan, np.nan)
                rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": m, "value": _n(point),
                             "ci_low": _n(lo), "ci_high": _n(hi), "note": f"label fraction {full:g}, mean of seeds"})
                if init != "random":
                    rpoint = float(mean_over_seeds("random", full, f"point/{m}"))
                    rreps = mean_over_seeds("random", full, m)
                    if isinstance(reps, np.ndarray) and isinstance(rreps, np.ndarray):
                        dlo, dhi = _quantile_ci(reps - rreps)
                    else:
                        dlo = dhi = np.nan
                    rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": f"delta_{m}",
                                 "value": _n(point - rpoint), "ci_low": _n(dlo), "ci_high": _n(dhi),
                                 "note": "minus random init, paired bootstrap over test patients"})
            head = tcls.headline
            r = next(x for x in rows if x["task"] == task and x["init"] == init and x["metric"] == head)
            table[init][f"{task} {head}"] = _fmt(r["value"], r["ci_low"], r["ci_high"])
        if task in ("pe", "nodule"):
            head, higher = tcls.headline, tcls().metric_fns()[tcls.headline]
            target_pt = float(mean_over_seeds("random", 1.0, f"point/{head}"))
            target_reps = mean_over_seeds("random", 1.0, head)
            fr = sorted(bench.fractions)
            for init in [*bench.strategies, *(CONTROLS if task in bench.controls else ())]:
                curve_pt = [float(mean_over_seeds(init, f, f"point/{head}")) for f in fr]
                need = ev.labels_needed(fr, curve_pt, target_pt, higher)
                curve_reps = np.stack([mean_over_seeds(init, f, head) for f in fr], 1)   # (n_boot, F)
                need_reps = np.array([ev.labels_needed(fr, c, t, higher) for c, t in zip(curve_reps, target_reps)])
                lo, hi = _quantile_ci(need_reps)
                if not _learned(head, target_pt):
                    need = lo = hi = float("nan")
                reached = np.isfinite(need)
                if not _learned(head, target_pt):
                    note = (f"undefined: random init did not learn {task} (full-label {head} {target_pt:.3f} < "
                            f"{LEARNED_FLOOR[head]}); train longer or at a higher resolution")
                elif np.isnan(need):
                    note = (f"undefined: {head} is undefined for random init or {init} on this test set "
                            f"(too few patients of one class?)")
                elif reached:
                    note = f"reaches random init's full-label {head} with {need * PERCENT:.0f}% of the labels"
                else:
                    note = (f"does not reach random init's full-label {head} ({target_pt:.3f}) "
                            f"even with 100% of the labels")
                if reached and need <= fr[0]:
                    note += f" (already at the smallest fraction, {fr[0] * PERCENT:g}%: an upper bound)"
                rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": "labels_needed",
                             "value": _n(need), "ci_low": _n(lo), "ci_high": _n(hi), "note": note})
                rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": "labels_saved",
                             "value": _n(1 - need) if reached else None,
                             "ci_low": _n(1 - hi) if np.isfinite(hi) else None,
                             "ci_high": _n(1 - lo) if np.isfinite(lo) else None, "note": note})
                table[init][f"{task} labels saved"] = (f"{(1 - need) * PERCENT:.0f}% [{_pct(1 - hi)}, {_pct(1 - lo)}]"
                                                        if reached else "n/a" if np.isnan(need) else "not reached")
        if task == "nodule":
            def curve(init):
                u = next((x for x in ft if x.task == task and x.init == init and x.fraction == 1.0), None)
                c = read_curve(store_paths(root).run_dir(u.run_id)) if u else []
                return [r["step"] for r in c if "val/dice" in r], [r["val/dice"] for r in c if "val/dice" in r]

            rs, rv = curve("random")
            for init in bench.strategies:
                s_i, v_i = curve(init)
                if len(rs) < 2 or len(s_i) < 2 or not np.isfinite(np.nanmax(rv)):
                    note, ratio = "no validation curve (set downstream.nodule.train.eval_every > 0)", None
                elif not _learned("dice", float(np.nanmax(rv))):
                    note, ratio = (f"undefined: random init's best val Dice is {np.nanmax(rv):.3f} "
                                   f"(< {LEARNED_FLOOR['dice']}), it did not learn; train longer"), None
                else:
                    ratio, t_r, t_i = ev.speed_ratio(rs, rv, s_i, v_i, bench.speed_frac)
                    note = (f"steps to {bench.speed_frac:g} x random init's best val Dice: random {t_r:.0f}, "
                            f"{init} " + (f"{t_i:.0f}" if np.isfinite(t_i) else "not reached"))
                    ratio = ratio if np.isfinite(t_i) else None
                rows.append({"benchmark_id": bid, "task": task, "init": init, "metric": "speed_ratio",
                             "value": _n(ratio) if ratio is not None else None, "ci_low": None, "ci_high": None,
                             "note": note})
                table[init]["nodule speed"] = (f"{ratio:.2f}x" if ratio else
                                               "n/a" if note.startswith(("undefined", "no validation")) else "not reached")
    notes: list[str] = []
    comp_rows, comp_lines = competence_rows(plan, root, table)
    rows += comp_rows
    notes += comp_lines
    sens_rows, sens_lines = sensitivity_rows(plan, all_boots, table, root)
    rows += sens_rows
    notes += sens_lines
    if "pe" in bench.tasks:
        rows_b, line = position_rows(plan, root, rows)
        rows += rows_b
        notes += [line] if line else []
    rows += probe_rows(plan, root, embeddings, table, log)
    if bench.bias and embeddings:
        bias_rows, bias_lines = run_bias(plan, root, embeddings, log)
        rows += bias_rows
        notes += bias_lines
        from ctssl_core.dose import dose_rows   # race re-rendered at 0..configured, when bias.dose_response

        dose, dose_lines, _ = dose_rows(plan, root, embeddings, log)
        rows, notes = rows + dose, notes + dose_lines
    rw.write_summaries(root, rows)
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "init"
    out = store_paths(root).run_dir(bid)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "summary.csv")
    (out / "summary.md").write_text(_markdown(df, plan, notes))
    log("\n" + _markdown(df, plan, notes))
    return df


def competence_rows(plan: Plan, root: Path, table: dict[str, dict[str, str]]):
    """Each strategy's pretext error on held-out (val-split) slices against its trivial baseline
    (``competence.py``) -> (summary rows, lines); a strategy that does not clearly beat it is flagged."""
    from ctssl_core import competence as comp
    from ctssl_core.data.store import SliceStore
    from ctssl_core.finetune import split_patient_idx

    store = SliceStore.open(root)
    val = split_patient_idx(store, root, plan.bench.split_seed, plan.bench.pool, plan.bench.split_fractions)["val"]
    ids = np.asarray(store.slice_ids)[np.isin(np.asarray(store.patient_idx), val)]
    rows: list[dict[str, Any]] = []
    flagged: list[str] = []
    for s in plan.bench.strategies:
        rid = find_pretrain(plan.pretraining(s), root)
        if rid is None or s not in comp.BASELINE_NAMES or ids.size < 2:
            continue
        try:
            c = comp.competence(root, rid, ids, store=store)
        except (ConfigError, KeyError) as e:
            table.setdefault(s, {})["pretext vs baseline"] = f"not measured ({e})"
            continue
        word = "beats" if c["beats"] else "does NOT clearly beat"
        note = (f"pretext error {c['model_error']:.4f} vs {c['baseline']} {c['baseline_error']:.4f} on {c['n']} "
                f"held-out val slices: {word} its trivial baseline")
        rows.append({"benchmark_id": plan.benchmark_id, "task": "pretext", "init": s, "metric": "competence_gain",
                     "value": _n(c["gain"]), "ci_low": _n(c["ci_low"]), "ci_high": _n(c["ci_high"]), "note": note})
        rows.append({"benchmark_id": plan.benchmark_id, "task": "pretext", "init": s, "metric": "pretext_error",
                     "value": _n(c["model_error"]), "ci_low": None, "ci_high": None, "note": note})
        rows.append({"benchmark_id": plan.benchmark_id, "task": "pretext", "init": s, "metric": "baseline_error",
                     "value": _n(c["baseline_error"]), "ci_low": None, "ci_high": None, "note": c["baseline"]})
        table.setdefault(s, {})["pretext vs baseline"] = (
            f"{c['model_error']:.4f} vs {c['baseline_error']:.4f}" + ("" if c["beats"] else " FLAG"))
        if not c["beats"]:
            flagged.append(f"{s} (vs {c['baseline']})")
    lines = ([f"Pretext competence: {', '.join(flagged)} did not clearly beat the trivial baseline of its own "
              f"task on held-out slices; its downstream numbers test an encoder that learned little."]
             if flagged else [])
    return rows, lines


POSITION_BASELINE = "z_position"       # summaries init of the PE slice-position baseline


def position_rows(plan: Plan, root: Path, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Summaries rows for PE scored from slice position alone, and one sentence for the summary."""
    from ctssl_core.data.store import SliceStore
    from ctssl_core.finetune import position_baseline

    ds = plan.config.get("downstream") or {}
    params = ((ds.get("pe") or {}).get("task_params")) or {}
    try:
        cis = position_baseline(SliceStore.open(root), root, plan.bench.split_seed,
                                int(ds.get("n_boot", 1000)), params, pool=plan.bench.pool,
                                fractions=plan.bench.split_fractions)
    except ConfigError as e:
        return [], f"PE position baseline not computed: {e}"
    note = "slice position alone (train-split PE rate per z-decile): not a model, the anatomy-level shortcut"
    out = [{"benchmark_id": plan.benchmark_id, "task": "pe", "init": POSITION_BASELINE, "metric": m,
            "value": _n(c.value), "ci_low": _n(c.low), "ci_high": _n(c.high), "note": note} for m, c in cis.items()]
    b = cis["slice_auroc"]
    models = [r for r in rows if r["task"] == "pe" and r["metric"] == "slice_auroc" and r["value"] is not None
              and r["init"] not in CONTROLS]
    best = max(models, key=lambda r: r["value"]) if models else None
    line = (f"PE baseline: slice position alone gives slice AUROC {_fmt(b.value, b.low, b.high)}"
            + (f"; the best model ({best['init']}) {_fmt(best['value'], best['ci_low'], best['ci_high'])}" if best else "")
            + ". A model that does not beat it has learned the level of the pulmonary arteries, not emboli.")
    return out, line


def probe_rows(plan: Plan, root: Path, embeddings, table, log) -> list[dict[str, Any]]:
    """Demographics route (a): ``probes`` on each init's frozen slice embeddings, paired vs random."""
    if not plan.bench.probes or "random" not in embeddings:
        return []
    from ctssl_core import embed as emb
    from ctssl_core import probes
    from ctssl_core.results import write as rw

    n_boot = plan.analyse.config.n_boot
    results: dict[str, dict] = {}
    for init, ids in embeddings.items():
        E, keys, _ = emb.load_embeddings(root, ids["slice"])
        try:
            results[init] = probes.probe_attributes(E, keys, n_boot=n_boot, seed=0)
        except probes.ProbeError as e:
            log(f"probe skipped for {init}: {e}")
    out, res_rows = [], []
    bid = plan.benchmark_id
    for init, per_attr in results.items():
        for attr, pr in per_attr.items():
            for m, est in pr.metrics.items():
                name = f"probe_{attr}_{m}"
                res_rows.append({"run_id": f"embed-{bid.split('-')[-1]}-{init}", "benchmark_id": bid,
                                 "task": "demographics", "init": init, "fraction": None, "seed": 0,
                                 "split": "probe", "metric": name, "value": _n(est.value), "ci_low": _n(est.ci_low),
                                 "ci_high": _n(est.ci_high), "n": int(pr.n_units)})
                out.append({"benchmark_id": bid, "task": "demographics", "init": init, "metric": name,
                            "value": _n(est.value), "ci_low": _n(est.ci_low), "ci_high": _n(est.ci_high),
                            "note": f"linear probe on frozen embeddings, {pr.n_units} patients, {pr.n_splits}-fold CV"})
            if init != "random" and attr in results.get("random", {}):
                for m, d in probes.paired_delta(pr, results["random"][attr], n_boot=n_boot).items():
                    out.append({"benchmark_id": bid, "task": "demographics", "init": init,
                                "metric": f"delta_probe_{attr}_{m}", "value": _n(d.value), "ci_low": _n(d.ci_low),
                                "ci_high": _n(d.ci_high), "note": "minus random init, paired bootstrap"})
        if "race" in per_attr:
            est = per_attr["race"].metrics["macro_auroc"]
            table[init]["race probe AUROC"] = _fmt(est.value, est.ci_low, est.ci_high)
    rw.write_results(root, res_rows)
    return out


def run_bias(plan: Plan, root: Path, embeddings, log) -> tuple[list[dict], list[str]]:
    """Bias analysis of every init's embedding against random init (bias.analyse_encoder), then the
    scorecard against the planted truth when the store holds the benchmark's synthetic cohort
    (``scorecard_rows``) -> (summary rows, lines)."""
    from ctssl_core import bias

    mapping = dict(plan.analyse.config.bias)
    bcfg = build(bias.BiasConfig, mapping, where="bias.")
    import pandas as pd

    from ctssl_core.finetune import read_exam_scores
    from ctssl_core.paths import store_paths

    ref = embeddings.get("random", {}).get("slice")
    frames: dict[str, pd.DataFrame] = {}
    for init, ids in embeddings.items():
        # subgroup performance of this init's full-label PE model (first seed), when there is one
        pe_units = sorted((u for u in plan.units if u.kind == "finetune" and u.task == "pe" and u.init == init
                           and u.fraction == 1.0), key=lambda u: u.seed)
        scores = val_scores = None
        if pe_units:   # validation scores choose the TPR/FPR threshold (never the test scores themselves)
            scores, val_scores = read_exam_scores(store_paths(root).run_dir(pe_units[0].run_id))
            if val_scores is not None and val_scores["label"].nunique() < 2:
                log(f"bias: the {init} PE model's validation exams are all one class, so no TPR/FPR threshold "
                    f"can be chosen from them (AUROC per group only; set bias.threshold for TPR/FPR)")
                val_scores = None
        reference = None if init == "random" else ref
        try:
            frames[init] = bias.analyse_encoder(root, ids["slice"], reference, bcfg, pe_scores=scores, progress=log,
                                                pe_val_scores=None if scores is None else val_scores)
        except bias.BiasError as e:
            if scores is None:
                raise
            # the subgroup part needs enough test patients per group; keep the embedding analysis
            log(f"bias: subgroup analysis of the {init} PE model skipped ({e})")
            frames[init] = bias.analyse_encoder(root, ids["slice"], reference, bcfg, progress=log)
    return scorecard_rows(plan, root, frames, {ids["slice"]: init for init, ids in embeddings.items()})


def scorecard_rows(plan: Plan, root: Path, frames: dict, labels: dict[str, str]) -> tuple[list[dict], list[str]]:
    """``bias.scorecard`` of every encoder against ``truth.json`` of the benchmark's synthetic cohort:
    summary rows (task 'bias', metric ``scorecard_<attribute>_<analysis>``, value 1 right / 0 wrong,
    the outcome (hit, miss, false positive, correct null, not run) and the sentence as note) and lines saying plainly where the analysis is wrong. Nothing when the
    store was not built from that cohort (real data has no planted truth)."""
    import pandas as pd

    from ctssl_core import bias, twins

    truth = plan.cohort / "truth.json"
    if not truth.is_file() or not frames:
        return [], []
    try:
        from ctssl_core.data.store import SliceStore
        from ctssl_core.paths import store_paths

        known = twins.patient_indices(plan.cohort, store_paths(root).secret)
        if not set(SliceStore.open(root).patients["patient_key"]) <= set(known):
            return [], ["bias scorecard: not computed (the store holds patients that are not the benchmark's "
                        "synthetic cohort, so there is no planted truth to score against)"]
    except Exception as e:  # noqa: BLE001 - a cohort that cannot be matched is said, never guessed
        return [], [f"bias scorecard: not computed ({type(e).__name__}: {e})"]
    card = bias.scorecard(pd.concat(list(frames.values()), ignore_index=True), bias.planted_truth(truth), labels)
    rows = [{"benchmark_id": plan.benchmark_id, "task": "bias", "init": r.encoder,
             "metric": f"scorecard_{r.attribute}_{r.analysis}",
             "value": None if r.correct is None else float(bool(r.correct)), "ci_low": None, "ci_high": None,
             "note": r.sentence, "outcome": r.outcome} for r in card.itertuples()]
    ran = card[card.correct.notna()]
    wrong = ran[~ran.correct.astype(bool)]
    fp = wrong[wrong.outcome == "false positive"]
    lines = [f"bias scorecard against the planted truth (truth.json): {len(ran) - len(wrong)} of {len(ran)} "
             f"(encoder, attribute, analysis) right; false positives (errors of the analysis): "
             + (", ".join(f"{r.encoder}/{r.attribute}/{r.analysis}" for r in fp.itertuples()) or "none")
             + "; misses (the encoder does not carry it, or the test lacks power): "
             + (", ".join(f"{r.encoder}/{r.attribute}/{r.analysis}" for r in wrong[wrong.outcome == "miss"].itertuples())
                or "none")]
    return rows, lines


def _pct(v: float) -> str:
    return f"{v * PERCENT:.0f}%" if v is not None and np.isfinite(v) else "n/r"


def _fmt(v, lo, hi) -> str:
    if v is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _markdown(df, plan: Plan, notes: list[str] = ()) -> str:
    cols = list(df.columns)
    lines = [f"# {plan.benchmark_id} (profile {plan.profile})", "",
             "Test-split metrics at the full label fraction with 95% patient-bootstrap CIs; "
             "labels saved = 1 - smallest label fraction reaching random init's full-label metric.", "",
             "| init | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for init, r in df.iterrows():
        name = f"*{init}* (control)" if init in CONTROLS else init
        lines.append(f"| {name} | " + " | ".join(str(r[c]) if r[c] == r[c] else "" for c in cols) + " |")
    lines += [""] + list(notes) if notes else []
    return "\n".join(lines) + "\n"
