"""Layer information of weights split across processes (FSDP), without gathering them.

`sharded_information` computes exactly what `information.layer_information` computes for the
whole tensors, from each process's shards, with two all-reduces for any number of layers.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from hf_graft.graft.information import (
    _check_bins,
    _check_criterion,
    _entropy_from_counts,
    _half_open_counts,
    _row_bin_counts,
    _scaled,
    layer_information,
)

__all__ = ["sharded_information", "sharded_layer_information"]


ReduceFn = Callable[[torch.Tensor, str], torch.Tensor]


def _default_all_reduce(group=None) -> ReduceFn:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return lambda t, op: t  # one process: the local shard is the whole weight
    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        dist.all_reduce(t, op=ops[op], group=group)
        return t

    return reduce


def _is_dtensor(t) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _local_piece(shard: torch.Tensor):
    """(local tensor, needs reduction) for a plain tensor or a DTensor (FSDP2's sharded parameter)."""
    to_local = getattr(shard, "to_local", None)
    if to_local is None or not hasattr(shard, "placements"):
        return shard.detach(), True
    sharded = any(p.is_shard() for p in shard.placements)
    return to_local().detach(), sharded


def _dtensor_group(shards: Sequence[torch.Tensor]):
    """The process group a DTensor is sharded over (its mesh dimension with a Shard placement),
    so that an HSDP layer, replicated over the other mesh dimension, is not counted twice."""
    for t in shards:
        placements = getattr(t, "placements", None)
        mesh = getattr(t, "device_mesh", None)
        if placements is None or mesh is None:
            continue
        dims = [i for i, p in enumerate(placements) if p.is_shard()]
        if len(dims) > 1:
            raise ValueError(f"sharded_information: a DTensor sharded over {len(dims)} mesh dimensions; pass group=")
        if dims:
            return mesh.get_group(dims[0])
    return None


def sharded_information(
    local_shards: Sequence[torch.Tensor],
    *,
    criterion: str = "entropy",
    bins: int = 10,
    all_reduce: ReduceFn | None = None,
    group=None,
    include_max: bool = True,
) -> torch.Tensor:
    """Information of N layers, each split across processes, without gathering any weight.

    `local_shards[i]` is this process's piece of layer i (any shape, possibly empty, without
    padding; a DTensor sharded by FSDP2 is read through `to_local()`). Every process must call
    this with its pieces of the same layers, in the same order. Returns a float32 [N] tensor,
    the same on every process, equal to `layer_information` of the whole layers: the bin counts
    are exactly the whole tensor's (same global [min, max], same per-value rule, summed), so the
    entropy is too; l1 sums agree up to summation order.

    Communication: entropy does two all-reduces for all N layers together (MAX of (-min, max),
    then SUM of counts, element counts and non-finite flags), l1 does one (SUM). `all_reduce(t,
    op)` (op in "min", "max", "sum") performs a reduction across processes and returns the
    result; by default `torch.distributed.all_reduce` over `group` (for DTensors, by default the
    group of the mesh dimension they are sharded over) when a process group is initialised, and
    no reduction otherwise. `include_max` is `layer_information`'s.
    """
    _check_criterion(criterion)
    _check_bins(bins)
    if len(local_shards) == 0:
        return torch.zeros(0, dtype=torch.float32)
    pieces = [_local_piece(s) for s in local_shards]
    if not any(needs for _, needs in pieces):
        return torch.stack([layer_information(p, criterion, bins, include_max) for p, _ in pieces])
    if all_reduce is None:
        if group is None:
            group = _dtensor_group(local_shards)
        all_reduce = _default_all_reduce(group)
    # replicated DTensors are whole on every process: count them once (on any one process the
    # reduction would multiply them by the world size), so reduce only the sharded ones
    local = [p for p, _ in pieces]
    weight_of = torch.tensor([1.0 if needs else 0.0 for _, needs in pieces], dtype=torch.float64)
    device = local[0].device

    if criterion == "l1":
        sums = torch.stack([torch.linalg.vector_norm(p.reshape(-1), ord=1, dtype=torch.float64) for p in local])
        replicated = sums * (1.0 - weight_of.to(device))
        total = all_reduce(sums * weight_of.to(device), "sum") + replicated
        return total.float()

    counts, total, bad = _sharded_histograms(local, bins=bins, all_reduce=all_reduce, sharded=[n for _, n in pieces],
                                             include_max=include_max)
    # float32 probabilities, as layer_information computes them for the whole tensor
    h = _entropy_from_counts(counts.float(), total.clamp(min=1.0).float().unsqueeze(1))
    h = torch.where(total > 0, h, torch.zeros_like(h))
    return torch.where(bad > 0, torch.full_like(h, math.nan), h)


def _sharded_histograms(local: Sequence[torch.Tensor], *, bins: int, all_reduce: ReduceFn,
                        sharded: Sequence[bool] | None = None, include_max: bool = True):
    """Whole-layer histograms from local pieces: (counts [N, bins], numel [N], non-finite flags
    [N]), float64, identical on every process. Pieces flagged not `sharded` are whole already.
    `include_max=False` counts the half-open bins of the whole layer's [min, max]."""
    N = len(local)
    device = local[0].device
    w = torch.tensor([1.0 if s else 0.0 for s in (sharded or [True] * N)], dtype=torch.float64, device=device)
    inf = torch.tensor(math.inf, dtype=torch.float32, device=device)
    extremes, nonfinite, numel = [], [], []
    for p in local:
        if p.numel() == 0:  # an empty piece: neutral for MIN/MAX, finite
            lo, hi = inf, -inf
            nonfinite.append(torch.zeros((), dtype=torch.bool, device=device))
        else:
            lo, hi = torch.aminmax(p.reshape(-1))
            lo, hi = lo.float(), hi.float()
            nonfinite.append(~(torch.isfinite(lo) & torch.isfinite(hi)))
        extremes.append(torch.stack([-lo, hi]))
        numel.append(p.numel())
    # a NaN in MAX may be dropped by the backend; the non-finite flags below carry it instead
    ext = torch.nan_to_num(torch.stack(extremes), nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # [N, 2]
    reduced = all_reduce(ext.clone(), "max")
    ext = torch.where(w.bool().unsqueeze(1), reduced, ext)
    lo_g, hi_g = -ext[:, 0], ext[:, 1]

    stats = torch.zeros(N, bins + 2, dtype=torch.float64, device=device)
    for i, p in enumerate(local):
        if p.numel():
            if include_max:
                stats[i, :bins] = _row_bin_counts(_scaled(p, lo_g[i], hi_g[i], bins), bins)[0].double()
            else:
                lo, hi = lo_g[i].view(1, 1), hi_g[i].view(1, 1)
                stats[i, :bins] = _half_open_counts(p.detach().reshape(1, -1), lo, hi, bins)[0].double()
    stats[:, bins] = torch.tensor(numel, dtype=torch.float64, device=device)
    stats[:, bins + 1] = torch.stack(nonfinite).double()
    w = w.unsqueeze(1)
    stats = all_reduce((stats * w).contiguous(), "sum") + stats * (1.0 - w)
    return stats[:, :bins], stats[:, bins], stats[:, bins + 1]


def sharded_layer_information(
    local_shard: torch.Tensor,
    *,
    criterion: str = "entropy",
    bins: int = 10,
    all_reduce: ReduceFn | None = None,
    group=None,
    include_max: bool = True,
) -> torch.Tensor:
    """`layer_information` of a weight split across processes, from this process's shard (0-dim
    float32). See `sharded_information`, which does many layers with the same two collectives."""
    return sharded_information([local_shard], criterion=criterion, bins=bins, all_reduce=all_reduce, group=group,
                               include_max=include_max)[0]
