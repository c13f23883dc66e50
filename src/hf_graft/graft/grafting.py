"""The graft: adaptive alpha, the anchor rule and the in-parallel ring graft, and the other
scion sources (noise, internal filters). The method is written out in docs/method.md.

Pure torch, no Trainer imports. Mixing runs on the device and in float32 (float64 for float64
weights). `graft_members` does no host synchronisation at all: the information of every layer
comes from `information.py` (or, for FSDP shards, `sharded.py`), the guard against non-finite
scions is a device-side `torch.where`, and the report keeps its numbers on the device until it is
first read, when they are copied to the host in one transfer. Large temporaries live in scratch
buffers reused for every tensor (no allocation, and no page faults, per layer).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from hf_graft.graft.information import CRITERIA, _check_bins, _check_criterion, _entropy_rows, _l1, _member_entropies
from hf_graft.graft.information import batched_entropy, layer_information  # noqa: F401  (public import path)
from hf_graft.graft.sharded import _default_all_reduce, _dtensor_group, _is_dtensor, _local_piece, sharded_information
from hf_graft.graft.sharded import sharded_layer_information  # noqa: F401  (public import path)

__all__ = [
    "ANCHOR_RULES",
    "CRITERIA",
    "INTERNAL_ORDERS",
    "LEVELS",
    "GraftReport",
    "MemberGraftReport",
    "adaptive_alpha",
    "anchor_plan",
    "batched_entropy",
    "bn_scale_alpha",
    "graft_internal",
    "graft_members",
    "graft_noise",
    "layer_information",
    "sharded_information",
    "sharded_layer_information",
]

# layer: one alpha per tensor (the paper's); filter: one alpha per output filter from the filter's own
# information (hf_graft's variant); bn_scale: one alpha per output channel from the BatchNorm scales of
# the two networks (the authors' filter-level script)
LEVELS = ("layer", "filter", "bn_scale")
# nearest: every conv/linear weight is an anchor (hf_graft's rule); authors: every entry whose key
# contains "conv" is (the authors' CIFAR code)
ANCHOR_RULES = ("nearest", "authors")
INTERNAL_ORDERS = ("snapshot", "sequential")


def adaptive_alpha(info_self, info_other, A: float = 0.4, c: float = 500.0):
    """alpha = A/pi * arctan(c * (info_self - info_other)) + 0.5   (eq. 7 with the authors' /pi).

    Lies in (0.5 - A/2, 0.5 + A/2); tensors in, float32 tensor out; numbers in, float out.
    """
    if isinstance(info_self, torch.Tensor) or isinstance(info_other, torch.Tensor):
        diff = torch.as_tensor(info_self, dtype=torch.float32) - torch.as_tensor(info_other, dtype=torch.float32)
        return A / math.pi * torch.atan(c * diff) + 0.5
    return A / math.pi * math.atan(c * (float(info_self) - float(info_other))) + 0.5


# ----------------------------------------------------------------------------- anchor rule
def _is_anchor(name: str, t: torch.Tensor, rule: str = "nearest") -> bool:
    if rule == "authors":
        return t.is_floating_point() and "conv" in name
    return t.is_floating_point() and t.ndim >= 2


def _check_anchor_rule(rule: str) -> None:
    if rule not in ANCHOR_RULES:
        raise ValueError(f"anchor must be one of {ANCHOR_RULES}, got {rule!r}")


def anchor_plan(state: dict[str, torch.Tensor], rule: str = "nearest") -> list[tuple[str, str | None]]:
    """(entry name, anchor name) for every entry to mix, in state-dict order (docs/method.md §3).

    Anchors map to themselves: with `rule="nearest"` the floating tensors with ndim >= 2 (conv and
    linear weights), with `rule="authors"` the floating entries whose key contains "conv" (the
    authors' CIFAR code: the classifier, and convolutions named otherwise such as a shortcut's,
    follow the last such entry). Other floating entries take the nearest preceding anchor (entries
    before the first anchor take the first anchor); integer buffers such as `num_batches_tracked`
    are left out. Entries that share storage with an earlier one (tied weights) are left out too,
    so they are mixed once.
    """
    _check_anchor_rule(rule)
    names = [n for n, t in state.items() if t.is_floating_point()]
    first_anchor = next((n for n in names if _is_anchor(n, state[n], rule)), None)
    seen_storage: set[tuple[int, int]] = set()
    plan = []
    current = first_anchor
    for name in names:
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen_storage:
            continue
        seen_storage.add(key)
        if _is_anchor(name, t, rule):
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

    `alphas`: anchor name -> alpha (the mean over channels for the filter and bn_scale levels); `information`:
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


def _graft_states(members: Sequence[nn.Module], level: str):
    """The members' live state dicts (local pieces for FSDP2 DTensors), checked alike; and, for
    sharded members, the DTensor states and the process group they are sharded over."""
    states = [_live_state(m) for m in members]
    # FSDP2: parameters are DTensors sharded along dim 0. Every process grafts its own shards;
    # the layers' information comes from all-reduced histograms (`sharded_information`), so no
    # weight is ever gathered. Members must be sharded alike (same wrapping, same mesh).
    dtensor_states, group = None, None
    if any(_is_dtensor(t) for t in states[0].values()):
        if level != "layer":
            raise ValueError(f"graft_members: level={level!r} is not supported on FSDP-sharded members; use 'layer'")
        dtensor_states, group = states, _dtensor_group(list(states[0].values()))
        states = [{n: _local_piece(t)[0] for n, t in st.items()} for st in states]
    _check_members(states)
    return states, dtensor_states, group


def _batchnorm_scales(module: nn.Module, plan, state) -> dict[str, str]:
    """anchor -> the scale (weight) of the BatchNorm that follows it in the plan and has one channel
    per output filter of the anchor: the BatchNorm that normalises that layer's output."""
    scales = {f"{prefix}.weight" if prefix else "weight": m.num_features for prefix, m in module.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    found: dict[str, str] = {}
    for name, anchor in plan:
        if name != anchor and anchor not in found and state[anchor].ndim >= 1 and \
                scales.get(name) == state[anchor].shape[0]:
            found[anchor] = name
    return found


def _information_tables(states, anchors, *, criterion: str, bins: int, level: str, scratch: "_Scratch",
                        include_max: bool = True, scales: dict[str, str] | None = None):
    """Information of every anchor of every member, [A, K] (NaN or inf where a layer is not finite),
    and for the filter level each anchor's per-filter information, {name: [K, F]}; for the bn_scale
    level, each anchor's following BatchNorm scales (`scales`: anchor -> scale entry), {name: [K, F]}.
    The K members of a layer are rows of one scratch buffer, binned and counted together."""
    K, device = len(states), scratch.device
    total = max(states[0][name].numel() for name in anchors) * K
    ibuf = scratch.get(2, total, torch.int32) if device.type == "cpu" else None
    info_rows, per_filter = [], {}
    for name in anchors:
        ws = [s[name] for s in states]
        n = ws[0].numel()
        if criterion == "entropy":
            x = scratch.get(0, K * n).view(K, n)
            info_rows.append(_member_entropies(ws, bins, x, None if ibuf is None else ibuf[: K * n], include_max))
        else:
            info_rows.append(torch.stack([_l1(w) for w in ws]))
        if level == "filter":
            F = ws[0].shape[0]
            if n == 0:
                per_filter[name] = torch.zeros(K, F, dtype=torch.float32, device=device)
            elif criterion == "entropy":
                x = _stacked_rows(ws, F, scratch)
                per_filter[name] = _entropy_rows(x, bins, x, None if ibuf is None else ibuf[: K * n],
                                                 include_max).view(K, F)
            else:
                per_filter[name] = torch.stack([_l1(w.reshape(F, -1), dim=1) for w in ws])
        elif level == "bn_scale" and name in scales:
            per_filter[name] = torch.stack([s[scales[name]].detach().float() for s in states])
    return torch.stack(info_rows), per_filter


def bn_scale_alpha(scale_self: torch.Tensor, scale_other: torch.Tensor) -> torch.Tensor:
    """Per channel, |g_self| / (|g_self| + |g_other|) from two BatchNorm scales (the authors' filter
    level); 0.5 where both are 0. NaN stays NaN."""
    g, other = scale_self.abs().float(), scale_other.abs().float()
    total = g + other
    return torch.where(total == 0, torch.full_like(total, 0.5), g / total)


def _alphas(info_table, per_filter, anchors, keep, *, level: str, A: float, c: float, decimals: int | None = None):
    """Each anchor's alphas ({name: [K]}, or [K, F] per filter) for member k against its scion k - 1
    (alpha 1 where the scion is not finite), and the [A, K] table the report shows. Alphas from
    eq. 7 are rounded to `decimals` when it is given (the authors round to 2); BatchNorm-scale
    ratios are not (the authors' filter-level script does not round them)."""
    def eq7(own, scion):
        alpha = adaptive_alpha(own, scion, A, c)
        return alpha if decimals is None else torch.round(alpha, decimals=decimals)

    if level == "layer":
        alpha_table = eq7(info_table, info_table.roll(1, 1))  # [A, K]
        alpha_table = torch.where(keep, torch.ones_like(alpha_table), alpha_table)
        return {name: alpha_table[i] for i, name in enumerate(anchors)}, alpha_table
    alphas = {}
    for i, name in enumerate(anchors):
        pf = per_filter.get(name)  # [K, F]
        if level == "filter":
            alpha = eq7(pf, pf.roll(1, 0))
        elif pf is not None:  # bn_scale: the channel ratios of the BatchNorm after this layer
            alpha = bn_scale_alpha(pf, pf.roll(1, 0))
        else:  # bn_scale, no BatchNorm after this layer (a classifier): the layer's own alpha, [K, 1]
            alpha = eq7(info_table[i], info_table[i].roll(1, 0)).unsqueeze(1)
        alphas[name] = torch.where(keep.unsqueeze(1), torch.ones_like(alpha), alpha)
    return alphas, torch.stack([alphas[name].mean(dim=1) for name in anchors])


def _mix_entries(states, plan, alphas, keep, scratch: "_Scratch") -> None:
    """Mix every planned entry of every member with its anchor's alphas, in place."""
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


@torch.no_grad()
def graft_members(
    members: Sequence[nn.Module],
    *,
    criterion: str = "entropy",
    bins: int = 10,
    A: float = 0.4,
    c: float = 500.0,
    level: str = "layer",
    anchor: str = "nearest",
    alpha_decimals: int | None = None,
    include_max: bool = True,
) -> GraftReport:
    """Graft a ring of K >= 2 same-architecture members in place: member k takes member (k-1) mod K.

    All K grafts read the weights as they were before this call (in-parallel semantics). Tensors
    are mixed `W_k' = alpha_k W_k + (1 - alpha_k) W_{k-1}` with one alpha per anchor (`anchor`:
    which entries get their own alpha, see `anchor_plan`), or one alpha per output filter with
    `level="filter"` (from each filter's own information) or `level="bn_scale"` (from the scales
    of the BatchNorm after the layer, `bn_scale_alpha`; a layer without one, such as a classifier,
    takes its layer alpha); at those two levels, 1-D entries whose length matches the anchor's
    filter count take the per-filter alphas, others their mean. See docs/method.md §2-§5.

    The authors' CIFAR code is `anchor="authors", alpha_decimals=2, include_max=False`: alpha
    rounded to 2 decimals, the histogram's maximum value left out (`layer_information`).

    A member whose weights are not all finite is never used as a scion: its receiver keeps its own
    weights (alpha = 1), and the report says so. A non-finite member still receives from its own
    (finite) scion; its non-finite layers get alpha NaN.

    No host synchronisation: the returned report copies its numbers to the host when first read.
    """
    if len(members) < 2:
        raise ValueError(f"graft_members needs K >= 2 members, got {len(members)}")
    _check_criterion(criterion)
    _check_bins(bins)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    _check_anchor_rule(anchor)
    if anchor == "authors" and level != "layer":
        raise ValueError(f"anchor='authors' is the authors' layer-level rule; it needs level='layer', got {level!r}")
    if alpha_decimals is not None and (not isinstance(alpha_decimals, int) or isinstance(alpha_decimals, bool)
                                       or alpha_decimals < 0):
        raise ValueError(f"alpha_decimals must be None or an integer >= 0, got {alpha_decimals!r}")
    K = len(members)
    states, dtensor_states, group = _graft_states(members, level)
    plan = anchor_plan(states[0], anchor)
    anchors = [name for name, a in plan if name == a]
    if not anchors:
        what = ("entry whose key contains 'conv'" if anchor == "authors"
                else "tensor with ndim >= 2 (conv/linear weight)")
        raise ValueError(f"members have no floating {what} to graft by (anchor={anchor!r})")
    scales = None
    if level == "bn_scale":
        scales = _batchnorm_scales(members[0], plan, states[0])
        if not scales:
            raise ValueError("level='bn_scale' weighs channels by the BatchNorm after each layer; these members have "
                             "no affine BatchNorm after any conv/linear layer (use level='layer' or 'filter')")
    scratch = _Scratch(states[0][anchors[0]].device)
    if dtensor_states is None:
        info_table, per_filter = _information_tables(states, anchors, criterion=criterion, bins=bins, level=level,
                                                     scratch=scratch, include_max=include_max, scales=scales)
    else:  # every layer of every member in the same two collectives
        pieces = [dtensor_states[k][name] for name in anchors for k in range(K)]
        info_table = sharded_information(pieces, criterion=criterion, bins=bins, group=group,
                                         include_max=include_max).view(len(anchors), K)
        per_filter = {}

    # finiteness of every member, on the device: its anchors' information and its other entries;
    # receivers of a non-finite scion keep their own weights
    others = [name for name, a in plan if name != a]
    finite = torch.isfinite(info_table).all(dim=0) & _entries_finite(states, others, scratch.device)  # [K]
    if dtensor_states is not None:  # a shard elsewhere may hold the non-finite value: agree on it
        finite = _default_all_reduce(group)((~finite).float(), "max") < 0.5
    keep = ~finite.roll(1, 0)  # keep[k] = not finite[k-1]

    alphas, alpha_table = _alphas(info_table, per_filter, anchors, keep, level=level, A=A, c=c,
                                  decimals=alpha_decimals)
    _mix_entries(states, plan, alphas, keep, scratch)
    return GraftReport(
        criterion=criterion, source="external",
        _pending=dict(anchors=anchors, alpha_table=alpha_table, info_table=info_table, finite=finite,
                      scion_of=[(k - 1) % K for k in range(K)]),
    )


# ----------------------------------------------------------------------------- other scion sources
def _conv_filters(state: dict[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    # filters are slices along the output channel of conv weights (docs/method.md §10)
    for name, t in state.items():
        if t.is_floating_point() and t.ndim == 4:
            yield name, t


@torch.no_grad()
def graft_noise(
    model: nn.Module,
    *,
    epoch: int,
    a: float = 0.975,
    first_t: int = 0,
    threshold: float = 0.1,
    generator: torch.Generator | None = None,
) -> dict[str, int]:
    """Noise as scion (Section 3.1.1): add N(0, sigma_t^2), sigma_t = a**t, to every invalid
    filter (l1 < threshold) of every conv layer; valid filters are not touched.

    `epoch` is the number of the epoch the graft follows, counted from 1; `t = epoch - 1 + first_t`.
    The defaults are the authors': a = 0.975 and t counted from 0 (sigma = 1 after the first epoch);
    `first_t=1` counts t from 1. The noise is drawn for whole layers in state-dict order from
    `generator`, so a seeded generator reproduces the graft. Returns the number of filters grafted
    per layer.
    """
    if not 0.0 < a < 1.0:
        raise ValueError(f"a must lie in (0, 1), got {a}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be an integer >= 1 (the epoch the graft follows, counted from 1), got {epoch!r}")
    if isinstance(first_t, bool) or not isinstance(first_t, int) or first_t < 0:
        raise ValueError(f"first_t must be an integer >= 0, got {first_t!r}")
    sigma = a ** (epoch - 1 + first_t)
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
def graft_internal(model: nn.Module, *, threshold: float = 0.1, order: str = "snapshot") -> dict[str, int]:
    """Internal filters as scion (Section 3.1.2): per layer, filters sorted by l1; the i-th smallest
    filter, when invalid (l1 < threshold), receives the i-th largest filter (added into it).

    `order="snapshot"` reads pre-graft values only. `order="sequential"` is the authors' loop, which
    adds one filter after the other in place, i = 0, 1, ...: once more than half of a layer's filters
    are invalid, the i-th largest filter may be one that already received (the ranks and the invalid
    set come from the pre-graft norms in both). Returns the number of filters grafted per layer.
    """
    if order not in INTERNAL_ORDERS:
        raise ValueError(f"order must be one of {INTERNAL_ORDERS}, got {order!r}")
    grafted = {}
    for name, w in _conv_filters(_live_state(model)):
        flat = w.detach().float().flatten(1)
        l1 = flat.abs().sum(1)
        ascending = torch.argsort(l1, stable=True)
        descending = ascending.flip(0)
        invalid = l1[ascending] < threshold  # the smallest filters that are invalid, in order
        new = flat.clone()
        # Step i adds filter descending[i] = ascending[F-1-i]. For i < ceil(F/2) that filter has not
        # received yet (it would have at step F-1-i > i), so those steps read pre-graft values; each
        # later step reads a filter that received in the first half, and no later step changes it.
        # So the sequential loop is two vectorised halves; the snapshot reads pre-graft values throughout.
        half = (flat.shape[0] + 1) // 2
        new.index_add_(0, ascending[:half], flat[descending[:half]] * invalid[:half].unsqueeze(1))
        source = new if order == "sequential" else flat
        new.index_add_(0, ascending[half:], source[descending[half:]] * invalid[half:].unsqueeze(1))
        w.copy_(new.view_as(w))
        grafted[name] = invalid.sum()
    if not grafted:
        return {}
    return dict(zip(grafted, (int(v) for v in torch.stack(list(grafted.values())).tolist())))
