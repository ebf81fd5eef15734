"""Packaging: `ctssl --version`, and pyproject's dependencies match what ctssl_core imports and what is locked.

Why: a pyproject without dependencies installs nothing with `pip install .`; a
declared set that drifts from the code (an import nobody declared, an optional
package imported at module level) breaks installs far from the cause. These
tests read the real pyproject (tomllib), the real sources (ast) and the real
import-name -> distribution map of the installed environment.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import ctssl_core
from ctssl_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Imports that may come from an extra only (import name -> extra). They must be imported lazily
# (inside a function) so that the default install imports every ctssl_core module.
OPTIONAL = {"umap": "umap", "mlflow": "trackers", "wandb": "trackers", "ray": "ray", "submitit": "slurm"}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(reqs: list[str]) -> set[str]:
    return {norm(Requirement(r).name) for r in reqs} - {"ctssl"}


@functools.cache
def third_party_imports() -> dict[str, list[tuple[str, bool]]]:
    """import name -> [(file, imported at module level?)] for every non-stdlib, non-ctssl import in ctssl_core."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted((ROOT / "ctssl_core").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "ctssl_core" or top == "__future__":
                    continue
                found.setdefault(top, []).append((str(path.relative_to(ROOT)), id(node) in top_level))
    return found


@functools.cache
def import_map() -> dict[str, list[str]]:
    return packages_distributions()


def dists_of(import_name: str) -> set[str]:
    dists = import_map().get(import_name)
    assert dists, f"ctssl_core imports {import_name!r}, which no installed distribution provides"
    return {norm(d) for d in dists}


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"ctssl {ctssl_core.__version__}\n"
    Version(ctssl_core.__version__)   # a valid PEP 440 version, or this raises


def test_pyproject_takes_its_version_from_the_package_and_ctssl_runs_the_cli():
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ctssl_core.__version__"}
    assert PROJECT["scripts"]["ctssl"] == "ctssl_core.cli:main"


def test_default_dependencies_cover_every_third_party_import_in_ctssl_core():
    default = declared(PROJECT["dependencies"])
    imports = third_party_imports()
    assert {"torch", "numpy", "pydicom"} <= set(imports)   # the scan sees the real imports
    missing = {name: sorted({f for f, _ in where}) for name, where in imports.items()
               if name not in OPTIONAL and not dists_of(name) & default}
    assert not missing, f"imported by ctssl_core but not in pyproject dependencies: {missing}"
    used = set().union(*(dists_of(name) for name in imports))
    assert not default - used, f"declared but never imported by ctssl_core: {sorted(default - used)}"


def test_optional_imports_come_from_their_extra_and_are_imported_lazily():
    extras = PROJECT["optional-dependencies"]
    imports = third_party_imports()
    for name, extra in OPTIONAL.items():
        assert name in imports, f"{name} is listed as optional but ctssl_core no longer imports it; drop it from OPTIONAL"
        assert dists_of(name) & declared(extras[extra]), f"{name} is not in the {extra!r} extra"
        assert not dists_of(name) & declared(PROJECT["dependencies"]), f"{name} should stay out of the default set"
        eager = [f for f, at_top in imports[name] if at_top]
        assert not eager, f"{name} is imported at module level in {eager}; import it inside the function that needs it"


def test_gpl_decoder_is_only_in_the_jpeg_extra():
    extras = PROJECT["optional-dependencies"]
    assert "pylibjpeg-libjpeg" in declared(extras["jpeg"])
    assert "pylibjpeg-libjpeg" not in declared(PROJECT["dependencies"])
    assert PROJECT["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_requirements_lock_pins_every_declared_dependency_inside_its_range():
    pins = {}
    for f in ("requirements.txt", "requirements-test.txt"):
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                r = Requirement(line)
                (spec,) = r.specifier
                assert spec.operator == "==", f"{f}: {line} is not an exact pin"
                pins[norm(r.name)] = spec.version
    reqs = list(PROJECT["dependencies"]) + [r for rs in PROJECT["optional-dependencies"].values() for r in rs]
    for text in reqs:
        r = Requirement(text)
        if norm(r.name) == "ctssl":
            continue
        assert norm(r.name) in pins, f"{r.name} is declared in pyproject but not pinned in requirements*.txt"
        assert r.specifier.contains(pins[norm(r.name)], prereleases=True), \
            f"requirements pin {r.name}=={pins[norm(r.name)]} is outside pyproject's range {r.specifier}"


def test_without_the_umap_extra_projection_says_what_to_install(monkeypatch):
    """umap-learn is optional: a missing one is a clear EmbedError (compute_projections then keeps PCA)."""
    import numpy as np

    from ctssl_core.embed import EmbedError, project_umap

    monkeypatch.setitem(sys.modules, "umap", None)   # `import umap` now raises ImportError, as if not installed
    E = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    with pytest.raises(EmbedError, match=r"pip install 'ctssl\[umap\]'.*--no-umap"):
        project_umap(E, pca_dims=4, n_neighbors=3)


def test_an_installed_package_keeps_its_data_in_the_users_data_folder_never_site_packages(monkeypatch, tmp_path):
    """Issue 17: data/ beside the installed package would be inside site-packages. A checkout keeps
    data/ (the README's make demo), an install uses the platform's user data folder, CTSSL_DATA wins."""
    from ctssl_core import paths

    site = tmp_path / "venv" / "lib" / "python3.12" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(paths, "REPO_ROOT", site)
    monkeypatch.delenv("CTSSL_DATA", raising=False)
    monkeypatch.delenv("CTSSL_STORE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(paths.sys, "platform", "linux")
    assert paths.data_root() == tmp_path / "xdg" / "ctssl"
    assert paths.default_store() == tmp_path / "xdg" / "ctssl" / "store"
    (site / "pyproject.toml").write_text("")           # even a stray pyproject in site-packages is not a checkout
    assert paths.data_root() == tmp_path / "xdg" / "ctssl"
    monkeypatch.setattr(paths.sys, "platform", "darwin")
    monkeypatch.setattr(paths.Path, "home", lambda: tmp_path / "home")
    assert paths.data_root() == tmp_path / "home" / "Library" / "Application Support" / "ctssl"
    checkout = tmp_path / "clone"
    (checkout / "ctssl_core").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\n")
    monkeypatch.setattr(paths, "REPO_ROOT", checkout)
    assert paths.data_root() == checkout / "data"
    monkeypatch.setenv("CTSSL_DATA", str(tmp_path / "mine"))
    assert paths.data_root() == tmp_path / "mine"
