"""Image datasets through `datasets`, timm transforms, and per-member example order."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from .config import DataArguments
from .data_checks import DECODE_ERRORS, prepare_labels, undecodable_image

__all__ = [
    "EpochShuffleSampler",
    "ImageData",
    "MemberOrderDataset",
    "population_datasets",
    "build_transform",
    "normalize_pixels",
    "pixel_statistics",
    "students_data_config",
    "load_builtin_digits",
    "load_image_data",
    "member_orders",
    "resolve_student_data_config",
]

BUILTIN_PREFIX = "builtin:"
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

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def load_builtin_digits(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's 1,797 8x8 handwritten digits as a `datasets.DatasetDict` (train/test).

    Pixel intensities 0..16 are scaled to 8-bit grayscale images; the split is stratified and
    fixed by `seed`, so every run sees the same held-out images.
    """
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype("uint8")
    images = [PILImage.fromarray(p, mode="L") for p in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    ds = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
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
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"DataArguments.data_dir: could not load images from {args.data_dir!r}: {cause}") from err
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise FileNotFoundError(f"DataArguments.dataset_name: {name!r} is not a folder")
    try:  # a local folder of parquet/arrow/... files, or a Hub id
        loaded = datasets.load_dataset(str(path) if path.is_dir() else name, args.dataset_config_name,
                                       data_dir=args.data_dir)
    except Exception as err:  # offline, unknown id, empty folder, ...: say which dataset and why, in one line
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"DataArguments.dataset_name: could not load {name!r}: {cause}") from err
    if not isinstance(loaded, datasets.DatasetDict):  # a dataset with a single unnamed split
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


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

    if args.max_train_samples is not None and args.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(args.max_train_samples))
    if args.max_eval_samples is not None and args.max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(args.max_eval_samples))
    keep = [image_column, label_column]
    train = train.select_columns(keep)
    evaluation = evaluation.select_columns(keep)
    return ImageData(train, evaluation, image_column, label_column, label_names, eval_split)


def resolve_student_data_config(model, input_size: int | None = None) -> dict[str, Any]:
    """timm's data config for the student, with an optional square input-size override."""
    from timm.data import resolve_data_config

    overrides = {"input_size": (3, input_size, input_size)} if input_size else {}
    config = resolve_data_config(overrides, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def build_transform(data_config: dict[str, Any], args: DataArguments, is_training: bool) -> Callable:
    """timm transforms for the student's input size and normalisation; with `args.normalize_on_device`
    they end at uint8 [C, H, W] pixels, which `normalize_pixels` turns into the same normalised input."""
    from timm.data import create_transform
    from torchvision import transforms as T

    uint8 = args.normalize_on_device
    input_size = tuple(data_config["input_size"])
    side = input_size[-1]
    interpolation = data_config.get("interpolation", "bilinear")
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    mode = args.train_augmentation
    if mode == "auto":
        mode = "pad_crop" if side <= 64 else "rrc"
    if not is_training or mode == "none":
        return create_transform(
            input_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
            crop_pct=data_config.get("crop_pct", 1.0), crop_mode=data_config.get("crop_mode", "center"),
            use_prefetcher=uint8,
        )
    if mode == "rrc":
        return create_transform(
            input_size, is_training=True, interpolation=interpolation, mean=mean, std=std,
            hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.auto_augment,
            use_prefetcher=uint8,
        )
    # pad_crop: the CIFAR recipe (resize to the input side, random crop with padding, flip)
    from timm.data.transforms import str_to_interp_mode

    return T.Compose([
        T.Resize((side, side), interpolation=str_to_interp_mode(interpolation)),
        T.RandomCrop(side, padding=args.crop_padding),
        T.RandomHorizontalFlip(args.hflip),
        *([T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]),
    ])


def students_data_config(population) -> dict[str, Any]:
    """The students' timm data config: the population spec's, else resolved from member 0 (what an
    exported student's config records then too)."""
    spec = getattr(population, "spec", None)
    if spec is not None and spec.data_config:
        return spec.data_config
    return resolve_student_data_config(population.members[0])


def pixel_statistics(data_config: dict[str, Any] | None, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The students' mean and std from `data_config` as [C] float32 tensors on `device` (`normalize_pixels`)."""
    if not data_config or not data_config.get("mean") or not data_config.get("std"):
        raise ValueError("pixel_values: uint8 batches are normalised with the students' mean and std, and the "
                         "population's spec has no data_config with them; set PopulationSpec.data_config, or give "
                         "float pixel_values")
    return tuple(torch.tensor(data_config[k], dtype=torch.float32).to(device) for k in ("mean", "std"))


def normalize_pixels(pixel_values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ([..., C, H, W]) as the float input the transforms would have given: the operations of
    torchvision's `ToTensor` and `Normalize`, so equal to the last bit. `mean` / `std`: [C] float32 on
    the pixels' device. Any other dtype is returned as it is (already normalised)."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    shape = (-1, 1, 1)
    return pixel_values.float().div_(255).sub_(mean.view(shape)).div_(std.view(shape))


class EpochShuffleSampler(Sampler[int]):
    """A fresh, reproducible permutation of the training examples every epoch.

    The permutation of epoch `e` depends only on (`seed`, `e`), never on the global RNG, so every
    process of a distributed run draws the same one (Accelerate then hands each process its own
    batches of it) and a resumed run draws the same one as an uninterrupted run. Indices come out
    *epoch-tagged*: example `i` of epoch `e` is yielded as `e * n + i`; `MemberOrderDataset` decodes
    the tag and seeds the example's augmentation with (seed, epoch, example, member), which makes
    the augmented pixels independent of dataloader workers, of `skip_first_batches` on resume, and
    of the point at which the Trainer restores the RNG state of a checkpoint.

    The epoch is set with `set_epoch` (Accelerate and the Trainer call it; GraftingTrainer also
    sets it at every epoch begin, since Accelerate's wrappers do not always forward the call).
    """

    def __init__(self, num_examples: int, seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"EpochShuffleSampler: num_examples must be >= 1, got {num_examples}")
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, 0x5EED, epoch))
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self):
        offset = self.epoch * self.num_examples
        yield from (self.permutation(self.epoch) + offset).tolist()

    def __len__(self) -> int:
        return self.num_examples


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing; deterministic across processes)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = (state * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state >> 1


def _seed_global_rng(seed: int) -> None:
    # the CPU generator only (what the transforms draw from): torch.manual_seed would also queue a
    # lazy CUDA seeding with a captured stack trace, ~0.3 ms per example (benchmarks/throughput.py)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


@contextlib.contextmanager
def _preserved_global_rng():
    """Restore torch's CPU, `random`'s and numpy's global RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _seeded_rng(seed: int):
    """Seed torch, `random` and numpy for one example's augmentation, restoring their states after."""
    with _preserved_global_rng():
        _seed_global_rng(seed)
        yield


def member_orders(num_examples: int, num_members: int, order: str, seed: int) -> torch.Tensor:
    """[K, n] rows each member reads for item i (`independent`: perm_0 the identity, perm_k for k >= 1
    a fixed permutation drawn from `seed`), or [1, n] (the identity) for a `shared` order."""
    perms = [torch.arange(num_examples)]
    for k in range(1, num_members if order == "independent" else 1):
        generator = torch.Generator().manual_seed(seed * 7919 + k)
        perms.append(torch.randperm(num_examples, generator=generator))
    return torch.stack(perms)


class MemberOrderDataset(TorchDataset):
    """Serves a `datasets.Dataset` to a population, decoding and transforming on the fly.

    `shared`: item i is one example for every member (`pixel_values` [C, H, W], `labels` []).
    `independent`: item i holds one example per member (`pixel_values` [K, C, H, W], `labels` [K]):
    member k reads example `perm_k[i]`, where perm_0 is the identity and perm_k (k >= 1) a fixed
    permutation drawn from `seed`. The sampler's shuffled order of i is a fresh permutation every
    epoch, so each member sees every example once per epoch, in its own order, reproducibly; and
    since the mapping is by index, it survives Accelerate's sharding of i across processes and
    `skip_first_batches` on resume.

    Indices may be epoch-tagged (`e * len(self) + i`, as `EpochShuffleSampler` yields them); the
    random augmentation of every example is then seeded by (seed, e, i, member), so a resumed or
    distributed run augments exactly as an uninterrupted single-process run does. Untagged
    indices (< len(self)) are epoch 0.
    """

    def __init__(self, dataset, transform: Callable, image_column: str, label_column: str,
                 num_members: int = 1, order: str = "shared", seed: int = 0):
        if order not in ("shared", "independent"):
            raise ValueError(f"order must be 'shared' or 'independent', got {order!r}")
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.num_members = num_members
        self.order = order
        self.seed = int(seed)
        self.member_indices = member_orders(len(dataset), num_members, order, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def _example(self, index: int, epoch: int = 0, member: int = 0) -> tuple[torch.Tensor, int]:
        try:  # decoding happens here; a file that cannot be read is named, not skipped
            row = self.dataset[index]
            image = row[self.image_column]
            if image.mode != "RGB":
                image = image.convert("RGB")
        except DECODE_ERRORS as err:
            raise undecodable_image(self.dataset, index, self.image_column, err) from err
        seed = _mix_seed(self.seed, epoch, index, member)
        if self._rng_preserved:  # inside __getitems__: the batch restores the global states once
            _seed_global_rng(seed)
            pixels = self.transform(image)
        else:
            with _seeded_rng(seed):
                pixels = self.transform(image)
        return pixels, int(row[self.label_column])

    _rng_preserved = False

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        """A DataLoader batch: the same examples and augmentations as item by item, but the global
        RNG states are saved and restored once per batch instead of once per example."""
        with _preserved_global_rng():
            self._rng_preserved = True
            try:
                return [self[i] for i in indices]
            finally:
                self._rng_preserved = False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(index), len(self.dataset))
        if self.order == "shared":
            pixels, label = self._example(i, epoch)
            return {"pixel_values": pixels, "labels": torch.tensor(label)}
        examples = [self._example(int(self.member_indices[k, i]), epoch, k) for k in range(self.num_members)]
        return {
            "pixel_values": torch.stack([e[0] for e in examples]),
            "labels": torch.tensor([e[1] for e in examples]),
        }


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
    (`device_data.DeviceImageDataset`; `train_cls` does not apply)."""
    if data_args.data_on_device:
        from .device_data import device_population_datasets

        return device_population_datasets(data, data_args, data_config, num_members=num_members, order=order,
                                          seed=seed, device=device)
    train = train_cls(
        data.train, build_transform(data_config, data_args, is_training=True), data.image_column, data.label_column,
        num_members=num_members, order=order if num_members > 1 else "shared", seed=seed,
    )
    evaluation = MemberOrderDataset(
        data.eval, build_transform(data_config, data_args, is_training=False), data.image_column, data.label_column,
    )
    return train, evaluation
