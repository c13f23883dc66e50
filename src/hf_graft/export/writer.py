"""One writer of a student folder with its model card, for the end of training and for `hf-graft export`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from hf_graft.data.transforms import resolve_student_data_config
from hf_graft.export.model_card import base_model_id, build_model_card, framework_versions
from hf_graft.export.student_folder import save_student
from hf_graft.run.records import RunRecords
from hf_graft.run.results import SELECTION_METRIC

__all__ = ["write_student"]


def write_student(
    member: nn.Module,
    folder: str | os.PathLike,
    *,
    spec=None,
    architecture: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    member_metrics: Mapping[int, Mapping[str, float]] | None = None,
    ensemble_metrics: Mapping[str, float] | None = None,
    selected_member: int,
    selection_reason: str,
    records: RunRecords | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    replace: bool = False,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """`member` as a student folder (config.json, weights, model card) that timm and transformers load.

    `spec` is the population's `PopulationSpec`: the architecture, model kwargs, labels, data config, dataset
    and evaluation split are taken from it; without one, from `architecture` and `model_kwargs` (an `hf-hub:` /
    `local-dir:` id or a folder is replaced by the registry name behind it). `records` (the run's settings and
    logged evaluations, `RunRecords`) give the card its hyperparameters, grafting and distillation settings,
    every evaluation and the base model of a pretrained student; `member_metrics` its results table, and the
    selected member's top-1 / top-5 (mAP / rank-1 for a re-identification population, `spec.task`) its
    evaluation results; `license` its license line."""
    if spec is None:
        from hf_graft.population.students import PopulationSpec

        spec = PopulationSpec(student_model=architecture, num_students=1, num_classes=getattr(member, "num_classes", 0),
                              student_model_kwargs=dict(model_kwargs or {}))
    records = records or RunRecords()
    architecture = spec.student_model
    if architecture.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(architecture):  # the registry name behind it
        architecture = member.pretrained_cfg.get("architecture", architecture)
    data_config = spec.data_config or resolve_student_data_config(member)
    pretrained = records.identity.get("student_pretrained")
    task = getattr(spec, "task", "classification")
    card = build_model_card(
        architecture=architecture, label_names=spec.label_names, dataset_name=spec.dataset_name,
        member_metrics={int(k): dict(v) for k, v in (member_metrics or {}).items()},
        ensemble_metrics=dict(ensemble_metrics) if ensemble_metrics else None,
        selected_member=int(selected_member), selection_reason=selection_reason,
        grafting_settings=records.grafting_settings(), kd_settings=records.kd_settings(), repo_id=repo_id,
        license=license, data_config=data_config, eval_split=spec.eval_split,
        base_model=base_model_id(spec.student_model, getattr(member, "pretrained_cfg", None)) if pretrained else None,
        hyperparameters=records.hyperparameters(), evaluations=records.evaluations(SELECTION_METRIC[task]),
        versions=framework_versions(), task=task,
    )
    return save_student(member, folder, architecture=architecture, model_kwargs=spec.student_model_kwargs,
                        label_names=spec.label_names, data_config=data_config, card=card, replace=replace,
                        source=source)
