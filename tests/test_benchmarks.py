"""The benchmarks run: each `--quick` mode exits 0 and prints its ratio / result line last.

These only check that the measuring instruments work end to end on real data (the numbers they
print are the benchmarks' business, not the test's): each runs in a subprocess, offline, in well
under a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
if not CIFAR.is_dir():  # a checkout elsewhere (e.g. a CI clone): the workplace copy
    CIFAR = Path("/work/shared/data/cifar10")
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"{CIFAR} (local CIFAR-10 copy) is not present")


def _run(script: str, *extra: str, timeout: int = 120) -> list[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{script} --quick printed nothing"
    return lines


@needs_cifar
def test_throughput_quick(tmp_path):
    lines = _run("throughput.py", "--workdir", str(tmp_path / "tp"))
    match = re.fullmatch(r"RATIO hf_graft/plain time per epoch: (\d+\.\d+) wall \(target <= 1\.05\), (\d+\.\d+) cpu", lines[-1])
    assert match, lines[-1]
    ratio = float(match.group(1))
    assert 0.1 < ratio < 10.0  # a real measurement of two runs of the same work, not a placeholder
    assert any(line.startswith("hf_graft GraftingTrainer: median") for line in lines)
    assert any(line.startswith("plain PyTorch loop:") for line in lines)


@needs_cifar
def test_reproduce_small_quick(tmp_path):
    lines = _run("reproduce_small.py", "--work-dir", str(tmp_path / "repro"))
    last = lines[-1]
    assert last.startswith("RESULT top-1"), last
    # both quick methods ran and report a top-1 in percent
    values = dict(re.findall(r"(baseline|graft2) (\d+\.\d+)", last))
    assert set(values) == {"baseline", "graft2"}, last
    assert all(0.0 <= float(v) <= 100.0 for v in values.values())
    # the quick run leaves the results file of the full run alone
    runs = (tmp_path / "repro_quick" / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2


def test_graft_cost_quick():
    lines = _run("graft_cost.py")
    assert lines[-1].startswith("RATIO reference / hf_graft graft time"), lines[-1]
    assert re.search(r"\d+(\.\d+)?", lines[-1]), lines[-1]


def test_gpu_step_quick(tmp_path):
    """The step benchmark runs end to end on CPU: every side of the first configuration measured,
    ratios against the hand loop, and the markdown report written."""
    out = tmp_path / "gpu_step.md"
    lines = _run("gpu_step.py", "--device", "cpu", "--out", str(out))
    match = re.fullmatch(r"RESULT cifar_resnet20 K=2: hand loop (\d+\.\d+) member-images/s; loop (\d+\.\d+)x, "
                         r"loop_cl (\d+\.\d+)x, fused (\d+\.\d+)x, hand_dev (\d+\.\d+)x", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) > 0 and all(0.05 < float(g) < 20 for g in match.groups()[1:])
    report = out.read_text()
    assert "| `cifar_resnet20` | 16 | 2 | 8 |" in report and "| `cifar_resnet20` | 16 | 4 | 8 |" in report
    assert "torch " in report and "timm " in report and "Skipped: none." in report
