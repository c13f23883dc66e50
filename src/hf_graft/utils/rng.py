"""Random streams: seeds mixed from integers, and a block that leaves the global generators untouched."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["mix_seed", "preserved_rng", "seed_global_rng"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing; deterministic across processes)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = (state * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state >> 1


def seed_global_rng(seed: int) -> None:
    """Seed torch's CPU generator, `random` and numpy (what the transforms draw from).

    Not `torch.manual_seed`: that also queues a lazy CUDA seeding with a captured stack trace,
    ~0.3 ms per example (benchmarks/throughput.py)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


@contextlib.contextmanager
def preserved_rng(device: torch.device | str | None = None):
    """Restore the python, numpy and torch CPU generators on exit, and the CUDA generator of `device`
    when it is a CUDA device."""
    device = torch.device(device) if device is not None else None
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
