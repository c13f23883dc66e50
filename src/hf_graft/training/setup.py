"""What a `GraftingTrainer` is built from: its population checked against the config, the config the
Trainer runs with, the frozen teachers and the evaluation's metrics."""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from hf_graft.config import GraftingConfig
from hf_graft.data.on_device import DeviceImageDataset, main_process_loading
from hf_graft.metrics import PopulationMetrics, ReidMetrics
from hf_graft.population.sources import load_teacher
from hf_graft.population.students import PopulationSpec, StudentPopulation
from hf_graft.population.teachers import TeacherEnsemble

__all__ = ["derived_config", "evaluation_metrics", "run_args", "teacher_dtype", "teacher_ensemble", "trainer_population"]


def run_args(args: GraftingConfig, train_dataset, eval_dataset) -> GraftingConfig:
    """The config the Trainer runs with: the user's, or a copy (never a change to it) with the dataloader
    settings that data on the device needs and, for pinned batches on CUDA, copies that do not block the
    host (it queues the next step's kernels while the GPU works)."""
    evaluation = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    changes: dict = {}
    if any(isinstance(d, DeviceImageDataset) for d in (train_dataset, *evaluation)):
        changes.update(main_process_loading(args))
    pinned = changes.get("dataloader_pin_memory", args.dataloader_pin_memory)
    if args.device.type == "cuda" and pinned and not args.accelerator_config.non_blocking:
        changes["accelerator_config"] = dataclasses.replace(args.accelerator_config, non_blocking=True)
    return derived_config(args, **changes) if changes else args


def derived_config(args: GraftingConfig, **changes) -> GraftingConfig:
    """A copy of `args` with `changes` (the user's config is never changed). Not `dataclasses.replace`: that
    would run `__post_init__` again, which sets up the processes (and Accelerate's state) anew."""
    derived = copy.copy(args)
    vars(derived).update(changes)
    return derived


def trainer_population(model, args) -> StudentPopulation:
    """The population a `GraftingTrainer` trains, checked against its config (one line per mismatch), with
    the loss weights and the execution (channels_last, fused) the config asks for."""
    if args is None or not isinstance(args, GraftingConfig):
        raise TypeError("GraftingTrainer needs args=GraftingConfig(...)")
    if model is None:
        raise TypeError("GraftingTrainer needs model=StudentPopulation or model=PopulationSpec")
    if isinstance(model, PopulationSpec):
        model = StudentPopulation.from_spec(model, seed=args.seed, pretrained=args.student_pretrained,
                                            shared_init=args.shared_init)
    if not isinstance(model, StudentPopulation):
        raise TypeError(f"GraftingTrainer: model must be a StudentPopulation, got {type(model).__name__}")
    if model.num_members != args.num_students:
        raise ValueError(f"GraftingConfig.num_students is {args.num_students} but the population has "
                         f"{model.num_members} members")
    if len(args.lr_multipliers) != model.num_members:
        raise ValueError("GraftingConfig.lr_spread must give one multiplier per member")
    model.ce_weight, model.kd_weight, model.kd_temperature = args.ce_weight, args.kd_weight, args.kd_temperature
    model.label_smoothing = args.label_smoothing_factor  # every member's CE
    channels_last = args.device.type == "cuda" if args.channels_last is None else bool(args.channels_last)
    model.set_execution(channels_last=channels_last, fused=args.member_execution == "fused",
                        model_name=model.spec.student_model if model.spec else args.student_model)
    if model.task == "reid":  # evaluated on the members' features, not their logits
        model.set_output("features")
    return model


def evaluation_metrics(args: GraftingConfig, population: StudentPopulation):
    """The trainer's `compute_metrics` for the population's task: top-1/top-5 (and the extra metrics) of the
    members' logits, or mAP / CMC of their features (task reid; the extra metrics take class predictions,
    which re-identification has none of)."""
    if population.task == "reid":
        if args.extra_metrics:
            raise ValueError(f"GraftingConfig.extra_metrics: got {args.extra_metrics} with a re-identification "
                             "population (its evaluation ranks features, it predicts no classes); allowed: null")
        return ReidMetrics(args.select_student, device=args.device)
    return PopulationMetrics(args.select_student, args.extra_metrics, args.extra_metric_kwargs,
                             owner=f"{type(args).__name__}.extra_metrics")


def teacher_ensemble(teachers: Sequence[nn.Module] | None, args: GraftingConfig, population: StudentPopulation,
                     ) -> TeacherEnsemble:
    """The grafting+ teachers (default: loaded from `args.teacher_models`), checked against the students."""
    if teachers is None and args.teacher_models:
        teachers = [load_teacher(name, args.teacher_model_kwargs) for name in args.teacher_models]
    ensemble = TeacherEnsemble(teachers or [], names=args.teacher_models)
    ensemble.check_classes(getattr(population.members[0], "num_classes", None))
    return ensemble


def teacher_dtype(args: GraftingConfig) -> torch.dtype | None:
    """Teachers run in the half precision of a CUDA run (they are frozen: no master weights needed)."""
    if args.device.type != "cuda":
        return None
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
