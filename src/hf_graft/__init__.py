"""hf_graft: filter grafting for timm image classifiers, trained with the Hugging Face Trainer.

    from hf_graft import GraftingConfig, DataArguments, GraftingTrainer, PopulationSpec

`import hf_graft` registers the CIFAR architectures in timm and nothing more; the public names
below are imported from their submodules on first use (transformers, datasets and evaluate load
only when a name that needs them is touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Registers the CIFAR architectures (cifar_resnet20/32/56/110, cifar_mobilenetv2, cifar_wrn28_10) in timm.
from hf_graft import models  # noqa: F401

# Public name -> the submodule that defines it: the one place to edit when a name moves.
_PUBLIC = {
    "GraftingConfig": "config",
    "DataArguments": "config",
    "GraftingTrainer": "training.trainer",
    "StudentPopulation": "population.students",
    "PopulationSpec": "population.students",
    "graft_members": "graft.grafting",
    "layer_information": "graft.grafting",
    "adaptive_alpha": "graft.grafting",
    "kd_loss": "graft.distill",
    "filter_report": "graft.filters",
    "reid_metrics": "metrics.reid",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the names without importing them at run time
    from hf_graft.config import DataArguments, GraftingConfig
    from hf_graft.graft.distill import kd_loss
    from hf_graft.graft.filters import filter_report
    from hf_graft.graft.grafting import adaptive_alpha, graft_members, layer_information
    from hf_graft.population.students import PopulationSpec, StudentPopulation
    from hf_graft.training.trainer import GraftingTrainer
    from hf_graft.metrics.reid import reid_metrics
