"""ctssl: self-supervised pretraining benchmark and bias-analysis workbench for chest CT.

Library code: no Streamlit, no I/O at import time. The Python API for notebooks (imported on first use,
so ``import ctssl_core`` stays light and loads no torch):

- ``SliceDataset(store, split=None, windows=None, ...)``: a torch Dataset over a slice store
  (``ctssl_core.dataset``);
- ``SliceStore.open(store)``: the slices, labels and patients themselves (``ctssl_core.data.store``);
- ``load_encoder(ref, store_root=None)``: an encoder from a run id, run folder, checkpoint or export
  folder -> (encoder, config) (``ctssl_core.checkpoint``);
- ``read``: the results readers the dashboard uses, e.g. ``read.headline_table(store)``,
  ``read.sensitivity(store)``, ``read.strategy_verdicts(store)`` (``ctssl_core.results.read``);
- ``run_benchmark(profile, store_root, overrides)``: the whole study (``ctssl_core.benchmark``).
"""

from __future__ import annotations

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_API = {
    "SliceDataset": ("ctssl_core.dataset", "SliceDataset"),
    "SliceStore": ("ctssl_core.data.store", "SliceStore"),
    "load_encoder": ("ctssl_core.checkpoint", "load_encoder"),
    "read": ("ctssl_core.results.read", None),
    "run_benchmark": ("ctssl_core.benchmark", "run_benchmark"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import an API name on first use (PEP 562): the dashboard and the CLI import ``ctssl_core``
    without paying for torch."""
    if name not in _API:
        raise AttributeError(f"module 'ctssl_core' has no attribute {name!r}; the API is {sorted(_API)}")
    import importlib

    module, attr = _API[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
