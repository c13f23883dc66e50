"""A tiny quickstart run through the command line (`hf_graft.train.main`, in this process).

cifar_resnet20 x 2 at 16 px on builtin:digits: 64 training images (4 steps of 16 an epoch), 32 held out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hf_graft.cli.train import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = ["--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--logging_steps", "1"]


def cli(out, *extra: str) -> int:
    """`hf-graft train recipes/quickstart.yaml` with the tiny settings, into `out`; returns the exit status."""
    return main([str(QUICKSTART), "--output_dir", str(out), *TINY, *extra])


def finished_quickstart_run(out: Path) -> Path:
    """A finished 2-epoch tiny quickstart run in `out`: checkpoint-4, checkpoint-8, results and student/."""
    assert cli(out, "--num_train_epochs", "2", "--save_strategy", "epoch", "--save_total_limit", "3") == 0
    assert {"checkpoint-4", "checkpoint-8", "all_results.json", "student"} <= {p.name for p in out.iterdir()}
    return out


def error_lines(capsys, prefix: str = "hf-graft train:") -> list[str]:
    """The lines of stderr written by the command itself (logging goes there too)."""
    lines = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.splitlines()]  # past progress bars
    return [line for line in lines if line.startswith(prefix)]


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".hf_graft.lock"))
    return target


def start_lock_holder(folder: Path) -> subprocess.Popen:
    """Another process that locks `folder` as a run would, and waits to be killed."""
    code = ("import sys, time\nfrom hf_graft.run.output_dir import lock_output_dir\n"
            "lock_output_dir(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder
