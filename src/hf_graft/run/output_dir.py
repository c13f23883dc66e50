"""One run per output folder: the folder lock, the run's identity, and the checks of a fresh run or a resume.

* **Lock.** A run holds `output_dir/.hf_graft.lock` (a `filelock.FileLock`: an exclusive `flock`, with the
  holder's process id and host written in the file) from its start to its end; a second run into the same
  folder fails at once, naming the holder. The kernel drops the lock when its process dies, so the file a
  killed run leaves behind is stale and the next run takes it over (on a file system without `flock`,
  filelock's soft lock: a marker naming its process, taken over once that process has ended on this host).
* **Fresh run.** A run that does not resume refuses a folder holding another run's checkpoints or
  results, unless `replace_output_dir` is set, which deletes them first (only what a run writes there:
  checkpoints, unfinished checkpoints, results, the exported student).
* **Resume.** The checkpoint must be a complete `checkpoint-N` folder (not a `tmp-` or `-replaced`
  leftover of an interrupted save, with readable weights) of the same experiment: every checkpoint holds
  `graft_run.json`, the run identity (architecture, number of members and classes, label names, the
  dataset, a digest of its rows and the training augmentation, optimisation and grafting settings), and a
  resume whose settings differ refuses with one line naming the field and both values (an identity
  without some of these, written by an earlier version, is compared on what it holds).

In a distributed run, process 0 does the file work and every process raises the same error.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from filelock import BaseFileLock, FileLock, Timeout

from hf_graft.utils.files import (
    CHECKPOINT_RE, EXPORT_BACKUP_TAG, EXPORT_FILES, EXPORT_STAGING_TAG, LOCK_FILE, POPULATION_FILE, RESULT_FILES,
    RUN_IDENTITY_FILE, STAGING_PREFIX, STUDENT_DIR, TRAINER_STATE_FILE, WEIGHTS_FILE, is_unfinished_checkpoint,
)
from hf_graft.errors import HfGraftError

__all__ = [
    "LOCK_FILE",
    "RUN_IDENTITY_FILE",
    "OutputDirError",
    "OutputDirClaim",
    "check_checkpoint_folder",
    "checkpoint_bytes",
    "checkpoint_problem",
    "newest_complete_checkpoint",
    "unfinished_save",
    "check_resume_identity",
    "interrupted_save_leftovers",
    "last_complete_checkpoint",
    "lock_output_dir",
    "previous_run_entries",
    "run_identity",
    "save_run_identity",
]

logger = logging.getLogger("hf_graft.run.output_dir")

WAYS_OUT = (
    "resume it (resume_from_checkpoint: true), use another or an emptied output_dir, "
    "or set replace_output_dir: true to replace it"
)


class OutputDirError(HfGraftError, ValueError):
    """The output folder or the checkpoint cannot be used for this run; the message is one line."""


# ----------------------------------------------------------------------------- lock
_held: dict[str, "OutputDirLock"] = {}


class OutputDirLock:
    """An exclusive lock on an output folder, re-entrant within one process (see `lock_output_dir`)."""

    def __init__(self, folder: str, file_lock: BaseFileLock, created: bool = False):
        self.folder, self.file_lock, self.count = folder, file_lock, 1
        self.soft = _soft(file_lock)
        self.created = created  # the folder was made for this run: removed again if the run wrote nothing
        self.pid = os.getpid()  # a forked child (a DataLoader worker) must not release its parent's lock

    @property
    def path(self) -> str:
        return self.file_lock.lock_file

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self.pid != os.getpid():
            return
        _held.pop(self.folder, None)
        if not self.soft:  # a soft lock removes its marker itself
            try:
                os.unlink(self.path)  # while still locked: a waiter then finds the file gone and locks a new one
            except OSError:
                pass
        self.file_lock.release(force=True)
        if self.created:
            try:
                os.rmdir(self.folder)  # only if empty: a run refused before writing leaves nothing behind
            except OSError:
                pass


def _soft(file_lock: BaseFileLock) -> bool:
    """Whether filelock fell back to a soft lock (a marker file naming its process: a file system without
    flock), where the lock reports its holder's pid; a flock reports none."""
    try:
        return file_lock.pid is not None
    except AttributeError:
        return False


def _holder(file_lock: BaseFileLock) -> dict[str, Any]:
    """What the lock file says of its holder: this package's record, or a soft lock's marker."""
    try:
        text = Path(file_lock.lock_file).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return {}
    try:
        record = json.loads(text or "{}")
        return record if isinstance(record, dict) else {}
    except ValueError:
        pass
    if not _soft(file_lock):
        return {}
    lines = text.splitlines()  # filelock's marker: the pid, then the host
    return {"pid": file_lock.pid, "host": lines[1] if len(lines) > 1 else "?"}


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process"
    started = holder.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"process {holder['pid']} on {holder.get('host', '?')}{when}"


def lock_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """Create `output_dir` if needed and lock it for this process; raise `OutputDirError` if another holds it.

    Creating the lock file is also the check that the folder is writable.
    """
    folder = os.path.realpath(output_dir)
    held = _held.get(folder)
    if held is not None:
        held.count += 1
        return held
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"output_dir: cannot create {str(output_dir)!r} ({err.strerror or err})") from None
    path = os.path.join(folder, LOCK_FILE)
    # one attempt, shared by the threads of this process; the kernel drops a flock when its process dies
    file_lock = FileLock(path, thread_local=False, blocking=False)
    try:
        file_lock.acquire()
    except Timeout:
        raise OutputDirError(
            f"output_dir: {output_dir} is in use by another run ({_describe(_holder(file_lock))}); wait for it to end "
            f"or choose another output_dir (if no such run exists, delete {path})"
        ) from None
    except OSError as err:
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} is not writable ({err.strerror or err}); choose a folder this user "
            "can write to"
        ) from None
    lock = _held[folder] = OutputDirLock(folder, file_lock, created)
    if not lock.soft:
        try:
            _record_holder(output_dir, path)
        except OSError as err:
            lock.release()
            raise OutputDirError(f"output_dir: cannot write {path} ({err.strerror or err})") from None
    return lock


def _record_holder(output_dir: str | os.PathLike, path: str) -> None:
    """Write this process into the (flocked) lock file, for a second run's refusal to name it."""
    with open(path, "r+", encoding="utf-8", errors="replace") as file:
        previous = file.read()
        try:
            holder = json.loads(previous) if previous else {}
        except ValueError:
            holder = {}
        if isinstance(holder, dict) and holder.get("pid"):
            logger.info("output_dir %s: taking over the lock left by %s, %s", output_dir, _describe(holder),
                        _why_stale(holder))
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _why_stale(holder: dict[str, Any]) -> str:
    """Why a lock file whose `flock` is free is stale, as far as this process can tell."""
    if holder.get("host") != socket.gethostname():
        return "which no process holds any more (it was written on another host)"
    if int(holder["pid"]) == os.getpid():
        return "which this process wrote and no longer holds"
    if _alive(int(holder["pid"])):
        return "which no process holds any more (that process id now belongs to another process)"
    return "which has ended"


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.count = 1
        lock.release()


# ----------------------------------------------------------------------------- folder content
def previous_run_entries(output_dir: str | os.PathLike) -> list[str]:
    """Names of the checkpoints and results of a run in `output_dir` (sorted; empty for a new folder)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.is_dir() and (CHECKPOINT_RE.match(entry.name) or entry.name == STUDENT_DIR):
            found.append(entry.name)
        elif entry.is_file() and entry.name in RESULT_FILES:
            found.append(entry.name)
    return sorted(found, key=_natural)


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _previous_run_to_replace(output_dir: str | os.PathLike) -> list[Path]:
    """What `replace_output_dir` removes from `output_dir`: a previous run's checkpoints and results and
    leftovers of interrupted saves; refused if its student folder holds files a run did not write."""
    folder = Path(output_dir)
    student = folder / STUDENT_DIR
    if student.is_dir():
        foreign = sorted(p.name for p in student.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            raise OutputDirError(
                f"replace_output_dir: {student} holds files that are not an exported student ({', '.join(foreign[:5])}); "
                "move them away or choose another output_dir"
            )
    names = previous_run_entries(folder)
    names += sorted(p.name for p in folder.iterdir() if p.is_dir() and is_unfinished_checkpoint(p))
    names += [p.name for p in interrupted_save_leftovers(folder) if p.name not in names]
    return [folder / name for name in names]


def interrupted_save_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """What killed saves left in `output_dir` and that holds no only copy of anything: `tmp-checkpoint-N`
    folders (unless one holds a complete checkpoint-N that is missing from the folder), the staging folders of
    an interrupted export of `student/`, and the older copy it was replacing once `student/` is back."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if not entry.is_dir():
            continue
        if name.startswith(STAGING_PREFIX) and CHECKPOINT_RE.match(name[len(STAGING_PREFIX):]):
            complete = any((p / TRAINER_STATE_FILE).is_file() for p in entry.iterdir() if p.is_dir())
            if not complete or (folder / name[len(STAGING_PREFIX):]).is_dir():
                found.append(entry)
        elif name.startswith(f".{STUDENT_DIR}{EXPORT_STAGING_TAG}"):
            found.append(entry)
        elif name.startswith(f".{STUDENT_DIR}{EXPORT_BACKUP_TAG}") and (folder / STUDENT_DIR).is_dir():
            found.append(entry)
    return sorted(found, key=lambda p: _natural(p.name))


def _size(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


# ----------------------------------------------------------------------------- checkpoints
def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read (truncated, damaged header), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: all mean "cannot be read"
        return " ".join(str(err).split()) or type(err).__name__
    return None


def _json_problem(file: Path) -> str | None:
    """Why a JSON file that exists cannot be read, or None."""
    if not file.is_file():
        return None
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return " ".join(str(err).split())
    return None


def unfinished_save(folder: Path, *, world_size: int = 1) -> str | None:
    """Why `folder` is a checkpoint whose save did not finish (one line), or None. The Trainer writes
    `trainer_state.json` last, after every process's RNG state, so a killed save leaves it missing, or
    another process's RNG state missing. (A truncated one is a damaged checkpoint: `checkpoint_problem`.)"""
    if not (folder / TRAINER_STATE_FILE).is_file():
        return f"has no {TRAINER_STATE_FILE}: its save did not finish"
    if world_size > 1 and (folder / "optimizer.pt").is_file():
        missing = [f"rng_state_{i}.pth" for i in range(world_size) if not (folder / f"rng_state_{i}.pth").is_file()]
        if missing:
            return f"lacks {', '.join(missing)}: another process's save did not finish"
    return None


def checkpoint_problem(folder: Path, *, what: str = "resume_from_checkpoint", world_size: int = 1) -> str | None:
    """Why `folder` is not a complete, readable hf_graft training checkpoint (one line), or None."""
    import zipfile

    if is_unfinished_checkpoint(folder):
        return "is what an interrupted checkpoint save left behind, not a checkpoint; use a checkpoint-N folder"
    if not (folder / POPULATION_FILE).is_file():
        return f"has no {POPULATION_FILE}; is it a hf_graft training checkpoint?"
    for name in (TRAINER_STATE_FILE, RUN_IDENTITY_FILE, POPULATION_FILE):  # truncated or damaged
        problem = _json_problem(folder / name)
        if problem:
            return f"{name} cannot be read ({problem}); it is damaged (truncated?)"
    if what == "resume_from_checkpoint":
        unfinished = unfinished_save(folder, world_size=world_size)
        if unfinished:
            return unfinished
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        problem = _safetensors_problem(weights)
        if problem:
            return f"{WEIGHTS_FILE} cannot be read ({problem})"
    # torch.save files are zip archives: a truncated one has no central directory at its end
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"):
        file = folder / name
        if file.is_file() and not zipfile.is_zipfile(file):
            return f"{name} is damaged (truncated?)"
    return None


def check_checkpoint_folder(path: str | os.PathLike, *, what: str = "resume_from_checkpoint",
                            world_size: int = 1) -> Path:
    """A complete hf_graft training checkpoint, or `OutputDirError` naming `what`, the folder and the problem."""
    folder = Path(path)
    if not folder.exists():
        raise OutputDirError(f"{what}: {path} does not exist (expected a checkpoint-N folder of a training run)")
    if not folder.is_dir():
        raise OutputDirError(f"{what}: {path} is a file, not a checkpoint-N folder")
    problem = checkpoint_problem(folder, what=what, world_size=world_size)
    if problem:
        name = problem.split(" ", 1)[0]  # a problem of one file names it: say where that file is
        where, problem = (folder / name, problem.split(" ", 1)[1]) if (folder / name).is_file() else (folder, problem)
        raise OutputDirError(f"{what}: {where} {problem}; use another checkpoint")
    return folder


def _checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the `checkpoint-N` folders of `folder`, newest first."""
    if not folder.is_dir():
        return []
    return sorted((int(p.name.split("-")[1]) for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)),
                  reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike, *, world_size: int = 1) -> str | None:
    """The newest `checkpoint-N` of `output_dir` whose save finished, or None (nothing is changed)."""
    for step in _checkpoint_steps(Path(output_dir)):
        checkpoint = Path(output_dir) / f"checkpoint-{step}"
        if unfinished_save(checkpoint, world_size=world_size) is None:
            return str(checkpoint)
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike, *, world_size: int = 1) -> str | None:
    """The newest `checkpoint-N` of `output_dir`. Newer ones whose save did not finish (a job killed while
    saving) are named in one line each and removed: the resumed run writes those steps again, and the
    Trainer's rotation (`save_total_limit`) would otherwise keep them in place of complete ones. A finished
    checkpoint that was damaged later is not skipped: resuming refuses it, naming the file."""
    folder = Path(output_dir)
    for step in _checkpoint_steps(folder):
        checkpoint = folder / f"checkpoint-{step}"
        unfinished = unfinished_save(checkpoint, world_size=world_size)
        if unfinished is None:
            return str(checkpoint)
        logger.warning("resume_from_checkpoint: skipping %s, which %s; removing it", checkpoint, unfinished)
        shutil.rmtree(checkpoint)
    return None


def resolve_resume(output_dir: str, resume: str | bool | None, *, world_size: int = 1) -> str | None:
    """The checkpoint folder a `resume_from_checkpoint` value names (None: a fresh run).

    True names the newest complete `checkpoint-N` of `output_dir` and fails without one; the strings
    "true" / "last" (recipes, command line) do the same but start fresh, with a warning, when there is none.
    """
    if resume is None or resume is False or resume == "":
        return None
    if resume is True or str(resume) in ("true", "True", "last"):
        last = newest_complete_checkpoint(output_dir, world_size=world_size)
        if last is None and resume is True:
            raise OutputDirError(f"resume_from_checkpoint: no checkpoint-N folder in output_dir {output_dir} is complete")
        if last is None:
            logger.warning("resume_from_checkpoint: no checkpoint in %s; starting from scratch", output_dir)
        return last
    return str(resume)


# ----------------------------------------------------------------------------- run identity
def _jsonable(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums of TrainingArguments
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


# settings of the config that make a different experiment (the ones a resume may change are left out:
# epochs and steps, logging, evaluation, saving, precision, workers, output_dir)
_CONFIG_IDENTITY_FIELDS = (
    "student_model", "student_model_kwargs", "student_pretrained", "shared_init", "seed", "data_seed",
    "learning_rate", "lr_spread", "optim", "optim_args", "weight_decay", "weight_decay_scope", "lr_scheduler_type", "lr_decay_epochs",
    "lr_decay_gamma", "max_grad_norm", "graft_source", "graft_level", "graft_criterion", "graft_bins", "graft_A",
    "graft_c", "graft_anchor", "graft_alpha_decimals", "graft_histogram_include_max", "graft_noise_first_t",
    "graft_internal_order", "graft_every_epochs", "graft_every_steps", "graft_start_epoch", "graft_noise_a",
    "graft_invalid_threshold", "bn_recalibration_batches", "data_order", "teacher_models", "kd_temperature",
    "kd_weight", "ce_weight", "label_smoothing_factor",
)


def run_identity(trainer) -> dict[str, Any]:
    """What makes this run's result a particular experiment, as JSON values keyed by setting name."""
    args = trainer.args
    population = trainer.population
    spec = population.spec
    first = population.members[0]
    # the most telling differences first: a resume names the first setting that differs
    identity: dict[str, Any] = {
        "student_model": args.student_model if spec is None else spec.student_model,
        "student_model_kwargs": args.student_model_kwargs if spec is None else spec.student_model_kwargs,
        "num_students": population.num_members,
        "num_classes": getattr(first, "num_classes", None) if spec is None else spec.num_classes,
    }
    if spec is not None:
        identity["label_names"] = spec.label_names
        identity["input_size"] = (spec.data_config or {}).get("input_size")
    dataset = trainer.train_dataset
    identity["num_train_examples"] = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    # the dataset, a digest of its rows and the augmentation (`data.fingerprint`), when the datasets say; the
    # digest last, after the settings (seed, data_seed) that change the rows a run draws
    data = dict(getattr(dataset, "data_identity", None) or {})
    if "dataset_name" in data:
        identity["dataset_name"] = data.pop("dataset_name")
    identity["total_train_batch_size"] = (
        args.per_device_train_batch_size * max(1, args.world_size) * args.gradient_accumulation_steps
    )
    for name in _CONFIG_IDENTITY_FIELDS:
        identity.setdefault(name, getattr(args, name, None))
    identity.update(data)
    return _jsonable(identity)


def save_run_identity(folder: str | os.PathLike, identity: dict[str, Any]) -> None:
    (Path(folder) / RUN_IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


_FIELD_NAMES = {
    "total_train_batch_size": "total_train_batch_size (per_device_train_batch_size x processes x "
    "gradient_accumulation_steps)",
    "num_train_examples": "the number of training examples",
    "num_classes": "the number of classes",
    "dataset_name": "DataArguments.dataset_name",
    "num_eval_examples": "the number of evaluation examples",
    "data_digest": "the data (a digest of both splits' sizes and of sampled rows)",
    "train_augmentation": "the training augmentation (DataArguments.train_augmentation and its settings)",
}


def check_resume_identity(checkpoint: str | os.PathLike, identity: dict[str, Any]) -> None:
    """Refuse (one line, the first differing setting and both values) a checkpoint of another experiment.

    Checkpoints without `graft_run.json` are compared on what their `graft_population.json` holds.
    """
    folder = Path(checkpoint)
    saved_path = folder / RUN_IDENTITY_FILE
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
    else:
        population = json.loads((folder / POPULATION_FILE).read_text())
        saved = {key: population.get(key) for key in ("student_model", "num_students", "num_classes", "label_names",
                                                      "student_model_kwargs")}
        saved["input_size"] = (population.get("data_config") or {}).get("input_size")
    for key, now in identity.items():
        if key not in saved:
            continue
        before = saved[key]
        if _jsonable(before) != now:
            name = _FIELD_NAMES.get(key, key)
            raise OutputDirError(
                f"resume_from_checkpoint: {checkpoint} was trained with {name} = {_short(before)}, this run has "
                f"{_short(now)}; resume with the checkpoint's settings, or start a fresh run in another output_dir"
            )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------- the claim
def _on_main_process(args, work: Callable[[], Any]) -> Any:
    """Run `work` on process 0 only; every process returns its result or raises its `OutputDirError`."""
    result, error = None, None
    _ = args.device  # sets up the processes (before it, every process would call itself process 0)
    if args.process_index == 0:
        try:
            result = work()
        except OutputDirError as err:
            error = str(err)
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            payload = [result, error]
            dist.broadcast_object_list(payload, src=0)
            result, error = payload
    if error is not None:
        raise OutputDirError(error)
    return result


def _check_room(output_dir: str, needed_bytes: int, freed_bytes: int = 0) -> None:
    free = shutil.disk_usage(output_dir).free + freed_bytes
    if free < needed_bytes:
        mb = 1024 * 1024
        raise OutputDirError(
            f"output_dir: {output_dir} has {free / mb:.1f} MB free, and a checkpoint of this run needs about "
            f"{needed_bytes / mb:.1f} MB; free some space or choose another output_dir"
        )


def checkpoint_bytes(population, args) -> int:
    """Disk room a checkpoint of `population` needs: its tensors and up to twice that of optimizer state
    (without checkpoints: one member, the exported student)."""
    import torch

    size = sum(t.numel() * t.element_size() for t in population.state_dict().values() if torch.is_tensor(t))
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
        return 3 * size
    return size // population.num_members if getattr(args, "export_student", False) else 0


class OutputDirClaim:
    """Lock `args.output_dir` for a run and check it; `release()` (or the `with` block's end) unlocks it.

    Claiming (the constructor) locks the folder, resolves `resume` (see `resolve_resume`) into
    `self.resume`, and, when not resuming and `check_fresh`, refuses a folder holding another run (with
    `args.replace_output_dir`, lists what replacing it removes). Nothing is changed on disk yet.
    `confirm` then checks what needs the built run (the checkpoint's identity against this run's, the
    room a checkpoint needs), and `clear_previous_run` (called by the trainer when training begins,
    through `at_train_begin`) removes the run that `replace_output_dir` replaces and what interrupted
    saves left behind, so that a run refused while it is being built loses nothing. The command line
    claims before it loads any data and hands the claim to the trainer (`GraftingTrainer.train`), so
    each check runs once.
    """

    def __init__(self, args, resume: str | bool | None = None, *, check_fresh: bool = True):
        self.args = args
        self.lock: OutputDirLock | None = None
        self.confirmed = False
        self._replaced: list[str] = []
        self.resume = _on_main_process(args, lambda: self._claim(resume, check_fresh))

    def _claim(self, resume, check_fresh) -> str | None:
        output_dir = self.args.output_dir
        asked = resume is not None and resume is not False and resume != ""
        if asked and getattr(self.args, "replace_output_dir", False):
            raise OutputDirError(
                "resume_from_checkpoint and replace_output_dir are both set, but a resume continues the run in "
                f"{output_dir} and replace_output_dir deletes it; to resume, set replace_output_dir: false "
                "(--replace_output_dir false); to start afresh, drop resume_from_checkpoint"
            )
        self.lock = lock_output_dir(output_dir)
        try:
            checkpoint = resolve_resume(output_dir, resume, world_size=self.args.world_size)
            if checkpoint is not None:
                check_checkpoint_folder(checkpoint, world_size=self.args.world_size)
            replaced = self._check_fresh(output_dir, asked) if checkpoint is None and check_fresh else []
            self._replaced = [str(p) for p in replaced]
        except BaseException:
            self.release()
            raise
        return checkpoint

    def confirm(self, *, identity: dict[str, Any] | None = None, needed_bytes: int = 0) -> None:
        """The checks that need the built run, then the removal of a replaced run (once per claim)."""
        if self.confirmed:
            return
        _on_main_process(self.args, lambda: self._confirm(identity, needed_bytes))
        self.confirmed = True

    def _confirm(self, identity, needed_bytes) -> None:
        replaced = [Path(p) for p in self._replaced]
        if needed_bytes:  # counting the room the previous run's files leave when they are replaced
            _check_room(self.args.output_dir, needed_bytes, freed_bytes=_size(replaced))
        if self.resume is not None and identity is not None:
            check_resume_identity(self.resume, identity)

    def clear_previous_run(self) -> None:
        """Remove the previous run that `replace_output_dir` replaces, and what interrupted saves left behind
        (`interrupted_save_leftovers`); once, on the process that holds the lock."""
        replaced, self._replaced = [Path(p) for p in self._replaced], []
        for path in replaced:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if replaced:
            logger.warning("replace_output_dir: removed the previous run's %s from %s",
                           ", ".join(p.name for p in replaced), self.args.output_dir)
        leftovers = interrupted_save_leftovers(self.args.output_dir) if self.lock is not None else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            logger.info("output_dir %s: removed what interrupted saves left behind: %s", self.args.output_dir,
                        ", ".join(p.name for p in leftovers))

    def at_train_begin(self):
        """A `TrainerCallback` that calls `clear_previous_run` when training begins (after the Trainer has
        built its data loaders, optimizer and scheduler, right before the first step)."""
        from transformers import TrainerCallback

        claim = self

        class ClearPreviousRun(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                claim.clear_previous_run()

        return ClearPreviousRun()

    def _check_fresh(self, output_dir: str, resume_asked: bool = False) -> list[Path]:
        """Refuse a folder holding another run, or (with `replace_output_dir`) list what replacing it removes."""
        previous = previous_run_entries(output_dir)
        if not previous:
            return []
        if getattr(self.args, "replace_output_dir", False):
            return _previous_run_to_replace(output_dir)
        shown = ", ".join(previous[:4]) + (f", ... ({len(previous)} in all)" if len(previous) > 4 else "")
        if resume_asked:  # "true" / "last" found no checkpoint: the results are of a run that saved none
            raise OutputDirError(
                f"resume_from_checkpoint: {output_dir} holds another run's results ({shown}) but no checkpoint-N "
                "folder to resume from (that run saved none); use another or an emptied output_dir, or set "
                "replace_output_dir: true, without resume_from_checkpoint, to replace it"
            )
        ways = WAYS_OUT if any(CHECKPOINT_RE.match(name) for name in previous) else WAYS_OUT.split(", ", 1)[1]
        raise OutputDirError(f"output_dir: {output_dir} holds another run's checkpoints or results ({shown}); {ways}")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "OutputDirClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
