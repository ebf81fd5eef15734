"""Frozen dataclass configs, YAML profiles and `key=value` overrides.

Every module owns the dataclass for its own knobs (``SynthConfig`` in
``data/synth.py``, ``TrainConfig`` in ``train.py`` ...). This module only knows
how to fill any such dataclass from a mapping, strictly: an unknown key is an
error that names the close matches, because a silently ignored typo in an
experiment config wastes a GPU-day.

Profiles live in ``experiments/profiles/<name>.yaml`` with one top-level
section per module (``synth``, ``ingest``, ``pretrain``, ``downstream``,
``embed``, ``benchmark``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

PROFILE_DIR = Path(__file__).resolve().parent.parent / "experiments" / "profiles"


class ConfigError(ValueError):
    """A config problem the user can fix; the message says how."""


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load a profile by name (``smoke``/``quick``/``paper``) or by YAML path."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(
            f"unknown profile {str(name_or_path)!r}: choose one of {profile_names()} "
            f"or pass the path of a YAML file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data.setdefault("profile", path.stem)
    return data


def _coerce_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (1 -> int, 1e-3 -> float, true -> bool)."""
    import yaml

    for number in (int, float):  # YAML 1.1 reads "3e-4" as a string; users mean a number
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - a value YAML can't parse is a plain string
        return text


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "task=rotation"]`` -> nested dict ``{"train": {"lr": 0.001}, "task": "rotation"}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lr=1e-3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = _coerce_scalar(value)
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or value is None:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return build(tp, value, where=where)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            try:
                return _convert(a, value, where)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{where}: cannot use {value!r} as {tp}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, typing.Iterable):
            value = [value]
        inner = args[0] if args else Any
        items = [_convert(inner, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is str:
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    return value


def build(cls: type[T], mapping: Mapping[str, Any] | None = None, overrides: typing.Iterable[str] = (), where: str = "") -> T:
    """Fill dataclass ``cls`` from ``mapping`` (+ ``key=value`` overrides), strictly.

    Unknown keys raise :class:`ConfigError` naming the valid ones and the closest match.
    """
    data = merge(mapping or {}, parse_overrides(overrides))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {where + key!r} for {cls.__name__}.{hint} "
                f"Valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(hints[key], value, where + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def config_hash(obj: Any, n: int = 8) -> str:
    """A short stable hash of a JSON-able config (sorted keys): the identity of a benchmark, a unit, a cohort."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# --------------------------------------------------------------------------- the CLI's `--set` grammar

# profile section -> the commands that read it (for the error that sends a key to the right command)
SECTION_READERS: dict[str, tuple[str, ...]] = {
    "synth": ("synth", "benchmark"),
    "ingest": ("ingest", "benchmark"),
    "pretrain": ("pretrain", "benchmark"),
    "downstream": ("finetune", "benchmark"),
    "embed": ("embed", "benchmark"),
    "bias": ("bias", "benchmark"),
    "benchmark": ("benchmark",),
}


def _split_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like section.key=value (e.g. --set pretrain.train.steps=5)")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key part; write section.key=value (e.g. --set embed.split=test)")
    return parts, value


def profile_overrides(items: typing.Iterable[str], command: str, own: str,
                      reads: typing.Iterable[str] | None = None) -> list[str]:
    """``--set`` items as full profile paths (``section.key...=value``), checked against what ``command`` reads.

    One grammar for every command: ``--set section.key=value`` is a path in the profile
    (``pretrain.train.steps=5``, ``embed.split=test``). A path that does not start with a section
    name is read relative to the command's own section ``own`` (``ctssl synth --set n_patients=8``
    is ``synth.n_patients=8``), the short form the commands always took. A section name without a
    key (``bias=false``) is refused: it could be that section or a key named like it
    (``benchmark.bias``). ``reads`` lists the sections (or ``section.key`` prefixes) the command
    uses (default: ``own``); a path outside them would be silently ignored, so it is an error that
    names the commands that do read it.
    """
    allowed = tuple(reads) if reads is not None else (own,)
    out = []
    for item in items:
        parts, value = _split_override(item)
        if parts[0] not in SECTION_READERS:
            parts = [own, *parts]
        elif len(parts) == 1:
            raise ConfigError(f"--set {item!r}: {parts[0]!r} is a whole profile section; set one key of it "
                              f"({parts[0]}.KEY=VALUE), or write {own}.{parts[0]}=... for the key of that name")
        path = ".".join(parts)
        if not any(path == a or path.startswith(a + ".") for a in allowed):
            section = parts[0]
            users = " or ".join(f"`ctssl {c}`" for c in SECTION_READERS[section])
            raise ConfigError(f"--set {item!r}: key of the {section!r} section, which `ctssl {command}` does not read "
                              f"(it reads {', '.join(a + '.*' if a in SECTION_READERS else a for a in allowed)}); "
                              f"pass it to {users}")
        out.append(f"{path}={value}")
    return out


def spec_overrides(items: typing.Iterable[str], command: str, section: str) -> list[str]:
    """``--set`` items for a command whose keys are not a profile section's (a job kind's spec fields:
    ``ctssl jobs submit finetune --set finetune.fraction=0.05``): ``section.KEY=VALUE`` or the short
    ``KEY=VALUE``, returned relative to ``section``. A key of a profile section is refused: it would
    be read as a field of the same name, or not at all."""
    out = []
    for item in items:
        parts, value = _split_override(item)
        if parts[0] == section and len(parts) > 1:
            parts = parts[1:]
        elif parts[0] in SECTION_READERS and len(parts) > 1:
            raise ConfigError(f"--set {item!r}: `ctssl {command}` takes the fields of a {section} job "
                              f"({section}.FIELD=VALUE or FIELD=VALUE; `ctssl jobs kinds` lists them), "
                              f"not keys of the {parts[0]!r} profile section")
        out.append(f"{'.'.join(parts)}={value}")
    return out


def section_overrides(items: typing.Iterable[str], command: str, section: str) -> list[str]:
    """``--set`` items for a command that builds one section: checked as in :func:`profile_overrides`,
    returned relative to ``section`` (``embed.split=test`` and ``split=test`` both give ``split=test``)."""
    n = len(section) + 1
    return [p[n:] for p in profile_overrides(items, command, section)]
