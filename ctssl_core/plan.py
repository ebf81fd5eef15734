"""The benchmark's plan: a profile resolved once into dataclasses, then a list of typed units.

Why a module of its own: planning decides *what* a benchmark computes (every unit and its resolved
config), the runner (``benchmark.py``) decides *when and where* (order, resume, engines) and the
summaries what it means. Planning is pure (it never opens the store) and validates every unit's config
before anything runs, so a bad key fails in a second, not after an hour of pretraining.

A unit is one pretraining, fine-tuning, control, embedding or the analysis; each carries its resolved
config (``PretrainConfig``, ``FinetuneConfig``, ``EmbedConfig``, ``AnalyseConfig``), built once here and handed
to ``pretrain.run_pretrain``/``finetune.finetune``/``embed.run_embed`` as it is (no YAML or dict round
trip). A unit's identity is ``unit_hash``: the hash of its resolved config and of the identity of the
unit it starts from (a fine-tune of a pretrained encoder changes when that pretraining's config does).
It is stored with the unit's run (``runs.unit_hash``), so a finished pretraining is found by its hash
(reused by any benchmark that resolves to the same config, and by a ``ctssl pretrain`` run of it), and a
fine-tune whose stored hash differs from the plan's (the code's defaults changed) is run again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ctssl_core.config import ConfigError, build, config_hash, load_profile, merge, parse_overrides, to_dict
from ctssl_core.controls import CONTROLS, NEGATIVE, POSITIVE


def _registered_strategies() -> tuple[str, ...]:
    from ctssl_core.pretext import strategies

    return strategies()


@dataclass(frozen=True)
class BenchmarkConfig:
    strategies: tuple[str, ...] = field(default_factory=lambda: _registered_strategies())  # pretext registry
    tasks: tuple[str, ...] = ("pe", "nodule", "demographics")
    fractions: tuple[float, ...] = (0.05, 0.25, 1.0)          # pe and nodule label fractions
    demographics_fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)                            # seeds at every fraction
    small_fraction_seeds: tuple[int, ...] = (0, 1, 2)        # seeds at fractions <= small_fraction
    small_fraction: float = 0.25
    split_seed: int = 0
    speed_frac: float = 0.9                                  # learning speed: fraction of random's best
    pool: float = 0.0                                        # fraction of patients set apart as the unlabelled
                                                             # pretraining pool (disjoint from the labelled
                                                             # cohort; 0 = pretrain on the train split)
    split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)   # train/val/test shares of the labelled cohort: a
                                                             # small-label study wants a large test split
    controls: tuple[str, ...] = ()                           # tasks that get a positive (supervised on the
                                                             # pool's labels) and a negative (shuffled) control
    twins: bool = True                                       # PE: score counterfactual twins (synthetic stores)
    alpha: float = 0.05                                      # family-wise error of the verdicts (Bonferroni)
    probes: bool = True                                      # demographics route (a): frozen-embedding probes
    bias: bool = True                                        # run bias.analyse_encoder on the embeddings
    cohort: str = ""                                         # cohort folder; '' = data/cohorts/<profile>-<hash>
    data: str = "synthetic"                                  # synthetic: an empty store gets the profile's
                                                             # synthetic cohort (generated and ingested, said);
                                                             # store: only what is in the store (your data),
                                                             # an empty store is refused
    threads: int = 0                                         # torch CPU threads; 0 = torch's default. 1 is
                                                             # far faster on a CPU shared with other jobs
    workers: int = 1                                         # units run in this many processes at once
                                                             # (each with `threads` threads); 1 = in-process
    executor: str = "local"                                  # engine of the units (executors.EXECUTORS): local
                                                             # (`workers` processes), ray or slurm (one task or
                                                             # job per unit)
    ray_address: str = ""                                    # executor=ray: '' starts a local Ray instance;
                                                             # 'ray://host:10001' or 'auto' joins a cluster
    slurm_partition: str = ""                                # executor=slurm: '' = the cluster's default
    slurm_timeout_min: int = 240                             # executor=slurm: each unit's time limit

    def __post_init__(self) -> None:
        from ctssl_core.downstream import DOWNSTREAM
        from ctssl_core.pretext import PRETEXT

        bad = [s for s in self.strategies if s not in PRETEXT]
        if bad:
            raise ConfigError(f"benchmark.strategies: unknown {bad}; choose from {sorted(PRETEXT)}")
        bad = [t for t in self.tasks if t not in DOWNSTREAM]
        if bad:
            raise ConfigError(f"benchmark.tasks: unknown {bad}; choose from {sorted(DOWNSTREAM)}")
        for f in (*self.fractions, *self.demographics_fractions):
            if not 0 < f <= 1:
                raise ConfigError(f"benchmark fractions must lie in (0, 1], got {f}")
        from ctssl_core.executors import check_executor

        check_executor(self.executor)
        if self.slurm_timeout_min < 1:
            raise ConfigError(f"benchmark.slurm_timeout_min must be >= 1 (minutes per unit), got "
                              f"{self.slurm_timeout_min}")
        if self.workers < 1 or self.threads < 0:
            raise ConfigError(f"benchmark.workers must be >= 1 and benchmark.threads >= 0, got "
                              f"{self.workers} and {self.threads}")
        bad = [t for t in self.controls if t not in ("pe", "nodule") or t not in self.tasks]
        if bad:
            raise ConfigError(f"benchmark.controls: {bad} must be among the benchmark's pe/nodule tasks "
                              f"{[t for t in self.tasks if t in ('pe', 'nodule')]}")
        if self.controls and not self.pool:
            raise ConfigError("benchmark.controls need an unlabelled pool whose labels train the positive "
                              "control: set benchmark.pool (e.g. 0.5), or benchmark.controls=[]")
        if not 0.0 <= self.pool < 1.0 or not 0.0 < self.alpha < 0.5:
            raise ConfigError(f"benchmark.pool must be in [0, 1) and benchmark.alpha in (0, 0.5), got "
                              f"{self.pool} and {self.alpha}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6 or not (fr[0] > 0 and fr[2] > 0):
            raise ConfigError(f"benchmark.split_fractions must be three shares (train, val, test) summing to 1 "
                              f"with train and test > 0, e.g. [0.5, 0.1, 0.4]; got {list(fr)}")
        if self.data not in ("synthetic", "store"):
            raise ConfigError(f"benchmark.data must be 'synthetic' (generate the profile's cohort into an empty "
                              f"store) or 'store' (use only the store's data), got {self.data!r}")
        if 1.0 not in self.fractions:
            raise ConfigError("benchmark.fractions must include 1.0: labels saved is measured against "
                              "random init trained on all labels")

    def seeds_for(self, fraction: float) -> tuple[int, ...]:
        return tuple(sorted(set(self.seeds) | (set(self.small_fraction_seeds) if fraction <= self.small_fraction else set())))


# ------------------------------------------------------------------ typed units


@dataclass(frozen=True, kw_only=True, eq=False)
class Unit:
    """What every unit has: its run id (for a pretraining, the plan's key: the run is found by its hash), the
    task and init it is filed under, and for fine-tunes the label fraction and seed."""

    run_id: str
    task: str
    init: str
    fraction: float | None = None
    seed: int | None = None
    after: str | None = None          # unit_hash of the unit it starts from (its pretraining or control source)
    kind: ClassVar[str] = ""

    @property
    def unit_hash(self) -> str:
        """The unit's identity: its resolved config and the identity of the unit it starts from."""
        cfg = getattr(self, "config", None)
        return config_hash({"kind": self.kind, "config": to_dict(cfg) if cfg is not None else None,
                            "after": self.after}, 16)


@dataclass(frozen=True, kw_only=True, eq=False)
class PretrainUnit(Unit):
    """One strategy's pretraining: ``run_pretrain(config=...)``. Its hash is ``pretrain_hash(config)``, the
    one ``run_pretrain`` stores, so a pretraining run by hand with the same resolved config is reused."""

    config: Any                       # pretrain.PretrainConfig
    kind: ClassVar[str] = "pretrain"

    @property
    def unit_hash(self) -> str:
        from ctssl_core.pretrain import pretrain_hash

        return pretrain_hash(self.config)


@dataclass(frozen=True, kw_only=True, eq=False)
class FinetuneUnit(Unit):
    """One downstream fine-tune (task x init x fraction x seed). ``config.init`` is the init's name; the
    runner puts the run id of the pretraining (or control) it needs in its place."""

    config: Any                       # finetune.FinetuneConfig
    kind: ClassVar[str] = "finetune"


@dataclass(frozen=True, kw_only=True, eq=False)
class ControlUnit(Unit):
    """Positive control (``init`` POSITIVE: a supervised fine-tune on the pool's labels, ``config`` its
    FinetuneConfig) or negative control (NEGATIVE: that encoder shuffled within each layer; ``config`` None,
    its identity is its source's)."""

    config: Any = None
    kind: ClassVar[str] = "control"


@dataclass(frozen=True, kw_only=True, eq=False)
class EmbedUnit(Unit):
    """The evaluation split embedded with one init (``embed.run_embed``)."""

    config: Any                       # embed.EmbedConfig
    kind: ClassVar[str] = "embed"


@dataclass(frozen=True)
class AnalyseConfig:
    """What the analysis reads besides the stored runs: the design, the bias section and the bootstrap size."""

    bench: BenchmarkConfig
    bias: dict = field(default_factory=dict)   # the profile's ``bias`` section (bias.BiasConfig keys)
    n_boot: int = 1000


@dataclass(frozen=True, kw_only=True, eq=False)
class AnalyseUnit(Unit):
    """Summaries, verdicts, probes and bias from the stored runs. Never stored as done: it is recomputed on
    every (resumed) benchmark from what the other units stored, so it always describes all of them."""

    config: AnalyseConfig
    kind: ClassVar[str] = "analyse"

    @property
    def unit_hash(self) -> str:
        """Its config minus the execution settings (they change how fast, never what is concluded)."""
        cfg = to_dict(self.config)
        cfg["bench"] = {k: v for k, v in cfg["bench"].items() if k not in EXECUTION_KEYS}
        return config_hash({"kind": self.kind, "config": cfg}, 16)


@dataclass
class Plan:
    profile: str
    config: dict                # the merged profile (after overrides)
    bench: BenchmarkConfig
    benchmark_id: str
    units: list[Unit]           # pretrain, control, finetune, embed units, then the one analyse unit
    cohort: Path                # the synthetic cohort's folder (generated only when benchmark.data = synthetic)
    synth: Any                  # data.synth.SynthConfig of that cohort
    ingest: Any                 # data.ingest.IngestConfig: how a cohort is ingested, and the store's slice size
    labels: dict | None = None  # name/tags/notes (`--name/--tag/--note`) of every run this benchmark starts;
                                # not part of any id: a re-run with other labels reuses the finished units

    @property
    def runs(self) -> list[Unit]:
        """The units that store a run (everything but the analysis)."""
        return [u for u in self.units if u.kind != "analyse"]

    @property
    def analyse(self) -> AnalyseUnit:
        return next(u for u in self.units if isinstance(u, AnalyseUnit))

    def of_kind(self, kind: str) -> list[Unit]:
        return [u for u in self.units if u.kind == kind]

    def pretraining(self, strategy: str) -> "PretrainUnit":
        return next(u for u in self.units if isinstance(u, PretrainUnit) and u.task == strategy)


# ------------------------------------------------------------------ profile -> resolved configs


def resolve_profile(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    cfg = merge(load_profile(profile), parse_overrides(overrides))
    allowed = {"profile", "synth", "ingest", "pretrain", "downstream", "embed", "bias", "benchmark"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"profile {profile!r}: unknown section(s) {unknown}; valid: {sorted(allowed)}")
    return cfg


# execution settings: they change how fast a benchmark runs, not what it computes
EXECUTION_KEYS = ("workers", "threads", "executor", "ray_address", "slurm_partition", "slurm_timeout_min",
                  "data")   # data: whether an empty store may be filled, never what a filled one computes


def result_config(cfg: dict) -> dict:
    """The profile minus its name and execution settings: what the benchmark id hashes, so a
    benchmark resumed with another ``workers``/``threads``/``executor`` reuses its finished units."""
    out = {k: v for k, v in cfg.items() if k != "profile"}
    if isinstance(out.get("benchmark"), dict):
        out["benchmark"] = {k: v for k, v in out["benchmark"].items() if k not in EXECUTION_KEYS}
    return out


def finetune_config(cfg: dict, task: str, init: str, fraction: float, seed: int, split_seed: int,
                    pre_encoder: tuple[str, dict], pool: float = 0.0, split_fractions=(0.7, 0.15, 0.15)):
    """FinetuneConfig for one unit: downstream common keys <- downstream.<task> keys <- unit keys.

    The input windows are the pretraining's (``pretrain.windows``), so random init and every
    pretrained init see the data through the same view."""
    from ctssl_core.finetune import FinetuneConfig
    from ctssl_core.train import TrainConfig

    ds = dict(cfg.get("downstream") or {})
    per_task = {k: ds.pop(k) for k in ("pe", "nodule", "demographics") if k in ds}
    mapping = merge({"windows": input_windows(cfg)}, merge(ds, per_task.get(task) or {}))
    mapping = merge(mapping, {"task": task, "init": init, "fraction": fraction, "seed": seed,
                              "split_seed": split_seed, "pool": pool,
                              "split_fractions": list(split_fractions), "encoder": pre_encoder[0],
                              "encoder_kwargs": pre_encoder[1]})
    fc = build(FinetuneConfig, mapping, where="downstream.")
    build(TrainConfig, fc.train, where=f"downstream.{task}.train.")   # its training keys, checked now
    return fc


def input_windows(cfg: dict):
    """The profile's model-input windows (``pretrain.windows``; the paper's single window when unset)."""
    return (cfg.get("pretrain") or {}).get("windows", "paper")


def pretrain_encoder(cfg: dict) -> tuple[str, dict]:
    pre = cfg.get("pretrain") or {}
    return str(pre.get("encoder", "tiny")), dict(pre.get("encoder_params") or {})


def pretrain_config(cfg: dict, bench: BenchmarkConfig, strategy: str):
    """The resolved ``PretrainConfig`` of one strategy, on the benchmark's split scheme: with a pool it sees
    only the pool's patients, else the train split of the same (seed, fractions) the fine-tunes are scored
    on (never their test patients)."""
    from ctssl_core import pretrain as pre_mod

    extra: dict[str, Any] = {"split_fractions": [float(f) for f in bench.split_fractions]}
    if bench.pool:
        extra.update({"split": "pool", "pool": bench.pool})
    section = merge(cfg.get("pretrain") or {}, {"task": strategy, "split_seed": bench.split_seed, **extra})
    return pre_mod.resolve_config(strategy, base=section)


def embed_config(cfg: dict, bench: BenchmarkConfig):
    """The benchmark's ``EmbedConfig``: the profile's ``embed`` section on the benchmark's encoder (name and
    ``pretrain.encoder_params``, so random init is the strategies' architecture), split scheme and input
    windows (what the embed units and the bias dose-response both embed with)."""
    from ctssl_core import embed as emb

    scheme = {"split_seed": bench.split_seed, "pool": bench.pool, "split_fractions": list(bench.split_fractions)}
    section = dict(cfg.get("embed") or {})
    clash = sorted(k for k in scheme if k in section)
    if clash:
        raise ConfigError(f"embed.{clash[0]} cannot be set in a benchmark profile: embeddings use the benchmark's "
                          f"split scheme (benchmark.split_seed / pool / split_fractions); remove it from `embed`")
    name, kwargs = pretrain_encoder(cfg)
    mapping = merge({"encoder": name, "encoder_kwargs": kwargs, "windows": input_windows(cfg)},
                    merge(section, scheme))
    return build(emb.EmbedConfig, mapping, where="embed.")


# ------------------------------------------------------------------ the plan


def make_plan(profile: str, overrides=()) -> Plan:
    """Resolve ``profile`` (+ ``--set`` overrides) once and list the benchmark's units in run order."""
    from ctssl_core.data.ingest import IngestConfig
    from ctssl_core.data.synth import SynthConfig
    from ctssl_core.paths import default_cohort

    cfg = resolve_profile(profile, overrides)
    bench = build(BenchmarkConfig, cfg.get("benchmark") or {}, where="benchmark.")
    name = str(cfg.get("profile", profile))
    data_hash = config_hash({"synth": cfg.get("synth"), "ingest": cfg.get("ingest")})
    cohort = Path(bench.cohort) if bench.cohort else default_cohort(f"{name}-{data_hash}")
    pre_hash = config_hash({"data": data_hash, "pretrain": cfg.get("pretrain"), "split": bench.split_seed})
    bench_hash = config_hash(result_config(cfg))
    benchmark_id = f"bench-{name}-{bench_hash}"
    enc = pretrain_encoder(cfg)
    units: list[Unit] = []
    source: dict[str, str] = {}                # init name -> unit_hash of the unit a fine-tune starts from
    for s in bench.strategies:
        u = PretrainUnit(run_id=f"pretrain-{s}-{pre_hash}", task=s, init=s, config=pretrain_config(cfg, bench, s))
        units.append(u)
        source[s] = u.unit_hash
    for task in bench.controls:
        fc = finetune_config(cfg, task, "random", 1.0, 0, bench.split_seed, enc, bench.pool, bench.split_fractions)
        # the source trains its encoder even when the readout protocol freezes it
        pc = ControlUnit(run_id=f"pc-{bench_hash}-{task}", task=task, init=POSITIVE, fraction=1.0, seed=0,
                         config=dataclasses.replace(fc, train_split="pool", freeze_encoder=False))
        nc = ControlUnit(run_id=f"nc-{bench_hash}-{task}", task=task, init=NEGATIVE, after=pc.unit_hash)
        units += [pc, nc]
        source[f"{POSITIVE}:{task}"], source[f"{NEGATIVE}:{task}"] = pc.unit_hash, nc.unit_hash
    inits = ["random", *bench.strategies]
    for task in bench.tasks:
        fracs = bench.demographics_fractions if task == "demographics" else bench.fractions
        for init in [*inits, *(CONTROLS if task in bench.controls else ())]:
            for f in sorted(fracs):
                for seed in bench.seeds_for(f):
                    fc = finetune_config(cfg, task, init, f, seed, bench.split_seed, enc, bench.pool,
                                         bench.split_fractions)
                    units.append(FinetuneUnit(run_id=f"ft-{bench_hash}-{task}-{init}-f{f:g}-s{seed}", task=task,
                                              init=init, fraction=f, seed=seed, config=fc,
                                              after=source.get(f"{init}:{task}" if init in CONTROLS else init)))
    if bench.probes or bench.bias:
        ecfg = embed_config(cfg, bench)
        for init in inits:
            units.append(EmbedUnit(run_id=f"embed-{bench_hash}-{init}", task="embed", init=init, config=ecfg,
                                   after=source.get(init)))
    n_boot = int((cfg.get("downstream") or {}).get("n_boot", 1000))
    units.append(AnalyseUnit(run_id=benchmark_id, task="benchmark", init="-",
                             config=AnalyseConfig(bench, dict(cfg.get("bias") or {}), n_boot)))
    return Plan(name, cfg, bench, benchmark_id, units, cohort,
                build(SynthConfig, cfg.get("synth") or {}, where="synth."),
                build(IngestConfig, cfg.get("ingest") or {}, where="ingest."))


# ------------------------------------------------------------------ dependencies and resources


def provides(u: Unit) -> str | None:
    """The key under which a unit's result (a run id with a checkpoint) is found by the units after it."""
    if u.kind == "pretrain":
        return u.task
    if u.kind == "control":
        return f"{u.init}:{u.task}"
    return None


def needs(u: Unit) -> str | None:
    """The ``provides`` key a unit waits for (None: it can start at once)."""
    if u.kind == "control":
        return f"{POSITIVE}:{u.task}" if u.init == NEGATIVE else None
    if u.kind in ("pretrain", "analyse") or u.init == "random":
        return None
    return f"{u.init}:{u.task}" if u.init in CONTROLS else u.init


def label(u: Unit) -> str:
    return f"{u.kind} {u.task} {u.init}" + (f" f={u.fraction:g} s={u.seed}" if u.fraction else "")


def unit_device(u: Unit) -> str:
    """The device a unit's config asks for ('cpu', 'cuda' or 'auto'): what an engine reserves a GPU for."""
    if u.kind == "embed":
        return u.config.device
    if u.kind == "pretrain":
        return u.config.train.device
    if u.kind == "analyse" or (u.kind == "control" and u.config is None):
        return "cpu"                                   # the negative control shuffles weights: no training
    return str((u.config.train or {}).get("device", "auto"))


def unit_resources(plan: Plan, u: Unit):
    from ctssl_core.executors import Resources

    return Resources(cpus=plan.bench.threads or 1, device=unit_device(u))
