"""What a run trains and evaluates on, as JSON values a resume compares: the dataset, the size of the
evaluation split, a digest of the data and the training augmentation.

The digest covers both splits' sizes and a few rows of each, evenly spaced, as stored (the encoded image
bytes, or the file's bytes where only a path is stored, and the label): cheap for any size of dataset,
independent of where the files lie, and different for other data, another subset or another split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from hf_graft.config import DataArguments

__all__ = ["SAMPLED_ROWS", "data_digest", "data_identity", "train_augmentation"]

SAMPLED_ROWS = 8  # rows of each split read into the digest


def _cell_bytes(value: Any) -> bytes:
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a datasets.Image cell as stored
        if value.get("bytes"):
            return bytes(value["bytes"])
        path = Path(str(value.get("path") or ""))
        try:
            return path.read_bytes()
        except OSError:
            return path.name.encode()
    return json.dumps(value, sort_keys=True, default=str).encode()


def _update(digest, dataset) -> None:
    count = len(dataset)
    digest.update(f"{count};".encode())
    if count == 0:
        return
    rows = sorted({int(i) for i in np.linspace(0, count - 1, min(SAMPLED_ROWS, count)).round()})
    table = dataset.with_format("arrow")[rows]
    for row in table.to_pylist():
        for column in sorted(row):
            digest.update(column.encode() + b"=" + _cell_bytes(row[column]) + b";")


def data_digest(train, evaluation) -> str:
    """A digest of two `datasets.Dataset` splits: their sizes and a few rows of each as stored."""
    digest = hashlib.sha256()
    for split in (train, evaluation):
        _update(digest, split)
    return digest.hexdigest()[:32]


def train_augmentation(data_args: DataArguments, side: int) -> dict[str, Any]:
    """The training augmentation as it runs at `side` pixels ('auto' resolved) and the settings it reads."""
    mode = data_args.train_augmentation
    if mode == "auto":
        mode = "pad_crop" if side <= 64 else "rrc"
    settings: dict[str, Any] = {"train_augmentation": mode}
    if mode == "pad_crop":
        settings.update(crop_padding=data_args.crop_padding, hflip=data_args.hflip)
    elif mode == "rrc":
        settings.update(hflip=data_args.hflip, color_jitter=data_args.color_jitter,
                        auto_augment=data_args.auto_augment)
    return settings


def _dataset_label(name: str) -> str:
    """A Hub id or builtin as it is; a local folder by its name (a resume may find it moved)."""
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def data_identity(data, data_args: DataArguments, data_config: dict[str, Any]) -> dict[str, Any]:
    """The data part of a run's identity (`run.output_dir.run_identity`) for `data` (a `loading.ImageData`)."""
    return {
        "dataset_name": _dataset_label(data_args.dataset_name),
        "num_eval_examples": len(data.eval),
        "data_digest": data_digest(data.train, data.eval),
        "train_augmentation": train_augmentation(data_args, int(data_config["input_size"][-1])),
    }
