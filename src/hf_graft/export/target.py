"""Where `hf-graft export` may write, how an export records its checkpoint, and the files' permissions.

An export of a training checkpoint records in its config.json (`hf_graft_export`) the checkpoint's
folder name, the member and a digest of the checkpoint (its trainer state, population description and
weights header: no local path). Exporting again from the same checkpoint replaces such a folder.
`--overwrite` also replaces a folder holding what an earlier export wrote (the three export files, with
an export's config.json), whatever checkpoint it came from; nothing else is ever removed: a folder
holding other files, the checkpoint being exported or a training run is refused, `--overwrite` or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any
from hf_graft.utils.files import (
    CHECKPOINT_RE, CONFIG_FILE, EXPORT_FILES, POPULATION_FILE, RUN_IDENTITY_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE,
)

__all__ = ["EXPORT_SOURCE_KEY", "apply_default_permissions", "check_export_target", "checkpoint_source"]

EXPORT_SOURCE_KEY = "hf_graft_export"


def _checkpoint_digest(checkpoint_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in (TRAINER_STATE_FILE, POPULATION_FILE):
        file = checkpoint_dir / name
        digest.update(file.read_bytes() if file.is_file() else b"-")
    weights = checkpoint_dir / WEIGHTS_FILE
    if weights.is_file():
        with open(weights, "rb") as handle:
            size = handle.read(8)
            header_len = struct.unpack("<Q", size)[0] if len(size) == 8 else 0
            digest.update(size + handle.read(min(header_len, 100_000_000)))
        digest.update(str(weights.stat().st_size).encode())
    return digest.hexdigest()


def checkpoint_source(checkpoint_dir: str | os.PathLike, member: int) -> dict[str, Any]:
    """The `hf_graft_export` record of member `member` of a checkpoint."""
    folder = Path(checkpoint_dir)
    return {"checkpoint": folder.resolve().name, "member": int(member), "checkpoint_digest": _checkpoint_digest(folder)}


def _recorded_source(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    source = config.get(EXPORT_SOURCE_KEY) if isinstance(config, dict) else None
    return source if isinstance(source, dict) else None


def _is_export(folder: Path, entries: list[str]) -> bool:
    """Whether `folder` holds only what an export writes: its files, with an export's config.json."""
    if not set(entries) <= set(EXPORT_FILES) or CONFIG_FILE not in entries:
        return False
    if _recorded_source(folder) is not None:
        return True
    try:  # a run's own student/ folder: the student config (`student_folder.build_student_config`), no record
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("model_type") == "timm_wrapper" and "architecture" in config
            and isinstance(config.get("model_args"), dict) and isinstance(config.get("pretrained_cfg"), dict))


def _training_run_inside(folder: Path) -> Path | None:
    """A training output or checkpoint folder at `folder` or one level below it, if any."""
    for candidate in (folder, *(p for p in folder.iterdir() if p.is_dir())):
        try:
            names = {p.name for p in candidate.iterdir()}
        except OSError:  # a folder this user cannot read
            continue
        if POPULATION_FILE in names or RUN_IDENTITY_FILE in names or any(CHECKPOINT_RE.match(n) for n in names):
            return candidate
    return None


def check_export_target(out: str | os.PathLike, checkpoint_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (FileExistsError, one line) an `--out` folder the export must not replace."""
    folder = Path(out).absolute()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    if not folder.is_dir():
        return
    source = Path(checkpoint_dir).resolve()
    if folder.resolve() in (source, *source.parents):
        raise FileExistsError(f"--out {out}: contains the checkpoint being exported ({checkpoint_dir}); replacing it "
                              "would delete that checkpoint; choose a folder of its own")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    recorded = _recorded_source(folder)
    same = recorded is not None and recorded.get("checkpoint_digest") == _checkpoint_digest(Path(checkpoint_dir))
    if same and set(entries) <= set(EXPORT_FILES):
        return
    run = _training_run_inside(folder)
    if run is not None:
        where = "is" if run == folder else f"contains ({run.name})"
        raise FileExistsError(f"--out {out}: {where} a training output or checkpoint folder, which an export never "
                              "replaces; choose another folder")
    if overwrite and _is_export(folder, entries):
        cwd = Path.cwd().resolve()
        if folder.resolve() in (cwd, *cwd.parents, Path.home().resolve()):
            raise FileExistsError(f"--out {out}: --overwrite would replace the current folder, one above it or the "
                                  "home folder; choose a folder of its own")
        return
    if recorded is not None and set(entries) <= set(EXPORT_FILES):
        what = f"it holds an export of another checkpoint ({recorded.get('checkpoint')}, member {recorded.get('member')})"
        raise FileExistsError(f"--out {out}: not an export of {checkpoint_dir} ({what}); pass --overwrite to replace "
                              "it, or choose another folder")
    foreign = [e for e in entries if e not in EXPORT_FILES] or entries
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    if _is_export(folder, entries):
        raise FileExistsError(f"--out {out}: holds another export (not of {checkpoint_dir}); pass --overwrite to "
                              "replace it, or choose another folder")
    raise FileExistsError(
        f"--out {out}: not empty and not an export of {checkpoint_dir} (it holds {shown}); an export replaces only "
        "what an earlier export wrote (--overwrite included): choose another folder, or move those files away"
    )


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_permissions(folder: str | os.PathLike) -> None:
    """Give a folder made with `tempfile.mkdtemp` (0700) and its files (safetensors writes 0600) the
    permissions a plain `mkdir` and `open` would have under the process umask."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for entry in Path(folder).iterdir():
        if entry.is_file():
            os.chmod(entry, 0o666 & ~mask)
