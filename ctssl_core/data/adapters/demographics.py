"""Demographics CSV -> patient attributes in the catalog (values override DICOM tags).

The CSV is keyed by ``PatientID`` or ``StudyInstanceUID`` (header names are matched
case-insensitively) and may carry ``age``, ``sex``, ``race`` and any extra column
the user wants analysed (stored in ``patients.attributes``; ``site`` also fills
``series.site``). Keys are pseudonymised with the store's key before they are
compared with the catalog, so raw identifiers never reach the store. Rows that
match no ingested patient are reported by CSV line number, never by key.

Only attributes are stored: a column that looks like an identifier (by its name, or by
holding a different text value for every patient) is dropped with a warning that names
the column, never its values. Exported hospital tables routinely carry a name, birth
date or MRN beside the attributes, and the catalog must never hold them.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

PATIENT_KEYS = ("patientid", "patient_id")
STUDY_KEYS = ("studyinstanceuid", "study_instance_uid", "study_uid")
CORE = ("age", "sex", "race")
# a column whose name (lower case, letters and digits only) contains one of these is an identifier
IDENTIFIER_WORDS = ("name", "birth", "dob", "mrn", "accession", "address", "street", "zip", "postcode", "postal",
                    "phone", "mobile", "fax", "email", "ssn", "socialsecurity", "insurance", "passport", "licen",
                    "medicalrecord", "recordnumber", "instanceuid", "seriesuid", "studyuid", "sopuid", "date",
                    "initials", "contact")
UNIQUE_MIN_KEYS = 10  # a text column unique per patient is an identifier once more than this many patients have it


class IdentifierColumnsDropped(UserWarning):
    """Demographics columns that look like identifiers were not stored."""


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def identifier_columns(header: list[str], rows: list[tuple[int, str, dict]]) -> dict[str, str]:
    """{column: why} for the columns of ``rows`` (as ``read_csv`` parses them) that look like identifiers.

    By name (``IDENTIFIER_WORDS``), or by content: a text (non-numeric) column in which every value
    belongs to exactly one row key, over more than ``UNIQUE_MIN_KEYS`` keys (a name or an MRN
    under an innocent header). Numeric columns (age, weight) may legitimately be unique.
    """
    out: dict[str, str] = {}
    for col in header:
        flat = re.sub(r"[^a-z0-9]", "", col.lower())
        word = next((w for w in IDENTIFIER_WORDS if w in flat), None)
        if word is not None:
            out[col] = f"its name contains {word!r}"
    owners: dict[str, dict[str, set[str]]] = {}
    for _, raw, vals in rows:
        for col, v in vals.items():
            owners.setdefault(col, {}).setdefault(v, set()).add(raw)
    for col, by_value in owners.items():
        if col in out or all(_is_number(v) for v in by_value):
            continue
        keys = set().union(*by_value.values())
        if len(keys) > UNIQUE_MIN_KEYS and all(len(k) == 1 for k in by_value.values()):
            out[col] = f"a different text value for each of its {len(keys)} patients"
    return out


def _norm_sex(v: str) -> str | None:
    v = v.strip().upper()
    return {"F": "F", "FEMALE": "F", "W": "F", "M": "M", "MALE": "M"}.get(v)


def read_csv(path: str | Path) -> tuple[str, list[tuple[int, str, dict]], dict[str, str]]:
    """('patient'|'study', [(line number, raw key, {column: value})], {dropped column: why}).

    Blank cells are dropped, and so are identifier-like columns (``identifier_columns``)."""
    from ctssl_core.config import ConfigError

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise ConfigError(f"{path} is empty; expected a header like PatientID,age,sex,race")
        low = [h.strip().lower() for h in header]
        kind, key_i = None, None
        for i, h in enumerate(low):
            if h in PATIENT_KEYS:
                kind, key_i = "patient", i
                break
            if h in STUDY_KEYS:
                kind, key_i = "study", i
        if kind is None:
            raise ConfigError(f"{path}: no PatientID or StudyInstanceUID column (header: {', '.join(header)}); "
                              f"add one so rows can be matched to the DICOM")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or key_i >= len(row) or not row[key_i].strip():
                continue
            vals = {}
            for i, h in enumerate(low):
                if i == key_i or i >= len(row) or not row[i].strip() or h in PATIENT_KEYS + STUDY_KEYS:
                    continue
                vals[h if h in CORE else header[i].strip()] = row[i].strip()
            rows.append((line, row[key_i].strip(), vals))
    names = [h if h in CORE else header[i].strip() for i, h in enumerate(low)
             if i != key_i and h not in PATIENT_KEYS + STUDY_KEYS]
    dropped = identifier_columns(names, rows)
    if dropped:
        rows = [(line, raw, {k: v for k, v in vals.items() if k not in dropped}) for line, raw, vals in rows]
    return kind, rows, dropped


def apply_demographics(db, csv_path: str | Path, key, summary=None) -> dict:
    """Update ``patients`` (and ``series.site``) from the CSV. Returns a report dict (also put on ``summary``)."""
    from ctssl_core.config import ConfigError
    from ctssl_core.data.catalog import demographic_state, update_demographics

    kind, rows, dropped = read_csv(csv_path)
    if dropped:
        warnings.warn(dropped_message(csv_path, dropped), IdentifierColumnsDropped, stacklevel=2)
    patients, study_patient = demographic_state(db)
    updates: dict[str, list] = {}
    site_rows = []
    unmatched = []
    for line, raw, vals in rows:
        if kind == "patient":
            pk = key("patient", raw)
            sk = None
        else:
            sk = key("study", raw)
            pk = study_patient.get(sk)
        if pk is None or pk not in patients:
            unmatched.append(line)
            continue
        age, sex, race, attrs = updates.get(pk) or list(patients[pk])
        attrs = json.loads(attrs) if isinstance(attrs, str) and attrs else (attrs or {})
        if "age" in vals:
            try:
                age = float(vals["age"])
            except ValueError:
                raise ConfigError(f"{csv_path} line {line}: age {vals['age']!r} is not a number (years)") from None
        if "sex" in vals:
            sex = _norm_sex(vals["sex"])
        if "race" in vals:
            race = vals["race"]
        for k, v in vals.items():
            if k not in CORE:
                attrs[k] = v
        updates[pk] = [age, sex, race, attrs]
        if "site" in vals:
            site_rows.append((sk, pk, vals["site"]))
    update_demographics(db, updates, site_rows)
    report = {"rows": len(rows), "matched": len(updates), "unmatched_lines": unmatched,
              "patients_without_row": len(set(patients) - set(updates)), "dropped_columns": sorted(dropped)}
    if summary is not None:
        summary.demographics_dropped_columns = sorted(dropped)
        summary.demographics_rows = len(rows)
        summary.demographics_unmatched_lines = unmatched
        summary.patients_without_demographics = report["patients_without_row"]
    return report


def dropped_message(csv_path, dropped: dict[str, str]) -> str:
    """The warning for dropped columns: names and reasons, never a value."""
    why = "; ".join(f"{c!r}: {r}" for c, r in sorted(dropped.items()))
    return (f"{csv_path}: columns not stored, as they look like patient identifiers: {why}. Only attributes "
            f"are kept; rename a column that really is an attribute.")
