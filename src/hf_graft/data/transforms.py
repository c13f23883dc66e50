"""timm transforms of the students, and pixel normalisation (on the host or the device)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from hf_graft.config import DataArguments

# the keys of a timm data config (pretrained_cfg) that define the evaluation transform
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

__all__ = ["DATA_CONFIG_KEYS", "DeviceNormalizer", "build_transform", "normalize_pixels", "pixel_statistics", "resolve_student_data_config", "students_data_config"]


def resolve_student_data_config(model, input_size: int | Sequence[int] | None = None, *,
                                whole_image: bool = False) -> dict[str, Any]:
    """timm's data config for the student, with an optional input-size override: a square side, or
    (height, width). `whole_image`: the evaluation transform resizes the whole image to the input size
    (crop_pct 1, crop_mode squash), as re-identification takes a person's box, instead of the model's
    resize-and-centre-crop."""
    from timm.data import resolve_data_config

    overrides: dict[str, Any] = {}
    if isinstance(input_size, int):
        overrides["input_size"] = (3, input_size, input_size)
    elif input_size:
        height, width = input_size
        overrides["input_size"] = (3, int(height), int(width))
    if whole_image:
        overrides.update(crop_pct=1.0, crop_mode="squash")
    config = resolve_data_config(overrides, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def build_transform(data_config: dict[str, Any], args: DataArguments, is_training: bool) -> Callable:
    """timm transforms for the student's input size (square or not) and normalisation; with
    `args.normalize_on_device` they end at uint8 [C, H, W] pixels, which `normalize_pixels` turns into the
    same normalised input. Training transforms end with timm's `RandomErasing` when `args.random_erasing`."""
    from timm.data import create_transform
    from torchvision import transforms as T

    uint8 = args.normalize_on_device
    input_size = tuple(data_config["input_size"])
    height, width = input_size[-2:]
    interpolation = data_config.get("interpolation", "bilinear")
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    mode = args.train_augmentation
    if mode == "auto":
        mode = "pad_crop" if max(height, width) <= 64 else "rrc"
    if not is_training or mode == "none":
        transform = create_transform(
            input_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
            crop_pct=data_config.get("crop_pct", 1.0), crop_mode=data_config.get("crop_mode", "center"),
            use_prefetcher=uint8,
        )
        return _with_random_erasing(transform, args.random_erasing) if is_training else transform
    if mode == "rrc":
        return create_transform(
            input_size, is_training=True, interpolation=interpolation, mean=mean, std=std,
            hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.auto_augment,
            re_prob=args.random_erasing, re_mode="const", use_prefetcher=uint8,
        )
    # pad_crop: the CIFAR and re-identification recipe (resize to the input size, random crop with
    # padding, flip)
    from timm.data.transforms import str_to_interp_mode

    return _with_random_erasing(T.Compose([
        T.Resize((height, width), interpolation=str_to_interp_mode(interpolation)),
        T.RandomCrop((height, width), padding=args.crop_padding),
        T.RandomHorizontalFlip(args.hflip),
        *([T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]),
    ]), args.random_erasing)


def _with_random_erasing(transform: Callable, probability: float) -> Callable:
    """`transform`, then timm's `RandomErasing` (const mode: the rectangle set to 0 in the normalised image,
    the mean colour) with `probability`; `transform` itself when it is 0."""
    if not probability:
        return transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    return T.Compose([transform, RandomErasing(probability, mode="const", device="cpu")])


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




class DeviceNormalizer:
    """`normalize_pixels` for uint8 batches that reach the device as they are
    (`DataArguments.normalize_on_device`), with the mean and std copied to each device once (a per-step
    copy from the host would be a host sync)."""

    def __init__(self, data_config: dict[str, Any] | None):
        self.data_config = data_config
        self._statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._statistics is None or self._statistics[0].device != pixel_values.device:
            self._statistics = pixel_statistics(self.data_config, pixel_values.device)
        return normalize_pixels(pixel_values, *self._statistics)
