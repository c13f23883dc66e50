"""What a finished run reports: which member is the student, and why."""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["format_number", "select_member"]


def _lower_is_better(metric: str) -> bool:
    return metric.endswith("loss") or metric.endswith("error")


def select_member(
    member_metrics: Mapping[int, Mapping[str, float]],
    select_student: str | int,
    metric: str = "top1",
    *,
    num_members: int | None = None,
) -> tuple[int, str]:
    """Which member to export, and why.

    `"best"`: the member with the best eval `metric` (highest; lowest for *loss / *error metrics), ties to the
    lowest index. An int or digit string: that member, checked against 0..num_members-1 (num_members
    defaults to the number of members in `member_metrics`).
    """
    metrics = {int(k): dict(v) for k, v in member_metrics.items()}
    if isinstance(select_student, str) and select_student.strip().lower() == "best":
        scored = {k: float(m[metric]) for k, m in metrics.items() if m.get(metric) is not None}
        scored = {k: v for k, v in scored.items() if not math.isnan(v)}
        if not scored:
            available = sorted({name for m in metrics.values() for name in m})
            raise ValueError(
                f"select_student=best needs the eval metric {metric!r} for at least one member; "
                f"available metrics: {', '.join(available) or 'none'}"
            )
        sign = -1.0 if _lower_is_better(metric) else 1.0
        best = min(scored, key=lambda k: (-sign * scored[k], k))
        direction = "lowest" if sign < 0 else "highest"
        reason = (
            f"member {best} has the {direction} eval {metric} ({format_number(scored[best])}) "
            f"of the {len(scored)} evaluated members"
        )
        tied = sorted(k for k, v in scored.items() if v == scored[best] and k != best)
        if tied:
            reason += f" (tied with member(s) {', '.join(map(str, tied))}; the lowest index wins)"
        return best, reason

    if isinstance(select_student, bool):
        raise ValueError(f"select_student must be 'best' or a member index, got {select_student!r}")
    if isinstance(select_student, int):
        index = select_student
    elif isinstance(select_student, str) and select_student.strip().isdigit():
        index = int(select_student.strip())
    else:
        raise ValueError(f"select_student must be 'best' or a member index, got {select_student!r}")
    count = num_members if num_members is not None else (max(metrics) + 1 if metrics else 0)
    if not 0 <= index < count:
        valid = f"0..{count - 1}" if count else "none known"
        raise ValueError(f"select_student={index}: no such member (members: {valid})")
    return index, f"member {index} was chosen explicitly (select_student={index})"


def format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != 0 else "0"
