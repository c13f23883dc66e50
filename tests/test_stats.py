"""The seed statistics of the reproduction benchmarks against hand-computed values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from stats import markdown_table, mean_std, paired_difference, t_interval  # noqa: E402


def test_t_interval_by_hand():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, t(0.975, 3) = 3.182446305
    mean, low, high = t_interval([1.0, 2.0, 3.0, 6.0])
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half, abs=1e-9) and high == pytest.approx(3.0 + half, abs=1e-9)
    assert high - low == pytest.approx(6.875, abs=1e-3)


def test_paired_difference_uses_shared_seeds_and_reads_the_interval():
    baseline = {0: 40.0, 1: 38.0, 2: 41.0, 3: 50.0}
    better = {0: 42.0, 1: 40.5, 2: 42.5}  # differences 2, 2.5, 1.5: mean 2, sd 0.5, t(0.975, 2) = 4.302653
    diff = paired_difference(better, baseline)
    assert diff.seeds == (0, 1, 2) and diff.n == 3
    assert diff.mean == pytest.approx(2.0)
    assert diff.low == pytest.approx(2.0 - 4.302652729749464 * 0.5 / math.sqrt(3), abs=1e-9)
    assert not diff.contains_zero and diff.verdict() == "higher than the baseline"

    noisy = {0: 44.0, 1: 36.0, 2: 41.0}  # differences 4, -2, 0
    diff = paired_difference(noisy, baseline)
    assert diff.contains_zero and diff.verdict() == "interval contains 0: no difference shown"
    assert paired_difference({0: 1.0}, baseline).verdict() == "one seed: no interval"
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({9: 1.0}, baseline)


def test_mean_std_and_table():
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
    table = markdown_table({"baseline": {0: 40.0, 1: 38.0, 2: 41.0},
                            "graft": {0: 42.0, 1: 40.5, 2: 42.5}}, "baseline")
    rows = table.splitlines()
    assert rows[2].startswith("| baseline | 0,1,2 | 39.7 ± 1.5 | (baseline)")
    assert "| graft | 0,1,2 | 41.7 ± 1.0 | +2.0 | [+0.8, +3.2] | higher than baseline |" == rows[3]
