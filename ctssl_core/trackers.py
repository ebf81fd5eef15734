"""Mirror finished ctssl runs into the experiment trackers people already use: MLflow, TensorBoard and W&B.

Why a mirror and not a live logger: the results store stays the one source of truth (training never
touches anything but its JSONL, ARCHITECTURE "Results"), and a run can be sent to a tracker at any
time -- after the command (``--track`` on pretrain/finetune/benchmark) or later (``ctssl track``).
What a tracker gets (``RunRecord``): params = the run's resolved config flattened to dotted keys
(absolute paths scrubbed to store-relative ones, as in export cards), the metric series of
``runs/<id>/metrics.jsonl``, the test results as final metrics (``<split>/<metric>``), tags (kind,
task, init, encoder, fraction, seed, status..., and the tags of ``ctssl annotate``), the run's name
and notes (``ctssl annotate``) and artifacts (the run's metrics.jsonl and, for a run with a
checkpoint, its export folder: card.json + safetensors, never the pickled checkpoint).

One target grammar (``parse_target``): ``mlflow:<folder>`` (a local ``file:`` store), ``mlflow:file:...``,
``mlflow:http(s)://host[:port][/path]`` (a tracking server), ``tensorboard:<local log dir>`` (one sub-folder
of event files per run) and ``wandb:<local folder>`` (Weights & Biases offline runs, ``<folder>/wandb/offline-run-*``,
which the user uploads with ``wandb sync`` when and where they choose). W&B is offline only: ctssl never logs in,
reads an API key or opens a connection for it, so a W&B target that names a server (a URI) or asks for ``online``
is refused. Other MLflow back ends (``databricks``, ``sqlite:``, database URIs...) are refused:
they need credentials or drivers ctssl neither supports nor tests. A target never carries credentials: a
URI with ``user:password@`` or a query string is refused (MLflow reads MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN from the environment instead), and the refusal shows it
redacted (``redact``), so a secret typed on the command line is never echoed, logged or stored.

Tags: ctssl's own (``results.write.TAG_COLUMNS``, ``ctssl.*``, ``mlflow.*``, ``name``) always win; ``ctssl annotate``
refuses a user tag with such a key (``reserved_tag``), and one left in an older store is not mirrored.

mlflow, tensorboard and wandb are optional (``pip install ctssl[trackers]``) and imported only inside the
functions that need them. Mirroring is idempotent: a run already in the target is reported, not
duplicated. A mirror cut short (the process killed mid-mirror) is not mistaken for a finished one: an
MLflow mirror is tagged ``ctssl.mirror = incomplete`` until its last write, and a later mirror replaces
an incomplete one (deleted, then written whole); a TensorBoard mirror, and a W&B offline run, is written
beside its final place and renamed into it when complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ctssl_core.config import ConfigError
from ctssl_core.db import StoreError
from ctssl_core.paths import scrub_paths, store_paths
from ctssl_core.results.write import TAG_COLUMNS, reserved_tag   # the run columns a mirror tags; ctssl's own keys

RUN_ID_TAG = "ctssl.run_id"   # how a mirror finds a run it already holds
MIRROR_TAG = "ctssl.mirror"   # "incomplete" from the mirror's first write, "complete" after its last
MLFLOW_SCHEMES = ("file", "http", "https")      # the MLflow back ends ctssl supports and tests
SUPPORTED_TARGETS = ("mlflow:<folder> (a local MLflow file store, e.g. mlflow:./mlruns), mlflow:file:<path>, "
                     "mlflow:http(s)://host[:port][/path] (a tracking server), tensorboard:<local log dir> "
                     "(e.g. tensorboard:./tb) or wandb:<local folder> (W&B offline runs, e.g. wandb:./wandb-runs; "
                     "upload them with `wandb sync`)")
EXPERIMENT = "ctssl"          # MLflow experiment of runs outside a benchmark; a benchmark's runs: ctssl-<id>
_PARAM_MAX = 6000             # MLflow's limit on a param value (longer ones are cut, marked with "...")
_EXPORTING = ("mlflow", "wandb")   # the trackers that receive the run's export (card + safetensors) as artifacts


class TrackerError(ConfigError):
    """A tracker target that cannot be used as given; the message says what to do."""


@dataclass
class RunRecord:
    """Everything a tracker receives about one run (read from the store, no DuckDB handle kept)."""

    run_id: str
    params: dict[str, str]
    series: dict[str, list[tuple[int, float, float | None]]]   # name -> [(step, value, wall_s)]
    final: dict[str, float]                                       # '<split>/<metric>' -> value
    tags: dict[str, str]
    artifacts: list[Path] = field(default_factory=list)
    started: float | None = None                                  # unix seconds
    wall_s: float | None = None
    name: str = ""                                                # `ctssl annotate --name`, else the run id
    notes: str = ""                                               # `ctssl annotate --note`


# ------------------------------------------------------------------ reading a run


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"pretrain.train.steps": "5", ...}`` (lists as JSON)."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1] if prefix else "value"
    return {key: obj if isinstance(obj, str) else json.dumps(obj, default=str)}


def read_series(metrics_file: Path) -> dict[str, list[tuple[int, float, float | None]]]:
    """A run's metrics.jsonl as one series per metric name (the parser ``results.write`` merges with)."""
    from ctssl_core.results.runfolder import parse_lines

    series: dict[str, list[tuple[int, float, float | None]]] = {}
    if not metrics_file.is_file():
        return series
    for _, step, _, wall, name, value in parse_lines("", metrics_file.read_bytes()):
        series.setdefault(name, []).append((int(step or 0), value, wall))
    return series


def read_run(store_root: str | Path, run_id: str, artifacts_dir: Path | None = None) -> RunRecord:
    """The ``RunRecord`` of ``run_id``; with ``artifacts_dir``, the run's export is written there to be logged."""
    from ctssl_core.results.store_api import run_record

    sp = store_paths(store_root)
    if not sp.db.exists():
        raise TrackerError(f"no store at {sp.root}; pass --store (or set CTSSL_STORE)")
    run, results = run_record(store_root, run_id)
    if run is None:
        raise TrackerError(f"no run {run_id!r} in {sp.root}; list runs on the dashboard's Runs page or pass the id "
                           f"that pretrain/finetune printed")
    if run["status"] == "running":
        raise TrackerError(f"run {run_id} is still running; mirror it once it has finished")
    cfg = json.loads(run["config"]) if isinstance(run["config"], str) else (run["config"] or {})
    params = {k: (v if len(v) <= _PARAM_MAX else v[:_PARAM_MAX - 3] + "...")
              for k, v in flatten(scrub_paths(cfg, sp.root)).items()}
    user_tags = run.get("tags") or {}   # `ctssl annotate --tag`; a reserved key (older stores) is not mirrored
    user_tags = json.loads(user_tags) if isinstance(user_tags, str) else dict(user_tags)
    tags = {**{k: str(v) for k, v in user_tags.items() if not reserved_tag(k)},
            **{k: str(run[k]) for k in TAG_COLUMNS if run.get(k) is not None}}
    tags[RUN_ID_TAG] = run_id
    run_dir = sp.run_dir(run_id)
    artifacts = [run_dir / "metrics.jsonl"] if (run_dir / "metrics.jsonl").is_file() else []
    if artifacts_dir is not None and run.get("checkpoint") and (sp.root / run["checkpoint"]).is_file():
        from ctssl_core.export import export_run

        weights, card = export_run(sp.root / run["checkpoint"], artifacts_dir / "export", sp.root)
        artifacts += sorted(p for p in weights.parent.iterdir() if p.is_file())
    started = run["created_at"].replace(tzinfo=_dt.timezone.utc).timestamp() if run.get("created_at") else None
    series = read_series(run_dir / "metrics.jsonl")
    final = {f"{s}/{m}": float(v) for s, m, v in results if v is not None and f"{s}/{m}" not in series}
    return RunRecord(run_id=run_id, params=params, series=series, final=final, tags=tags,
                     artifacts=artifacts, started=started, wall_s=run.get("wall_s"),
                     name=run.get("name") or run_id, notes=run.get("notes") or "")


# ------------------------------------------------------------------ targets


_SECRET_IN_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*:(?://)?)(?P<userinfo>[^/\s?#]*@)")
_QUERY_VALUE = re.compile(r"(?P<key>[?&;][^=&;#\s]*=)(?P<value>[^&;#\s]*)")


def redact(text: str) -> str:
    """``text`` with the credentials of any URI in it masked: ``user:pw@`` -> ``***@`` and every query
    value -> ``***`` (a token may hide under any name). For messages, so a refused target never echoes
    the secret that was typed."""
    text = _SECRET_IN_URI.sub(lambda m: m.group("scheme") + "***@", str(text))
    return _QUERY_VALUE.sub(lambda m: m.group("key") + "***", text)


def _scheme(where: str) -> str | None:
    """The URI scheme of a target location, lower case, or None for a plain path (``C:\\x`` is a path)."""
    if re.match(r"^[a-zA-Z]:[\\/]", where):
        return None
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", where)
    return m.group(1).lower() if m else None


def parse_target(spec: str) -> tuple[str, str]:
    """``mlflow:<folder|file:|http(s):>`` / ``tensorboard:<dir>`` / ``wandb:<dir>`` -> (tracker, location);
    anything else, an unsupported back end, a W&B target that would go online, or credentials in the location
    is a TrackerError (the target shown redacted)."""
    kind, sep, where = str(spec).partition(":")
    shown = redact(spec)
    if not sep or kind not in TRACKERS or not where:
        raise TrackerError(f"--track {shown!r}: write {SUPPORTED_TARGETS}")
    scheme = _scheme(where)
    if kind == "wandb" and (scheme is not None or where.strip().lower() in ("online", "offline")):
        raise TrackerError(f"--track {shown!r}: ctssl writes W&B runs in offline mode only, into a local folder "
                           f"(no login, no API key, no network): write wandb:<folder> (e.g. wandb:./wandb-runs), "
                           f"then upload them yourself with `wandb sync <folder>/wandb/offline-run-*`")
    if scheme is not None and any(c in where for c in "@?#"):
        raise TrackerError(f"--track {shown!r}: a target carries no credentials (user:password@ or a query "
                           f"string): they would end up in shell history, process lists and logs. Give the "
                           f"plain URI and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                           f"MLFLOW_TRACKING_TOKEN in the environment")
    backend = scheme or where.strip().lower()
    unsupported = (kind == "mlflow" and (scheme not in (None, *MLFLOW_SCHEMES)
                                         or backend in ("databricks", "databricks-uc", "uc"))) or \
                  (kind == "tensorboard" and scheme is not None)
    if unsupported:
        raise TrackerError(f"--track {shown!r}: {kind} target {backend!r} is not supported (it needs credentials "
                           f"or drivers ctssl neither supports nor tests); use {SUPPORTED_TARGETS}")
    return kind, where


def check_target(spec: str) -> tuple[str, str]:
    """``parse_target`` plus: the tracker's package is installed. Commands call it before any work,
    so a typo or a missing extra fails in a second, not after hours of training."""
    kind, where = parse_target(spec)
    _require(kind)
    return kind, where


def check_targets(specs: list[str]) -> None:
    """``check_target`` for each ``--track`` value."""
    for spec in specs:
        check_target(spec)


def _require(kind: str) -> None:
    import importlib.util

    module, dist = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard"),
                    "wandb": ("wandb", "wandb")}[kind]
    if importlib.util.find_spec(module) is None:
        raise TrackerError(f"--track {kind}: the {module} package is not installed; "
                           f"`pip install ctssl[trackers]` (or `pip install {dist}`)")


def mirror(store_root: str | Path, run_id: str, spec: str) -> str:
    """Mirror one finished run to the target ``spec``; returns a line saying where it went."""
    kind, where = check_target(spec)
    with tempfile.TemporaryDirectory(prefix="ctssl-track-") as tmp:
        rec = read_run(store_root, run_id, artifacts_dir=Path(tmp) if kind in _EXPORTING else None)
        return TRACKERS[kind](rec, where)


def mirror_many(store_root: str | Path, run_ids: list[str], specs: list[str],
                say: Callable[[str], None] = print) -> int:
    """Every run to every target; returns how many mirrors were written or found. The runs' folders are
    merged into the store first: a run a command has just made may not be merged yet (its process writes only
    its folder, ``results/runfolder.py``), and a mirror must carry all of it."""
    from ctssl_core.results.write import merge_pending

    for rid in run_ids:
        merge_pending(store_root, rid)
    n = 0
    for spec in specs:
        for rid in run_ids:
            try:
                say(mirror(store_root, rid, spec))
                n += 1
            except (ConfigError, StoreError):   # bad input (unknown run, bad target): the CLI says what to do
                raise
            except Exception as e:  # noqa: BLE001 -- a tracker outage must not turn finished runs into a failure
                say(redact(f"run {rid} is finished and kept; mirroring it to {spec} failed ({type(e).__name__}: {e}); "
                           f"retry with `ctssl track {rid} --to {spec}`"))
    return n


def benchmark_runs(store_root: str | Path, benchmark_id: str) -> list[str]:
    """The finished runs of a benchmark, oldest first, and the pretrainings they started from (a pretraining
    is shared between benchmarks, so it carries no benchmark id; its fine-tunes name its checkpoint)."""
    from ctssl_core.results.store_api import benchmark_run_configs, finished_of

    rows = benchmark_run_configs(store_root, benchmark_id)
    ids = [r[0] for r in rows]
    inits = set()
    for _, cfg in rows:
        ck = (json.loads(cfg) if isinstance(cfg, str) else (cfg or {})).get("init_checkpoint")
        m = re.match(r"^runs/([^/]+)/", str(ck or ""))
        if m and m.group(1) not in ids:
            inits.add(m.group(1))
    return finished_of(store_root, sorted(inits)) + ids


# ------------------------------------------------------------------ MLflow


def mlflow_uri(where: str) -> str:
    """A tracking URI as given (``file:``, ``http(s):``; ``parse_target`` refuses the others); a plain
    folder as a ``file:`` URI."""
    if _scheme(where) is not None:
        return where
    return Path(where).expanduser().resolve().as_uri()


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the duration of a mirror, then the environment as it was: a tracker
    library reads its settings from there, and ctssl's choices must not leak into the rest of the process."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _file_store_allowed(uri: str):
    """MLflow 3 keeps its folder store in maintenance and refuses it unless MLFLOW_ALLOW_FILE_STORE is set;
    for a ``file:`` target (the local store the user asked for) set it for the duration of the mirror."""
    key = "MLFLOW_ALLOW_FILE_STORE"
    return _environ({key: "true"} if uri.startswith("file:") and key not in os.environ else {})


def _mlflow_key(name: str) -> str:
    """MLflow accepts letters, digits and ``_-. /`` in metric and param names; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", name)


def to_mlflow(rec: RunRecord, where: str) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(where)
    with _file_store_allowed(uri):
        client = MlflowClient(tracking_uri=uri)
        name = f"ctssl-{rec.tags['benchmark_id']}" if rec.tags.get("benchmark_id") else EXPERIMENT
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{rec.run_id}'", max_results=100)
        done = [r for r in found if _mirror_complete(r)]
        if done:
            return f"{rec.run_id}: already in MLflow {uri} (experiment {name}, run {done[0].info.run_id})"
        for stale in found:   # a mirror cut short (process killed): replaced whole, so the target holds one run
            client.delete_run(stale.info.run_id)
        start_ms = int((rec.started or 0) * 1000) or None
        note = (rec.notes + "\n\n" if rec.notes else "") + f"mirrored from ctssl run {rec.run_id}"
        run = client.create_run(exp_id, start_time=start_ms, run_name=rec.name or rec.run_id,
                                tags={**rec.tags, "mlflow.note.content": note, MIRROR_TAG: "incomplete"})
        mid = run.info.run_id
        base = start_ms or 0
        metrics = [Metric(_mlflow_key(k), v, base + int(1000 * (w or 0)), s)
                   for k, pts in rec.series.items() for s, v, w in pts]
        last = max((s for pts in rec.series.values() for s, _, _ in pts), default=0)
        metrics += [Metric(_mlflow_key(k), v, base + int(1000 * (rec.wall_s or 0)), last) for k, v in rec.final.items()]
        params = [Param(_mlflow_key(k), v) for k, v in rec.params.items()]
        for i in range(0, len(metrics), 1000):    # MLflow's batch limits: 1000 metrics, 100 params
            client.log_batch(mid, metrics=metrics[i:i + 1000])
        for i in range(0, len(params), 100):
            client.log_batch(mid, params=params[i:i + 100])
        client.log_batch(mid, tags=[RunTag("ctssl.artifacts", ", ".join(p.name for p in rec.artifacts))])
        for path in rec.artifacts:
            client.log_artifact(mid, str(path))
        status = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}.get(rec.tags.get("status"),
                                                                                           "FINISHED")
        end_ms = base + int(1000 * rec.wall_s) if start_ms and rec.wall_s else None
        client.set_terminated(mid, status=status, end_time=end_ms)
        client.set_tag(mid, MIRROR_TAG, "complete")   # the last write: only now is the mirror whole
    replaced = f"; replaced {len(found)} incomplete mirror(s) of an interrupted `ctssl track`" if found else ""
    return f"{rec.run_id}: mirrored to MLflow {uri} (experiment {name}, run {mid}{replaced})"


def _mirror_complete(run) -> bool:
    """An MLflow run of ours that holds the whole mirror: tagged complete, or (mirrors written before the
    tag existed, whose last write was ``set_terminated``) no tag and no longer RUNNING."""
    tag = run.data.tags.get(MIRROR_TAG)
    return tag == "complete" if tag is not None else run.info.status != "RUNNING"


# ------------------------------------------------------------------ TensorBoard


def to_tensorboard(rec: RunRecord, where: str) -> str:
    from torch.utils.tensorboard import SummaryWriter

    import shutil

    log_dir = Path(where).expanduser() / rec.run_id
    if log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*")):
        return f"{rec.run_id}: already in TensorBoard {log_dir}"
    # written beside the log dir and renamed into place when whole: a mirror cut short (process killed)
    # leaves only this folder, which the next mirror removes, never a partial log dir taken for a done one
    partial = log_dir.parent / f".{rec.run_id}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    start = rec.started or 0.0
    writer = SummaryWriter(log_dir=str(partial))
    try:
        last = 0
        for name, pts in rec.series.items():
            for step, value, wall in pts:
                writer.add_scalar(name, value, step, walltime=start + (wall or 0.0))
                last = max(last, step)
        for name, value in rec.final.items():
            writer.add_scalar(name, value, last, walltime=start + (rec.wall_s or 0.0))
        table = "| param | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in sorted(rec.params.items()))
        writer.add_text("params", table, 0, walltime=start)
        writer.add_text("params_json", json.dumps(rec.params, sort_keys=True), 0, walltime=start)
        writer.add_text("tags", json.dumps({**rec.tags, "name": rec.name}, sort_keys=True), 0, walltime=start)
        if rec.notes:
            writer.add_text("notes", rec.notes, 0, walltime=start)
        if rec.artifacts:
            writer.add_text("artifacts", ", ".join(p.name for p in rec.artifacts), 0, walltime=start)
    finally:
        writer.close()
    if log_dir.is_dir():
        log_dir.rmdir()   # an empty folder (no event files, checked above); anything else in it stops here
    os.replace(partial, log_dir)
    return f"{rec.run_id}: mirrored to TensorBoard {log_dir}"


# ------------------------------------------------------------------ Weights & Biases (offline)


WANDB_PROJECT = "ctssl"      # one W&B project; a benchmark's runs are grouped by its id (W&B's run groups)
_WANDB_TAG_MAX = 64          # W&B refuses a longer tag; the exact tags are also in the config (``ctssl.tags``)


def wandb_runs(where: str | Path, run_id: str) -> list[Path]:
    """The offline W&B runs of ``run_id`` in ``<where>/wandb`` (a folder appears there only once complete)."""
    runs = Path(where).expanduser() / "wandb"
    name = re.compile(r"^offline-run-\d{8}_\d{6}-" + re.escape(run_id) + "$")
    found = runs.glob("offline-run-*") if runs.is_dir() else []
    return sorted(p for p in found if name.match(p.name) and (p / f"run-{run_id}.wandb").is_file())


def _wandb_history(series: dict[str, list[tuple[int, float, float | None]]]) -> list[tuple[int, dict[str, float]]]:
    """The series as W&B history rows, one per step in step order: W&B indexes a run's history by a step
    that only grows, so the series (logged one after another for MLflow and TensorBoard) are merged by step.
    A step a series holds twice keeps its last value."""
    rows: dict[int, dict[str, float]] = {}
    for name, pts in series.items():
        for step, value, _ in pts:
            rows.setdefault(step, {})[name] = value
    return sorted(rows.items())


def to_wandb(rec: RunRecord, where: str) -> str:
    """One offline W&B run (``wandb.init(mode="offline")``): config = the params (plus the exact tags as
    ``ctssl.tags``), history = the metric series at their steps, summary = the test results, run id = the ctssl
    run id, name/notes/tags (``key=value``) and group = the benchmark; the export as a ``model`` artifact.
    Written under a hidden folder and moved into ``<where>/wandb`` when whole (a killed mirror leaves nothing
    that looks finished); the wandb-core service it starts is shut down before returning."""
    import shutil

    out = Path(where).expanduser().resolve()
    done = wandb_runs(out, rec.run_id)
    if done:
        return f"{rec.run_id}: already in W&B (offline) {done[0]}"
    home = out / ".ctssl-wandb"   # wandb's own folders for this target: nothing in the user's home directory
    partial, staging = home / f"{rec.run_id}.partial", home / "staging" / rec.run_id
    shutil.rmtree(partial, ignore_errors=True)   # what a mirror cut short left; it is written whole again
    shutil.rmtree(staging, ignore_errors=True)
    partial.mkdir(parents=True)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",   # no network, no Sentry
           "WANDB_DATA_DIR": str(staging),            # artifact files wait here for `wandb sync` to upload them
           "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_CONFIG_DIR": str(home / "config")}  # the user's global W&B settings (entity, server) are not read
    with _environ(env):
        import wandb
        from wandb.sdk import wandb_setup

        ours = getattr(wandb_setup, "_singleton", None) is None   # W&B not otherwise in use here: stop it after
        settings = wandb.Settings(mode="offline", silent=True, console="off", disable_git=True, save_code=False,
                                  x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                                  x_save_requirements=False)
        tags = sorted({t if len(t) <= _WANDB_TAG_MAX else t[:_WANDB_TAG_MAX - 3] + "..."
                       for t in (f"{k}={v}" for k, v in rec.tags.items())})
        note = (rec.notes + "\n\n" if rec.notes else "") + f"mirrored from ctssl run {rec.run_id}"
        failed = rec.tags.get("status") in ("failed", "cancelled")
        try:
            run = wandb.init(dir=str(partial), project=WANDB_PROJECT, id=rec.run_id, name=rec.name or rec.run_id,
                             notes=note, tags=tags, group=rec.tags.get("benchmark_id"), job_type=rec.tags.get("kind"),
                             config={**rec.params, "ctssl.tags": dict(rec.tags)}, settings=settings,
                             reinit="create_new")
            try:
                for step, row in _wandb_history(rec.series):
                    run.log(row, step=step)
                run.summary.update(rec.final)
                if rec.artifacts:
                    art = wandb.Artifact(f"ctssl-export-{rec.run_id}", type="model",
                                         metadata={RUN_ID_TAG: rec.run_id})
                    for path in rec.artifacts:
                        art.add_file(str(path), name=path.name)
                    run.log_artifact(art)
            finally:
                run.finish(exit_code=1 if failed else 0)   # also when cut short: the run folder stays in partial
            (run_dir,) = (partial / "wandb").glob(f"offline-run-*-{rec.run_id}")
        finally:
            if ours:
                wandb.teardown()   # stops the wandb-core process, so no service outlives the mirror
                for sock in Path(tempfile.gettempdir()).glob(f"wandb-{os.getpid()}-*"):
                    try:
                        sock.rmdir()   # the folder of its socket, which wandb-core leaves behind (empty)
                    except OSError:
                        pass
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    final = out / "wandb" / run_dir.name
    os.replace(run_dir, final)
    shutil.rmtree(partial, ignore_errors=True)
    return f"{rec.run_id}: mirrored to W&B (offline) {final}; upload it with `wandb sync {final}`"


# tracker name -> writer(RunRecord, location) -> message; a new tracker is one entry
TRACKERS: dict[str, Callable[[RunRecord, str], str]] = {"mlflow": to_mlflow, "tensorboard": to_tensorboard,
                                                        "wandb": to_wandb}
