"""The benchmarks run: each `--quick` mode exits 0 and prints its ratio / result line last.

These only check that the measuring instruments work end to end on real data (the numbers they
print are the benchmarks' business, not the test's): each runs in a subprocess, offline, in well
under a minute.
"""

from __future__ import annotations

import json
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
    lines = _run("reproduce_small.py", "--work-dir", str(tmp_path / "repro"), timeout=240)
    last = lines[-1]
    assert last.startswith("RESULT top-1"), last
    # both quick methods ran on both seeds and report a top-1 in percent, graft2 with its paired interval
    values = dict(re.findall(r"(baseline|graft2) (\d+\.\d+)", last))
    assert set(values) == {"baseline", "graft2"}, last
    assert all(0.0 <= float(v) <= 100.0 for v in values.values())
    assert re.search(r"vs baseline [+-]\d+\.\d, 95% t \[[+-]\d+\.\d, [+-]\d+\.\d\]", last), last
    work = tmp_path / "repro_quick"
    runs = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("baseline", 0), ("baseline", 1), ("graft2", 0), ("graft2", 1)]
    # the graft diagnostics callback measured the one graft of each grafting run: before, after, BN re-estimated
    for r in runs:
        assert len(r["graft_diagnostics"]) == (1 if r["method"] == "graft2" else 0)
        for d in r["graft_diagnostics"]:
            assert d["graft"] == 1 and all(len(d[k]) == 2 for k in ("before", "after", "after_bn_recal"))
        assert all(len(curve) == 2 for curve in r["eval_curves"].values())  # one evaluation per epoch
    # the table reads the paired difference; --report-only rewrites the same file from the work dir alone
    table = (work / "reproduce_small.md").read_text()
    assert re.search(r"\| graft2 \| 0,1 \| .* \| [+-]\d+\.\d \| \[.*\] \| (interval contains 0|higher|lower)", table)
    rewritten = tmp_path / "again.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce_small.py"), "--report-only",
                           "--work-dir", str(work), "--results", str(rewritten)],
                          cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _without_environment(rewritten.read_text()) == _without_environment(table)


def _without_environment(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("Environment:"))


def test_graft_cost_quick():
    lines = _run("graft_cost.py")
    assert lines[-1].startswith("RATIO reference / hf_graft graft time"), lines[-1]
    assert re.search(r"\d+(\.\d+)?", lines[-1]), lines[-1]


@needs_cifar
def test_gpu_window_quick(tmp_path):
    """The one-GPU window as a CPU smoke run (reproduction part only; the step benchmark has its own
    test): it writes the results file with the card, the versions, every part's wall time and the
    reproduction's tables, and cleans up its temporary files."""
    out = tmp_path / "results" / "gpu.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_window.sh"), str(CIFAR), "--quick", "--no-step",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    text = out.read_text()
    assert "- versions: python" in text and "torch" in text and "datasets" in text
    rows = dict(re.findall(r"^\| (card and versions|step profile|step benchmark|reproduction) \| \d+ \| ([^|]+) \|$",
                           text, re.M))
    assert rows == {"card and versions": "0", "step profile": "left out (--no-step)",
                    "step benchmark": "left out (--no-step)", "reproduction": "0"}, rows
    assert "Status: finished" in text
    # the epoch timing of cifar_resnet56 and the reproduction table, one row per method
    assert re.search(r"^\| fused \| 1 \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+ \|$", text, re.M)
    for method in ("baseline", "independent2", "ensemble2", "graft2", "graft2_ensemble"):
        assert re.search(rf"^\| {method} \| 0 \| \d+\.\d ± n/a \|", text, re.M), method
    assert re.search(r"^\| graft2 \| 0 \| \d+\.\d \| \d+\.\d \| \d+\.\d \| \d+ \|$", text, re.M)  # 2 epochs
    assert proc.stdout.strip().splitlines()[-1].startswith("== wrote ")
    runs = json.loads((tmp_path / "results" / "gpu_runs.json").read_text())["runs"]
    assert [(r["method"], r["seed"], r["complete"]) for r in runs] == [
        ("baseline", 0, True), ("independent2", 0, True), ("graft2", 0, True)]
    assert not list(tmp_path.glob("gpu_window.*"))  # its work folder is gone


def test_gpu_step_quick(tmp_path):
    """The step benchmark runs end to end on CPU: every side of the first configuration measured,
    ratios against the hand loop, and the markdown report written."""
    out = tmp_path / "gpu_step.md"
    lines = _run("gpu_step.py", "--device", "cpu", "--out", str(out))
    match = re.fullmatch(r"RESULT cifar_resnet20 K=2: hand loop (\d+\.\d+) member-images/s; loop (\d+\.\d+)x, "
                         r"loop_cl (\d+\.\d+)x, loop_u8 (\d+\.\d+)x, fused (\d+\.\d+)x, hand_dev (\d+\.\d+)x",
                         lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) > 0 and all(0.05 < float(g) < 20 for g in match.groups()[1:])
    report = out.read_text()
    assert "| `cifar_resnet20` | 16 | 2 | 8 |" in report and "| `cifar_resnet20` | 16 | 4 | 8 |" in report
    assert "torch " in report and "timm " in report and "Skipped: none." in report


def test_gpu_step_diagnose_quick(tmp_path):
    """The per-step profile runs on CPU: host operators per step for every side, the hand loop's close to
    the trainer's (the trainer adds its per-member norms and loss bookkeeping, not another forward)."""
    out = tmp_path / "diagnose.md"
    lines = _run("gpu_step.py", "--device", "cpu", "--diagnose", "--out", str(out))
    match = re.fullmatch(r"RESULT cifar_resnet20 K=2: host ops per step: hand (\d+), loop_cl (\d+), fused (\d+), "
                         r"hand_dev (\d+)", lines[-1])
    assert match, lines[-1]
    hand, loop_cl, fused, hand_dev = map(int, match.groups())
    assert hand > 300 and abs(hand - hand_dev) < 0.1 * hand  # a forward and backward of two ResNet-20s
    assert 0.9 * hand < loop_cl < 1.3 * hand
    report = out.read_text()
    assert "| `cifar_resnet20` | 16 | 2 | hand loop |" in report and "| trainer, fused |" in report


def test_reid_metrics_quick(tmp_path):
    """The ReID metric benchmark at a tiny size: every side timed, the same results on every side, the
    markdown report written."""
    out = tmp_path / "reid_metrics.md"
    lines = _run("reid_metrics.py", "--markdown", str(out))
    match = re.fullmatch(r"RATIO reference / hf_graft reid_metrics time \(median wall, 300 x 1500, 256-d\): "
                         r"(\d+\.\d)x, CPU time (\d+\.\d)x; reference_matvec (\d+\.\d)x, reference_precomputed "
                         r"(\d+\.\d)x; same results: yes \(target >= 10x\)", lines[-1])
    assert match, lines[-1]
    assert all(float(g) > 0 for g in match.groups())
    report = out.read_text()
    assert "Results (every side the same: yes)" in report and "valid_queries 300" in report
    assert re.search(r"^\| reference \| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\dx \|", report, re.M)
