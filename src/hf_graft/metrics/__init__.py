"""Evaluation metrics through `evaluate`.

`accuracy.population_accuracy` computes top-1/top-5 of every member, of the ensemble and of the selected
member from [N, K, C] logits (`reid.ReidMetrics`: mAP and CMC of a re-identification population's features); `population_accuracy/` wraps that one function as an `evaluate` metric
shipped inside the package (it loads offline). Extra metrics
(`GraftingConfig.extra_metrics`, `hf-graft evaluate --extra_metrics`) are any `evaluate` metric: a name
(loaded from the Hub, or from evaluate's cache when offline) or a local folder / script.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch

from hf_graft.errors import one_line
from hf_graft.metrics.accuracy import best_member, population_accuracy
from hf_graft.metrics.reid import ReidMetrics

__all__ = [
    "POPULATION_ACCURACY_PATH",
    "PopulationMetrics",
    "ReidMetrics",
    "check_extra_metrics",
    "load_metric",
    "load_population_accuracy",
    "best_member",
    "population_accuracy",
]

POPULATION_ACCURACY_PATH = Path(__file__).resolve().parent / "population_accuracy"


def load_metric(name_or_path: str | os.PathLike, owner: str = "extra_metrics"):
    """An `evaluate` metric by name or local path, kept in memory (no cache files, no locks).

    Raises ValueError with one line naming the metric when it cannot be loaded (e.g. a Hub name offline).
    """
    import evaluate

    name = str(name_or_path)
    try:
        return evaluate.load(name, keep_in_memory=True)
    except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
        local = os.path.exists(name) or name.startswith((".", "/", "~")) or name.endswith(".py")
        if local:
            hint = "a local metric is a folder holding a metric script named after it (FOLDER/FOLDER.py), or that script"
        else:
            hint = (
                "evaluate loads metrics given by name from the Hugging Face Hub (or its cache), which is not "
                "reachable here; pass a local folder with the metric script instead"
            )
        raise ValueError(f"{owner}: cannot load the evaluate metric {name!r} ({one_line(error, with_type=True)}); {hint}") from error


def load_population_accuracy():
    """The `population_accuracy` metric shipped with hf_graft."""
    return load_metric(POPULATION_ACCURACY_PATH, owner="population_accuracy")


def check_extra_metrics(names: Sequence[str] | None, kwargs: Mapping[str, Any] | None, owner: str) -> None:
    """Fail at configuration time on a metric that cannot be loaded, or on arguments for an unlisted one."""
    names = list(names or [])
    for name in names:
        load_metric(name, owner=f"{owner}.extra_metrics")
    for name, value in (kwargs or {}).items():
        if name not in names:
            raise ValueError(f"{owner}.extra_metric_kwargs: {name!r} is not one of extra_metrics {names}")
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{owner}.extra_metric_kwargs: the arguments of {name!r} must be a mapping, "
                f"e.g. {{\"{name}\": {{\"average\": \"macro\"}}}}; got {value!r}"
            )


def _plain(value: Any) -> Any:
    """A metric value as a JSON/logging-friendly Python number (or nested list)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class PopulationMetrics:
    """`compute_metrics` of a population: `population_accuracy`, plus every extra metric computed on the
    predictions (argmax) of the selected member (`f1`) and of the ensemble (`ensemble_f1`).

    Call it with [N, K, C] logits and [N] labels (or [N, K] per-member labels: the first column).
    With `ensemble=False` the extra metrics are computed for the selected member only. Members in
    `leave_out` (diverged ones) are still measured on their own, but are not in the ensemble, nor chosen
    as the best member; the ensemble's metrics then come with `ensemble_members`, the members in it.
    """

    def __init__(
        self,
        select_student: str | int = "best",
        extra_metrics: Sequence[str] | None = None,
        extra_metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        ensemble: bool = True,
        owner: str = "extra_metrics",
    ):
        self.select_student = str(select_student)
        self.extra = [(str(name), load_metric(name, owner=owner)) for name in (extra_metrics or [])]
        self.extra_kwargs = {str(k): dict(v) for k, v in (extra_metric_kwargs or {}).items()}
        self.ensemble = ensemble

    def __call__(self, logits, labels, leave_out: Collection[int] = ()) -> dict[str, Any]:
        logits = np.asarray(logits, dtype=np.float32)
        labels = np.asarray(labels)
        if labels.ndim == 2:  # per-member labels: evaluation data is shared, take the first view
            labels = labels[:, 0]
        labels = labels.astype(np.int64)
        results: dict[str, Any] = population_accuracy(torch.from_numpy(logits), torch.from_numpy(labels),
                                                      select_student=self.select_student)
        members = [k for k in range(logits.shape[1]) if k not in set(leave_out)]
        if members and len(members) < logits.shape[1]:
            # the ensemble (and the best member) of the members left: one diverged member's nan logits
            # would otherwise decide every example of the ensemble
            best = self.select_student == "best"
            kept = population_accuracy(torch.from_numpy(logits[:, members]), torch.from_numpy(labels),
                                       select_student="best" if best else "0")
            results.update({key: kept[key] for key in ("ensemble_top1", "ensemble_top5")})
            results["ensemble_members"] = members
            if best:
                selected = members[int(kept["selected_member"])]
                results.update(selected_member=float(selected), top1=results[f"member{selected}_top1"],
                               top5=results[f"member{selected}_top5"])
        if not self.extra:
            return results
        predictions = {"": logits[:, int(results["selected_member"])].argmax(axis=-1)}
        if self.ensemble:  # the ensemble's probabilities exactly as population_accuracy computes them
            ensemble = logits[:, results["ensemble_members"]] if "ensemble_members" in results else logits
            probs = torch.softmax(torch.from_numpy(ensemble), dim=-1).mean(dim=1)
            predictions["ensemble_"] = probs.argmax(dim=-1).numpy()
        for name, metric in self.extra:
            kwargs = self.extra_kwargs.get(name, {})
            for prefix, predicted in predictions.items():
                scores = metric.compute(predictions=predicted, references=labels, **kwargs) or {}
                for key, value in scores.items():
                    out = prefix + key
                    if out in results:  # never overwrite a population number, nor another metric's
                        out = f"{prefix}{metric.name}_{key}"
                    results[out] = _plain(value)
        return results
