"""Checkpoints are the Trainer's own; resuming takes the newest complete one.

The Trainer writes a checkpoint's files in a fixed order with `trainer_state.json` last. A save that is
killed leaves an incomplete `checkpoint-N`, which `resume_from_checkpoint: true` names in one line,
removes and skips (tests/test_resume.py resumes past one bit-exactly).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hf_graft.run.output_dir import (
    OutputDirError, check_checkpoint_folder, checkpoint_problem, newest_complete_checkpoint, resolve_resume,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = {"model.safetensors", "graft_population.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json", "training_args.bin"}


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, digits_small):
    """One real checkpoint, written by the Trainer during a 3-step run (checkpoint-3)."""
    from _tiny_run import build_trainer

    run = tmp_path_factory.mktemp("saved") / "run"
    trainer = build_trainer(digits_small, run, max_steps=3, save_strategy="steps", save_steps=3, eval_strategy="no")
    trainer.train()
    return run / "checkpoint-3"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_the_trainer_writes_a_complete_checkpoint(saved_checkpoint):
    assert CHECKPOINT_FILES <= {p.name for p in saved_checkpoint.iterdir()}
    assert checkpoint_problem(saved_checkpoint) is None
    assert check_checkpoint_folder(saved_checkpoint) == saved_checkpoint


@pytest.mark.parametrize("damage, reason", [
    ("no_state", "has no trainer_state.json"),
    ("truncated_state", "trainer_state.json cannot be read"),
    ("truncated_optimizer", "optimizer.pt is damaged"),
])
def test_an_interrupted_save_is_incomplete(saved_checkpoint, tmp_path, damage, reason):
    folder = _copy(saved_checkpoint, tmp_path / "checkpoint-4")
    if damage == "no_state":
        (folder / "trainer_state.json").unlink()
    elif damage == "truncated_state":
        text = (folder / "trainer_state.json").read_text()
        (folder / "trainer_state.json").write_text(text[: len(text) // 2])
    else:
        data = (folder / "optimizer.pt").read_bytes()
        (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert reason in checkpoint_problem(folder)
    with pytest.raises(OutputDirError, match=re.escape(reason)):
        check_checkpoint_folder(folder)


def test_every_process_rng_state_is_needed_with_several_processes(saved_checkpoint, tmp_path):
    folder = _copy(saved_checkpoint, tmp_path / "checkpoint-3")
    (folder / "rng_state.pth").rename(folder / "rng_state_0.pth")
    assert "rng_state_1.pth" in checkpoint_problem(folder, world_size=2)
    (folder / "rng_state_1.pth").write_bytes((folder / "rng_state_0.pth").read_bytes())
    assert checkpoint_problem(folder, world_size=2) is None


def test_a_finished_checkpoint_damaged_later_is_refused_not_skipped(saved_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _copy(saved_checkpoint, run / "checkpoint-3")
    damaged = _copy(saved_checkpoint, run / "checkpoint-5")
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert resolve_resume(str(run), "last") == str(damaged)  # its save finished: not skipped
    with pytest.raises(OutputDirError, match=r"checkpoint-5/model.safetensors cannot be read"):
        check_checkpoint_folder(damaged)
    assert damaged.exists()


def test_resume_takes_the_newest_complete_checkpoint(saved_checkpoint, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    _copy(saved_checkpoint, run / "checkpoint-3")
    partial = _copy(saved_checkpoint, run / "checkpoint-5")
    (partial / "trainer_state.json").unlink()
    (partial / "rng_state.pth").unlink()
    with caplog.at_level(logging.WARNING, logger="hf_graft.run.output_dir"):
        assert newest_complete_checkpoint(run) == str(run / "checkpoint-3")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "checkpoint-5" in line and "trainer_state.json" in line and "\n" not in line
    assert not partial.exists()  # the resumed run writes step 5 again
    assert resolve_resume(str(run), "last") == str(run / "checkpoint-3")


def test_resume_true_without_a_complete_checkpoint_is_one_line(saved_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    partial = _copy(saved_checkpoint, run / "checkpoint-5")
    (partial / "trainer_state.json").unlink()
    with pytest.raises(OutputDirError, match="no checkpoint-N folder in output_dir .* is complete"):
        resolve_resume(str(run), True)
    assert resolve_resume(str(tmp_path / "empty"), "last") is None


def test_a_checkpoint_trainer_state_is_plain_json(saved_checkpoint):
    state = json.loads((saved_checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_transformers_has_no_upper_bound():
    """Checkpoints no longer depend on where the Trainer writes them: nothing caps transformers
    (tests/test_compat.py names any private member a new release moves)."""
    (line,) = re.findall(r'"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert not any(spec.operator in ("<", "<=", "==", "~=") for spec in Requirement(line).specifier), line
