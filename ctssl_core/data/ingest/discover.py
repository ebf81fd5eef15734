"""Before any header is read: which files an ingest folder holds, which label sidecars sit beside
them, which files are new since the last run, and under what key the catalog names each file.

Why its own module: this is the part that touches the folder tree (walk, stat) and decides what
the later stages see; it reads no DICOM and writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ctssl_core.config import ConfigError
from ctssl_core.data.dicom import REASONS, is_transient
from ctssl_core.data.ingest.config import IngestConfig

SIDECAR_SUFFIXES = {".csv", ".xml", ".json", ".md", ".yaml", ".yml", ".npz", ".npy"}


def find_files(root: Path, xml_out: list | None = None) -> list[Path]:
    """Every candidate file under ``root`` (any name, with or without .dcm), sidecars and hidden files excluded.

    XML files met on the way (LIDC reads may sit beside each case's DICOM) are appended to
    ``xml_out`` so the tree is walked once.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if xml_out is not None and os.path.basename(dirpath) == "lidc_xml":
            xml_out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if n.lower().endswith(".xml"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            ext = os.path.splitext(name)[1].lower()
            if name.startswith(".") or ext in SIDECAR_SUFFIXES:
                if ext == ".xml" and xml_out is not None and os.path.basename(dirpath) != "lidc_xml":
                    xml_out.append(os.path.join(dirpath, name))
                continue
            if "lidc_xml" in os.path.relpath(dirpath, root).split(os.sep):
                continue
            out.append(os.path.join(dirpath, name))
    return [Path(p) for p in out] if len(out) < 10_000 else out  # strings for big trees (pathlib is slow)


def detect_sidecars(root: Path, cfg: IngestConfig, xmls: list | None = None) -> dict[str, Any]:
    """Label files in ``root``: train.csv (RSNA-PE), XML reads (LIDC; found by ``find_files``), demographics.csv."""
    found: dict[str, Any] = {}
    csv = root / "train.csv"
    if cfg.format == "rsna-pe" and not csv.exists():
        raise ConfigError(f"--format rsna-pe needs {csv} (the competition's train.csv); put it beside the train/ folder")
    if csv.exists() and cfg.format in ("auto", "rsna-pe"):
        found["rsna_csv"] = csv
    if xmls is None:
        xmls = []
        find_files(root, xmls)
    if cfg.format == "lidc" and not xmls:
        raise ConfigError(f"--format lidc found no XML reads under {root} (expected lidc_xml/*.xml or *.xml)")
    if xmls and cfg.format in ("auto", "lidc"):
        found["lidc_xml"] = sorted(xmls)
    demo = Path(cfg.demographics) if cfg.demographics else root / "demographics.csv"
    if cfg.demographics and not demo.exists():
        raise ConfigError(f"--demographics {demo}: file not found")
    if demo.exists():
        found["demographics"] = demo
    return found


def is_synthetic_cohort(root: Path) -> bool:
    """True for a folder written by ``ctssl synth`` (its marker, truth and completion manifest)."""
    from ctssl_core.data.synth import MARKER

    return all((Path(root) / n).is_file() for n in (MARKER, "truth.json", "manifest.json"))


def check_key_fits_data(root: Path, store_root) -> None:
    """Refuse data that is not a synthetic cohort into a store whose pseudonym key is the synthetic one.

    That key is derived from a public cohort config (``pseudonym.create_secret``, written by
    ``ctssl benchmark``): real PatientIDs hashed with it could be recovered by anyone.
    """
    from ctssl_core.data.pseudonym import is_synthetic_key
    from ctssl_core.paths import store_paths

    paths = store_paths(store_root)
    if is_synthetic_key(paths.secret) and not is_synthetic_cohort(root):
        raise ConfigError(f"the store at {paths.root} uses the synthetic cohort's pseudonym key (derived from its "
                          f"public config, so anyone could recompute it), and {root} is not a `ctssl synth` cohort; "
                          f"ingest real data into a fresh store (--store NEW_FOLDER), which gets a random key")


def _stat_files(files) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[str, str, str]]]:
    """(path -> (size, mtime), path -> error row) for every candidate file.

    A broken symlink or a file that vanished cannot be stat'ed, and a named pipe or device is
    not a file at all (opening a pipe blocks forever): both become ``not_dicom`` rows instead
    of stopping the ingest.
    """
    import stat as stat_mod

    stat: dict[str, tuple[int, float]] = {}
    odd: dict[str, tuple[str, str, str]] = {}
    for f in map(str, files):
        try:
            st = os.stat(f)
        except OSError as e:
            stat[f] = (0, 0.0)
            reason = "transient" if is_transient(e) else "not_dicom"  # a permission fixed later: retried
            odd[f] = (f, reason, f"cannot read the file ({e.strerror}). " + REASONS[reason])
            continue
        stat[f] = (st.st_size, st.st_mtime)
        if not stat_mod.S_ISREG(st.st_mode):
            odd[f] = (f, "not_dicom", "not a regular file (a pipe, socket or device). " + REASONS["not_dicom"])
    return stat, odd


def _new_files(stat: dict[str, tuple[int, float]], done: dict[str, tuple[int, float]], keyed) -> list[str]:
    """Files (in ``stat``'s order) not ingested before with the same size and mtime.

    ``keyed(path)`` is the file's catalog key; it is an HMAC, so it is only computed when
    the store has ingested files at all.
    """
    if not done:
        return list(stat)
    todo = []
    for f, (size, mtime) in stat.items():
        prev = done.get(keyed(f))
        if prev is None or prev[0] != size or abs(prev[1] - mtime) >= 1e-3:
            todo.append(f)
    return todo


def path_key(key, rel: str) -> str:
    """Catalog key of a file: keyed hash of its path relative to the ingest root.

    Why not the path itself: exports name folders and files after patients and UIDs
    (RSNA: train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm), and nothing identifying may be stored.
    ``ctssl ingest DIR --list-errors`` maps the keys back to paths on the user's own terminal.
    """
    return key("path", rel.replace(os.sep, "/"))
