"""Atomic checkpoints: every process writes into a staging folder, which is renamed into place
only once all of them have finished (see `GraftingTrainer._save_checkpoint`)."""

from __future__ import annotations

import os
import shutil

__all__ = ["STAGING_PREFIX", "publish_dir"]

STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N`: matched by neither get_last_checkpoint nor rotation


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
        replaced = staging_dir + "-replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final_dir, replaced)
    os.rename(staging_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
