"""The names of the files and folders a run, a checkpoint and an export write: one constant per name."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "ALL_RESULTS_FILE", "CHECKPOINT_RE", "CONFIG_FILE", "EXPORT_BACKUP_TAG", "EXPORT_FILES", "EXPORT_STAGING_TAG",
    "LOCK_FILE", "MODEL_CARD_FILE",
    "POPULATION_FILE", "REPLACED_SUFFIX", "RESULT_FILES", "RUN_IDENTITY_FILE", "STAGING_PREFIX", "STUDENT_DIR",
    "TRAINER_STATE_FILE", "WEIGHTS_FILE", "is_unfinished_checkpoint",
]

# a run's output folder
LOCK_FILE = ".hf_graft.lock"
RUN_IDENTITY_FILE = "graft_run.json"  # the experiment a run (and each checkpoint) belongs to
POPULATION_FILE = "graft_population.json"  # the population's description, beside its weights
ALL_RESULTS_FILE = "all_results.json"
TRAINER_STATE_FILE = "trainer_state.json"
STUDENT_DIR = "student"
CHECKPOINT_RE = re.compile(r"^checkpoint-\d+$")
RESULT_FILES = (
    ALL_RESULTS_FILE, "train_results.json", "eval_results.json", TRAINER_STATE_FILE, RUN_IDENTITY_FILE,
    "model.safetensors", POPULATION_FILE, "training_args.bin",
)

# an exported student folder (also the population's weights in a checkpoint)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_CARD_FILE = "README.md"
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD_FILE)

# what an interrupted checkpoint save of hf_graft 0.1 (which staged its checkpoints) can have left
STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N`, being written
REPLACED_SUFFIX = "-replaced"  # the older copy a publish was replacing

# an interrupted export into FOLDER: `.FOLDER.tmp-XXXX` (the new files) and `.FOLDER.old-XXXX` (the folder
# being replaced, until the rename is done), beside FOLDER
EXPORT_STAGING_TAG = ".tmp-"
EXPORT_BACKUP_TAG = ".old-"


def is_unfinished_checkpoint(path: str | os.PathLike) -> bool:
    """A leftover of an interrupted checkpoint save: `tmp-checkpoint-N`, what it holds, or a `-replaced` copy."""
    path = Path(path).absolute()
    return (path.name.startswith(STAGING_PREFIX) or path.name.endswith(REPLACED_SUFFIX)
            or path.parent.name == STAGING_PREFIX + path.name)
