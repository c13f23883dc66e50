"""Top-1 / top-5 of a population, and which member is the best: the one implementation that the trainer's
evaluation, `hf-graft evaluate`, the shipped `evaluate` metric (`population_accuracy/`) and the run's
selection of its student all use."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

__all__ = ["best_member", "population_accuracy"]


def best_member(scores: Mapping[int, Any] | Sequence[Any], *, lower_is_better: bool = False) -> int | None:
    """The member with the best score (highest, or lowest with `lower_is_better`); ties go to the lowest
    index; members without a finite score are left out. None when no member has one."""
    items = scores.items() if isinstance(scores, Mapping) else enumerate(scores)
    finite = {int(k): float(v) for k, v in items if v is not None and math.isfinite(float(v))}
    if not finite:
        return None
    sign = 1.0 if lower_is_better else -1.0
    return min(finite, key=lambda k: (sign * finite[k], k))


def population_accuracy(logits, labels, select_student: str | int = "best") -> dict[str, float]:
    """Top-1/top-5 (percent) of every member, of the ensemble (the mean of the members' softmax) and of the
    selected member (`"best"`: the best top-1, ties to the lowest index; or a member index).

    `logits` [N, K, C] and `labels` [N] (or [N, K] per-member labels: the first column), tensors or
    arrays, on any device; top-5 is top-min(5, C). Returns `member{k}_top1/_top5`, `ensemble_top1/_top5`,
    `selected_member` (a float, as logged) and `top1` / `top5` of the selected member."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, device=logits.device).long()
    if labels.ndim == 2:  # per-member labels: evaluation data is shared, take the first view
        labels = labels[:, 0]
    if logits.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"population_accuracy: predictions must be [N, K, C] logits for N references, got shape "
                         f"{tuple(logits.shape)} for {labels.shape[0]} references")
    logits = logits.float()
    num_members, maxk = logits.shape[1], min(5, logits.shape[-1])
    ensemble = torch.softmax(logits, dim=-1).mean(dim=1, keepdim=True)
    ranked = torch.cat([logits, ensemble], dim=1).topk(maxk, dim=-1).indices  # [N, K + 1, maxk]
    hits = ranked == labels[:, None, None]
    n = labels.shape[0]  # percent as timm's `accuracy` computes it: hits * 100 / N
    top1 = hits[..., 0].float().sum(dim=0) * 100.0 / n
    top5 = hits.any(dim=-1).float().sum(dim=0) * 100.0 / n
    top1, top5 = top1.tolist(), top5.tolist()  # the one host read
    results: dict[str, float] = {}
    for k in range(num_members):
        results[f"member{k}_top1"], results[f"member{k}_top5"] = top1[k], top5[k]
    results["ensemble_top1"], results["ensemble_top5"] = top1[-1], top5[-1]
    if str(select_student) == "best":
        selected = best_member(top1[:num_members])
    else:
        selected = int(select_student)
    if selected is None or not 0 <= selected < num_members:
        raise ValueError(f"population_accuracy: select_student={select_student!r}, members 0..{num_members - 1}")
    results["selected_member"] = float(selected)
    results["top1"], results["top5"] = results[f"member{selected}_top1"], results[f"member{selected}_top5"]
    return results
