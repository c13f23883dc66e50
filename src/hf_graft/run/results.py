"""What a finished run reports: which member is the student and why, each member's numbers, and
the closing summary. Plain functions of the final metrics (`GraftingTrainer.train` calls them once)."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

from hf_graft.metrics.accuracy import best_member

__all__ = [
    "ensemble_label",
    "ensemble_metrics",
    "filter_summaries",
    "format_number",
    "logged_evaluation",
    "member_metrics",
    "METRIC_NAMES",
    "SELECTION_METRIC",
    "select_member",
    "run_results",
    "summary_lines",
]

TOPK = ("top1", "top5")
# every per-member number a population's evaluation reports: classification's, then re-identification's
METRIC_NAMES = (*TOPK, "mAP", "rank1", "rank5", "rank10")
# the number that chooses the best member, by task (DataArguments.task)
SELECTION_METRIC = {"classification": "top1", "reid": "mAP"}

logger = logging.getLogger(__name__)


def _lower_is_better(metric: str) -> bool:
    return metric.endswith("loss") or metric.endswith("error")


def select_member(
    member_metrics: Mapping[int, Mapping[str, float]],
    select_student: str | int,
    metric: str = "top1",
    *,
    num_members: int | None = None,
    diverged: Mapping[int, int] | None = None,
) -> tuple[int | None, str]:
    """Which member to export, and why.

    `"best"`: the member with the best eval `metric` (highest; lowest for *loss / *error metrics), ties to the
    lowest index. An int or digit string: that member, checked against 0..num_members-1 (num_members
    defaults to the number of members in `member_metrics`). `diverged` ({member: step}) are never chosen:
    "best" picks among the others, and an explicit choice of a diverged member gives (None, why).
    """
    metrics = {int(k): dict(v) for k, v in member_metrics.items()}
    diverged = {int(k): int(v) for k, v in (diverged or {}).items()}
    left_out = ""
    if diverged:
        left_out = f" ({_members(diverged)} diverged and {'is' if len(diverged) == 1 else 'are'} left out)"
    if isinstance(select_student, str) and select_student.strip().lower() == "best":
        scored = {k: m.get(metric) for k, m in metrics.items() if k not in diverged}
        best = best_member(scored, lower_is_better=_lower_is_better(metric))
        if best is None:
            available = sorted({name for m in metrics.values() for name in m})
            raise ValueError(
                f"select_student=best needs the eval metric {metric!r} for at least one member; "
                f"available metrics: {', '.join(available) or 'none'}"
            )
        scored = {k: float(v) for k, v in scored.items() if v is not None and math.isfinite(float(v))}
        sign = -1.0 if _lower_is_better(metric) else 1.0
        direction = "lowest" if sign < 0 else "highest"
        reason = (
            f"member {best} has the {direction} eval {metric} ({format_number(scored[best])}) "
            f"of the {len(scored)} evaluated members{left_out}"
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
    if index in diverged:
        healthy = [k for k in range(count) if k not in diverged]
        return None, (
            f"select_student={index}, but member {index} diverged at step {diverged[index]} (non-finite weights or "
            f"losses) and is not exported; the healthy members are {', '.join(map(str, healthy)) or 'none'}: "
            "choose one of them (select_student, or hf-graft export CHECKPOINT --member K)"
        )
    return index, f"member {index} was chosen explicitly (select_student={index})"


def _members(indices) -> str:
    indices = sorted(indices)
    return f"member {indices[0]}" if len(indices) == 1 else "members " + ", ".join(map(str, indices))


def format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != 0 else "0"


def member_metrics(metrics: Mapping[str, Any], num_members: int, prefix: str = "eval") -> dict[int, dict[str, float]]:
    """{k: {"top1": ..., "top5": ...}} from flat `{prefix}_member{k}_top1` metrics (those of `METRIC_NAMES`
    present: `mAP`, `rank1`, ... for a re-identification run)."""
    return {
        k: {name: metrics[f"{prefix}_member{k}_{name}"] for name in METRIC_NAMES
            if f"{prefix}_member{k}_{name}" in metrics}
        for k in range(num_members)
    }


def ensemble_metrics(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[str, Any]:
    """The ensemble's metrics, and "members" (the members in it) when some were left out."""
    found = {name: metrics[f"{prefix}_ensemble_{name}"] for name in METRIC_NAMES
             if f"{prefix}_ensemble_{name}" in metrics}
    if f"{prefix}_ensemble_members" in metrics:
        found["members"] = [int(k) for k in metrics[f"{prefix}_ensemble_members"]]
    return found


def ensemble_label(members: Sequence[int] | None) -> str:
    """What the ensemble is: "ensemble of all members", or of the members listed when some were left out."""
    if members is None:
        return "ensemble of all members"
    return f"ensemble of {_members(members)} (diverged members left out)"


def filter_summaries(metrics: Mapping[str, Any], members: Sequence, *, thresholds: Sequence[float], bins: int,
                     prefix: str = "eval") -> dict[str, dict[str, float]]:
    """Each member's filter health (`FilterReport.summary`: invalid-filter ratios and total entropy):
    taken from the evaluation's metrics when it logged them, computed from the weights otherwise."""
    from hf_graft.graft.filters import filter_report, threshold_key

    names = [f"invalid_ratio@{threshold_key(t)}" for t in thresholds] + ["total_entropy"]
    summaries = {}
    for k, member in enumerate(members):
        keys = [f"{prefix}_member{k}_{name}" for name in names]
        if all(key in metrics for key in keys):
            summaries[f"member{k}"] = {name: metrics[key] for name, key in zip(names, keys)}
        else:
            summaries[f"member{k}"] = filter_report(member, thresholds=thresholds, bins=bins).summary()
    return summaries


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{minutes} min {rest:02d} s"


def summary_lines(results: Mapping[str, Any], num_members: int) -> list[str]:
    """The closing lines of a run: where the student is, which member and why, each member's and the
    ensemble's top-1 (mAP and rank-1 for a re-identification run), and the wall time."""
    selected = results.get("selected_member")
    folder = results.get("student_dir")
    if selected is None:
        lines = [f"no student selected: {results.get('selection_reason')}"]
    elif folder:
        lines = [f"student: member {selected}, written to {folder}"]
    else:
        lines = [f"student: member {selected} (not written: export_student is false)"]
    if selected is not None:
        lines.append(f"selected because {results.get('selection_reason')}")
    reid = results.get("task") == "reid"
    names, title = (("mAP", "rank1"), "eval mAP / rank-1 (%)") if reid else (("top1",), "eval top-1 (%)")

    def shown(values: Mapping[str, Any]) -> str | None:
        return " / ".join(format_number(values[n]) for n in names) if all(n in values for n in names) else None

    members = {k: shown(v) for k, v in member_metrics(results, num_members).items()}
    scores = [f"member {k} {v}" for k, v in members.items() if v is not None]
    ensemble_values = ensemble_metrics(results)
    ensemble = shown(ensemble_values)
    if ensemble is not None and num_members > 1:
        kept = f" ({_members(ensemble_values['members'])}, diverged left out)" if "members" in ensemble_values else ""
        scores.append(f"ensemble {ensemble}{kept}")
    if scores:
        lines.append(f"{title}: " + ", ".join(scores))
    if "wall_time_s" in results:
        lines.append(f"wall time: {_duration(results['wall_time_s'])}")
    return lines


def logged_evaluation(log_history: Sequence[Mapping[str, Any]], step: int) -> dict[str, Any] | None:
    """The evaluation the Trainer logged at `step` (without its `step` key), or None when there is none."""
    for entry in reversed(log_history):
        if entry.get("step") == step and "eval_runtime" in entry:
            return {key: value for key, value in entry.items() if key != "step"}
    return None


def run_results(metrics: Mapping[str, Any], *, args, members: Sequence, has_eval: bool,
                diverged: Mapping[int, int] | None = None, selection_metrics: Mapping[str, Any] | None = None,
                eval_split: str | None = None, selection_split: str | None = None,
                task: str = "classification") -> dict[str, Any]:
    """What a finished run reports, from its final metrics (training and evaluation, flat): the selected
    member and why, on which split it was chosen, the grafting and distillation settings, every member's
    filter health, the members' mean, and the members that diverged (they went on alone, never as scions).

    With `selection_metrics` (`selection_member{k}_top1`, ... of a split held out of train), `best` chooses
    on them alone; otherwise on the evaluation split, and a split named `test` is said once in the log.
    `args` is the run's `GraftingConfig`; `task` ("classification" or "reid") the number that chooses the
    best member (`SELECTION_METRIC`: top-1, or mAP), and a re-identification run's results say `task`."""
    results = dict(metrics)
    metric = SELECTION_METRIC[task]
    if task != "classification":
        results["task"] = task
    per_member = member_metrics(results, args.num_students)
    if per_member and all(metric in m for m in per_member.values()):
        results[f"eval_members_mean_{metric}"] = sum(m[metric] for m in per_member.values()) / len(per_member)
    chooser, chooser_split = per_member, eval_split
    if selection_metrics is not None:
        results.update(selection_metrics)
        chooser, chooser_split = member_metrics(selection_metrics, args.num_students, prefix="selection"), selection_split
    if args.select_student == "best" and not has_eval and selection_metrics is None:
        selected, reason = None, "no eval_dataset to choose the best member by (select_student: best)"
    else:
        selected, reason = select_member(chooser, args.select_student, metric, num_members=args.num_students,
                                         diverged=diverged)
        if args.select_student == "best":
            results["selection_split"] = chooser_split or "the evaluation split"
            reason += f" on {results['selection_split']}"
            if selection_metrics is None and chooser_split and "test" in chooser_split.lower():
                logger.warning("select_student: best chose member %d on the split %r, the one the results report: "
                               f"its {'top-1' if metric == 'top1' else metric} there is optimistic; set selection_split_percentage to choose on a part "
                               "of the training split instead", selected, chooser_split)
    results.update(selected_member=selected, selection_reason=reason, grafting=args.grafting_settings())
    if args.kd_settings():
        results["distillation"] = args.kd_settings()
    results["filters"] = filter_summaries(results, members, thresholds=args.filter_thresholds, bins=args.graft_bins)
    if diverged:
        results["diverged_members"] = {str(k): step for k, step in diverged.items()}
    return results
