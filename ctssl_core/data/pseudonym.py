"""Keyed pseudonyms for patients, studies, series and SOP instances.

Why keyed (HMAC) rather than a plain hash: UIDs and PatientIDs are short and
guessable, so an unkeyed SHA-256 could be reversed by hashing candidates. The
key is a random per-store secret at ``StorePaths.secret``; it never leaves the
store folder, so the same PatientID maps to the same key within one store (re-
ingest is idempotent) and to unrelated keys across stores.
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
    _write_secret(path, key)
    return key


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
    """
    path = Path(path)
    if len(key) < 16:
        raise ValueError("a pseudonym key needs at least 16 bytes")
    if path.exists():
        return False
    _write_secret(path, key)
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
