"""Keyed pseudonyms for patients, studies, series and SOP instances.

Why keyed (HMAC) rather than a plain hash: UIDs and PatientIDs are short and
guessable, so an unkeyed SHA-256 could be reversed by hashing candidates. The
key is a random per-store secret at ``StorePaths.secret``; it never leaves the
store folder, so the same PatientID maps to the same key within one store (re-
ingest is idempotent) and to unrelated keys across stores.

The one exception is the synthetic cohort's key (``create_secret``), derived from a
public config so benchmarks reproduce across machines. Anyone can recompute it, so it
is marked by a ``<secret>.synthetic`` file beside it, and ingest refuses real data into
a store that holds it (``is_synthetic_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32
KEY_HEX = 16  # hex characters kept: 64 bits, collisions negligible below ~10^8 items


def load_or_create_secret(path: str | Path) -> bytes:
    """Read the store's secret, creating it (mode 0600) on first use."""
    path = Path(path)
    if path.exists():
        key = path.read_bytes()
        if len(key) < 16:
            from ctssl_core.db import StoreError

            raise StoreError(f"pseudonym key {path} is damaged ({len(key)} bytes). Restore it from a backup, "
                             f"or start a new store (keys would no longer match the catalog).")
        return key
    key = secrets.token_bytes(KEY_BYTES)
    synthetic_marker(path).unlink(missing_ok=True)  # a marker left beside a deleted key describes no random key
    _write_secret(path, key)
    return key


def synthetic_marker(secret_path: str | Path) -> Path:
    """The file beside the secret that says it is the (public, recomputable) synthetic-cohort key."""
    secret_path = Path(secret_path)
    return secret_path.with_name(secret_path.name + ".synthetic")


def is_synthetic_key(secret_path: str | Path) -> bool:
    """True when the store's secret is the synthetic-cohort key that anyone can recompute."""
    return Path(secret_path).exists() and synthetic_marker(secret_path).exists()


def _write_secret(path: Path, key: bytes) -> None:
    """Create ``path`` holding ``key``, owner-only (0600); never overwrites an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)


def create_secret(path: str | Path, key: bytes) -> bool:
    """Write ``key`` as the store's secret unless one exists (mode 0600); True if written.

    Only for data with no real identities (the synthetic cohort): a key derived
    from the cohort's config gives the same pseudonyms, hence the same seeded
    patient splits, in every store built from that cohort, so a benchmark is
    reproducible across machines. Real data keeps the random per-store key.

    The key is marked synthetic (``synthetic_marker``) before it is written, so no crash can
    leave a recomputable key unmarked; ingest then refuses real data into this store.
    """
    path = Path(path)
    if len(key) < 16:
        raise ValueError("a pseudonym key needs at least 16 bytes")
    if path.exists():
        return False
    marker = synthetic_marker(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("this store's pseudonym key is derived from the public synthetic-cohort config; "
                      "ctssl ingest refuses real data into it\n")
    try:
        _write_secret(path, key)
    except FileExistsError:  # another process created a (random) key meanwhile: it is not ours to mark
        marker.unlink(missing_ok=True)
        return False
    return True


class Pseudonymiser:
    """``p(kind, value) -> hex[:16]``. ``kind`` separates namespaces (a SOP UID never collides with a series UID)."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def __call__(self, kind: str, value: str) -> str:
        msg = f"{kind}\x00{value.strip()}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:KEY_HEX]

    @classmethod
    def for_store(cls, secret_path: str | Path) -> "Pseudonymiser":
        return cls(load_or_create_secret(secret_path))
