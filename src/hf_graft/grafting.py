"""The Method: information criteria, adaptive alpha and the in-parallel ring graft (SPEC 1-5).

Pure torch, no Trainer imports. Everything runs on the device and in the dtype the weights live
in; information is computed in float32. A graft does no host synchronisation per layer or per
bin: the histograms are built with one scatter per tensor, and the report's numbers are copied
to the host once, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "CRITERIA",
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
]

CRITERIA = ("entropy", "l1")
LEVELS = ("layer", "filter")


# ----------------------------------------------------------------------------- information
def batched_entropy(rows: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Entropy (natural log) of the histogram of each row of a 2-D tensor, in float32.

    Each row gets `bins` equal-width bins over its own [min, max]; a value equal to max falls in
    the last bin (as `torch.histc` does). A constant row has entropy 0.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    x = rows.detach().float()
    if x.ndim != 2:
        raise ValueError(f"batched_entropy expects a 2-D tensor, got shape {tuple(x.shape)}")
    n_rows, n = x.shape
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    width = hi - lo
    # constant rows: width 0 -> every value in bin 0 -> entropy 0
    scaled = (x - lo) / torch.where(width > 0, width, torch.ones_like(width)) * bins
    idx = scaled.long().clamp_(0, bins - 1)
    idx += torch.arange(n_rows, device=x.device).unsqueeze(1) * bins
    counts = torch.zeros(n_rows * bins, device=x.device, dtype=torch.float32)
    counts.scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device=x.device, dtype=torch.float32))
    p = counts.view(n_rows, bins) / n
    return -torch.special.xlogy(p, p).sum(dim=1)


def layer_information(weight: torch.Tensor, criterion: str = "entropy", bins: int = 10) -> torch.Tensor:
    """Information of a whole layer as a 0-dim float32 tensor on the weight's device.

    `entropy` (eq. 6): entropy of the histogram of all the layer's values; `l1` (eq. 3): sum |w|.
    """
    if criterion == "entropy":
        return batched_entropy(weight.detach().reshape(1, -1), bins)[0]
    if criterion == "l1":
        return weight.detach().float().abs().sum()
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def _row_information(rows: torch.Tensor, criterion: str, bins: int) -> torch.Tensor:
    """Information of each row of a 2-D tensor (used for K members at once, or per filter)."""
    if criterion == "entropy":
        return batched_entropy(rows, bins)
    if criterion == "l1":
        return rows.detach().float().abs().sum(dim=1)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def adaptive_alpha(info_self, info_other, A: float = 0.4, c: float = 500.0):
    """alpha = A/pi * arctan(c * (info_self - info_other)) + 0.5   (eq. 7 with the authors' /pi).

    Lies in (0.5 - A/2, 0.5 + A/2); tensors in, tensor out; numbers in, float out.
    """
    if isinstance(info_self, torch.Tensor) or isinstance(info_other, torch.Tensor):
        diff = torch.as_tensor(info_self, dtype=torch.float32) - torch.as_tensor(info_other, dtype=torch.float32)
        return A / math.pi * torch.atan(c * diff) + 0.5
    return A / math.pi * math.atan(c * (float(info_self) - float(info_other))) + 0.5


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
@dataclass
class MemberGraftReport:
    """What happened to one member (the rootstock) in one graft."""

    index: int
    scion: int | None
    alphas: dict[str, float] = field(default_factory=dict)  # anchor name -> alpha (mean for filter level)
    information: dict[str, float] = field(default_factory=dict)  # anchor name -> own information
    scion_information: dict[str, float] = field(default_factory=dict)
    finite: bool = True
    skipped_reason: str | None = None

    @property
    def alpha_values(self) -> list[float]:
        return list(self.alphas.values())


@dataclass
class GraftReport:
    """Per-member alphas and information values of one population graft."""

    members: list[MemberGraftReport]
    criterion: str = "entropy"
    source: str = "external"

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


# ----------------------------------------------------------------------------- external graft
def _members_finite(states: Sequence[dict[str, torch.Tensor]]) -> list[bool]:
    flags = []
    for state in states:
        checks = [torch.isfinite(t).all() for t in state.values() if t.is_floating_point() and t.numel()]
        flags.append(torch.stack(checks).all() if checks else torch.tensor(True))
    # one host sync for the whole population
    return [bool(f) for f in torch.stack([f.to(flags[0].device) for f in flags]).tolist()]


def _check_same_architecture(states: Sequence[dict[str, torch.Tensor]]) -> None:
    ref = states[0]
    for k, state in enumerate(states[1:], start=1):
        if state.keys() != ref.keys():
            missing = sorted(set(ref) ^ set(state))[:3]
            raise ValueError(f"member {k} has a different architecture from member 0 (entries differ: {missing})")
        for name, t in state.items():
            if t.shape != ref[name].shape:
                raise ValueError(
                    f"member {k}: {name} has shape {tuple(t.shape)}, member 0 has {tuple(ref[name].shape)}"
                )


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
    receiver keeps its own weights, and the report says so.
    """
    if len(members) < 2:
        raise ValueError(f"graft_members needs K >= 2 members, got {len(members)}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    K = len(members)
    states = [_live_state(m) for m in members]
    _check_same_architecture(states)
    finite = _members_finite(states)
    plan = anchor_plan(states[0])
    anchors = [name for name, anchor in plan if name == anchor]
    scion_of = [(k - 1) % K for k in range(K)]
    # receivers of a non-finite scion keep their weights (alpha = 1)
    keep_own = torch.tensor([not finite[scion_of[k]] for k in range(K)], device=states[0][plan[0][0]].device)

    alphas: dict[str, torch.Tensor] = {}  # anchor -> [K] (layer) or [K, F] (filter)
    infos: dict[str, torch.Tensor] = {}  # anchor -> [K]
    for name in anchors:
        stacked = torch.stack([s[name].detach().float().reshape(-1) for s in states])  # [K, n]
        info = _row_information(stacked, criterion, bins)
        infos[name] = info
        if level == "layer":
            alpha = adaptive_alpha(info, info.roll(1, 0), A, c)  # [K]
        else:
            n_filters = states[0][name].shape[0]
            per_filter = _row_information(stacked.reshape(K * n_filters, -1), criterion, bins).view(K, n_filters)
            alpha = adaptive_alpha(per_filter, per_filter.roll(1, 0), A, c)  # [K, F]
        alphas[name] = torch.where(keep_own.view(-1, *([1] * (alpha.ndim - 1))), torch.ones_like(alpha), alpha)

    for name, anchor in plan:
        alpha = alphas[anchor]
        ref = states[0][name]
        if alpha.ndim == 2:  # filter level
            if name == anchor or (ref.ndim >= 1 and ref.shape[0] == alpha.shape[1]):
                alpha = alpha.view(K, alpha.shape[1], *([1] * (ref.ndim - 1)))
            else:
                alpha = alpha.mean(dim=1).view(K, *([1] * ref.ndim))
        else:
            alpha = alpha.view(K, *([1] * ref.ndim))
        pre = torch.stack([s[name].detach().float() for s in states])  # pre-graft copies, [K, ...]
        mixed = torch.lerp(pre, pre.roll(1, 0), 1.0 - alpha)
        for k, state in enumerate(states):
            state[name].copy_(mixed[k])

    return _build_report(K, anchors, alphas, infos, finite, scion_of, criterion)


def _build_report(K, anchors, alphas, infos, finite, scion_of, criterion) -> GraftReport:
    if anchors:
        alpha_table = torch.stack([a if a.ndim == 1 else a.mean(dim=1) for a in (alphas[n] for n in anchors)], 1)
        info_table = torch.stack([infos[n] for n in anchors], dim=1)
        alpha_rows, info_rows = alpha_table.cpu().tolist(), info_table.cpu().tolist()  # one copy to host
    else:
        alpha_rows = info_rows = [[] for _ in range(K)]
    reports = []
    for k in range(K):
        j = scion_of[k]
        reason = None if finite[j] else f"scion member {j} has non-finite weights; member {k} kept its own"
        reports.append(
            MemberGraftReport(
                index=k,
                scion=j,
                alphas=dict(zip(anchors, alpha_rows[k])),
                information=dict(zip(anchors, info_rows[k])),
                scion_information=dict(zip(anchors, info_rows[j])),
                finite=finite[k],
                skipped_reason=reason,
            )
        )
    return GraftReport(members=reports, criterion=criterion, source="external")


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
    """Noise as scion (Section 3.1.1): add N(0, a**epoch) to every invalid filter (l1 < threshold).

    Returns the number of filters grafted per layer.
    """
    if not 0.0 < a < 1.0:
        raise ValueError(f"a must lie in (0, 1), got {a}")
    sigma = a**epoch
    grafted = {}
    for name, w in _conv_filters(_live_state(model)):
        invalid = w.detach().float().abs().flatten(1).sum(1) < threshold  # [F]
        noise = torch.randn(w.shape, generator=generator, dtype=torch.float32, device=w.device) * sigma
        mask = invalid.view(-1, *([1] * (w.ndim - 1)))
        w.copy_(torch.where(mask, w.float() + noise, w.float()))
        grafted[name] = invalid
    return {name: int(v) for name, v in zip(grafted, torch.stack([m.sum() for m in grafted.values()]).tolist())} if grafted else {}


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
        ascending = torch.argsort(l1)
        descending = ascending.flip(0)
        invalid = l1[ascending] < threshold  # the smallest filters that are invalid, in order
        scion = flat[descending] * invalid.unsqueeze(1)
        new = flat.clone()
        new.index_add_(0, ascending, scion)
        w.copy_(new.view_as(w))
        grafted[name] = invalid.sum()
    return {name: int(v) for name, v in zip(grafted, torch.stack(list(grafted.values())).tolist())} if grafted else {}


# ----------------------------------------------------------------------------- diversity
def cosine_lr_multipliers(num_members: int) -> list[float]:
    """The authors' "dlr" spread: member i (1-based, of K) starts at lr * (1 + cos(pi (K - i) / K)) / 2."""
    K = num_members
    return [(1.0 + math.cos(math.pi * (K - i) / K)) / 2.0 for i in range(1, K + 1)]
