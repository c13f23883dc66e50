"""Faults and bad input as a new user meets them: each ends in one clear line or in correct behaviour,
with nothing lost (every file of an earlier run keeps its name, size and modification time) and
nothing reported wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_graft.cli import export

from _cli_run import cli, copy_run, error_lines


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below `folder`: its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch quickstart run: checkpoint-4, checkpoint-8, results and student/."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli(out, "--num_train_epochs", "2", "--save_strategy", "epoch", "--save_total_limit", "3") == 0
    assert {"checkpoint-4", "checkpoint-8", "all_results.json", "student"} <= {p.name for p in out.iterdir()}
    return out


# ----------------------------------------------------------------------------- deletes a user's data
def test_export_overwrite_never_removes_a_folder_holding_the_run(finished_run, tmp_path, capsys):
    parent = tmp_path / "parent"
    run = copy_run(finished_run, parent / "run")
    (parent / "notes.txt").write_text("mine")
    before = _files(parent)
    assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(parent), "--overwrite"]) == 2
    (line,) = error_lines(capsys, "hf-graft export")
    assert f"--out {parent}: contains the checkpoint being exported" in line
    # a folder holding another training run, or the user's own files: refused, --overwrite or not
    other = tmp_path / "other"
    copy_run(finished_run, other / "old_run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text("{}")
    listings = {other: _files(other), mine: _files(mine)}
    for out, message in ((other, "contains (old_run) a training output"), (mine, "not empty and not an export of")):
        assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(out), "--overwrite"]) == 2
        (line,) = error_lines(capsys, "hf-graft export")
        assert message in line
    assert _files(parent) == before
    assert {folder: _files(folder) for folder in listings} == listings
    # what an earlier export wrote is replaced with --overwrite: another checkpoint's export, the run's student/
    for out in (tmp_path / "export_of_4", tmp_path / "student_copy"):
        if out.name == "student_copy":
            copy_run(finished_run / "student", out)
        else:
            assert export.main([str(run / "checkpoint-4"), "--member", "1", "--out", str(out)]) == 0
        assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(out)]) == 2
        assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(out), "--overwrite"]) == 0
        recorded = json.loads((out / "config.json").read_text())["hf_graft_export"]
        assert (recorded["checkpoint"], recorded["member"]) == ("checkpoint-8", 0)


def test_replace_output_dir_with_a_bad_batch_size_refuses_before_touching_the_run(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = _files(out)
    for field, value in (("per_device_train_batch_size", "0"), ("per_device_eval_batch_size", "0"),
                         ("gradient_accumulation_steps", "0"), ("max_steps", "0"), ("save_steps", "-1")):
        assert cli(out, f"--{field}", value) == 2  # the quickstart recipe sets replace_output_dir: true
        (line,) = error_lines(capsys)
        assert f"GraftingConfig.{field}: got {value}" in line
    assert _files(out) == before


def test_replace_output_dir_removes_the_previous_run_only_when_training_begins(finished_run, tmp_path, monkeypatch):
    """A failure while the Trainer builds its optimizer, scheduler or data loaders loses nothing."""
    from hf_graft.training.trainer import GraftingTrainer

    def broken(self, *args, **kwargs):
        raise ValueError("no optimizer today")

    out = copy_run(finished_run, tmp_path / "run")
    before = _files(out)
    monkeypatch.setattr(GraftingTrainer, "create_optimizer", broken)
    with pytest.raises(ValueError, match="no optimizer today"):
        cli(out)
    assert _files(out) == before
