"""Where things live on disk. Pure path arithmetic: nothing is created at import time.

Layout of a store (see data/README.md)::

    <store>/ctssl.duckdb          catalog + results + jobs (one file)
    <store>/slices/<series>.npy   int16 HU, (S, H, W), memory-mappable
    <store>/masks/<series>.npy    uint8 nodule consensus mask, (S, H, W)
    <store>/runs/<run_id>/        config.json, metrics.jsonl, log.txt, checkpoints/
    <store>/embeddings/           <emb_id>.npy vectors + <emb_id>.parquet row keys
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _is_checkout(root: Path) -> bool:
    """Is ctssl_core running from a source checkout (a clone, or ``pip install -e``)? An installed wheel
    lives in site-packages, next to every other package: no pyproject.toml beside it."""
    return (root / "pyproject.toml").is_file() and not {"site-packages", "dist-packages"} & set(root.parts)


def user_data_dir(app: str = "ctssl") -> Path:
    """The platform's per-user data folder (the XDG base directory on Linux, Application Support on
    macOS, LOCALAPPDATA on Windows): where an installed ctssl keeps cohorts and its store."""
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / app
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / app
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / app


def data_root() -> Path:
    """Where synthetic cohorts and the default store live: ``CTSSL_DATA`` when set; else ``data/`` of
    the checkout (what the README's ``make demo`` uses); else, for an installed package, the user's data
    folder, never site-packages (read-only for many users, and wiped by an upgrade)."""
    if os.environ.get("CTSSL_DATA"):
        return Path(os.environ["CTSSL_DATA"])
    return REPO_ROOT / "data" if _is_checkout(REPO_ROOT) else user_data_dir()


def default_store() -> Path:
    """The store the main job writes and the dashboard reads unless told otherwise."""
    return Path(os.environ.get("CTSSL_STORE", data_root() / "store"))


def default_cohort(name: str = "synthetic") -> Path:
    return data_root() / "cohorts" / name


@dataclass(frozen=True)
class StorePaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "ctssl.duckdb"

    @property
    def slices(self) -> Path:
        return self.root / "slices"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def secret(self) -> Path:
        """Per-store key for pseudonymisation (HMAC). Never leaves the store folder."""
        return self.root / ".pseudonym_key"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id


def in_store(path: str | Path, root: str | Path) -> str:
    """``path`` as recorded in configs, cards and results: relative to the store root (posix) when it
    lies inside it, else the file name only -- never an absolute path, which names the user's folders
    and cannot follow a store that is moved or shared."""
    p, r = Path(path).resolve(), Path(root).resolve()
    try:
        return p.relative_to(r).as_posix()
    except ValueError:
        return p.name


def scrub_paths(obj, root: str | Path):
    """``obj`` (JSON-like: dicts, lists, strings) with every absolute path string made ``in_store``:
    for what leaves the machine (export cards), whatever an older run recorded."""
    if isinstance(obj, dict):
        return {k: scrub_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_paths(v, root) for v in obj]
    if isinstance(obj, str) and Path(obj).is_absolute():
        return in_store(obj, root)
    return obj


def store_paths(root: str | Path | None = None) -> StorePaths:
    return StorePaths(Path(root) if root is not None else default_store())
