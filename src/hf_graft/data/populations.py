"""A population's datasets: the training set in every member's order and the shared evaluation set."""

from __future__ import annotations

from typing import Any

import torch

from hf_graft.config import DataArguments
from hf_graft.data.fingerprint import data_identity
from hf_graft.data.loading import ImageData
from hf_graft.data.sampling import MemberOrderDataset
from hf_graft.data.transforms import build_transform

__all__ = ["population_datasets", "reid_population_datasets", "selection_dataset"]


def population_datasets(
    data: ImageData,
    data_args: DataArguments,
    data_config: dict[str, Any],
    *,
    num_members: int,
    order: str,
    seed: int,
    train_cls: type = MemberOrderDataset,
    device: torch.device | str = "cpu",
) -> tuple[MemberOrderDataset, MemberOrderDataset]:
    """(train, eval) datasets of a population: timm transforms for `data_config`, the training set
    in `order` for each of `num_members` members (one member: shared), the eval set shared.
    With `data_args.data_on_device`, both splits are decoded once onto `device` instead
    (`device_data.DeviceImageDataset`; `train_cls` does not apply).
    The training set's `data_identity` (`fingerprint.data_identity`) is what a resume compares."""
    if data_args.data_on_device:
        from hf_graft.data.on_device import device_population_datasets

        train, evaluation = device_population_datasets(data, data_args, data_config, num_members=num_members,
                                                       order=order, seed=seed, device=device)
        evaluation.split_name = data.eval_split
    else:
        train = _training_dataset(data, data_args, data_config, num_members, order, seed, train_cls)
        evaluation = MemberOrderDataset(
            data.eval, build_transform(data_config, data_args, is_training=False), data.image_column,
            data.label_column,
        )
        evaluation.split_name = data.eval_split  # what the run's numbers are measured on, for its results
    train.data_identity = data_identity(data, data_args, data_config)
    return train, evaluation


def reid_population_datasets(
    data,
    data_args: DataArguments,
    data_config: dict[str, Any],
    *,
    num_members: int,
    order: str,
    seed: int,
    train_cls: type = MemberOrderDataset,
):
    """(train, eval) datasets of a re-identification population (`data`: a `data.reid.ReidData`): the
    training split exactly as a classification one (identities as labels, each member its order and
    augmentation), and the query then the gallery split as one `ReidEvalDataset` with the evaluation
    transform."""
    from hf_graft.data.reid import ReidEvalDataset

    train = _training_dataset(data, data_args, data_config, num_members, order, seed, train_cls)
    evaluation = ReidEvalDataset(data.query, data.gallery, build_transform(data_config, data_args, is_training=False))
    return train, evaluation


def _training_dataset(data, data_args: DataArguments, data_config: dict[str, Any], num_members: int, order: str,
                      seed: int, train_cls: type) -> MemberOrderDataset:
    """The training split in `order` for each member (one member: shared), with the training transform."""
    return train_cls(
        data.train, build_transform(data_config, data_args, is_training=True), data.image_column, data.label_column,
        num_members=num_members, order=order if num_members > 1 else "shared", seed=seed,
    )


def selection_dataset(data: ImageData, data_args: DataArguments, data_config: dict[str, Any]) -> MemberOrderDataset | None:
    """The part of the training split held out to choose the student by (`selection_split_percentage`), with
    the evaluation transform; None without one."""
    if data.selection is None:
        return None
    selection = MemberOrderDataset(data.selection, build_transform(data_config, data_args, is_training=False),
                                   data.image_column, data.label_column)
    selection.split_name = data.selection_split
    return selection
