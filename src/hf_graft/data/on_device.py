"""Data on the training device: every split decoded once into a uint8 tensor, batches built there.

`DataArguments.data_on_device: true` replaces the per-example PIL path (`data.MemberOrderDataset`)
for datasets that fit in the device's memory. Each split is decoded once, resized to the student's
input size with the same PIL geometry as the PIL path (`data.build_transform`), and kept as a
uint8 tensor [N, C, H, W] on the device. A training batch is then a handful of batched tensor ops:
gather the rows, pad-crop with `crop_padding`, flip with probability `hflip`, normalise with the
student's mean and std. Evaluation only normalises (its geometry, resize and center crop, was
applied at decode time), so its inputs equal the PIL path's up to float rounding.

What the PIL path guarantees holds here too:
- each member its own order every epoch (member k reads `perm_k[i]` of the sampler's i, the same
  permutations as `MemberOrderDataset`; `data_order: shared` feeds every member the same rows);
- the augmentation of every example is a pure function of (seed, epoch, row, member): crop offsets
  and flip bits come from a counter-based hash computed on the device, so they do not depend on the
  batch an example lands in, on `skip_first_batches` when a run resumes, or on the number of
  processes (Accelerate shards batches of the sampler's indices across them), and a run stopped
  mid-epoch and resumed ends bit-identical to an uninterrupted one;
- no global random stream is touched.

The augmented pixels are not the PIL path's (another random source draws the offsets), but they are
the same on every run with the same seed. Supported training augmentations: `pad_crop` and `none`.

A dataset is a `torch.utils.data.Dataset` whose `__getitems__` returns the whole batch, ready on
the device, so the Trainer drives it as any other dataset; batches are built in the main process
(`dataloader_num_workers` 0, `dataloader_pin_memory` off: see `main_process_loading`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from hf_graft.config import DataArguments
from hf_graft.data.sampling import member_orders
from hf_graft.utils.rng import mix_seed
from hf_graft.data.transforms import normalize_pixels
from hf_graft.data.checks import DECODE_ERRORS, as_rgb, undecodable_image

__all__ = [
    "DEVICE_AUGMENTATIONS",
    "MEMORY_FRACTION",
    "DeviceImageDataset",
    "DeviceSplits",
    "collate_examples",
    "decode_split",
    "decode_to_device",
    "device_population_datasets",
    "main_process_loading",
]

logger = logging.getLogger(__name__)

DEVICE_AUGMENTATIONS = ("pad_crop", "none")
MEMORY_FRACTION = 0.75  # at most this share of the free memory is taken by the decoded data
_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- counter-based hash
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow (16-bit halves)."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) that mixes every input bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _example_hash(key: tuple[int, int], epoch: torch.Tensor, row: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of (key, epoch, row, member), element-wise, in int64 (same on every device)."""
    h = _fmix32((epoch & _M32) ^ key[0])
    h = _fmix32(h ^ (row & _M32))
    h = _fmix32(h ^ (member & _M32))
    return _fmix32(h ^ key[1])


def _draw(h: torch.Tensor, stream: int) -> torch.Tensor:
    """An independent 32-bit value per element for each `stream` (crop y, crop x, flip)."""
    return _fmix32(h ^ ((stream * 0x9E3779B9) & _M32))


# ----------------------------------------------------------------------------- the dataset
class DeviceImageDataset(TorchDataset):
    """A decoded split on the device, served as ready batches to a population.

    `images` is uint8 [N, C, H, W] and `labels` int64 [N], both on the device the batches are built
    on. `order` and the indices follow `MemberOrderDataset`: `shared` gives `pixel_values`
    [B, C, H, W] and `labels` [B]; `independent` gives [B, K, C, H, W] and [B, K], member k reading
    row `perm_k[i]`. Indices may be epoch-tagged (`e * len(self) + i`, as `EpochShuffleSampler`
    yields them); the augmentation of every row is drawn from (seed, epoch, row, member).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean, std, augmentation: str = "none",
                 crop_padding: int = 4, hflip: float = 0.0, num_members: int = 1, order: str = "shared",
                 seed: int = 0):

        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"DeviceImageDataset: images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"DeviceImageDataset: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if order not in ("shared", "independent"):
            raise ValueError(f"DeviceImageDataset: order must be 'shared' or 'independent', got {order!r}")
        if augmentation not in DEVICE_AUGMENTATIONS:
            raise ValueError(f"DeviceImageDataset: augmentation {augmentation!r}; allowed: "
                             f"{', '.join(DEVICE_AUGMENTATIONS)}")
        self.images, self.labels = images, labels.to(device=images.device, dtype=torch.long)
        self.device = images.device
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.augmentation = augmentation
        self.crop_padding = int(crop_padding) if augmentation == "pad_crop" else 0
        hflip = float(hflip) if augmentation == "pad_crop" else 0.0
        self.flip_threshold = round(hflip * 2**32)  # flip when a uniform 32-bit draw is below it
        self.num_members = num_members
        self.order = order
        self.seed = int(seed)
        # the rows each member reads: the same permutations as the PIL path's MemberOrderDataset
        self.member_indices = member_orders(len(labels), num_members, order, self.seed).to(self.device)
        mixed = mix_seed(self.seed, 0xDA7A)
        self._key = (mixed & _M32, (mixed >> 32) & _M32)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip_threshold > 0

    def augmentation_params(self, epoch: torch.Tensor, row: torch.Tensor, member: torch.Tensor):
        """(dy, dx, flip) of every (epoch, row, member): the crop's offsets in the zero-padded image,
        in 0..2 * crop_padding, and whether the crop is mirrored."""
        h = _example_hash(self._key, epoch, row, member)
        span = 2 * self.crop_padding + 1
        dy = (_draw(h, 1) * span) >> 32  # uniform in 0..span-1, exactly (span < 2**31)
        dx = (_draw(h, 2) * span) >> 32
        flip = _draw(h, 3) < self.flip_threshold
        return dy, dx, flip

    def _pixels(self, epoch: torch.Tensor, row: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """Normalised float32 pixels [M, C, H, W] of the given rows, augmented for (epoch, member)."""
        images = self.images[row]
        if self.augments:
            images = self._pad_crop_flip(images, *self.augmentation_params(epoch, row, member))
        return normalize_pixels(images, self.mean, self.std)  # the PIL path's ToTensor + Normalize

    def _pad_crop_flip(self, images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor):
        """Crop every image at its offset in the image padded with `crop_padding` zeros, mirror some:
        two gathers over source coordinates, and zeros where they fall in the padding."""
        m, c, height, width = images.shape
        p = self.crop_padding
        ys = dy.unsqueeze(1) - p + torch.arange(height, device=self.device)  # [M, H] source rows
        xs = dx.unsqueeze(1) - p + torch.arange(width, device=self.device)  # [M, W] source columns
        xs = torch.where(flip.unsqueeze(1), xs.flip(1), xs)
        inside = ((ys >= 0) & (ys < height)).view(m, 1, height, 1) & ((xs >= 0) & (xs < width)).view(m, 1, 1, width)
        out = images.gather(2, ys.clamp(0, height - 1).view(m, 1, height, 1).expand(m, c, height, width))
        out = out.gather(3, xs.clamp(0, width - 1).view(m, 1, 1, width).expand(m, c, height, width))
        return out.masked_fill_(~inside, 0)

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        """One batch, whole and on the device (the DataLoader's collate passes it through)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.device.type == "cuda":  # a pageable copy would wait for the GPU to finish the last step
            index = index.pin_memory().to(self.device, non_blocking=True)
        else:
            index = index.to(self.device)
        n = len(self)
        epoch, i = index // n, index % n
        rows = self.member_indices[:, i].t()  # [B, K] (K = 1 for a shared order)
        batch, k = rows.shape
        member = torch.arange(k, device=self.device).expand(batch, k)
        pixels = self._pixels(epoch.unsqueeze(1).expand(batch, k).reshape(-1), rows.reshape(-1), member.reshape(-1))
        labels = self.labels[rows]
        if self.order == "shared":
            return {"pixel_values": pixels, "labels": labels[:, 0]}
        return {"pixel_values": pixels.view(batch, k, *pixels.shape[1:]), "labels": labels}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {name: value[0] for name, value in batch.items()}


def collate_examples(batch):
    """`default_collate` for a list of examples; a batch a dataset built whole (a dict, as
    `DeviceImageDataset.__getitems__` returns) passes through untouched."""
    return batch if isinstance(batch, Mapping) else default_collate(batch)


def main_process_loading(args) -> dict[str, Any]:
    """The dataloader settings under which batches that already live on the device are built: in the main
    process (no workers: they cannot share CUDA tensors cheaply) and unpinned (only CPU memory can be
    pinned). Returns those that differ from `args` (which stays as it is)."""
    settings = {"dataloader_num_workers": 0, "dataloader_pin_memory": False, "dataloader_persistent_workers": False,
                "dataloader_prefetch_factor": None}
    changed = {name: value for name, value in settings.items() if getattr(args, name) != value}
    if changed:
        logger.info("data on the device: batches are built in the main process (was %s)",
                    {name: getattr(args, name) for name in changed})
    return changed


# ----------------------------------------------------------------------------- decoding
@dataclass
class DeviceSplits:
    """Both splits decoded on the device and the settings of their batches; `datasets` gives the
    (train, eval) pair of a population (cheap: the pixels are shared, only the orders are new)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str
    crop_padding: int
    hflip: float

    def datasets(self, *, num_members: int, order: str, seed: int) -> tuple[DeviceImageDataset, DeviceImageDataset]:
        train = DeviceImageDataset(
            self.train_images, self.train_labels, mean=self.mean, std=self.std, augmentation=self.augmentation,
            crop_padding=self.crop_padding, hflip=self.hflip, num_members=num_members,
            order=order if num_members > 1 else "shared", seed=seed,
        )
        evaluation = DeviceImageDataset(self.eval_images, self.eval_labels, mean=self.mean, std=self.std)
        return train, evaluation


def _geometry(transform) -> Callable:
    """The deterministic PIL part of a `data.build_transform` pipeline (resize, center crop): every
    step before the first random or tensor step."""
    from torchvision import transforms as T

    stop = ("RandomCrop", "RandomHorizontalFlip", "ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor",
            "Normalize")
    steps = []
    for step in getattr(transform, "transforms", [transform]):
        if type(step).__name__ in stop:
            break
        if type(step).__name__.startswith("Random"):
            raise ValueError(f"DataArguments.train_augmentation: {type(step).__name__} cannot run on the device; "
                             f"allowed with data_on_device: {', '.join(DEVICE_AUGMENTATIONS)}")
        steps.append(step)
    return T.Compose(steps)


def _device_augmentation(data_args: DataArguments, side: int) -> str:
    mode = data_args.train_augmentation
    if mode == "auto":
        mode = "pad_crop" if side <= 64 else "rrc"
    if mode not in DEVICE_AUGMENTATIONS:
        raise ValueError(
            f"DataArguments.train_augmentation: {data_args.train_augmentation!r} means {mode!r} at {side} px, which "
            f"data_on_device does not run; allowed with data_on_device: {', '.join(DEVICE_AUGMENTATIONS)}"
        )
    return mode


def _free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the CUDA allocator's view for a GPU, available RAM otherwise."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil  # an Accelerate dependency

    return int(psutil.virtual_memory().available)


def _check_fits(counts: Mapping[str, int], shape: tuple[int, int, int], device: torch.device) -> None:
    """Fail before decoding anything when the decoded splits would not fit on the device."""
    per_image = int(np.prod(shape)) + 8  # uint8 pixels and an int64 label
    needed = sum(counts.values()) * per_image
    free = _free_memory(device)
    if needed > MEMORY_FRACTION * free:
        gib = 2.0**30
        images = " + ".join(f"{n} {split}" for split, n in counts.items())
        raise ValueError(
            f"DataArguments.data_on_device: the decoded data needs {needed / gib:.2f} GiB ({images} images of "
            f"{'x'.join(map(str, shape))} uint8) but {device} has {free / gib:.2f} GiB free (at most "
            f"{MEMORY_FRACTION:.0%} of it is used for data); set data_on_device: false, or a smaller input_size "
            "or max_train_samples"
        )


_DECODE_JOB: tuple | None = None  # (undecoded split, column, feature, geometry, side): read by forked workers


def _decode_range(bounds: tuple[int, int]) -> np.ndarray:
    dataset, column, feature, geometry, side = _DECODE_JOB
    low, high = bounds
    values = dataset.with_format("arrow")[low:high].column(column).to_pylist()  # {"bytes", "path"} each
    out = np.empty((high - low, side, side, 3), dtype=np.uint8)
    for j, value in enumerate(values):
        try:  # a file that cannot be read is named (split, row, file), not skipped
            image = feature.decode_example(value)
            image = as_rgb(image)
        except DECODE_ERRORS as err:
            raise undecodable_image(dataset, low + j, column, err) from err
        image = geometry(image)
        if image.size != (side, side):
            raise ValueError(f"DataArguments.input_size: decoding gave a {image.size} image, expected {side}x{side}")
        out[j] = np.asarray(image)
    return out


def decode_split(split, image_column: str, label_column: str, geometry: Callable, side: int,
                 device: torch.device | str, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a `datasets.Dataset` split once: (uint8 [N, 3, side, side], int64 [N]) on `device`.

    Images are decoded from their stored bytes (or paths) with the `datasets.Image` feature, made RGB,
    and passed through `geometry` (PIL resize / center crop). Large splits are decoded by a pool of
    forked processes (`workers`, default: up to 8, one per core), each on its own range of rows.
    """
    global _DECODE_JOB
    from datasets import Image

    feature = split.features[image_column]
    if not isinstance(feature, Image):
        raise ValueError(f"DataArguments.image_column: {image_column!r} is {feature}, not a datasets.Image column")
    undecoded = split.cast_column(image_column, Image(decode=False))
    n = len(split)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n >= 4096 else 1
    chunk = max(1, -(-n // (4 * max(workers, 1))))
    ranges = [(low, min(low + chunk, n)) for low in range(0, n, chunk)]
    _DECODE_JOB = (undecoded, image_column, Image(), geometry, side)
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            # forked workers inherit the job (and the memory-mapped dataset); they touch no device
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_decode_range, ranges)
        else:
            parts = [_decode_range(r) for r in ranges]
    finally:
        _DECODE_JOB = None
    pixels = np.concatenate(parts) if parts else np.empty((0, side, side, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(np.asarray(split.with_format("numpy")[label_column]), dtype=torch.long).to(device)
    return images, labels


def decode_to_device(data, data_args: DataArguments, data_config: dict[str, Any], device: torch.device | str,
                     workers: int | None = None) -> DeviceSplits:
    """Check the augmentation and the memory, then decode both splits of `data` (`data.ImageData`)
    at the student's input size onto `device`."""
    from hf_graft.data.transforms import build_transform

    device = torch.device(device)
    side = int(data_config["input_size"][-1])
    augmentation = _device_augmentation(data_args, side)
    _check_fits({"train": len(data.train), "eval": len(data.eval)}, (3, side, side), device)
    train_geometry = _geometry(build_transform(data_config, data_args, is_training=True))
    eval_geometry = _geometry(build_transform(data_config, data_args, is_training=False))
    train_images, train_labels = decode_split(data.train, data.image_column, data.label_column, train_geometry, side,
                                              device, workers)
    eval_images, eval_labels = decode_split(data.eval, data.image_column, data.label_column, eval_geometry, side,
                                            device, workers)
    return DeviceSplits(train_images, train_labels, eval_images, eval_labels, tuple(data_config["mean"]),
                        tuple(data_config["std"]), augmentation, data_args.crop_padding, data_args.hflip)


def device_population_datasets(data, data_args: DataArguments, data_config: dict[str, Any], *, num_members: int,
                               order: str, seed: int, device: torch.device | str = "cpu"):
    """`data.population_datasets` for `data_on_device`: (train, eval) `DeviceImageDataset`s on `device`."""
    return decode_to_device(data, data_args, data_config, device).datasets(num_members=num_members, order=order,
                                                                           seed=seed)
