"""One writer of a student folder with its model card, for the end of training and for `hf-graft export`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from hf_graft.data.transforms import resolve_student_data_config
from hf_graft.export.model_card import build_model_card
from hf_graft.export.student_folder import save_student

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
    grafting_settings: Mapping[str, Any] | None = None,
    kd_settings: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    replace: bool = False,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """`member` as a student folder (config.json, weights, model card) that timm and transformers load.

    `spec` is the population's `PopulationSpec`: the architecture, model kwargs, labels, data config and
    dataset are taken from it; without one, from `architecture` and `model_kwargs` (an `hf-hub:` /
    `local-dir:` id or a folder is replaced by the registry name behind it)."""
    if spec is None:
        from hf_graft.population.students import PopulationSpec

        spec = PopulationSpec(student_model=architecture, num_students=1, num_classes=getattr(member, "num_classes", 0),
                              student_model_kwargs=dict(model_kwargs or {}))
    architecture = spec.student_model
    if architecture.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(architecture):  # the registry name behind it
        architecture = member.pretrained_cfg.get("architecture", architecture)
    data_config = spec.data_config or resolve_student_data_config(member)
    card = build_model_card(
        architecture=architecture, label_names=spec.label_names, dataset_name=spec.dataset_name,
        member_metrics={int(k): dict(v) for k, v in (member_metrics or {}).items()},
        ensemble_metrics=dict(ensemble_metrics) if ensemble_metrics else None,
        selected_member=int(selected_member), selection_reason=selection_reason,
        grafting_settings=dict(grafting_settings or {}), kd_settings=kd_settings, repo_id=repo_id,
        data_config=data_config,
    )
    return save_student(member, folder, architecture=architecture, model_kwargs=spec.student_model_kwargs,
                        label_names=spec.label_names, data_config=data_config, card=card, replace=replace,
                        source=source)
