"""Shared fixtures. Owned by the lead: ask for a fixture rather than editing this file.

``tiny_cohort``: a synthetic cohort (synth TINY preset) written as DICOM once per session.
``tiny_store``:  that cohort ingested into a store at 64² once per session. Read-only by
                 convention: tests that write to a store use ``store_copy``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# One Chromium per session for every browser test module: a session fixture imported into two
# modules separately would be two fixtures, and Playwright refuses a second sync instance.
from browser_harness import browser, page  # noqa: E402,F401

os.environ.setdefault("OMP_NUM_THREADS", "2")

# The checkout's data/ folder is the user's (their cohorts, their store): the suite writes its cohorts
# (a benchmark generates its synthetic cohort under CTSSL_DATA) to a folder of its own, removed at the end.
_OWN_DATA = None if "CTSSL_DATA" in os.environ else tempfile.mkdtemp(prefix="ctssl-test-data-")
if _OWN_DATA:
    os.environ["CTSSL_DATA"] = _OWN_DATA


def pytest_sessionfinish(session, exitstatus):
    if _OWN_DATA:
        shutil.rmtree(_OWN_DATA, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    from ctssl_core.data.synth import TINY, generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(TINY, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_store(tiny_cohort, tmp_path_factory):
    from ctssl_core.data.ingest import IngestConfig, ingest
    from ctssl_core.data.pseudonym import create_secret
    from ctssl_core.paths import store_paths

    root = tmp_path_factory.mktemp("tiny_store")
    # A fixed pseudonym key (instead of a random one per store) keeps the patient keys, and so the
    # seeded splits and everything trained on them, identical from one test session to the next.
    create_secret(store_paths(root).secret, b"ctssl-tests-fixed-pseudonym-key!")
    ingest(tiny_cohort, root, IngestConfig(size=64, workers=1), progress=False)
    return root


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    """A private, writable copy of ``tiny_store``."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """A store built by the REAL smoke benchmark (synth -> ingest -> pretrain -> fine-tune -> embed -> bias),
    once per session (~40 s on 2 cores). Read-only by convention: pages and queries must work on what the
    production writers produce, not only on ``results/seed.py``'s imitation of it."""
    from ctssl_core.benchmark import run_benchmark

    root = tmp_path_factory.mktemp("smoke_store")
    run_benchmark("smoke", store_root=root, progress=False, log=lambda m: None)
    return root


@pytest.fixture(scope="session")
def two_benchmark_store(smoke_store, tmp_path_factory):
    """``smoke_store`` plus a second smoke benchmark with another override (``downstream.n_boot=20``):
    a store holding two benchmarks, as a user gets after re-running with different settings."""
    from ctssl_core.benchmark import run_benchmark

    root = tmp_path_factory.mktemp("two_benchmarks") / "store"
    shutil.copytree(smoke_store, root)
    run_benchmark("smoke", store_root=root, overrides=["downstream.n_boot=20"], progress=False, log=lambda m: None)
    return root


@pytest.fixture(scope="session")
def attributes_store(smoke_store, tmp_path_factory):
    """A copy of ``smoke_store`` (without run folders and checkpoints) after a user's demographics CSV brought
    extra columns, applied by ingest's own writer (``apply_demographics``): ``bmi`` (fractional numbers),
    ``scanner_code`` (whole-number codes 1-3), and ``sex`` "not recorded" for everyone (stored as unknown, so
    the attribute is empty). Read-only by convention."""
    import pandas as pd

    from ctssl_core.plan import make_plan
    from ctssl_core.data.adapters.demographics import apply_demographics
    from ctssl_core.data.pseudonym import Pseudonymiser
    from ctssl_core.paths import store_paths

    root = tmp_path_factory.mktemp("attributes") / "store"
    shutil.copytree(smoke_store, root, ignore=shutil.ignore_patterns("runs", "*.pt"))
    key = Pseudonymiser.for_store(store_paths(root).secret)
    ids = pd.read_csv(make_plan("smoke").cohort / "demographics.csv").PatientID.astype(str)
    extra = pd.DataFrame({"PatientID": ids, "bmi": [f"{18.5 + 0.37 * i:.2f}" for i in range(len(ids))],
                          "scanner_code": [str(i % 3 + 1) for i in range(len(ids))],
                          "sex": "not recorded"})
    extra.to_csv(root / "extra_demographics.csv", index=False)
    apply_demographics(store_paths(root).db, root / "extra_demographics.csv", key)
    return root
