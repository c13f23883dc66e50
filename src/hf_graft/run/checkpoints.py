"""A checkpoint save that fails because the disk is full: one line saying so, where, and which earlier
checkpoint is intact (the Trainer writes its checkpoints itself; `GraftingTrainer._save_checkpoint` wraps it)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil

from hf_graft.errors import HfGraftError

__all__ = ["CheckpointSaveError", "disk_full", "one_line_when_disk_full"]

# what torch's zip writer and safetensors say when a write stops short (the file system is full)
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|No space left|Disk quota exceeded", re.IGNORECASE)


class CheckpointSaveError(HfGraftError, OSError):
    """A checkpoint could not be written because the disk is full; the message is one line saying where and
    which earlier checkpoint is intact."""


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a write that stopped because the file system is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, (OSError, RuntimeError)) and _SHORT_WRITE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def one_line_when_disk_full(run_dir: str, step: int, *, world_size: int = 1):
    """Around a checkpoint save: a full disk becomes a `CheckpointSaveError` (one line), and the unfinished
    `checkpoint-<step>` is removed (the room it took; a resume would skip it anyway)."""
    from hf_graft.run.output_dir import last_complete_checkpoint

    folder = os.path.join(run_dir, f"checkpoint-{step}")
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not disk_full(err):
            raise
        shutil.rmtree(folder, ignore_errors=True)
        previous = last_complete_checkpoint(run_dir, world_size=world_size)
        kept = (f"the previous checkpoint {previous} is intact: free some space and resume from it "
                "(resume_from_checkpoint: true)") if previous else "no earlier checkpoint exists"
        free = shutil.disk_usage(run_dir).free / 2**20
        raise CheckpointSaveError(f"the disk is full: {folder} could not be written ({free:.1f} MB free in "
                                  f"{run_dir}); the unfinished copy was removed, {kept}") from err
