"""The Reason: invalid filters and layer entropy of a trained network (docs/method.md §10; paper 4.2-4.3).

A filter is the slice `W[j]` of a conv weight (a floating-point 4-D `*weight` tensor) along its
output channel; it is *invalid* at threshold `t` when its l1 norm `sum |W[j]|` is below `t`.
`filter_report` gathers, for one model, every conv layer's per-filter l1 norms and whole-layer
entropy, from which it reports invalid counts and ratios, mean l1 of valid and invalid filters
(Figure 7, Tables 8 and 10) and the network's total entropy (Figure 8). With a `reference`
model, the valid/invalid split is decided by the reference's norms, and the analysed model's
mean l1 is taken over those fixed sets (Table 8). `plot_reports` draws Figures 7, 8, 9/11.

Pure torch + numpy; matplotlib is imported only when plotting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "population_filter_metrics",
    "DEFAULT_THRESHOLDS",
    "KINDS",
    "FilterReport",
    "LayerFilters",
    "conv_layer_kinds",
    "filter_report",
    "threshold_key",
]

DEFAULT_THRESHOLDS = (1e-3, 1e-2, 0.1, 1.0)
KINDS = ("dense", "grouped", "depthwise")


def threshold_key(t: float) -> str:
    """How a threshold is spelled in JSON keys and log names: as Python prints the float."""
    return repr(float(t))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _ratio_or_none(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# ----------------------------------------------------------------------------- per layer
@dataclass
class LayerFilters:
    """One conv layer: its per-filter l1 norms and its whole-layer entropy.

    `reference_l1` holds the reference model's norms of the same filters when the report was
    built with a reference; it then decides which filters count as invalid.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    l1: np.ndarray  # [filters], float64
    entropy: float
    reference_l1: np.ndarray | None = None
    nonfinite: int = 0  # weights of this layer that are NaN or infinite

    @property
    def filters(self) -> int:
        return int(self.l1.shape[0])

    def invalid_mask(self, threshold: float) -> np.ndarray:
        """Invalid filters under the split in force (the reference's when there is one)."""
        deciding = self.l1 if self.reference_l1 is None else self.reference_l1
        return deciding < threshold

    def own_invalid_mask(self, threshold: float) -> np.ndarray:
        """Invalid filters by this model's own norms, whatever the reference says."""
        return self.l1 < threshold

    def to_dict(self, thresholds: Sequence[float]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "kind": self.kind,
            "filters": self.filters,
            "entropy": self.entropy,
            "l1": self.l1.tolist(),
            "invalid": {threshold_key(t): int(self.invalid_mask(t).sum()) for t in thresholds},
            "nonfinite_weights": self.nonfinite,
        }
        if self.reference_l1 is not None:
            out["own_invalid"] = {threshold_key(t): int(self.own_invalid_mask(t).sum()) for t in thresholds}
        return out


# ----------------------------------------------------------------------------- whole model
@dataclass
class FilterReport:
    """Filter statistics of one model (see `filter_report`)."""

    layers: list[LayerFilters]
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    bins: int = 10
    has_reference: bool = False
    reference_name: str | None = None
    # every floating-point tensor of the model (not only conv layers) holding NaN / inf: name -> how many
    nonfinite: dict[str, int] = field(default_factory=dict)
    num_weights: int = 0  # floating-point values in the model's state dict
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def total_nonfinite(self) -> int:
        """NaN or infinite weights in the whole model: its statistics then describe a broken network."""
        return sum(self.nonfinite.values())

    # -- totals
    @property
    def total_filters(self) -> int:
        return sum(layer.filters for layer in self.layers)

    @property
    def total_entropy(self) -> float:
        """Sum of the conv layers' entropies: the network's information (Figure 8)."""
        return float(sum(layer.entropy for layer in self.layers))

    @property
    def layer_entropies(self) -> dict[str, float]:
        return {layer.name: layer.entropy for layer in self.layers}

    def _all(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        # the concatenated norms of every filter in the network, with each filter's layer kind
        if "all" not in self._cache:
            layers = self.layers
            l1 = np.concatenate([la.l1 for la in layers]) if layers else np.zeros(0)
            ref = None
            if self.has_reference:
                ref = np.concatenate([la.reference_l1 for la in layers]) if layers else np.zeros(0)
            kinds = np.repeat(np.array([la.kind for la in layers], dtype=object), [la.filters for la in layers])
            self._cache["all"] = (l1, ref, kinds)
        return self._cache["all"]

    @staticmethod
    def _split_stats(l1: np.ndarray, invalid: np.ndarray) -> dict[str, Any]:
        count = int(invalid.sum())
        return {
            "filters": int(l1.size),
            "count": count,
            "ratio": _ratio_or_none(count, int(l1.size)),
            "mean_l1_valid": _mean_or_none(l1[~invalid]),
            "mean_l1_invalid": _mean_or_none(l1[invalid]),
        }

    def invalid_stats(self, threshold: float) -> dict[str, Any]:
        """Invalid filters at one threshold, over all conv layers and broken out by layer kind.

        `count` / `ratio` follow the split in force (the reference's, when there is one); the
        means are this model's l1 over those valid / invalid sets (None for an empty set). With a
        reference, `own_count` / `own_ratio` give the model's own invalid filters too.
        """
        l1, ref, kinds = self._all()
        deciding = l1 if ref is None else ref
        invalid = deciding < threshold
        stats = self._split_stats(l1, invalid)
        del stats["filters"]
        if ref is not None:
            own = int((l1 < threshold).sum())
            stats["own_count"] = own
            stats["own_ratio"] = _ratio_or_none(own, int(l1.size))
        stats["by_kind"] = {kind: self._split_stats(l1[kinds == kind], invalid[kinds == kind]) for kind in KINDS}
        return stats

    def own_invalid_ratio(self, threshold: float) -> float | None:
        """Fraction of this model's filters with l1 < threshold (ignores any reference; Figure 7)."""
        l1, _, _ = self._all()
        return _ratio_or_none(int((l1 < threshold).sum()), int(l1.size))

    # -- outputs
    def summary(self, thresholds: Sequence[float] | None = None) -> dict[str, float]:
        """Flat scalars for logging: `invalid_ratio@{t}` (the model's own ratio) and `total_entropy`."""
        logs: dict[str, float] = {}
        for t in self.thresholds if thresholds is None else thresholds:
            ratio = self.own_invalid_ratio(t)
            logs[f"invalid_ratio@{threshold_key(t)}"] = float("nan") if ratio is None else ratio
        logs["total_entropy"] = self.total_entropy
        return logs

    def to_dict(self, name: str) -> dict[str, Any]:
        """JSON-ready description of the report (None where a mean is over an empty set)."""
        out: dict[str, Any] = {
            "name": name,
            "total_filters": self.total_filters,
            "total_entropy": self.total_entropy,
            "bins": self.bins,
            "thresholds": [float(t) for t in self.thresholds],
            "weights": self.num_weights,
            "nonfinite_weights": self.total_nonfinite,
            "nonfinite_by_tensor": dict(self.nonfinite),
        }
        if self.has_reference:
            out["reference"] = self.reference_name
        out["invalid"] = {threshold_key(t): self.invalid_stats(t) for t in self.thresholds}
        out["layers"] = [layer.to_dict(self.thresholds) for layer in self.layers]
        return out


# ----------------------------------------------------------------------------- building
def _is_conv_weight(name: str, tensor: torch.Tensor) -> bool:
    # 4-D floating "*weight" entries; the name test keeps out 4-D position embeddings and the like
    return tensor.is_floating_point() and tensor.ndim == 4 and name.endswith("weight")


def conv_layer_kinds(model: nn.Module) -> dict[str, str]:
    """State-dict name of every conv weight -> "dense" / "grouped" / "depthwise", from `groups`.

    Depthwise: groups > 1 and each filter sees a single input channel (W.shape[1] == 1, which
    covers groups == out_channels and channel multipliers); grouped: any other groups > 1.
    """
    kinds = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        groups = getattr(module, "groups", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not isinstance(groups, int):
            continue
        key = f"{module_name}.weight" if module_name else "weight"
        if groups == 1:
            kinds[key] = "dense"
        elif weight.shape[1] == 1:
            kinds[key] = "depthwise"
        else:
            kinds[key] = "grouped"
    return kinds


def _kind_from_shape(shape: torch.Size) -> str:
    # without the module, a grouped conv looks dense; a 1-input-channel k x k conv (k > 1) is
    # taken as depthwise (a 1-channel stem would be misread; pass the module to avoid that)
    return "depthwise" if shape[1] == 1 and (shape[2] > 1 or shape[3] > 1) else "dense"


def _conv_weights(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = dict(source)
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
    # FSDP2-sharded weights (DTensors) are gathered one layer at a time, on every process
    return {
        name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and _is_conv_weight(name, t)
    }


def _nonfinite_counts(source: nn.Module | Mapping[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """(NaN / inf count of every floating-point tensor that has any, number of floating-point values)."""
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    tensors = {
        name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
    }
    if not tensors:
        return {}, 0
    counts = torch.stack([(~torch.isfinite(t)).sum() for t in tensors.values()]).cpu().tolist()  # one host copy
    total = sum(t.numel() for t in tensors.values())
    return {name: int(n) for name, n in zip(tensors, counts) if n}, int(total)


def _filter_l1(weights: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-filter l1 norms of every layer, copied to the host once."""
    if not weights:
        return {}
    norms = [w.float().abs().flatten(1).sum(1) for w in weights.values()]
    flat = torch.cat([n.cpu() for n in norms]).double().numpy()
    out, start = {}, 0
    for name, n in zip(weights, norms):
        out[name] = flat[start : start + n.numel()]
        start += n.numel()
    return out


def _layer_entropies(weights: Mapping[str, torch.Tensor], bins: int) -> dict[str, float]:
    # the same layer entropy the graft uses (docs/method.md §2): one implementation
    from hf_graft.graft.information import layer_information

    if not weights:
        return {}
    # stacked where the weights live, copied to the host once
    values = torch.stack([layer_information(w, criterion="entropy", bins=bins).float() for w in weights.values()])
    return dict(zip(weights, values.cpu().double().tolist()))


def _check_reference(weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    for name, w in weights.items():
        if name not in reference:
            raise ValueError(
                f"reference does not match the model: it has no conv layer {name!r} (shape {tuple(w.shape)})"
            )
        if reference[name].shape != w.shape:
            raise ValueError(
                f"reference does not match the model at layer {name!r}: "
                f"model shape {tuple(w.shape)}, reference shape {tuple(reference[name].shape)}"
            )
    extra = [name for name in reference if name not in weights]
    if extra:
        raise ValueError(f"reference does not match the model: the model has no conv layer {extra[0]!r}")


@torch.no_grad()
def filter_report(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    reference: nn.Module | Mapping[str, torch.Tensor] | None = None,
    bins: int = 10,
    reference_name: str | None = None,
) -> FilterReport:
    """Per-filter l1 norms and per-layer entropy of every conv layer of a model or state dict.

    Conv layers are the floating-point 4-D `*weight` tensors (depthwise and grouped convs
    included). With `reference` (same architecture), each filter's valid/invalid status at a
    threshold is decided by the reference's l1, and the means are this model's l1 over those
    fixed sets (Table 8). Layer kinds come from the modules' `groups` when a module is given
    (the model, else the reference), otherwise from the weight shapes.
    """
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds:
        raise ValueError("filter_report needs at least one threshold")
    weights = _conv_weights(model_or_state_dict)
    ref_weights = None
    if reference is not None:
        ref_weights = _conv_weights(reference)
        _check_reference(weights, ref_weights)

    if isinstance(model_or_state_dict, nn.Module):
        kinds = conv_layer_kinds(model_or_state_dict)
    elif isinstance(reference, nn.Module):
        kinds = conv_layer_kinds(reference)
    else:
        kinds = {}

    l1 = _filter_l1(weights)
    ref_l1 = _filter_l1({name: ref_weights[name] for name in weights}) if ref_weights is not None else None
    entropies = _layer_entropies(weights, bins)
    nonfinite, num_weights = _nonfinite_counts(model_or_state_dict)
    layers = [
        LayerFilters(
            name=name,
            shape=tuple(w.shape),
            kind=kinds.get(name) or _kind_from_shape(w.shape),
            l1=l1[name],
            entropy=entropies[name],
            reference_l1=None if ref_l1 is None else ref_l1[name],
            nonfinite=nonfinite.get(name, 0),
        )
        for name, w in weights.items()
    ]
    return FilterReport(
        layers=layers,
        thresholds=thresholds,
        bins=bins,
        has_reference=reference is not None,
        reference_name=(reference_name or "reference") if reference is not None else None,
        nonfinite=nonfinite,
        num_weights=num_weights,
    )


# ----------------------------------------------------------------------------- plots
def population_filter_metrics(members: Sequence[nn.Module], *, thresholds: Sequence[float], bins: int) -> dict[str, float]:
    """Filter health of every member (the paper's "Reason"): its invalid-filter ratio at each threshold and
    its total entropy, as flat `member{k}_...` scalars for the logs."""
    logs: dict[str, float] = {}
    for k, member in enumerate(members):
        summary = filter_report(member, thresholds=thresholds, bins=bins).summary()
        logs.update({f"member{k}_{name}": value for name, value in summary.items()})
    return logs
