"""Atomic checkpoints for a `transformers.Trainer`: a killed save never leaves a half-written
`checkpoint-N` behind.

transformers' `Trainer._save_checkpoint` writes straight into `<run dir>/checkpoint-N`, so a
process killed while saving leaves a half-written folder that `get_last_checkpoint` then picks.
`AtomicCheckpoints` runs that same method unchanged, with the run folder it writes into (the
Trainer's `_get_output_dir`) redirected to a staging folder `<run dir>/tmp-checkpoint-N`; once
every process has finished writing, the folder is flushed to disk and renamed to
`<run dir>/checkpoint-N` in one `os.rename`. A killed save leaves only `tmp-checkpoint-N`, which
neither `get_last_checkpoint` nor the rotation of `save_total_limit` match, and which the next
save of that step removes. `best_model_checkpoint` and the rotation follow the final name.

This is the one place where hf_graft relies on Trainer internals: that `_save_checkpoint(model,
trial)` writes every file under `os.path.join(self._get_output_dir(trial=trial), "checkpoint-N")`.
`tests/test_checkpointing.py` checks it against the installed transformers, and every save checks
that the staged folder really holds the checkpoint (a `RuntimeError` naming the transformers
version otherwise). pyproject.toml bounds transformers to the versions this was run with; the
README says how to move the bound.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from hf_graft.utils.files import REPLACED_SUFFIX, STAGING_PREFIX

__all__ = ["AtomicCheckpoints", "CheckpointSaveError", "publish_dir"]

# what torch's zip writer and safetensors say when a write stops short (the file system is full)
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|No space left|Disk quota exceeded", re.IGNORECASE)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written because the disk is full; the message is one line saying where and
    which earlier checkpoint is intact."""


def _disk_full(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, (OSError, RuntimeError)) and _SHORT_WRITE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full_error(run_dir: str, name: str, staging_root: str) -> CheckpointSaveError:
    from hf_graft.run.output_dir import last_checkpoint

    previous = last_checkpoint(run_dir)
    kept = (f"the previous checkpoint {previous} is intact: free some space and resume from it "
            "(resume_from_checkpoint: true)") if previous else "no earlier checkpoint exists"
    free = shutil.disk_usage(run_dir).free / 2**20
    return CheckpointSaveError(
        f"the disk is full: {name} could not be written to {staging_root} ({free:.1f} MB free in "
        f"{run_dir}); the unfinished copy was removed, {kept}")



class AtomicCheckpoints:
    """`transformers.Trainer` mixin (list it before `Trainer`) that publishes checkpoints atomically."""

    _staging_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        # while a checkpoint is being saved, the run folder the Trainer writes into is the staging folder
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        args = self.args
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged_dir = os.path.join(staging_root, name)
        if args.local_process_index == 0:  # one process per node (nodes may not share a file system)
            shutil.rmtree(staging_root, ignore_errors=True)  # left over by a save that was killed
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()

        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # model, optimizer, scheduler, scaler, RNG, trainer state
        except (OSError, RuntimeError) as err:
            if not _disk_full(err):
                raise
            shutil.rmtree(staging_root, ignore_errors=True)  # the room it took, and no half-written leftover
            raise _disk_full_error(run_dir, name, staging_root) from err
        finally:
            self._staging_root = None
        if args.should_save:
            _check_staged(staged_dir)
            # the Trainer recorded the best checkpoint under the staging name when it is this one
            best = self.state.best_model_checkpoint
            if best is not None and os.path.abspath(os.path.dirname(best)) == os.path.abspath(staging_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(staged_dir, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every process has written its files
        if args.process_index == 0:
            _publish_staged(staged_dir, final_dir)
        self.accelerator.wait_for_everyone()
        # nodes that do not share process 0's file system publish their own copy, one after it
        if args.process_index != 0 and args.local_process_index == 0 and os.path.isdir(staged_dir):
            _publish_staged(staged_dir, final_dir)
        self.accelerator.wait_for_everyone()
        if args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def _check_staged(staged_dir: str) -> None:
    from transformers import __version__
    from transformers.trainer import TRAINER_STATE_NAME

    if not os.path.isfile(os.path.join(staged_dir, TRAINER_STATE_NAME)):
        raise RuntimeError(
            f"transformers {__version__}: Trainer._save_checkpoint did not write the checkpoint into "
            f"{staged_dir}; hf_graft's atomic checkpoints (hf_graft/checkpointing.py) do not support this "
            "transformers version: install one within the bound in pyproject.toml"
        )


def _publish_staged(staged_dir: str, final_dir: str) -> None:
    publish_dir(staged_dir, final_dir)
    shutil.rmtree(os.path.dirname(staged_dir), ignore_errors=True)  # the now empty staging folder


def _fsync_tree(folder: str) -> None:
    """Flush every file of `folder`, then the folder itself, to stable storage."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(staging_dir: str, final_dir: str) -> None:
    """Rename a complete staging folder to its final name (replacing an older copy of that name)."""
    _fsync_tree(staging_dir)
    replaced = None
    if os.path.isdir(final_dir):
        replaced = staging_dir + REPLACED_SUFFIX
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final_dir, replaced)
    os.rename(staging_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
