"""Exact resume and atomic checkpoints of GraftingTrainer.

One uninterrupted reference run (3 epochs x 4 steps, K = 2, a checkpoint every 2 steps, grafts at
the start of epochs 1 and 2, i.e. at global steps 4 and 8, right after the checkpoints of those
steps) is compared with runs that stop and resume: bit-identical final weights (every parameter
and buffer of every member, torch.equal) on CPU. The runs use random augmentation (pad-crop +
flip) and dropout, so the data order, the augmentation and the global RNG all have to come back.
"""

from __future__ import annotations

import logging

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_graft.population.students import load_checkpoint_members
from hf_graft.run.output_dir import LOCK_FILE

from _tiny_run import CountingTrainer, assert_bit_identical, build_trainer, population_state

COMMON = dict(
    num_train_epochs=3, save_strategy="steps", save_steps=2, save_total_limit=None,
    student_model_kwargs={"drop_rate": 0.2},
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_small):
    """The uninterrupted run: its final population, its grafts and its checkpoints."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    trainer = build_trainer(digits_small, out, trainer_cls=CountingTrainer, **COMMON)
    trainer.train()
    yield {"out": out, "state": population_state(trainer), "grafts": trainer.graft_log,
           "log_history": trainer.state.log_history}
    torch.set_num_threads(threads)


def _grafts_done_in(checkpoint) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["GraftingCallback"]["attributes"]["grafts_done"]


def test_reference_run_grafts_after_the_epoch_checkpoints(reference):
    out = reference["out"]
    assert reference["grafts"] == [(0, 4), (1, 8)]  # start of epochs 1 and 2, never after the last
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in (10, 12, 2, 4, 6, 8)
    ]
    # the checkpoint of an epoch's last step is written before that boundary's graft
    assert [_grafts_done_in(out / f"checkpoint-{s}") for s in (2, 4, 6, 8, 10, 12)] == [0, 0, 1, 1, 2, 2]


def test_crash_while_saving_keeps_previous_checkpoint_and_resume_mid_epoch_is_exact(
        tmp_path, digits_small, reference, single_thread, caplog):
    """A save killed half-way (model and optimizer written, RNG state not) leaves checkpoint-6
    usable; resuming (mid-epoch 1) skips the incomplete checkpoint-8 and ends bit-identical to the
    uninterrupted run."""
    out = tmp_path / "run"
    crashing = build_trainer(digits_small, out, **COMMON)
    original = crashing._save_rng_state

    def crash_at_step_8(output_dir):
        if crashing.state.global_step == 8:
            raise RuntimeError("simulated kill while saving checkpoint-8")
        return original(output_dir)

    crashing._save_rng_state = crash_at_step_8
    with pytest.raises(RuntimeError, match="simulated kill"):
        crashing.train()

    partial = out / "checkpoint-8"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "rng_state.pth").exists()  # the save really stopped half-way
    assert not (partial / "trainer_state.json").exists()
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "graft_population.json"} <= {p.name for p in (out / "checkpoint-6").iterdir()}

    resumed = build_trainer(digits_small, out, trainer_cls=CountingTrainer, **COMMON)
    with caplog.at_level(logging.WARNING, logger="hf_graft.run.output_dir"):
        resumed.train(resume_from_checkpoint=True)  # the newest complete checkpoint: checkpoint-6
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-8" in skipped[0] and "trainer_state.json" in skipped[0]
    assert resumed.graft_log == [(1, 8)]  # graft 0 was before checkpoint-6; graft 1 not repeated
    assert resumed.graft_callback.grafts_done == 2
    assert_bit_identical(population_state(resumed), reference["state"])
    # the re-save of step 8 is complete
    assert (out / "checkpoint-8" / "rng_state.pth").is_file() and (out / "checkpoint-8" / "trainer_state.json").is_file()


@pytest.mark.parametrize("step, restore_callbacks", [(4, True), (8, False)])
def test_resume_at_epoch_boundary_before_the_graft_is_exact(
        tmp_path, digits_small, reference, single_thread, step, restore_callbacks):
    """checkpoint-4 / checkpoint-8 end an epoch and precede its graft: the resumed run grafts first,
    exactly once, then trains on; also with the Trainer's callback-state restoration switched on."""
    checkpoint = reference["out"] / f"checkpoint-{step}"
    resumed = build_trainer(digits_small, tmp_path / "run", trainer_cls=CountingTrainer,
                            restore_callback_states_from_checkpoint=restore_callbacks, **COMMON)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = [(0, 4), (1, 8)] if step == 4 else [(1, 8)]
    assert resumed.graft_log == expected
    assert resumed.graft_callback.grafts_done == 2
    assert_bit_identical(population_state(resumed), reference["state"])


def test_save_total_limit_and_load_best_model_at_end(tmp_path, digits_small, single_thread):
    """Rotation keeps the best and the last checkpoint of the population; the best is reloaded."""

    class ListCheckpoints(TrainerCallback):
        def __init__(self):
            self.kept_after_save, self.last_weights = [], None

        def on_save(self, args, state, control, **kwargs):
            folders = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != LOCK_FILE)  # held by the run
            self.kept_after_save.append((state.global_step, state.best_model_checkpoint, folders))
            checkpoint = tmp_path / "run" / f"checkpoint-{state.global_step}"
            self.last_weights = load_file(str(checkpoint / "model.safetensors"))

    listing = ListCheckpoints()
    trainer = build_trainer(
        digits_small, tmp_path / "run", num_train_epochs=3, save_strategy="epoch", save_total_limit=1,
        load_best_model_at_end=True, metric_for_best_model="eval_ensemble_top1", learning_rate=0.1,
        callbacks=[listing],
    )
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_ensemble_top1" in e]
    assert [e["step"] for e in evals] == [4, 8, 12]
    values = [e["eval_ensemble_top1"] for e in evals]
    best_step = evals[values.index(max(values))]["step"]  # the first maximum
    best_dir = tmp_path / "run" / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best_dir)
    # during training: the newest checkpoint and the best so far, nothing else (no staging folders)
    for step, best, folders in listing.kept_after_save:
        assert folders == sorted({f"checkpoint-{step}", os.path.basename(best)}), (step, folders)
    # at the end, save_total_limit=1 keeps the best checkpoint only (transformers' rule)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == [f"checkpoint-{best_step}"]
    # the run's results are those of the population it ends with, the best one: its logged evaluation, reused
    assert len([e for e in trainer.state.log_history if "eval_ensemble_top1" in e]) == 3
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["eval_ensemble_top1"] == max(values) and results["epoch"] == evals[values.index(max(values))]["epoch"]
    # the population in memory is the best checkpoint's, every member of it
    saved = load_file(str(best_dir / "model.safetensors"))
    state = population_state(trainer)
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[name], state[name]) for name in state)
    spec, members = load_checkpoint_members(best_dir)
    assert spec.num_students == 2 and len(members) == 2
    if best_step != 12:  # (here: step 4) the reload really changed the weights
        assert any(not torch.equal(listing.last_weights[name], state[name]) for name in state)


def test_training_batches_depend_only_on_seed_and_epoch(tmp_path, digits_small, single_thread):
    """The order and the augmentation of every training batch are a function of (seed, epoch): not of
    the global RNG (which the Trainer restores at a different point when it resumes) or of dataloader
    workers; a new epoch gives a new order and new augmentations of the same examples."""
    import random

    trainer = build_trainer(digits_small, tmp_path / "run")
    loader = trainer.get_train_dataloader()
    n = len(trainer.train_dataset)

    def first_batches(epoch, rng_seed, count=2):
        torch.manual_seed(rng_seed)
        random.seed(rng_seed)
        loader.set_epoch(epoch)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                return batches

    a, b, c = first_batches(1, 0), first_batches(1, 12345), first_batches(2, 0)
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(a[0]["pixel_values"], c[0]["pixel_values"])
    # every epoch is a permutation of all examples, tagged with its epoch
    sampler = trainer.epoch_sampler
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert sorted(i - epoch * n for i in indices) == list(range(n))
    # the same example is augmented differently in another epoch (random pad-crop + flip)
    dataset = trainer.train_dataset
    assert any(not torch.equal(dataset[i]["pixel_values"], dataset[n + i]["pixel_values"]) for i in range(8))
    assert all(torch.equal(dataset[n + i]["pixel_values"], dataset[n + i]["pixel_values"]) for i in range(4))


