"""Seed statistics for the reproduction tables: mean and spread over seeds, and paired differences
against a baseline with a Student-t confidence interval.

Every method is run on the same seeds as its baseline, so seed s of the method and seed s of the
baseline share the data subset, the evaluation images and the initialisation stream; the per-seed
difference removes that shared part of the noise, and its t-interval (n - 1 degrees of freedom) says
whether the mean difference is distinguishable from zero at this number of seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["PairedDifference", "mean_std", "paired_difference", "t_interval", "markdown_table"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of a single value is nan."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student-t interval of the mean; (mean, nan, nan) for n < 2."""
    from scipy.stats import t

    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed difference method - baseline, its mean and t-interval."""

    mean: float
    low: float
    high: float
    seeds: tuple[int, ...]
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def contains_zero(self) -> bool:
        """True when the interval includes 0 (or cannot be formed): no difference shown."""
        return not (self.low > 0 or self.high < 0)

    def verdict(self, reference: str = "the baseline") -> str:
        if self.n < 2:
            return "one seed: no interval"
        if self.contains_zero:
            return "interval contains 0: no difference shown"
        return f"higher than {reference}" if self.low > 0 else f"lower than {reference}"


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> PairedDifference:
    """Differences on the seeds both have; fails when they share none."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    if not seeds:
        raise ValueError("paired_difference: the method and the baseline share no seed")
    mean, low, high = t_interval([method[s] - baseline[s] for s in seeds], confidence)
    return PairedDifference(mean, low, high, seeds, confidence)


def _fmt(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def markdown_table(results: Mapping[str, Mapping[int, float]], baseline: str, *, confidence: float = 0.95,
                   metric: str = "top-1") -> str:
    """One row per method: seeds, mean ± std over seeds, and the paired difference to `baseline`
    with its interval and, in words, what the interval supports."""
    if baseline not in results:
        raise ValueError(f"markdown_table: baseline {baseline!r} not among the methods {sorted(results)}")
    level = f"{round(confidence * 100)}%"
    lines = [
        f"| method | seeds | {metric} mean ± std | difference to {baseline} (paired, per seed) | {level} t-interval | reading |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, per_seed in results.items():
        mean, std = mean_std(list(per_seed.values()))
        cells = [name, ",".join(str(s) for s in sorted(per_seed)), f"{_fmt(mean)} ± {_fmt(std)}"]
        if name == baseline:
            cells += ["(baseline)", "", ""]
        else:
            diff = paired_difference(per_seed, results[baseline], confidence)
            cells += [_fmt(diff.mean, signed=True), f"[{_fmt(diff.low, True)}, {_fmt(diff.high, True)}]", diff.verdict(baseline)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
