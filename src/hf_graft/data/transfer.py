"""Training batches to the GPU on a CUDA stream of their own, beside the previous step's kernels.

Accelerate's dataloader copies each batch on the stream the training kernels run on, so the GPU does
nothing else while it copies, between two steps; with one batch per member the copy grows with K
(128 images of 224 px for each of two members: 154 MB of float32 a step). On CUDA the trainer
keeps the host ahead of the GPU (pinned batches, non-blocking copies, no per-step host sync), so when
a batch reaches `training_step` the GPU is still running the previous step: a copy issued then on a
second stream runs on the copy engine while those kernels run. The training stream waits for the
copy only where it first reads the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import recursively_apply

__all__ = ["SideStreamCopy", "on_host"]


def on_host(batch: Any) -> bool:
    """Whether `batch` holds a tensor, and every tensor it holds is in CPU memory."""
    devices = []
    recursively_apply(lambda t: devices.append(t.device.type), batch)
    return bool(devices) and all(d == "cpu" for d in devices)


class SideStreamCopy:
    """`copy(batch)`: `batch` (tensors in pinned CPU memory, nested in dicts / lists / tuples) on
    `device`, copied on a stream of its own; the current stream waits for the copy before it runs
    anything queued after this call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def __call__(self, batch: Any) -> Any:
        compute = torch.cuda.current_stream(self.device)
        copied: list[torch.Tensor] = []

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            out = tensor.to(self.device, non_blocking=True)
            copied.append(out)
            return out

        with torch.cuda.stream(self.stream):
            out = recursively_apply(copy, batch)
        compute.wait_stream(self.stream)
        for tensor in copied:
            # allocated on the copy stream, read on the training stream: the allocator must not give
            # this memory to the next batch's copy before the training stream is done with it
            tensor.record_stream(compute)
        return out
