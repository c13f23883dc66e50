"""Information of a layer: the entropy of its weight histogram, or its l1 norm (docs/method.md).

Pure torch, no Trainer imports. Everything runs on the device and in the dtype the weights live
in; information is computed in float32.

No host synchronisation: a layer's histogram comes from a device-side min/max and one counting
kernel over the pre-scaled bin indices (`bincount` on CPU, `histc` over a fixed range
elsewhere), so that `graft_members` can compute the information of every layer of every member
without waiting on the device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["COUNT_METHODS", "CRITERIA", "batched_entropy", "layer_information"]

CRITERIA = ("entropy", "l1")


def _check_bins(bins: int) -> None:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


# ----------------------------------------------------------------------------- histograms
def _scaled(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, out: torch.Tensor | None = None):
    """(x - lo) * bins / (hi - lo) in float32, for the rows of a 2-D `x` ([R, n]; `lo`, `hi`
    [R, 1]) or for a whole tensor (0-dim `lo`, `hi`; returned flat). The bin of a value is the
    floor of this; a value equal to max gives `bins`, which goes to the last bin. These are the
    float32 operations, in the same order, of `torch.histc`'s kernel, so the counts equal
    `torch.histc` exactly; like histc, a constant row is binned over [v - 1, v + 1] (its entropy
    is 0 either way). NaN stays NaN. `out` may be `x` itself when `x` is a float32 scratch."""
    if lo.ndim == 0:
        x = x.detach().reshape(-1)
    constant = (hi == lo).float()
    lo, hi = lo - constant, hi + constant
    t = out if out is not None else torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.dtype == torch.float32:
        torch.sub(x.detach(), lo, out=t)
    else:  # subtract in float32, not in the weight's dtype
        t.copy_(x.detach())
        t.sub_(lo)
    width = hi - lo
    return t.mul_(bins).div_(torch.where(width > 0, width, torch.ones_like(width)))


COUNT_METHODS = ("bincount", "histc", "scatter")


def _row_bin_counts(t: torch.Tensor, bins: int, method: str | None = None, index_out: torch.Tensor | None = None):
    """float32 [R, bins] histogram of each row of `t` ([R, n], or 1-D for one row) from
    `_scaled`: bin floor(t), `bins` goes to the last bin, NaN is not counted (its entropy is
    replaced by NaN anyway). Overwrites `t`. All rows are counted by one kernel, in R * (bins + 2)
    slots: slot 0 of a row takes its NaNs, slot bins + 1 its values equal to max.

    The kernel follows the device: `bincount` on CPU (the fastest there); `histc` over a fixed
    range elsewhere (it maps an integer v to v * N / N = v exactly while v * N < 2**24, and, its
    range being given, reads nothing back to the host, unlike `bincount` on CUDA); a 1-D
    `scatter_add` (deterministic on CUDA) where deterministic algorithms are on, since CUDA's
    histc refuses to run then, or where the range is too large for exact float32 slots.
    """
    rows = t.view(1, -1) if t.ndim == 1 else t
    R, S = rows.shape[0], bins + 2
    N = R * S
    # floor first: adding the slot offset to an unfloored value could round it up into the next bin
    rows.floor_().nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0).clamp_(-1, bins)
    if R == 1:
        rows.add_(1.0)
    else:
        rows.add_(torch.arange(R, dtype=torch.float32, device=t.device).mul_(S).add_(1.0).unsqueeze(1))
    if method is None:
        if t.device.type == "cpu":
            method = "bincount"
        elif torch.are_deterministic_algorithms_enabled() or N * N >= 2**24:
            method = "scatter"
        else:
            method = "histc"
    flat = rows.reshape(-1)
    if method == "bincount":
        idx = index_out.view(-1).copy_(flat) if index_out is not None else flat.to(torch.int32)
        c = torch.bincount(idx, minlength=N).float()
    elif method == "histc":
        c = torch.histc(flat, bins=N, min=0, max=N)
    elif method == "scatter":
        c = torch.zeros(N, dtype=torch.float32, device=t.device)
        c.scatter_add_(0, flat.long(), torch.ones(1, dtype=torch.float32, device=t.device).expand(flat.numel()))
    else:
        raise ValueError(f"method must be one of {COUNT_METHODS}, got {method!r}")
    c = c.view(R, S)
    return torch.cat([c[:, 1:bins], c[:, bins:].sum(1, keepdim=True)], dim=1)


def _half_open_counts(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """float32 [R, bins] histogram of each row of `x` [R, n] (`lo`, `hi`: float32 [R, 1]) over the
    half-open bins [e_i, e_(i+1)), e_i = lo + i * ((hi - lo) / bins) computed in float32, as the
    authors' code bins: a value counts when it lies inside one. A value equal to max lies outside
    unless rounding put e_bins above it; a constant row has empty bins. count(e_i <= x < e_(i+1)) is
    count(x >= e_i) - count(x >= e_(i+1)), the edges being non-decreasing: bins + 1 passes over x."""
    scale = (hi - lo) / bins
    at_or_above = torch.stack([(x >= lo + i * scale).sum(dim=1) for i in range(bins + 1)], dim=1)
    return (at_or_above[:, :-1] - at_or_above[:, 1:]).float()


def _entropy_from_counts(counts: torch.Tensor, n) -> torch.Tensor:
    p = counts.float() / n
    return torch.special.xlogy(p, p).neg_().sum(dim=-1)  # (-0 terms sum to +0)


def _entropy_rows(x: torch.Tensor, bins: int, out: torch.Tensor | None = None,
                  index_out: torch.Tensor | None = None, include_max: bool = True) -> torch.Tensor:
    """Entropy (float32 [R]) of the histogram of each row of `x` [R, n], over the row's own
    [min, max]; NaN for a row with a non-finite value. `out` (float32 [R, n], may be `x`) and
    `index_out` (int32, CPU) are scratch space. `include_max=False`: the half-open bins of
    `_half_open_counts`."""
    R, n = x.shape
    if n == 0:
        return torch.zeros(R, dtype=torch.float32, device=x.device)
    # amin/amax (NaN propagates into both): aminmax along a dim is ~20x slower on CPU
    lo, hi = x.detach().amin(dim=1, keepdim=True).float(), x.detach().amax(dim=1, keepdim=True).float()
    finite = (torch.isfinite(lo) & torch.isfinite(hi)).squeeze(1)
    if include_max:
        counts = _row_bin_counts(_scaled(x, lo, hi, bins, out), bins, index_out=index_out)
    else:
        counts = _half_open_counts(x.detach(), lo, hi, bins)
    h = _entropy_from_counts(counts, n)
    return torch.where(finite, h, torch.full_like(h, math.nan))


def _member_entropies(ws: Sequence[torch.Tensor], bins: int, out: torch.Tensor, index_out: torch.Tensor | None,
                      include_max: bool = True):
    """Entropy (float32 [K]) of each of K same-shape tensors, as `_entropy_rows` of their stack,
    without the stacking copy: each tensor is scaled straight into its row of `out` ([K, n])."""
    K, n = len(ws), ws[0].numel()
    if n == 0:
        return torch.zeros(K, dtype=torch.float32, device=out.device)
    flats = [w.detach().reshape(-1) for w in ws]
    extremes = torch.stack([torch.stack(torch.aminmax(f)) for f in flats]).float()  # [K, 2], NaN propagates
    lo, hi = extremes[:, :1], extremes[:, 1:]
    finite = torch.isfinite(extremes).all(dim=1)
    if not include_max:
        counts = torch.cat([_half_open_counts(f.view(1, -1), lo[k : k + 1], hi[k : k + 1], bins)
                            for k, f in enumerate(flats)])
        h = _entropy_from_counts(counts, n)
        return torch.where(finite, h, torch.full_like(h, math.nan))
    constant = (hi == lo).float()
    lo, hi = lo - constant, hi + constant  # histc's range for a constant tensor
    for k, f in enumerate(flats):
        if f.dtype == torch.float32:
            torch.sub(f, lo[k], out=out[k])
        else:  # subtract in float32, not in the weight's dtype
            out[k].copy_(f)
            out[k].sub_(lo[k])
    width = hi - lo
    out.mul_(bins).div_(torch.where(width > 0, width, torch.ones_like(width)))
    h = _entropy_from_counts(_row_bin_counts(out, bins, index_out=index_out), n)
    return torch.where(finite, h, torch.full_like(h, math.nan))


def batched_entropy(rows: torch.Tensor, bins: int = 10, include_max: bool = True) -> torch.Tensor:
    """Entropy (natural log) of the histogram of each row of a 2-D tensor, in float32.

    Each row gets `bins` equal-width bins over its own [min, max], binned as `torch.histc` bins
    that row (a value equal to max falls in the last bin; `include_max=False`: the authors'
    half-open bins, see `layer_information`). A constant row has entropy 0; a row with a
    non-finite value has entropy NaN.
    """
    _check_bins(bins)
    if rows.ndim != 2:
        raise ValueError(f"batched_entropy expects a 2-D tensor, got shape {tuple(rows.shape)}")
    return _entropy_rows(rows, bins, include_max=include_max)


def _l1(x: torch.Tensor, dim=None) -> torch.Tensor:
    """sum |x| (over `dim`, or all values) as float32, accumulated in float64: float32 norms
    accumulate sequentially and drift by 1e-5 on a large layer; no |x| temporary is allocated."""
    x = x.detach()
    if x.device.type == "mps":  # no float64 there
        return x.float().abs().sum(dim=dim) if dim is not None else x.float().abs().sum()
    if dim is None:
        return torch.linalg.vector_norm(x.reshape(-1), ord=1, dtype=torch.float64).float()
    return torch.linalg.vector_norm(x, ord=1, dim=dim, dtype=torch.float64).float()


def layer_information(weight: torch.Tensor, criterion: str = "entropy", bins: int = 10,
                      include_max: bool = True) -> torch.Tensor:
    """Information of a whole layer as a 0-dim float32 tensor on the weight's device.

    `entropy` (eq. 6): entropy (natural log) of the `bins`-bin histogram of all the layer's
    values over [min, max], as `torch.histc` bins them; 0 for a constant tensor, NaN when a
    value is not finite. `include_max=False` bins as the authors' code does: half-open bins
    [lo + i w, lo + (i + 1) w) with w = (max - min) / bins and the edges computed in float32,
    so the values equal to the maximum are in no bin (unless rounding put the top edge above
    them), while every share stays count / numel. `l1` (eq. 3): sum |w| (accumulated in
    float64, returned as float32).
    """
    _check_criterion(criterion)
    _check_bins(bins)
    if criterion == "entropy":
        return _entropy_rows(weight.detach().reshape(1, -1), bins, include_max=include_max)[0]
    return _l1(weight)

