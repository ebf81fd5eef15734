"""The rules docs/ARCHITECTURE.md states about imports, checked rather than hoped for:
the library never imports streamlit, and what the dashboard pages import does not load torch
(a page must open in a second, and the dashboard process must not hold a CUDA context)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path``, at any depth (lazy imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_library_never_imports_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "ctssl_core").rglob("*.py"))
                 if any(m == "streamlit" or m.startswith("streamlit.") for m in _imports(p))]
    assert offenders == []


def test_what_the_pages_import_does_not_load_torch():
    page_files = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]
    top_level = set()
    for p in page_files:                                    # only module-level imports run when a page loads
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module == "ctssl_core":
                top_level |= {f"ctssl_core.{a.name}" for a in node.names}      # from ctssl_core import charts
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctssl_core"):
                top_level.add(node.module)
            elif isinstance(node, ast.Import):
                top_level |= {a.name for a in node.names if a.name.startswith("ctssl_core")}
    assert {"ctssl_core.results.read", "ctssl_core.charts"} <= top_level   # the check sees the real imports
    code = ("import importlib, json, sys\n"
            f"for m in {sorted(top_level)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"{sorted(top_level)} load torch"
