"""Every private member of another package that hf_graft touches, in one place.

A private name (a leading underscore, or an attribute a package does not document) can move in any
release. hf_graft reaches each one through this module: an accessor below, or, for a private Trainer
or torch hook that must be overridden on a class, its name in `OVERRIDDEN_HOOKS`. `FOREIGN_MEMBERS`
lists them all; tests/test_compat.py checks each against the installed packages and fails with a message
naming the member and the package version when one has moved. Before raising a dependency's floor or
releasing against a new version, run that test file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

__all__ = [
    "FOREIGN_MEMBERS", "OVERRIDDEN_HOOKS", "TIMM_EFFICIENTNET_BLOCKS", "ForeignMember", "batchnorm_base", "close_progress_bars",
    "conv_padding", "dataset_indices", "foreach_mul_", "foreach_norm", "inductor_modes", "keep_batches_on_host",
    "logged_loss_state", "mark_scheduler_created", "model_args", "model_input_config", "own_buffers",
    "own_parameters", "record_model_args", "submodules", "tensorboard_writers", "timm_module", "unwrap_compiled",
]


@dataclass(frozen=True)
class ForeignMember:
    """`owner.name` of `package`: `owner` is an importable module path, or `module:Class`."""

    package: str
    owner: str
    name: str
    why: str
    # attribute (looked up on the owner), instance (set on instances), hook (overridden), reads (a function
    # of the owner reads the attribute `name` of its argument)
    kind: str = "attribute"


# private Trainer / nn.Module methods that hf_graft's classes override (checked to exist with these names)
OVERRIDDEN_HOOKS = {
    "transformers.trainer:Trainer": ("_build_accelerator_args", "_clip_grad_norm", "_get_grad_norm",
                                     "_get_train_sampler", "_prepare_inputs", "_push_from_checkpoint", "_save",
                                     "_save_checkpoint"),
    "torch.nn:Module": ("_apply",),
}

FOREIGN_MEMBERS: tuple[ForeignMember, ...] = (
    *(ForeignMember("transformers", owner, name, "a GraftingTrainer hook", "hook")
      for owner, names in OVERRIDDEN_HOOKS.items() if owner.startswith("transformers") for name in names),
    ForeignMember("torch", "torch.nn:Module", "_apply", "StudentPopulation re-binds fused statistics after .to()",
                  "hook"),
    ForeignMember("transformers", "transformers.trainer:Trainer", "_tr_loss",
                  "the loss accumulated since the last log (the on-device NaN filter)", "instance"),
    ForeignMember("transformers", "transformers.trainer:Trainer", "_globalstep_last_logged",
                  "the step of the last log (the on-device NaN filter)", "instance"),
    ForeignMember("transformers", "transformers.trainer:Trainer", "_created_lr_scheduler",
                  "marks the step-decay scheduler as the Trainer's own", "instance"),
    ForeignMember("transformers", "transformers.trainer_callback:ProgressCallback", "training_bar",
                  "closed when a run stops with an error", "instance"),
    ForeignMember("transformers", "transformers.trainer_callback:ProgressCallback", "prediction_bar",
                  "closed when a run stops with an error", "instance"),
    ForeignMember("transformers", "transformers.integrations:TensorBoardCallback", "tb_writer",
                  "the graft's alpha histograms", "instance"),
    ForeignMember("accelerate", "accelerate.data_loader:DataLoaderShard", "device",
                  "pinned batches left on the host for the side-stream copy", "instance"),
    ForeignMember("torch", "torch", "_foreach_norm", "per-member gradient norms in one call"),
    ForeignMember("torch", "torch", "_foreach_mul_", "per-member clipping in one call"),
    ForeignMember("torch", "torch._inductor", "list_mode_options", "torch_compile_mode checked with the config"),
    ForeignMember("torch", "torch.nn.modules.batchnorm", "_BatchNorm", "every BatchNorm, for recalibration"),
    ForeignMember("torch", "torch.nn:Module", "_modules", "a module walk without building names", "instance"),
    ForeignMember("torch", "torch.nn:Module", "_parameters", "a module's own parameters", "instance"),
    ForeignMember("torch", "torch.nn:Module", "_buffers", "fused statistics bound as views", "instance"),
    ForeignMember("torch", "torch.nn:Conv2d", "_reversed_padding_repeated_twice",
                  "non-zero padding modes of fused convolutions", "instance"),
    ForeignMember("torch", "torch._dynamo.eval_frame:OptimizedModule", "_orig_mod",
                  "the model inside torch.compile's wrapper", "instance"),
    ForeignMember("timm", "timm.models._input", "get_model_args", "an export's construction arguments"),
    ForeignMember("timm", "timm.models._input", "get_model_input_config", "an export's input config"),
    ForeignMember("timm", "timm.models._input:get_model_args", "_model_args",
                  "where the CIFAR ResNets record their shortcut for exports", "reads"),
    ForeignMember("timm", "timm.models._efficientnet_blocks", "InvertedResidual",
                  "EfficientNet blocks that fused members run unchanged"),
    ForeignMember("datasets", "datasets:Dataset", "_indices", "a selection's rows when naming a bad example",
                  "instance"),
)


# ----------------------------------------------------------------------------- transformers / accelerate
def logged_loss_state(trainer) -> tuple[torch.Tensor | None, int]:
    """The Trainer's loss accumulated since the last log, and the step of that log."""
    return getattr(trainer, "_tr_loss", None), getattr(trainer, "_globalstep_last_logged", 0)


def mark_scheduler_created(trainer) -> None:
    """A scheduler built in `create_scheduler` is the Trainer's own (it steps and saves it as such)."""
    trainer._created_lr_scheduler = True


def close_progress_bars(callbacks: Iterable) -> None:
    """Close the Trainer's tqdm bars (a run stopped by an error then prints on a line of its own)."""
    from transformers.trainer_callback import ProgressCallback

    for callback in callbacks:
        if isinstance(callback, ProgressCallback):
            for name in ("training_bar", "prediction_bar"):
                bar = getattr(callback, name, None)
                if bar is not None:
                    bar.close()
                    setattr(callback, name, None)


def tensorboard_writers(callbacks: Iterable) -> list:
    """The SummaryWriters of the TensorBoard callbacks that have one."""
    from transformers.integrations import TensorBoardCallback

    return [c.tb_writer for c in callbacks if isinstance(c, TensorBoardCallback) and getattr(c, "tb_writer", None)]


def keep_batches_on_host(loader) -> None:
    """An Accelerate dataloader whose batches stay where the collate put them (pinned host memory)."""
    if getattr(loader, "device", None) is not None:
        loader.device = None


# ----------------------------------------------------------------------------- torch
def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return torch._foreach_norm(tensors)


def foreach_mul_(tensors: list[torch.Tensor], scalar: torch.Tensor) -> None:
    torch._foreach_mul_(tensors, scalar)


def inductor_modes() -> list[str]:
    import torch._inductor

    return list(torch._inductor.list_mode_options())


def batchnorm_base() -> type:
    """The base class of BatchNorm1d/2d/3d (and of timm's BatchNorm variants)."""
    return nn.modules.batchnorm._BatchNorm


def submodules(module: nn.Module) -> Iterable[nn.Module]:
    """The direct children of `module` (None slots left out), without building names."""
    return (child for child in module._modules.values() if child is not None)


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    return module._parameters


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The module's own buffers, as the mutable mapping a buffer is re-bound in."""
    return module._buffers


def conv_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The `F.pad` argument a Conv2d with a non-zero padding mode applies."""
    return conv._reversed_padding_repeated_twice


def unwrap_compiled(model: nn.Module) -> nn.Module | None:
    """The module inside a torch.compile wrapper, or None."""
    return getattr(model, "_orig_mod", None)


# ----------------------------------------------------------------------------- timm / datasets
def model_args(model: nn.Module) -> dict[str, Any]:
    """The timm.create_model keyword arguments timm recorded for `model` (and later changes to it)."""
    from timm.models._input import get_model_args

    return dict(get_model_args(model))


def record_model_args(model: nn.Module, **kwargs: Any) -> None:
    """Arguments that `model_args` (timm's `get_model_args`) must report for `model`, e.g. a default that an
    export has to name (timm keeps them in `model._model_args`)."""
    model._model_args = {**getattr(model, "_model_args", {}), **kwargs}


def model_input_config(model: nn.Module) -> dict[str, Any]:
    from timm.models._input import get_model_input_config

    return get_model_input_config(model)


TIMM_EFFICIENTNET_BLOCKS = "timm.models._efficientnet_blocks"  # the blocks of EfficientNet / MobileNetV3


def timm_module(path: str):
    """A timm module by path (private block modules included), or None when it is not there."""
    try:
        return importlib.import_module(path)
    except ImportError:
        return None


def dataset_indices(dataset) -> Any:
    """The indices mapping of a `datasets.Dataset` selection (None for a plain table)."""
    return getattr(dataset, "_indices", None)
