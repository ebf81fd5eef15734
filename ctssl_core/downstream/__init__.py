"""Downstream tasks: ``DOWNSTREAM`` maps the registry key to the task dataclass.

Each task implements the ``tasks.Task`` protocol (so ``train.fit`` trains it
like a pretext task) plus ``eval_batch`` (no augmentation), ``predict``
(logits -> probabilities / values), ``metric_fns`` (metric -> higher is
better) and ``stat_fn(outputs)`` (drawn patients -> metrics, for the patient
bootstrap in ``evaluate``). ``headline`` names the metric summary tables show.
"""

from ctssl_core.downstream.demographics import DemographicsTask
from ctssl_core.downstream.nodule import NoduleTask
from ctssl_core.downstream.pe import PETask

DOWNSTREAM: dict[str, type] = {"pe": PETask, "nodule": NoduleTask, "demographics": DemographicsTask}


def make_downstream(name: str, **hparams):
    """Build downstream task ``name`` with ``hparams`` (strictly, via ``config.build``)."""
    from ctssl_core.config import ConfigError, build

    if name not in DOWNSTREAM:
        raise ConfigError(f"unknown downstream task {name!r}; choose one of {sorted(DOWNSTREAM)}")
    return build(DOWNSTREAM[name], hparams, where=f"downstream.{name}.")


__all__ = ["DOWNSTREAM", "DemographicsTask", "NoduleTask", "PETask", "make_downstream"]
