"""Image datasets through `datasets`, timm transforms, and per-member example order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hf_graft.config import DataArguments
from hf_graft.data.checks import prepare_labels
from hf_graft.errors import one_line

__all__ = ["BUILTIN_DIGITS_FILE", "BUILTIN_PREFIX", "ImageData", "load_builtin_digits", "load_image_data"]


BUILTIN_PREFIX = "builtin:"
# written by scripts/make_builtin_digits.py from scikit-learn's copy
BUILTIN_DIGITS_FILE = Path(__file__).with_name("builtin_digits.npz")
_IMAGE_COLUMN_GUESSES = ("image", "img", "pixel_values", "picture")
_LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "class", "target")


@dataclass
class ImageData:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    image_column: str
    label_column: str
    label_names: list[str]
    eval_split: str = ""  # which split `eval` is, or what part of the training split was held out
    selection: Any = None  # datasets.Dataset held out of train to choose the student by, or None
    selection_split: str = ""  # what part of the training split `selection` is

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def load_builtin_digits(seed: int = 0, test_fraction: float = 0.2):
    """The 1,797 8x8 handwritten digits of UCI's optical digits test set (scikit-learn's `load_digits`,
    shipped with hf_graft: `builtin_digits.npz`, CC BY 4.0) as a `datasets.DatasetDict` (train/test).

    Pixel counts 0..16 are scaled to 8-bit grayscale images; the split is stratified and fixed by
    `seed`, so every run sees the same held-out images.
    """
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    with np.load(BUILTIN_DIGITS_FILE) as digits:
        counts, labels = digits["images"], digits["labels"]
    pixels = np.clip(counts * (255.0 / 16.0), 0, 255).round().astype("uint8")
    images = [PILImage.fromarray(p, mode="L") for p in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    ds = Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    return ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")


def _load_raw(args: DataArguments):
    """The DatasetDict named by the arguments (Hub id, local folder, imagefolder or builtin)."""
    import datasets

    name = args.dataset_name
    if name.startswith(BUILTIN_PREFIX):
        which = name[len(BUILTIN_PREFIX):]
        if which != "digits":
            raise ValueError(f"DataArguments.dataset_name: unknown builtin {name!r}; allowed: builtin:digits")
        return load_builtin_digits()
    if name == "imagefolder":
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"DataArguments.data_dir: {args.data_dir!r} is not a folder")
        try:
            return datasets.load_dataset("imagefolder", data_dir=args.data_dir)
        except Exception as err:  # e.g. a folder without images
            cause = one_line(err)
            raise RuntimeError(f"DataArguments.data_dir: could not load images from {args.data_dir!r}: {cause}") from err
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # e.g. a split saved empty, which datasets cannot load back
            empty = _empty_saved_splits(path)
            if empty:
                raise ValueError(
                    f"DataArguments.dataset_name: {name}: split(s) {', '.join(map(repr, empty))} were saved with no "
                    "examples, which datasets cannot load back; save the dataset without them"
                ) from err
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"DataArguments.dataset_name: could not load {name!r}: {cause}") from err
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise FileNotFoundError(f"DataArguments.dataset_name: {name!r} is not a folder")
    try:  # a local folder of parquet/arrow/... files, or a Hub id
        loaded = datasets.load_dataset(str(path) if path.is_dir() else name, args.dataset_config_name,
                                       data_dir=args.data_dir)
    except Exception as err:  # offline, unknown id, empty folder, ...: say which dataset and why, in one line
        cause = one_line(err)
        raise RuntimeError(f"DataArguments.dataset_name: could not load {name!r}: {cause}") from err
    if not isinstance(loaded, datasets.DatasetDict):  # a dataset with a single unnamed split
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _empty_saved_splits(path: Path) -> list[str]:
    """The splits of a `save_to_disk` folder that hold no data files (saved with no examples)."""
    import json

    def empty(folder: Path) -> bool:
        try:
            return not json.loads((folder / "state.json").read_text()).get("_data_files")
        except (OSError, ValueError, AttributeError):
            return False

    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["train"] if empty(path) else []
    return [str(split) for split in splits if empty(path / str(split))]


def _pick_column(features, wanted: str | None, kind_check: Callable[[Any], bool], guesses, what: str) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise ValueError(f"DataArguments.{what}_column: {wanted!r} is not a column; columns: {columns}")
        return wanted
    typed = [c for c in columns if kind_check(features[c])]
    if len(typed) == 1:
        return typed[0]
    if len(typed) > 1:  # e.g. CIFAR-100's fine_label and coarse_label: a conventional name decides
        candidates = [c for c in guesses if c in typed]
        candidates = candidates[:1] if candidates else typed
    else:
        candidates = [c for c in guesses if c in features]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"DataArguments.{what}_column: no column looks like the {what}s (columns: {columns}); "
                         f"set {what}_column")
    raise ValueError(
        f"DataArguments.{what}_column: cannot tell which column holds the {what}s "
        f"(candidates: {candidates}); set {what}_column"
    )


def _eval_split_name(raw, args: DataArguments) -> str | None:
    """The split evaluated on (None: a part of the training split is held out)."""
    if args.eval_split is not None:
        return args.eval_split
    present = [s for s in ("validation", "test", "val", "valid") if s in raw and s != args.train_split]
    return present[0] if present else None


def load_image_data(args: DataArguments, seed: int = 42) -> ImageData:
    """Load, split, subsample and describe the data; no image is decoded here.

    Columns are detected on the training split before anything else, so a dataset without an
    image or label column fails at once. String labels become a `ClassLabel` (sorted names).
    """
    from datasets import ClassLabel, Image, Value

    raw = _load_raw(args)
    if args.train_split not in raw:
        raise ValueError(f"DataArguments.train_split: {args.train_split!r} not in the dataset's splits {list(raw)}")
    train = raw[args.train_split]
    image_column = _pick_column(train.features, args.image_column, lambda f: isinstance(f, Image),
                                _IMAGE_COLUMN_GUESSES, "image")
    label_column = _pick_column(train.features, args.label_column, lambda f: isinstance(f, ClassLabel),
                                _LABEL_COLUMN_GUESSES, "label")
    if label_column == image_column:
        raise ValueError(f"DataArguments.label_column: {label_column!r} is also the image column; set label_column")
    # every split used is checked (rows as loaded, before any held-out part is split off); sparse integer
    # labels are renumbered with their values as class names
    raw, integer_names = prepare_labels(raw, [args.train_split, _eval_split_name(raw, args)], label_column)
    train = raw[args.train_split]

    if args.eval_split is not None:
        if args.eval_split not in raw:
            raise ValueError(f"DataArguments.eval_split: {args.eval_split!r} not in the dataset's splits {list(raw)}")
        evaluation = raw[args.eval_split]
        eval_split = args.eval_split
    else:
        present = [s for s in ("validation", "test", "val", "valid") if s in raw and s != args.train_split]
        if present:
            evaluation = raw[present[0]]
            eval_split = present[0]
        else:
            if len(train) < 2:
                raise ValueError(
                    f"DataArguments.validation_split_percentage: split {args.train_split!r} has {len(train)} "
                    "example(s), too few to hold some out; set eval_split"
                )
            split = train.train_test_split(test_size=args.validation_split_percentage / 100.0, seed=seed)
            train, evaluation = split["train"], split["test"]
            eval_split = f"{args.validation_split_percentage}% of {args.train_split!r} held out (seed {seed})"
    for field, split, part in (("train_split", args.train_split, train), ("eval_split", eval_split, evaluation)):
        if len(part) == 0:
            raise ValueError(f"DataArguments.{field}: split {split!r} of {args.dataset_name} has no examples")
    for column in (image_column, label_column):
        if column not in evaluation.features:
            raise ValueError(
                f"DataArguments.eval_split: the evaluation split has no column {column!r}; "
                f"columns: {list(evaluation.features)}"
            )

    image_feature = train.features[image_column]
    if isinstance(image_feature, Value) and image_feature.dtype in ("string", "large_string"):
        # file paths: decode them as images, on the fly like any Image column
        train = train.cast_column(image_column, Image())
        evaluation = evaluation.cast_column(image_column, Image())
    elif not isinstance(image_feature, Image):
        raise ValueError(
            f"DataArguments.image_column: {image_column!r} holds {image_feature}; "
            "allowed: a datasets.Image column or image file paths"
        )

    label_feature = train.features[label_column]
    if isinstance(label_feature, ClassLabel):
        label_names = list(label_feature.names)
    elif isinstance(label_feature, Value) and label_feature.dtype in ("string", "large_string"):
        label_names = sorted(set(train.unique(label_column)) | set(evaluation.unique(label_column)))
        feature = ClassLabel(names=label_names)
        train = train.cast_column(label_column, feature)
        evaluation = evaluation.cast_column(label_column, feature)
    elif isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint")):
        # integer labels without names: 0..max over both splits
        top = max(max(train[label_column], default=0), max(evaluation[label_column], default=0))
        label_names = integer_names or [str(i) for i in range(int(top) + 1)]
    else:
        raise ValueError(
            f"DataArguments.label_column: {label_column!r} holds {label_feature}; "
            "allowed: ClassLabel, integer or string labels"
        )

    selection, selection_split = None, ""
    if args.selection_split_percentage:
        if len(train) < 2:
            raise ValueError(f"DataArguments.selection_split_percentage: split {args.train_split!r} has {len(train)} "
                             "example(s), too few to hold some out")
        # another seed than the held-out evaluation part's, so the two parts differ
        split = train.train_test_split(test_size=args.selection_split_percentage / 100.0, seed=seed + 1)
        train, selection = split["train"], split["test"].select_columns([image_column, label_column])
        selection_split = f"{args.selection_split_percentage:g}% of {args.train_split!r} held out (seed {seed + 1})"
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(args.max_train_samples))
    if args.max_eval_samples is not None and args.max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(args.max_eval_samples))
    keep = [image_column, label_column]
    train = train.select_columns(keep)
    evaluation = evaluation.select_columns(keep)
    return ImageData(train, evaluation, image_column, label_column, label_names, eval_split, selection,
                     selection_split)


