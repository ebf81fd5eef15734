"""Job kinds: what a job may be, which parameters it takes, and the command it becomes.

Why a registry of typed specs and not a command string: a job is launched
from a browser form, so nothing typed there may reach a command line as
free text. Each kind is a frozen dataclass of parameters; every number has
bounds, every string is a short token (no path separators, no shell
characters) that must also be one of the choices that exist in the store
(a checkpoint that is really there, a registered task). The argv is rebuilt
from the validated spec by the worker, never stored or taken from the user,
and started without a shell.

``JOB_KINDS`` is a plain dict ``kind -> JobKind``. Extra kinds (tests, site
plugins) register by adding to it, or by naming modules in the
``CTSSL_JOB_PLUGINS`` environment variable (comma-separated) that add to it
when imported, so a separately started worker and dashboard know them too.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ctssl_core.config import ConfigError, build
from ctssl_core.jobs.presence import worker_executor

PLUGINS_ENV = "CTSSL_JOB_PLUGINS"
DEVICES = ("auto", "cpu", "cuda")
SAFE_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SHELL_CHARS = set(";&|$`<>(){}[]*?!~'\"\\ \t\n\r#%^=,:@")


class JobSpecError(ConfigError):
    """A job spec the user can fix (bad number, unknown choice, unsafe string); nothing was queued."""


def check_token(name: str, value: str) -> str:
    """A string that may reach an argv: short, no path separators, no shell metacharacters."""
    if not isinstance(value, str):
        raise JobSpecError(f"{name}: expected text, got {value!r}")
    if "/" in value or "\\" in value or ".." in value or value.startswith(("~", ".")):
        raise JobSpecError(f"{name}: {value!r} looks like a path; choose one of the listed names instead "
                           f"(jobs never take file paths)")
    bad = sorted(set(value) & _SHELL_CHARS)
    if bad or not SAFE_TOKEN.match(value):
        shown = "".join(bad) if bad else value[:1]
        raise JobSpecError(f"{name}: {value!r} contains characters that are not allowed ({shown!r}); "
                           f"use letters, digits, '_', '-', '.' only")
    return value


def _bounds(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict:
    return {"min": lo, "max": hi, "min_open": lo_open}


def _choices(fn: Callable[[Path], list[str]]) -> dict:
    return {"choices": fn}


# --------------------------------------------------------------------------- choices from the store


def pretext_keys(store_root: Path | None = None) -> list[str]:
    try:
        from ctssl_core.pretext import PRETEXT
        keys = sorted(PRETEXT)
    except (ImportError, AttributeError):
        keys = []
    return keys or ["composite", "denoise", "flip", "masked_region", "next_slice", "rotation"]


def downstream_keys(store_root: Path | None = None) -> list[str]:
    try:
        from ctssl_core.downstream import DOWNSTREAM
        keys = sorted(DOWNSTREAM)
    except (ImportError, AttributeError):
        keys = []
    return keys or ["demographics", "nodule", "pe"]


def profile_choices(store_root: Path | None = None) -> list[str]:
    from ctssl_core.config import profile_names
    return profile_names() or ["smoke"]


def init_choices(store_root: Path | None) -> list[str]:
    """``random``, plus every pretext key and run id with a checkpoint that exists in the store."""
    from ctssl_core.results.store_api import checkpoints
    out = ["random"]
    if store_root is not None:
        ck = checkpoints(store_root)
        out += sorted(set(ck["task"])) + list(ck["run_id"])
    return out


def checkpoint_choices(store_root: Path | None) -> list[str]:
    """Run ids with a checkpoint on disk, plus ``random`` (the untrained reference)."""
    from ctssl_core.results.store_api import checkpoints
    return ["random"] + (list(checkpoints(store_root)["run_id"]) if store_root is not None else [])


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class PretrainSpec:
    task: str = field(default="masked_region", metadata=_choices(pretext_keys))
    steps: int = field(default=200, metadata=_bounds(1, 10_000_000))
    seed: int = field(default=0, metadata=_bounds(0, 2**31 - 1))
    profile: str = field(default="smoke", metadata=_choices(profile_choices))
    device: str = field(default="auto", metadata={"choices": lambda _r: list(DEVICES)})


@dataclass(frozen=True)
class FinetuneSpec:
    task: str = field(default="pe", metadata=_choices(downstream_keys))
    init: str = field(default="random", metadata=_choices(init_choices))
    fraction: float = field(default=1.0, metadata=_bounds(0.0, 1.0, lo_open=True))
    seed: int = field(default=0, metadata=_bounds(0, 2**31 - 1))
    steps: int = field(default=200, metadata=_bounds(1, 10_000_000))
    profile: str = field(default="smoke", metadata=_choices(profile_choices))
    device: str = field(default="auto", metadata={"choices": lambda _r: list(DEVICES)})


@dataclass(frozen=True)
class EmbedSpec:
    checkpoint: str = field(default="random", metadata=_choices(checkpoint_choices))
    split: str = field(default="test", metadata={"choices": lambda _r: ["test", "val", "train", "all"]})


@dataclass(frozen=True)
class BenchmarkSpec:
    profile: str = field(default="smoke", metadata=_choices(profile_choices))


def cli(*args: Any) -> list[str]:
    """argv of ``ctssl ...`` in this interpreter (no shell, no PATH lookup)."""
    return [sys.executable, "-m", "ctssl_core.cli", *map(str, args)]


def _pretrain_argv(spec: PretrainSpec, store: Path, resume_run: str | None) -> list[str]:
    if resume_run:  # the run's saved config (task, steps, device) is the truth on resume
        return cli("pretrain", "--resume", resume_run, "--store", store, "--no-progress")
    device = [] if spec.device == "auto" else ["--set", f"train.device={spec.device}"]
    return cli("pretrain", "--task", spec.task, "--profile", spec.profile, "--store", store,
               "--set", f"train.steps={spec.steps}", "--set", f"train.seed={spec.seed}", *device, "--no-progress")


def _finetune_argv(spec: FinetuneSpec, store: Path, resume_run: str | None, probe: bool = False) -> list[str]:
    device = [] if spec.device == "auto" else ["--set", f"downstream.train.device={spec.device}"]
    argv = cli("finetune", "--task", spec.task, "--init", spec.init, "--fraction", spec.fraction,
               "--seed", spec.seed, "--profile", spec.profile, "--store", store,
               "--set", f"downstream.train.steps={spec.steps}", *device, "--quiet")
    return argv + (["--set", "downstream.freeze_encoder=true"] if probe else [])


def _embed_argv(spec: EmbedSpec, store: Path, resume_run: str | None) -> list[str]:
    return cli("embed", "--checkpoint", spec.checkpoint, "--split", spec.split, "--store", store)


def _benchmark_argv(spec: BenchmarkSpec, store: Path, resume_run: str | None) -> list[str]:
    return cli("benchmark", "--profile", spec.profile, "--store", store, "--quiet")


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its parameter dataclass and how a validated spec becomes an argv.

    ``argv(spec, store_root, resume_run_id)``; ``resumable``: the command can
    continue a run from its last checkpoint given ``--resume RUN_ID``
    (otherwise resume re-runs the spec from the start). ``checkpoint``: the file,
    inside the run's folder, that a resume continues from; a run stopped before
    writing it cannot be continued, so resume starts the spec afresh instead.
    """

    spec: type
    argv: Callable[[Any, Path, str | None], list[str]]
    label: str = ""
    resumable: bool = False
    checkpoint: str = "checkpoints/last.pt"  # train.fit's checkpoint.LAST (not imported: it needs torch)


JOB_KINDS: dict[str, JobKind] = {
    "pretrain": JobKind(PretrainSpec, _pretrain_argv, "Pretrain an encoder with a pretext task", True),
    # `ctssl finetune` has no --resume: resuming a finetune job runs it again from the start
    "finetune": JobKind(FinetuneSpec, _finetune_argv, "Fine-tune on a downstream task"),
    "probe": JobKind(FinetuneSpec, lambda s, r, rr: _finetune_argv(s, r, rr, probe=True),
                     "Linear probe on a frozen encoder"),
    "embed": JobKind(EmbedSpec, _embed_argv, "Embeddings + projections + bias analysis"),
    "benchmark": JobKind(BenchmarkSpec, _benchmark_argv, "Whole benchmark for a profile"),
}

_loaded_plugins: set[str] = set()


def job_kinds() -> dict[str, JobKind]:
    """``JOB_KINDS`` after importing any ``CTSSL_JOB_PLUGINS`` modules (once each)."""
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if name not in _loaded_plugins:
            importlib.import_module(name)
            _loaded_plugins.add(name)
    return JOB_KINDS


def get_kind(kind: str) -> JobKind:
    kinds = job_kinds()
    if kind not in kinds:
        raise JobSpecError(f"unknown job kind {kind!r}: choose one of {sorted(kinds)}")
    return kinds[kind]


def field_choices(kind: str, store_root: Path | None) -> dict[str, list[str]]:
    """For a form: field -> allowed values (from what exists in the store)."""
    spec_cls = get_kind(kind).spec
    return {f.name: f.metadata["choices"](store_root) for f in dataclasses.fields(spec_cls)
            if "choices" in f.metadata}


def validate_spec(kind: str, params: Mapping[str, Any] | None, store_root: Path | None) -> Any:
    """Build the kind's spec strictly and check bounds, tokens and store-backed choices.

    Raises :class:`JobSpecError` with a message for the form; returns the frozen spec.
    """
    jk = get_kind(kind)
    try:
        spec = build(jk.spec, dict(params or {}), where=f"{kind}.")
    except JobSpecError:
        raise
    except ConfigError as e:
        raise JobSpecError(str(e)) from None
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        meta = f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise JobSpecError(f"{f.name}: {value!r} is not a finite number")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
            op = ">" if meta.get("min_open") else ">="
            raise JobSpecError(f"{f.name} must be {op} {lo} (and <= {hi}); got {value!r}")
        if hi is not None and value > hi:
            raise JobSpecError(f"{f.name} must be <= {hi}; got {value!r}")
        if isinstance(value, str):
            check_token(f.name, value)
            if "choices" in meta:
                allowed = meta["choices"](store_root)
                if value not in allowed:
                    shown = ", ".join(map(str, allowed[:12])) + (" ..." if len(allowed) > 12 else "")
                    what = "checkpoint" if f.name in ("init", "checkpoint") else f.name
                    raise JobSpecError(f"unknown {what} {value!r}: choose one of {shown}"
                                       + (" (train one with a pretrain job first)"
                                          if what == "checkpoint" else ""))
    if getattr(spec, "device", None) == "cuda" and not has_gpu() and worker_executor(store_root) == "local":
        raise JobSpecError("device 'cuda': this machine has no GPU that the local worker could use; choose 'cpu' "
                           "or 'auto', or serve the store with a worker that runs jobs on a cluster with GPUs "
                           "(ctssl worker --executor ray|slurm)")
    return spec


def build_argv(kind: str, spec: Any, store_root: Path, resume_run: str | None = None) -> list[str]:
    """The validated spec as an argv list (started without a shell)."""
    if resume_run is not None:
        check_token("resume", resume_run)
    argv = get_kind(kind).argv(spec, Path(store_root), resume_run)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise JobSpecError(f"job kind {kind!r} built an invalid argv {argv!r}")
    return argv


def resource_of(spec: Any) -> str:
    """'gpu' or 'cpu': the slot the job needs. ``auto`` means the GPU when this machine has one."""
    device = getattr(spec, "device", "auto")  # kinds without a device knob use the GPU when there is one
    if device == "cuda":
        return "gpu"
    if device == "auto" and has_gpu():
        return "gpu"
    return "cpu"


def has_gpu() -> bool:
    """Cheap check (no torch import): an NVIDIA device node or CUDA_VISIBLE_DEVICES says so."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None and vis.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists()
