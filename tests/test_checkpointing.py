"""The one piece of hf_graft that relies on transformers' Trainer internals: atomic checkpoints.

`hf_graft.run.checkpoints.AtomicCheckpoints` runs transformers' own `Trainer._save_checkpoint` with the
run folder (`Trainer._get_output_dir`) redirected to a staging folder, then renames the staged
checkpoint into place. These tests fail loudly when the installed transformers stops writing its
checkpoint where that redirection sends it, and when it is newer than the bound in pyproject.toml
(the versions the suite has been run with; README, "Checkpoints and resuming", says how to move it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import Trainer

from hf_graft.run.checkpoints import AtomicCheckpoints

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = {"model.safetensors", "graft_population.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json", "training_args.bin"}


def _trainer_ready_to_save(make_trainer, tmp_path, step: int):
    trainer = make_trainer(output_dir=str(tmp_path / "run"), save_strategy="steps", save_steps=1, eval_strategy="no")
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    trainer.state.global_step = step
    return trainer


def test_transformers_writes_the_checkpoint_where_it_is_redirected(make_trainer, tmp_path):
    """transformers' `_save_checkpoint` must write every file under `_get_output_dir()/checkpoint-N`:
    after one save the run folder holds the complete checkpoint-N and nothing else."""
    assert "_save_checkpoint" in vars(Trainer) and "_get_output_dir" in vars(Trainer)
    trainer = _trainer_ready_to_save(make_trainer, tmp_path, step=3)
    trainer._save_checkpoint(trainer.model, trial=None)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3"]
    assert CHECKPOINT_FILES <= {p.name for p in (run / "checkpoint-3").iterdir()}
    # the redirection is over once the save is
    assert trainer._get_output_dir(trial=None) == str(run)


def test_a_save_outside_the_staging_folder_is_an_error(make_trainer, tmp_path, monkeypatch):
    """If a transformers version wrote the checkpoint somewhere else, the save says so at once."""

    def writes_elsewhere(self, model, trial):  # what a changed upstream method might do
        (Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}").mkdir(parents=True)

    monkeypatch.setattr(Trainer, "_save_checkpoint", writes_elsewhere)
    trainer = _trainer_ready_to_save(make_trainer, tmp_path, step=5)
    with pytest.raises(RuntimeError, match=rf"transformers {re.escape(transformers.__version__)}: .*pyproject"):
        trainer._save_checkpoint(trainer.model, trial=None)


def test_the_mixin_comes_before_trainer():
    from hf_graft.training.trainer import GraftingTrainer

    mro = GraftingTrainer.__mro__
    assert mro.index(AtomicCheckpoints) < mro.index(Trainer)


def test_installed_transformers_is_within_the_tested_bound():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (line,) = re.findall(r'"(transformers[^"]*)"', pyproject)
    requirement = Requirement(line)
    assert any(spec.operator == "<" for spec in requirement.specifier), f"no upper bound on transformers: {line}"
    assert Version(transformers.__version__) in requirement.specifier, (
        f"transformers {transformers.__version__} is outside {line}: run tests/test_checkpointing.py, "
        "tests/test_resume.py and tests/test_distributed.py with it, then move the bound (README)"
    )
