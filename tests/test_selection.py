"""`select_student: best` on a split held out of train (selection_split_percentage): the choice never looks
at the evaluation split, and the results say which split chose."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from hf_graft.run.results import run_results


def _args(select_student="best"):
    return SimpleNamespace(num_students=2, select_student=select_student, filter_thresholds=[0.1], graft_bins=10,
                           grafting_settings=lambda: {}, kd_settings=lambda: None)


def test_the_selection_split_alone_chooses(caplog):
    # on the test split member 1 is better; on the selection split member 0 is
    evaluation = {"eval_member0_top1": 70.0, "eval_member1_top1": 90.0, "eval_top1": 90.0}
    selection = {"selection_member0_top1": 80.0, "selection_member1_top1": 60.0}
    filters = {f"eval_member{k}_{n}": 0.0 for k in range(2) for n in ("invalid_ratio@0.1", "total_entropy")}
    with caplog.at_level(logging.WARNING, logger="hf_graft.run.results"):
        results = run_results({**evaluation, **filters}, args=_args(), members=[None, None], has_eval=True,
                              selection_metrics=selection, eval_split="test",
                              selection_split="10% of 'train' held out (seed 1)")
    assert results["selected_member"] == 0
    assert results["selection_split"] == "10% of 'train' held out (seed 1)"
    assert results["selection_member0_top1"] == 80.0 and results["eval_member1_top1"] == 90.0
    assert results["eval_members_mean_top1"] == 80.0
    assert not caplog.records  # no warning: the test split did not choose
    # without it, the test split chooses member 1, and the run says so once
    with caplog.at_level(logging.WARNING, logger="hf_graft.run.results"):
        results = run_results({**evaluation, **filters}, args=_args(), members=[None, None], has_eval=True,
                              eval_split="test")
    assert results["selected_member"] == 1 and results["selection_split"] == "test"
    (record,) = caplog.records
    assert "optimistic" in record.getMessage() and "selection_split_percentage" in record.getMessage()


def test_an_explicit_member_needs_no_split():
    import torch.nn as nn

    members = [nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 4, 3))]
    results = run_results({}, args=_args("0"), members=members, has_eval=False, eval_split="test")
    assert results["selected_member"] == 0 and "selection_split" not in results


def test_selection_split_percentage_is_checked():
    from hf_graft.config import DataArguments

    with pytest.raises(ValueError, match=r"^DataArguments.selection_split_percentage: got 0"):
        DataArguments(dataset_name="builtin:digits", selection_split_percentage=0)


@pytest.mark.slow
def test_a_run_chooses_on_its_selection_split(tmp_path, single_thread):
    from _tiny_run import build_trainer

    from hf_graft.config import DataArguments
    from hf_graft.data.loading import load_image_data
    from hf_graft.training.builder import build_run

    args = DataArguments(dataset_name="builtin:digits", max_train_samples=64, max_eval_samples=64, input_size=16,
                         selection_split_percentage=20)
    data = load_image_data(args, seed=0)
    assert data.selection is not None and len(data.selection) == 288  # 20% of the 1,437 training digits
    assert not set(data.selection["label"]) - set(range(10))
    reference = build_trainer((args, data), tmp_path / "ref", num_train_epochs=1)  # the config, for build_run
    parts = build_run(reference.args, args, data=data)
    trainer = type(reference)(args=reference.args, **parts.trainer_kwargs())
    trainer.train()
    results = json.loads((tmp_path / "ref" / "all_results.json").read_text())
    top1 = [results[f"selection_member{k}_top1"] for k in range(2)]
    assert results["selected_member"] == (0 if top1[0] >= top1[1] else 1)
    assert results["selection_split"].startswith("20% of 'train' held out")
    assert "eval_member0_top1" in results and "eval_members_mean_top1" in results
