"""What a run records about itself, as the model card of its student reports it: the run identity (the
settings, `graft_run.json`) and the Trainer's state (the batch size, the planned epochs and every logged
evaluation, `trainer_state.json`).

Training makes the record from the live trainer (`trainer_records`), `hf-graft export` reads it
from a checkpoint folder (`read_run_records`): both cards are built from the same record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hf_graft.config import grafting_settings_of, kd_settings_of
from hf_graft.errors import HfGraftError
from hf_graft.run.output_dir import run_identity
from hf_graft.run.results import logged_evaluation
from hf_graft.utils.files import RUN_IDENTITY_FILE, TRAINER_STATE_FILE

__all__ = ["RunRecords", "RunRecordsError", "read_run_records", "trainer_records"]



class RunRecordsError(HfGraftError, ValueError):
    """A record file of a checkpoint cannot be read; the message names the file."""


@dataclass(frozen=True)
class RunRecords:
    """A run's settings (`identity`: `run_identity`'s keys) and what the Trainer's state says of it."""

    identity: Mapping[str, Any] = field(default_factory=dict)
    log_history: Sequence[Mapping[str, Any]] = ()
    train_batch_size: int | None = None  # per device, as `TrainingArguments.train_batch_size`
    num_train_epochs: float | None = None
    global_step: int | None = None

    @classmethod
    def from_state(cls, identity: Mapping[str, Any] | None, state) -> "RunRecords":
        """From a run identity and a `transformers.TrainerState` (the live one, or one read from a checkpoint)."""
        return cls(identity=dict(identity or {}), log_history=[dict(e) for e in state.log_history or []],
                   train_batch_size=state.train_batch_size, num_train_epochs=state.num_train_epochs,
                   global_step=state.global_step)

    def hyperparameters(self) -> dict[str, Any]:
        """The training hyperparameters, named as transformers' Trainer cards name them (those recorded)."""
        run = self.identity
        optimizer = run.get("optim")
        if optimizer and run.get("optim_args"):
            optimizer = f"{optimizer} ({run['optim_args']})"
        values = {
            "learning_rate": run.get("learning_rate"),
            "train_batch_size": self.train_batch_size,
            "total_train_batch_size": run.get("total_train_batch_size"),
            "num_epochs": self.num_train_epochs,
            "seed": run.get("seed"),
            "data_seed": run.get("data_seed"),
            "optimizer": optimizer,
            "weight_decay": run.get("weight_decay"),
            "weight_decay_scope": run.get("weight_decay_scope"),
            "max_grad_norm": run.get("max_grad_norm"),
            "num_students": run.get("num_students"),
        }
        return {name: value for name, value in values.items() if value is not None}

    def grafting_settings(self) -> dict[str, Any]:
        return grafting_settings_of(self.identity)

    def kd_settings(self) -> dict[str, Any] | None:
        return kd_settings_of(self.identity)

    def evaluation(self) -> dict[str, Any] | None:
        """The evaluation logged at the recorded step (of the weights saved with it), or None."""
        return None if self.global_step is None else logged_evaluation(self.log_history, self.global_step)

    def evaluations(self, metric: str = "top1") -> list[dict[str, Any]]:
        """Every logged evaluation of the members or the ensemble, in order: `epoch`, `step`, then
        `member{k}_{metric}` for each member and `ensemble_{metric}`, as logged (`metric`: top1, or mAP
        for a re-identification run)."""
        member_key = re.compile(rf"^eval_member(\d+)_{re.escape(metric)}$")
        rows = []
        for entry in self.log_history:
            members = sorted(int(m.group(1)) for m in map(member_key.match, entry) if m)
            if not members and f"eval_ensemble_{metric}" not in entry:
                continue
            row = {"epoch": entry.get("epoch"), "step": entry.get("step")}
            row.update({f"member{k}_{metric}": entry[f"eval_member{k}_{metric}"] for k in members})
            if f"eval_ensemble_{metric}" in entry:
                row[f"ensemble_{metric}"] = entry[f"eval_ensemble_{metric}"]
            rows.append(row)
        return rows


def trainer_records(trainer) -> RunRecords:
    """The records of a `GraftingTrainer`'s run as they stand: its identity (as `train()` saves it in every
    checkpoint, computed when `train()` has not run) and its `TrainerState`."""
    return RunRecords.from_state(trainer.run_identity or run_identity(trainer), trainer.state)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunRecordsError(f"{path}: not readable as JSON ({' '.join(str(error).split())})") from None


def read_run_records(checkpoint_dir: str | os.PathLike) -> RunRecords:
    """The records of a checkpoint folder; a missing file leaves its part empty (a checkpoint of an older
    run), a file that is not JSON raises `RunRecordsError` naming it."""
    from transformers import TrainerState

    folder = Path(checkpoint_dir)
    identity_path, state_path = folder / RUN_IDENTITY_FILE, folder / TRAINER_STATE_FILE
    identity = _read_json(identity_path) if identity_path.is_file() else {}
    if not isinstance(identity, dict):
        raise RunRecordsError(f"{identity_path}: expected a JSON object of settings, got {type(identity).__name__}")
    if not state_path.is_file():
        return RunRecords(identity=identity)
    state = _read_json(state_path)
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise RunRecordsError(f"{state_path}: expected the Trainer's state, a JSON object with a log_history list")
    known = {name: value for name, value in state.items() if name in TrainerState.__dataclass_fields__}
    return RunRecords.from_state(identity, TrainerState(**known))
