"""The Method: information criteria, adaptive alpha and the in-parallel ring graft (SPEC 1-5).

Pure torch, no Trainer imports. Everything runs on the device and in the dtype the weights live
in; information is computed in float32 (mixing in float32, or float64 for float64 weights).

`graft_members` does no host synchronisation at all: a layer's histogram comes from a
device-side min/max and one counting kernel over the pre-scaled bin indices (`bincount` on CPU,
`histc` over a fixed range elsewhere), the guard against non-finite scions is a device-side
`torch.where`, and the report keeps its numbers on the device until it is first read, when they
are copied to the host in one transfer. Large temporaries live in scratch buffers reused for
every tensor (no allocation, and no page faults, per layer).

`sharded_information` computes the same information from the shards of a weight that is split
across processes (FSDP), with two all-reduces for any number of layers and no gather.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "CRITERIA",
    "LEVELS",
    "GraftReport",
    "MemberGraftReport",
    "adaptive_alpha",
    "anchor_plan",
    "batched_entropy",
    "cosine_lr_multipliers",
    "graft_internal",
    "graft_members",
    "graft_noise",
    "layer_information",
    "sharded_information",
    "sharded_layer_information",
]

CRITERIA = ("entropy", "l1")
LEVELS = ("layer", "filter")


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


def _entropy_from_counts(counts: torch.Tensor, n) -> torch.Tensor:
    p = counts.float() / n
    return torch.special.xlogy(p, p).neg_().sum(dim=-1)  # (-0 terms sum to +0)


def _entropy_rows(x: torch.Tensor, bins: int, out: torch.Tensor | None = None,
                  index_out: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (float32 [R]) of the histogram of each row of `x` [R, n], over the row's own
    [min, max]; NaN for a row with a non-finite value. `out` (float32 [R, n], may be `x`) and
    `index_out` (int32, CPU) are scratch space."""
    R, n = x.shape
    if n == 0:
        return torch.zeros(R, dtype=torch.float32, device=x.device)
    # amin/amax (NaN propagates into both): aminmax along a dim is ~20x slower on CPU
    lo, hi = x.detach().amin(dim=1, keepdim=True).float(), x.detach().amax(dim=1, keepdim=True).float()
    finite = (torch.isfinite(lo) & torch.isfinite(hi)).squeeze(1)
    counts = _row_bin_counts(_scaled(x, lo, hi, bins, out), bins, index_out=index_out)
    h = _entropy_from_counts(counts, n)
    return torch.where(finite, h, torch.full_like(h, math.nan))


def _member_entropies(ws: Sequence[torch.Tensor], bins: int, out: torch.Tensor, index_out: torch.Tensor | None):
    """Entropy (float32 [K]) of each of K same-shape tensors, as `_entropy_rows` of their stack,
    without the stacking copy: each tensor is scaled straight into its row of `out` ([K, n])."""
    K, n = len(ws), ws[0].numel()
    if n == 0:
        return torch.zeros(K, dtype=torch.float32, device=out.device)
    flats = [w.detach().reshape(-1) for w in ws]
    extremes = torch.stack([torch.stack(torch.aminmax(f)) for f in flats]).float()  # [K, 2], NaN propagates
    lo, hi = extremes[:, :1], extremes[:, 1:]
    finite = torch.isfinite(extremes).all(dim=1)
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


def batched_entropy(rows: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy (natural log) of the histogram of each row of a 2-D tensor, in float32.

    Each row gets `bins` equal-width bins over its own [min, max], binned as `torch.histc` bins
    that row (a value equal to max falls in the last bin). A constant row has entropy 0; a row
    with a non-finite value has entropy NaN.
    """
    _check_bins(bins)
    if rows.ndim != 2:
        raise ValueError(f"batched_entropy expects a 2-D tensor, got shape {tuple(rows.shape)}")
    return _entropy_rows(rows, bins)


def _l1(x: torch.Tensor, dim=None) -> torch.Tensor:
    """sum |x| (over `dim`, or all values) as float32, accumulated in float64: float32 norms
    accumulate sequentially and drift by 1e-5 on a large layer; no |x| temporary is allocated."""
    x = x.detach()
    if x.device.type == "mps":  # no float64 there
        return x.float().abs().sum(dim=dim) if dim is not None else x.float().abs().sum()
    if dim is None:
        return torch.linalg.vector_norm(x.reshape(-1), ord=1, dtype=torch.float64).float()
    return torch.linalg.vector_norm(x, ord=1, dim=dim, dtype=torch.float64).float()


def layer_information(weight: torch.Tensor, criterion: str = "entropy", bins: int = 10) -> torch.Tensor:
    """Information of a whole layer as a 0-dim float32 tensor on the weight's device.

    `entropy` (eq. 6): entropy (natural log) of the `bins`-bin histogram of all the layer's
    values over [min, max], as `torch.histc` bins them; 0 for a constant tensor, NaN when a
    value is not finite. `l1` (eq. 3): sum |w| (accumulated in float64, returned as float32).
    """
    _check_criterion(criterion)
    _check_bins(bins)
    if criterion == "entropy":
        return _entropy_rows(weight.detach().reshape(1, -1), bins)[0]
    return _l1(weight)


def adaptive_alpha(info_self, info_other, A: float = 0.4, c: float = 500.0):
    """alpha = A/pi * arctan(c * (info_self - info_other)) + 0.5   (eq. 7 with the authors' /pi).

    Lies in (0.5 - A/2, 0.5 + A/2); tensors in, float32 tensor out; numbers in, float out.
    """
    if isinstance(info_self, torch.Tensor) or isinstance(info_other, torch.Tensor):
        diff = torch.as_tensor(info_self, dtype=torch.float32) - torch.as_tensor(info_other, dtype=torch.float32)
        return A / math.pi * torch.atan(c * diff) + 0.5
    return A / math.pi * math.atan(c * (float(info_self) - float(info_other))) + 0.5


# ----------------------------------------------------------------------------- sharded (FSDP)
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
    no reduction otherwise.
    """
    _check_criterion(criterion)
    _check_bins(bins)
    if len(local_shards) == 0:
        return torch.zeros(0, dtype=torch.float32)
    pieces = [_local_piece(s) for s in local_shards]
    if not any(needs for _, needs in pieces):
        return torch.stack([layer_information(p, criterion, bins) for p, _ in pieces])
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

    counts, total, bad = _sharded_histograms(local, bins=bins, all_reduce=all_reduce, sharded=[n for _, n in pieces])
    # float32 probabilities, as layer_information computes them for the whole tensor
    h = _entropy_from_counts(counts.float(), total.clamp(min=1.0).float().unsqueeze(1))
    h = torch.where(total > 0, h, torch.zeros_like(h))
    return torch.where(bad > 0, torch.full_like(h, math.nan), h)


def _sharded_histograms(local: Sequence[torch.Tensor], *, bins: int, all_reduce: ReduceFn,
                        sharded: Sequence[bool] | None = None):
    """Whole-layer histograms from local pieces: (counts [N, bins], numel [N], non-finite flags
    [N]), float64, identical on every process. Pieces flagged not `sharded` are whole already."""
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
            stats[i, :bins] = _row_bin_counts(_scaled(p, lo_g[i], hi_g[i], bins), bins)[0].double()
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
) -> torch.Tensor:
    """`layer_information` of a weight split across processes, from this process's shard (0-dim
    float32). See `sharded_information`, which does many layers with the same two collectives."""
    return sharded_information([local_shard], criterion=criterion, bins=bins, all_reduce=all_reduce, group=group)[0]


# ----------------------------------------------------------------------------- anchor rule
def _is_anchor(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2


def anchor_plan(state: dict[str, torch.Tensor]) -> list[tuple[str, str | None]]:
    """(entry name, anchor name) for every entry to mix, in state-dict order (SPEC section 3).

    Anchors (floating tensors with ndim >= 2) map to themselves; other floating entries take the
    nearest preceding anchor (entries before the first anchor take the first anchor); integer
    buffers such as `num_batches_tracked` are left out. Entries that share storage with an
    earlier one (tied weights) are left out too, so they are mixed once.
    """
    names = [n for n, t in state.items() if t.is_floating_point()]
    first_anchor = next((n for n in names if _is_anchor(state[n])), None)
    seen_storage: set[tuple[int, int]] = set()
    plan = []
    current = first_anchor
    for name in names:
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen_storage:
            continue
        seen_storage.add(key)
        if _is_anchor(t):
            current = name
        plan.append((name, current))
    return plan


def _live_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # state_dict() tensors share storage with the parameters/buffers: writing into them (under
    # no_grad) updates the module in place, which keeps optimizers, DDP buckets and compiled
    # graphs pointing at the same tensors.
    return module.state_dict(keep_vars=False)


# ----------------------------------------------------------------------------- report
class MemberGraftReport:
    """What happened to one member (the rootstock) in one graft.

    `alphas`: anchor name -> alpha (the mean over filters for the filter level); `information`:
    anchor name -> own information before the graft; `scion_information`: the scion's;
    `finite`: whether this member's weights were all finite; `skipped_reason`: why it kept its
    own weights (its scion was not finite), else None.
    """

    def __init__(self, index, scion, alphas=None, information=None, scion_information=None, finite=True,
                 skipped_reason=None):
        self.index = index
        self.scion = scion
        self.alphas: dict[str, float] = dict(alphas or {})
        self.information: dict[str, float] = dict(information or {})
        self.scion_information: dict[str, float] = dict(scion_information or {})
        self.finite = finite
        self.skipped_reason = skipped_reason

    @property
    def alpha_values(self) -> list[float]:
        return list(self.alphas.values())

    def __repr__(self) -> str:
        return (f"MemberGraftReport(index={self.index}, scion={self.scion}, anchors={len(self.alphas)}, "
                f"finite={self.finite}, skipped_reason={self.skipped_reason!r})")


class GraftReport:
    """Per-member alphas and information values of one population graft.

    `graft_members` leaves the numbers on the device; they are copied to the host, in one
    transfer, the first time `members` (or anything built on it) is read.
    """

    def __init__(self, members: list[MemberGraftReport] | None = None, criterion: str = "entropy",
                 source: str = "external", *, _pending: dict | None = None):
        self._members = members
        self._pending = _pending
        self.criterion = criterion
        self.source = source

    @property
    def members(self) -> list[MemberGraftReport]:
        if self._members is None:
            self._members = _materialise(**self._pending)
            self._pending = None
        return self._members

    def to_log_dict(self, prefix: str = "graft") -> dict[str, float]:
        """Flat scalars for Trainer logging (TensorBoard, W&B, ...)."""
        logs: dict[str, float] = {}
        for m in self.members:
            key = f"{prefix}/member{m.index}"
            values = m.alpha_values
            if values:
                logs[f"{key}_alpha_mean"] = sum(values) / len(values)
                logs[f"{key}_alpha_min"] = min(values)
                logs[f"{key}_alpha_max"] = max(values)
            if m.information:
                logs[f"{key}_information"] = sum(m.information.values())
            logs[f"{key}_skipped"] = float(m.skipped_reason is not None)
        return logs

    @property
    def skipped(self) -> list[int]:
        return [m.index for m in self.members if m.skipped_reason is not None]

    def __repr__(self) -> str:
        return f"GraftReport(K={len(self.members)}, criterion={self.criterion!r}, source={self.source!r})"


def _materialise(anchors, alpha_table, info_table, finite, scion_of) -> list[MemberGraftReport]:
    K = len(scion_of)
    A = len(anchors)
    # one device -> host copy for the whole report: [A, K] alphas, [A, K] information, [K] finite
    host = torch.cat([alpha_table.reshape(-1), info_table.reshape(-1), finite.float()]).cpu().tolist()
    alpha_rows = [host[k : A * K : K] for k in range(K)]
    info_rows = [host[A * K + k : 2 * A * K : K] for k in range(K)]
    fin = [v > 0.5 for v in host[2 * A * K :]]
    reports = []
    for k in range(K):
        j = scion_of[k]
        reason = None if fin[j] else f"scion member {j} has non-finite weights; member {k} kept its own"
        reports.append(MemberGraftReport(
            index=k, scion=j, alphas=dict(zip(anchors, alpha_rows[k])), information=dict(zip(anchors, info_rows[k])),
            scion_information=dict(zip(anchors, info_rows[j])), finite=fin[k], skipped_reason=reason,
        ))
    return reports


# ----------------------------------------------------------------------------- external graft
def _check_members(states: Sequence[dict[str, torch.Tensor]]) -> None:
    ref = states[0]
    device = next((t.device for t in ref.values()), None)
    for k, state in enumerate(states[1:], start=1):
        if state.keys() != ref.keys():
            differ = sorted(set(ref) ^ set(state))[:3]
            raise ValueError(f"member {k} has a different architecture from member 0 (entries differ: {differ})")
        for name, t in state.items():
            if t.shape != ref[name].shape or t.dtype != ref[name].dtype:
                raise ValueError(
                    f"member {k}: {name} is {t.dtype} {tuple(t.shape)}, member 0 has {ref[name].dtype} "
                    f"{tuple(ref[name].shape)}"
                )
            if t.device != device:
                raise ValueError(f"member {k}: {name} lives on {t.device}; all members must live on {device}")


def _entries_finite(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str], device) -> torch.Tensor:
    """[K] bool: every value of the named entries of each member is finite (min and max propagate
    NaN). The entries are small (biases, norm parameters, running statistics): one concatenation
    and one aminmax per member."""
    flags = []
    for state in states:
        parts = [state[n].detach().reshape(-1) for n in names if state[n].numel()]
        if not parts:
            flags.append(torch.ones((), dtype=torch.bool, device=device))
            continue
        lo, hi = torch.aminmax(torch.cat(parts) if len(parts) > 1 else parts[0])
        flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    return torch.stack(flags)


def _stacked_rows(ws: Sequence[torch.Tensor], rows_per_member: int, scratch: "_Scratch") -> torch.Tensor:
    """The K members' tensors as float32 rows of one scratch buffer, [K * rows, n]."""
    n = ws[0].numel()
    x = scratch.get(0, len(ws) * n).view(len(ws) * rows_per_member, n // rows_per_member)
    for k, w in enumerate(ws):
        x[k * rows_per_member : (k + 1) * rows_per_member].copy_(w.detach().reshape(rows_per_member, -1))
    return x


class _Scratch:
    """Flat buffers reused for every tensor of one graft (grown to the largest one)."""

    def __init__(self, device):
        self.device = device
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, slot: int, numel: int, dtype=torch.float32) -> torch.Tensor:
        buf = self.buffers.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[(slot, dtype)] = buf
        return buf[:numel]


def _mix_ring(ws: list[torch.Tensor], betas: list[torch.Tensor], keep: torch.Tensor, scratch: _Scratch) -> None:
    """In place, from pre-graft values: ws[k] <- lerp(ws[k], ws[k-1], betas[k]) (= alpha ws[k] +
    (1 - alpha) ws[k-1]); where keep[k] the scion is replaced by ws[k] itself, so a non-finite
    scion never reaches its receiver (a plain zero weight would still give 0 * NaN = NaN)."""
    K = len(ws)
    n = ws[0].numel()
    if n == 0:
        return
    shape = ws[0].shape
    if ws[0].dtype == torch.float32:
        # member 0's scion is member K-1, which is mixed first: keep its pre-graft copy
        end0 = torch.where(keep[0], ws[0], ws[K - 1], out=scratch.get(0, n).view(shape))
        for k in range(K - 1, 0, -1):  # ws[k-1] is still pre-graft when ws[k] is mixed
            end = torch.where(keep[k], ws[k], ws[k - 1], out=scratch.get(1, n).view(shape))
            ws[k].lerp_(end, betas[k])
        ws[0].lerp_(end0, betas[0])
        return
    compute = torch.promote_types(ws[0].dtype, torch.float32)  # bf16/fp16 -> float32, float64 stays
    pre = [w.to(compute) for w in ws]
    for k in range(K):
        end = torch.where(keep[k], pre[k], pre[k - 1])
        ws[k].copy_(torch.lerp(pre[k], end, betas[k].to(compute)))


@torch.no_grad()
def graft_members(
    members: Sequence[nn.Module],
    *,
    criterion: str = "entropy",
    bins: int = 10,
    A: float = 0.4,
    c: float = 500.0,
    level: str = "layer",
) -> GraftReport:
    """Graft a ring of K >= 2 same-architecture members in place: member k takes member (k-1) mod K.

    All K grafts read the weights as they were before this call (in-parallel semantics). Tensors
    are mixed `W_k' = alpha_k W_k + (1 - alpha_k) W_{k-1}` with one alpha per anchor (SPEC 3), or
    one alpha per output filter with `level="filter"` (the authors' filter-level variant; 1-D
    entries whose length matches the anchor's filter count take the per-filter alphas, others
    their mean). A member whose weights are not all finite is never used as a scion: its
    receiver keeps its own weights (alpha = 1), and the report says so. A non-finite member
    still receives from its own (finite) scion; its non-finite layers get alpha NaN.

    No host synchronisation: the returned report copies its numbers to the host when first read.
    """
    if len(members) < 2:
        raise ValueError(f"graft_members needs K >= 2 members, got {len(members)}")
    _check_criterion(criterion)
    _check_bins(bins)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    K = len(members)
    states = [_live_state(m) for m in members]
    # FSDP2: parameters are DTensors sharded along dim 0. Every process grafts its own shards;
    # the layers' information comes from all-reduced histograms (`sharded_information`), so no
    # weight is ever gathered. Members must be sharded alike (same wrapping, same mesh).
    dtensor_states = states if any(_is_dtensor(t) for t in states[0].values()) else None
    if dtensor_states is not None:
        if level != "layer":
            raise ValueError("graft_members: level='filter' is not supported on FSDP-sharded members; use 'layer'")
        group = _dtensor_group(list(states[0].values()))
        states = [{n: _local_piece(t)[0] for n, t in st.items()} for st in states]
    _check_members(states)
    plan = anchor_plan(states[0])
    anchors = [name for name, anchor in plan if name == anchor]
    if not anchors:
        raise ValueError("members have no floating tensor with ndim >= 2 (conv/linear weight) to graft by")
    device = states[0][anchors[0]].device
    scion_of = [(k - 1) % K for k in range(K)]
    scratch = _Scratch(device)

    # information of every anchor of every member, [A, K] (NaN or inf where a layer is not
    # finite), and per-filter information for the filter level; the K members of a layer are
    # rows of one scratch buffer, binned and counted together
    total = max(states[0][name].numel() for name in anchors) * K
    ibuf = scratch.get(2, total, torch.int32) if device.type == "cpu" else None
    info_rows, per_filter = [], {}
    for name in anchors if dtensor_states is None else ():
        ws = [s[name] for s in states]
        n = ws[0].numel()
        if criterion == "entropy":
            x = scratch.get(0, K * n).view(K, n)
            info_rows.append(_member_entropies(ws, bins, x, None if ibuf is None else ibuf[: K * n]))
        else:
            info_rows.append(torch.stack([_l1(w) for w in ws]))
        if level == "filter":
            F = ws[0].shape[0]
            if n == 0:
                per_filter[name] = torch.zeros(K, F, dtype=torch.float32, device=device)
            elif criterion == "entropy":
                x = _stacked_rows(ws, F, scratch)
                per_filter[name] = _entropy_rows(x, bins, x, None if ibuf is None else ibuf[: K * n]).view(K, F)
            else:
                per_filter[name] = torch.stack([_l1(w.reshape(F, -1), dim=1) for w in ws])
    if dtensor_states is None:
        info_table = torch.stack(info_rows)  # [A, K]
    else:  # every layer of every member in the same two collectives
        pieces = [dtensor_states[k][name] for name in anchors for k in range(K)]
        info_table = sharded_information(pieces, criterion=criterion, bins=bins, group=group).view(len(anchors), K)

    # finiteness of every member, on the device: its anchors' information and its other entries;
    # receivers of a non-finite scion keep their own weights
    others = [name for name, anchor in plan if name != anchor]
    finite = torch.isfinite(info_table).all(dim=0) & _entries_finite(states, others, device)  # [K]
    if dtensor_states is not None:  # a shard elsewhere may hold the non-finite value: agree on it
        bad = _default_all_reduce(group)((~finite).float(), "max")
        finite = bad < 0.5
    keep = ~finite.roll(1, 0)  # keep[k] = not finite[k-1]

    if level == "layer":
        alpha_table = adaptive_alpha(info_table, info_table.roll(1, 1), A, c)  # [A, K]
        alpha_table = torch.where(keep, torch.ones_like(alpha_table), alpha_table)
        alphas = {name: alpha_table[i] for i, name in enumerate(anchors)}  # [K] each
    else:
        alphas = {}
        for name in anchors:
            pf = per_filter[name]  # [K, F]
            alpha = adaptive_alpha(pf, pf.roll(1, 0), A, c)
            alphas[name] = torch.where(keep.unsqueeze(1), torch.ones_like(alpha), alpha)
        alpha_table = torch.stack([alphas[name].mean(dim=1) for name in anchors])

    # mix every entry with its anchor's alpha, in place
    betas_of = {name: 1.0 - a for name, a in alphas.items()}
    for name, anchor in plan:
        ws = [s[name] for s in states]
        beta = betas_of[anchor]
        ref = ws[0]
        if beta.ndim == 1:  # layer level: [K] -> K 0-dim weights
            per_member = list(beta.unbind(0))
        elif name == anchor or (ref.ndim >= 1 and ref.shape[0] == beta.shape[1]):  # filter level, per filter
            per_member = [b.view(beta.shape[1], *([1] * (ref.ndim - 1))) for b in beta.unbind(0)]
        else:  # filter level, an entry that does not follow the anchor's filters: the mean alpha
            per_member = list(beta.mean(dim=1).unbind(0))
        _mix_ring(ws, per_member, keep, scratch)

    return GraftReport(
        criterion=criterion, source="external",
        _pending=dict(anchors=anchors, alpha_table=alpha_table, info_table=info_table, finite=finite,
                      scion_of=scion_of),
    )


# ----------------------------------------------------------------------------- other scion sources
def _conv_filters(state: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    # filters are slices along the output channel of conv weights (SPEC section 7)
    for name, t in state.items():
        if t.is_floating_point() and t.ndim == 4:
            yield name, t


@torch.no_grad()
def graft_noise(
    model: nn.Module,
    *,
    epoch: int,
    a: float = 0.9,
    threshold: float = 0.1,
    generator: torch.Generator | None = None,
) -> dict[str, int]:
    """Noise as scion (Section 3.1.1): add N(0, sigma_t^2), sigma_t = a**epoch, to every invalid
    filter (l1 < threshold) of every conv layer; valid filters are not touched.

    The noise is drawn for whole layers in state-dict order from `generator`, so a seeded
    generator reproduces the graft. Returns the number of filters grafted per layer.
    """
    if not 0.0 < a < 1.0:
        raise ValueError(f"a must lie in (0, 1), got {a}")
    sigma = a**epoch
    grafted = {}
    for name, w in _conv_filters(_live_state(model)):
        invalid = _l1(w.flatten(1), dim=1) < threshold
        noise = torch.randn(w.shape, generator=generator, dtype=torch.float32, device=w.device) * sigma
        mask = invalid.view(-1, *([1] * (w.ndim - 1)))
        w.copy_(torch.where(mask, w.float() + noise, w.float()))
        grafted[name] = invalid.sum()
    if not grafted:
        return {}
    return dict(zip(grafted, (int(v) for v in torch.stack(list(grafted.values())).tolist())))


@torch.no_grad()
def graft_internal(model: nn.Module, *, threshold: float = 0.1) -> dict[str, int]:
    """Internal filters as scion (Section 3.1.2): per layer, filters sorted by l1; the i-th smallest
    filter, when invalid (l1 < threshold), receives the i-th largest filter (added into it).

    Reads pre-graft values only. Returns the number of filters grafted per layer.
    """
    grafted = {}
    for name, w in _conv_filters(_live_state(model)):
        flat = w.detach().float().flatten(1)
        l1 = flat.abs().sum(1)
        ascending = torch.argsort(l1, stable=True)
        descending = ascending.flip(0)
        invalid = l1[ascending] < threshold  # the smallest filters that are invalid, in order
        scion = flat[descending] * invalid.unsqueeze(1)
        new = flat.clone()
        new.index_add_(0, ascending, scion)
        w.copy_(new.view_as(w))
        grafted[name] = invalid.sum()
    if not grafted:
        return {}
    return dict(zip(grafted, (int(v) for v in torch.stack(list(grafted.values())).tolist())))


# ----------------------------------------------------------------------------- diversity
def cosine_lr_multipliers(num_members: int) -> list[float]:
    """The authors' "dlr" spread: member i (1-based, of K) starts at lr * (1 + cos(pi (K - i) / K)) / 2."""
    K = num_members
    return [(1.0 + math.cos(math.pi * (K - i) / K)) / 2.0 for i in range(1, K + 1)]
