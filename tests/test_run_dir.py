"""One run per output folder: fresh-run refusal and replacement, the folder lock, writability and room,
the resume checks (same experiment, complete checkpoint, never a leftover of an interrupted save), and
where `hf-graft export` may write, with which permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from hf_graft.cli import export
from hf_graft.utils.files import EXPORT_FILES
from hf_graft.cli.analyze import main as analyze_main
from hf_graft.run.output_dir import LOCK_FILE, RUN_IDENTITY_FILE, OutputDirError, lock_output_dir

from _cli_run import finished_quickstart_run, cli, copy_run, error_lines, start_lock_holder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch quickstart run with checkpoint-4 and checkpoint-8, results and student/."""
    return finished_quickstart_run(tmp_path_factory.mktemp("finished") / "run")


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- fresh runs
def test_a_fresh_run_refuses_a_folder_holding_another_run(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = _listing(out)
    assert cli(out, "--seed", "7", "--replace_output_dir", "false") == 2
    (line,) = error_lines(capsys)
    assert str(out) in line and "checkpoint-4" in line and "all_results.json" in line
    assert "resume_from_checkpoint: true" in line and "another or an emptied output_dir" in line
    assert "replace_output_dir: true" in line
    assert _listing(out) == before  # nothing read, written or removed


def test_replace_output_dir_lets_the_quickstart_run_twice(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "tmp-checkpoint-12").mkdir()  # a leftover of an interrupted save goes too
    (out / "notes.txt").write_text("mine")  # what a run did not write stays
    assert cli(out, "--seed", "7") == 0  # the quickstart recipe sets replace_output_dir: true
    names = {p.name for p in out.iterdir()}
    assert "checkpoint-4" not in names and "checkpoint-8" not in names and "tmp-checkpoint-12" not in names
    assert {"all_results.json", "student", "notes.txt"} <= names and LOCK_FILE not in names
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("refused", [
    (["--member_execution", "fused", "--student_model", "vit_tiny_patch16_224"], "has no fused form"),  # the build
    (["--fsdp", "full_shard"], "fsdp"),  # the Trainer's construction
])
def test_a_run_refused_while_it_is_built_leaves_the_run_it_would_replace(finished_run, tmp_path, capsys, refused):
    """replace_output_dir removes the previous run only when the new one starts training: a run refused
    while its data, population or trainer is built loses nothing."""
    overrides, message = refused
    out = copy_run(finished_run, tmp_path / "run")
    before = _listing(out)
    assert cli(out, *overrides) == 2  # the quickstart recipe sets replace_output_dir: true
    (line,) = error_lines(capsys)
    assert message in line
    assert _listing(out) == before


def test_the_room_check_counts_what_replacing_the_previous_run_frees(finished_run, tmp_path, capsys, monkeypatch):
    """A folder whose previous run takes the room the new checkpoints need: replacing it frees that
    room, so the run is not refused; the same free space without the previous run is refused."""
    import hf_graft.run.output_dir as run_dir

    out = copy_run(finished_run, tmp_path / "run")  # two checkpoints of the same population
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 4096, 4096))
    assert cli(out, "--save_strategy", "epoch") == 0
    assert cli(tmp_path / "empty", "--save_strategy", "epoch") == 2
    assert "MB free" in error_lines(capsys)[-1]


def test_library_trainer_refuses_another_run_and_may_train_again(make_trainer, tmp_path):
    first = make_trainer(num_train_epochs=1, save_strategy="epoch")
    first.train()
    assert json.loads((tmp_path / "run" / "checkpoint-4" / RUN_IDENTITY_FILE).read_text())["num_students"] == 2
    first.train()  # the same trainer may train again in the folder it claimed
    other = make_trainer(num_train_epochs=1, save_strategy="epoch", seed=3)
    # the trainer ends its run with all_results.json and trainer_state.json next to the checkpoint
    with pytest.raises(OutputDirError, match=r"holds another run's checkpoints or results "
                                             r"\(all_results.json, checkpoint-4, trainer_state.json\)"):
        other.train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["all_results.json", "checkpoint-4",
                                                                    "trainer_state.json"]


# ----------------------------------------------------------------------------- resume checks
@pytest.mark.parametrize("change, message", [
    (["--seed", "7"], "was trained with seed = 42, this run has 7"),
    (["--learning_rate", "0.2"], "was trained with learning_rate = 0.05, this run has 0.2"),
    (["--num_students", "3"], "was trained with num_students = 2, this run has 3"),
    (["--num_students", "1", "--graft_source", "none", "--lr_spread", "none"], "num_students = 2, this run has 1"),
    (["--student_model", "cifar_resnet32"], 'student_model = "cifar_resnet20", this run has "cifar_resnet32"'),
    (["--max_train_samples", "48"], "the number of training examples = 64, this run has 48"),
])
def test_resume_refuses_a_checkpoint_of_another_experiment(finished_run, tmp_path, capsys, change, message):
    out = copy_run(finished_run, tmp_path / "run")
    assert cli(out, "--resume_from_checkpoint", "true", "--replace_output_dir", "false", "--num_train_epochs", "2",
               *change) == 2
    (line,) = error_lines(capsys)
    assert message in line and str(out / "checkpoint-8") in line


def test_resume_with_the_same_settings_and_more_epochs(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "tmp-checkpoint-12").mkdir()  # never picked as the last checkpoint
    assert cli(out, "--resume_from_checkpoint", "true", "--replace_output_dir", "false", "--num_train_epochs", "3",
               "--save_strategy", "epoch") == 0
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and [e["step"] for e in state["log_history"] if "loss" in e][0] == 1


def test_resume_from_a_missing_unfinished_or_damaged_checkpoint(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    common = ["--num_train_epochs", "3", "--replace_output_dir", "false"]  # the quickstart sets it
    assert cli(out, "--resume_from_checkpoint", str(out / "checkpoint-99"), *common) == 2
    assert "checkpoint-99 does not exist" in error_lines(capsys)[0]

    shutil.copytree(out / "checkpoint-8", out / "tmp-checkpoint-12")
    shutil.copytree(out / "checkpoint-8", out / "tmp-checkpoint-12-replaced")
    for leftover in ("tmp-checkpoint-12", "tmp-checkpoint-12-replaced"):
        assert cli(out, "--resume_from_checkpoint", str(out / leftover), *common) == 2
        (line,) = error_lines(capsys)
        assert leftover in line and "interrupted checkpoint save" in line

    weights = out / "checkpoint-8" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # killed mid-write by something outside our control
    assert cli(out, "--resume_from_checkpoint", "true", *common) == 2
    (line,) = error_lines(capsys)
    assert "checkpoint-8/model.safetensors cannot be read" in line and "incomplete" in line

    # export and analyze refuse them with one line as well
    for folder, expected in ((out / "checkpoint-8", "cannot be read"), (out / "tmp-checkpoint-12", "interrupted")):
        assert export.main([str(folder), "--member", "0", "--out", str(tmp_path / "x")]) == 2
        (line,) = error_lines(capsys, "hf-graft export")
        assert expected in line
    assert analyze_main([str(out / "tmp-checkpoint-12")]) == 2
    (line,) = error_lines(capsys, "hf-graft analyze")
    assert "interrupted checkpoint save" in line
    assert not (tmp_path / "x").exists()


def test_library_resume_checks_name_the_field(make_trainer, tmp_path):
    make_trainer(num_train_epochs=1, save_strategy="epoch").train()
    grown = make_trainer(num_train_epochs=2, save_strategy="epoch", num_students=3)
    with pytest.raises(OutputDirError, match="num_students = 2, this run has 3"):
        grown.train(resume_from_checkpoint=True)
    empty = make_trainer(num_train_epochs=1, output_dir=tmp_path / "empty")
    with pytest.raises(OutputDirError, match="no checkpoint-N folder in output_dir"):
        empty.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- the lock
def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    holder = start_lock_holder(out)
    try:
        assert cli(out) == 2
        (line,) = error_lines(capsys)
        assert f"in use by another run (process {holder.pid} on " in line and str(out) in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the second run
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the next run takes it over
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    assert cli(out) == 0
    assert not (out / LOCK_FILE).exists() and (out / "all_results.json").is_file()


def test_a_lock_file_of_a_dead_process_is_taken_over(make_trainer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere", "started": 0}))
    trainer = make_trainer(num_train_epochs=1)
    trainer.train()
    assert not (out / LOCK_FILE).exists()


def test_the_lock_is_reentrant_names_its_holder_and_goes_with_its_last_release(tmp_path):
    import socket
    import threading
    import time

    out = tmp_path / "run"  # made by the lock: removed again when the run wrote nothing
    first = lock_output_dir(out)
    record = json.loads((out / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert abs(record["started"] - time.time()) < 600
    # the command line locks, then the trainer it builds locks again, possibly from another thread
    from_thread = []
    thread = threading.Thread(target=lambda: from_thread.append(lock_output_dir(out)))
    thread.start()
    thread.join()
    assert from_thread == [first] and lock_output_dir(str(out) + "/") is first
    for _ in range(2):
        first.release()
        assert (out / LOCK_FILE).is_file()
    first.release()
    assert not out.exists()
    kept = tmp_path / "kept"  # a folder that was there before keeps what it holds
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    lock_output_dir(kept).release()
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_the_lock_is_released_when_its_process_exits(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = "import sys\nfrom hf_graft.run.output_dir import lock_output_dir\nlock_output_dir(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120, env=_env())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    lock_output_dir(out).release()


def test_the_soft_lock_of_a_file_system_without_flock_names_and_outlives_its_holder(tmp_path, monkeypatch):
    """Where flock is missing, filelock locks by a marker naming its process: refused while that process
    runs, taken over once it has ended."""
    import socket

    import filelock

    import hf_graft.run.output_dir as run_dir

    out = tmp_path / "run"
    code = ("import sys, time, filelock\nimport hf_graft.run.output_dir as run_dir\n"
            "run_dir.FileLock = filelock.SoftFileLock\nrun_dir.lock_output_dir(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    monkeypatch.setattr(run_dir, "FileLock", filelock.SoftFileLock)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError) as refused:
            lock_output_dir(out)
        assert f"in use by another run (process {holder.pid} on {socket.gethostname()})" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE).is_file()  # the marker of a process that has ended: stale
    lock = lock_output_dir(out)
    assert lock.soft and filelock.SoftFileLock(str(out / LOCK_FILE)).pid == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


# ----------------------------------------------------------------------------- writable, room
def test_an_output_dir_that_cannot_be_written_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli(blocker / "run") == 2
    (line,) = error_lines(capsys)
    assert line.startswith("hf-graft train: output_dir: cannot create") and "a_file/run" in line
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read_only"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert cli(locked) == 2
            assert "is not writable" in error_lines(capsys)[0]
        finally:
            locked.chmod(0o700)


def test_no_room_for_a_checkpoint_fails_before_training(tmp_path, capsys, monkeypatch):
    import hf_graft.run.output_dir as run_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "run"
    assert cli(out, "--save_strategy", "epoch") == 2
    (line,) = error_lines(capsys)
    assert "has 0.0 MB free" in line and "a checkpoint of this run needs about" in line
    assert not out.exists()  # made for the run, removed again: it wrote nothing


# ----------------------------------------------------------------------------- export folder
def test_export_refuses_a_folder_that_is_not_an_export_of_this_checkpoint(finished_run, tmp_path, capsys):
    checkpoint_4, checkpoint_8 = finished_run / "checkpoint-4", finished_run / "checkpoint-8"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text("{}")
    assert export.main([str(checkpoint_8), "--member", "0", "--out", str(mine)]) == 2
    (line,) = error_lines(capsys, "hf-graft export")
    assert "not empty and not an export of" in line and "README.md" in line and "--overwrite" in line
    assert (mine / "README.md").read_text() == "my notes"

    out = tmp_path / "student"
    assert export.main([str(checkpoint_4), "--member", "0", "--out", str(out)]) == 0
    assert export.main([str(checkpoint_4), "--member", "1", "--out", str(out)]) == 0  # same checkpoint: replaced
    assert json.loads((out / "config.json").read_text())["hf_graft_export"]["member"] == 1
    capsys.readouterr()
    assert export.main([str(checkpoint_8), "--member", "0", "--out", str(out)]) == 2
    (line,) = error_lines(capsys, "hf-graft export")
    assert "an export of another checkpoint (checkpoint-4, member 1)" in line
    # the run's own student/ is not an export of a checkpoint either
    assert export.main([str(checkpoint_8), "--member", "0", "--out", str(finished_run / "student")]) == 2

    # --overwrite replaces what an earlier export wrote, never anything else
    assert export.main([str(checkpoint_8), "--member", "0", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert json.loads((out / "config.json").read_text())["hf_graft_export"]["checkpoint"] == "checkpoint-8"
    assert export.main([str(checkpoint_8), "--member", "0", "--out", str(mine), "--overwrite"]) == 2
    assert (mine / "README.md").read_text() == "my notes"
    capsys.readouterr()
    assert export.main([str(checkpoint_8), "--member", "0", "--out", str(finished_run), "--overwrite"]) == 2
    assert "contains the checkpoint being exported" in error_lines(capsys, "hf-graft export")[0]


def test_exported_files_are_readable_by_others_under_the_umask(finished_run, tmp_path):
    previous = os.umask(0o022)
    try:
        out = export.export_from_checkpoint(finished_run / "checkpoint-8", member=0, out=tmp_path / "student")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        name: 0o644 for name in EXPORT_FILES}
    # the student a run exports gets the permissions of the umask it ran under
    student = finished_run / "student"
    expected = 0o666 & ~previous
    assert {stat.S_IMODE(p.stat().st_mode) for p in student.iterdir()} == {expected}
