"""Per-member example order: each member's permutation of the training set, the epoch sampler, and each example's seeded augmentation."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from hf_graft.data.checks import DECODE_ERRORS, as_rgb, undecodable_image
from hf_graft.utils.rng import mix_seed, preserved_rng, seed_global_rng

__all__ = ["EpochShuffleSampler", "MemberOrderDataset", "member_orders"]


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
        generator = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch))
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self):
        offset = self.epoch * self.num_examples
        yield from (self.permutation(self.epoch) + offset).tolist()

    def __len__(self) -> int:
        return self.num_examples


@contextlib.contextmanager
def _seeded_rng(seed: int):
    """Seed torch, `random` and numpy for one example's augmentation, restoring their states after."""
    with preserved_rng():
        seed_global_rng(seed)
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
            image = as_rgb(image)
        except DECODE_ERRORS as err:
            raise undecodable_image(self.dataset, index, self.image_column, err) from err
        seed = mix_seed(self.seed, epoch, index, member)
        if self._rng_preserved:  # inside __getitems__: the batch restores the global states once
            seed_global_rng(seed)
            pixels = self.transform(image)
        else:
            with _seeded_rng(seed):
                pixels = self.transform(image)
        return pixels, int(row[self.label_column])

    _rng_preserved = False

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        """A DataLoader batch: the same examples and augmentations as item by item, but the global
        RNG states are saved and restored once per batch instead of once per example."""
        with preserved_rng():
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


