"""channels_last execution (`GraftingConfig.channels_last`) and the other pieces of the GPU path.

channels_last is on by default for CUDA runs only; on CPU it is allowed (these tests turn it on)
and must change nothing but the memory layout: the same training (float64: to the last bits), the
same grafts, checkpoints and exports of ordinary contiguous tensors, exact resume.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

import hf_graft  # noqa: F401
from hf_graft.export.student_folder import save_student
from hf_graft.graft.grafting import graft_internal, graft_members, graft_noise
from hf_graft.population.students import channels_last_batch, load_checkpoint_members

from _float64 import FLOAT64_EXACT, Float64Trainer, max_difference
from _tiny_run import SaveAndStopAtStep, assert_bit_identical, build_trainer, population_state

CL = torch.channels_last


def _conv_weights(module: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, nn.Conv2d)]


def _teacher():
    torch.manual_seed(11)
    return timm.create_model("cifar_resnet20", num_classes=10).eval()


def test_off_by_default_on_cpu(tmp_path, digits_small):
    trainer = build_trainer(digits_small, tmp_path / "run")
    assert trainer.args.channels_last is None
    assert not trainer.channels_last and not trainer.population.channels_last
    assert all(w.is_contiguous() for w in _conv_weights(trainer.population))
    assert not trainer.args.accelerator_config.non_blocking  # the CPU path is unchanged


def test_batch_layout_gives_every_member_a_channels_last_view():
    x = torch.randn(4, 3, 3, 8, 8)
    laid_out = channels_last_batch(x)
    assert torch.equal(laid_out, x)
    for k in range(3):
        member = laid_out[:, k]
        assert member.is_contiguous(memory_format=CL)  # no copy needed before the member's convolution
    assert channels_last_batch(laid_out).data_ptr() == laid_out.data_ptr()  # a second call is free
    shared = channels_last_batch(torch.randn(4, 3, 8, 8))
    assert shared.is_contiguous(memory_format=CL)


def test_training_checkpoint_and_export_in_channels_last(tmp_path, digits_small, single_thread):
    """channels_last on CPU with a grafting+ teacher: members and teacher train in channels_last;
    the checkpoint and the export hold the same values as ordinary tensors, loadable by timm."""
    teacher = _teacher()
    trainer = build_trainer(digits_small, tmp_path / "run", num_train_epochs=2, channels_last=True,
                            save_strategy="epoch", eval_strategy="no", teachers=[teacher])
    trainer.train()
    assert trainer.population.channels_last
    weights = _conv_weights(trainer.population)
    assert all(w.is_contiguous(memory_format=CL) for w in weights)
    assert not any(w.is_contiguous() for w in weights if w.shape[-1] > 1)  # 1x1 kernels are both
    assert all(w.is_contiguous(memory_format=CL) for w in _conv_weights(teacher))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)
    assert trainer.graft_callback.grafts_done == 1

    checkpoint = tmp_path / "run" / "checkpoint-8"
    saved = load_file(str(checkpoint / "model.safetensors"))
    live = trainer.population.state_dict()
    assert saved.keys() == live.keys()
    for name, tensor in live.items():
        assert torch.equal(saved[name], tensor), name
    _, members = load_checkpoint_members(checkpoint)
    assert_bit_identical(members[1].state_dict(), trainer.population.members[1].state_dict())

    member = trainer.population.members[0].eval()
    folder = save_student(member, tmp_path / "student", architecture="cifar_resnet20",
                          data_config=trainer.population.spec.data_config)  # reloads with timm and transformers
    exported = load_file(str(folder / "model.safetensors"))
    for name, tensor in member.state_dict().items():
        assert torch.equal(exported[name], tensor), name
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert all(w.is_contiguous() for w in _conv_weights(loaded))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), member(x))




def test_resume_in_channels_last_is_exact(tmp_path, digits_small, single_thread):
    """Stopped after step 6 (mid-epoch 1, after a graft) and resumed: bit-identical to the
    uninterrupted channels_last run."""
    common = dict(num_train_epochs=2, channels_last=True, eval_strategy="no", save_strategy="no",
                  student_model_kwargs={"drop_rate": 0.2})
    reference = build_trainer(digits_small, tmp_path / "reference", **common)
    reference.train()
    out = tmp_path / "run"
    build_trainer(digits_small, out, callbacks=[SaveAndStopAtStep(6)], **common).train()
    resumed = build_trainer(digits_small, out, **common)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert all(w.is_contiguous(memory_format=CL) for w in _conv_weights(resumed.population))
    assert_bit_identical(population_state(reference), population_state(resumed))


@pytest.mark.parametrize("member_execution", ["loop", "fused"])
def test_channels_last_run_equals_contiguous_run_float64(tmp_path, digits_small, single_thread, member_execution):
    """The same training, grafts and teacher passes in either layout (float64: to the last bits)."""
    states = {}
    for channels_last in (False, True):
        trainer = build_trainer(digits_small, tmp_path / str(channels_last), trainer_cls=Float64Trainer,
                                num_train_epochs=2, eval_strategy="no", channels_last=channels_last,
                                member_execution=member_execution, teachers=[_teacher()], kd_weight=0.5)
        trainer.train()
        assert trainer.population.channels_last == channels_last
        states[channels_last] = population_state(trainer)
    assert max_difference(states[False], states[True]) <= FLOAT64_EXACT


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_graft_is_independent_of_the_memory_layout(level):
    """graft_members, graft_noise and graft_internal give identical weights and alphas on
    channels_last members as on contiguous ones."""
    def members():
        out = []
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            m = timm.create_model("cifar_resnet20", num_classes=10)
            with torch.no_grad():
                for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
                m.conv1.weight[:3].mul_(1e-3)  # a few invalid filters for the noise / internal scions
            out.append(m)
        return out

    plain, channels_last = members(), [m.to(memory_format=CL) for m in members()]
    assert not channels_last[0].conv1.weight.is_contiguous()
    report_plain = graft_members(plain, level=level)
    report_cl = graft_members(channels_last, level=level)
    assert report_plain.members[0].alphas == report_cl.members[0].alphas
    counts = []
    for group in (plain, channels_last):
        generator = torch.Generator().manual_seed(5)
        counts.append((graft_noise(group[0], epoch=1, threshold=0.05, generator=generator),
                       graft_internal(group[1], threshold=0.05)))
    assert counts[0] == counts[1] and sum(counts[0][0].values()) > 0
    for a, b in zip(plain, channels_last):
        assert_bit_identical(a.state_dict(), b.state_dict())


def test_nan_loss_filter_on_the_device_logs_what_the_trainer_logs(tmp_path, digits_small, single_thread):
    """On CUDA the Trainer's logging_nan_inf_filter runs on the device, without a host sync per step.
    Forced on here (CPU; the filter is opt-in, `GraftingConfig` turns it off): with a non-finite loss at one step, the logged losses equal the Trainer's
    own filter's, and `logging_nan_inf_filter` is restored after training."""
    from _tiny_run import CountingTrainer

    class NanAtStep3(CountingTrainer):
        on_device = False

        def _streams_to_device(self):
            return self.on_device

        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            if model.training and self.state.global_step == 2:
                loss = loss + (torch.full_like(loss, float("nan")) - loss).detach()  # the value, not the gradient
            return loss

    logged = {}
    for on_device in (False, True):
        NanAtStep3.on_device = on_device
        trainer = build_trainer(digits_small, tmp_path / str(on_device), trainer_cls=NanAtStep3, num_train_epochs=1,
                                eval_strategy="no", logging_steps=2, logging_nan_inf_filter=True)
        trainer.train()
        assert trainer.args.logging_nan_inf_filter is True
        logged[on_device] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged[True]) == 2 and all(math.isfinite(v) for v in logged[True])
    assert logged[True] == pytest.approx(logged[False], rel=1e-6)


def test_fused_members_copy_keeps_working():
    """copy.deepcopy of a channels_last, fused population (e.g. an EMA copy) runs on its own."""
    from hf_graft.population.students import PopulationSpec, StudentPopulation

    population = StudentPopulation.from_spec(PopulationSpec("cifar_resnet20", 2, 10), seed=0)
    population.set_execution(channels_last=True, fused=True)
    clone = copy.deepcopy(population)
    x = torch.randn(2, 2, 3, 16, 16)
    y = torch.randint(0, 10, (2, 2))
    before = population.members[0].bn1.running_mean.clone()
    clone.train()(pixel_values=x, labels=y)
    assert torch.equal(population.members[0].bn1.running_mean, before)  # the original is untouched
    assert not torch.equal(clone.members[0].bn1.running_mean, before)
    population.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            clone(pixel_values=x)["logits"],
            torch.stack([m(x[:, k]) for k, m in enumerate(clone.members)], dim=1), rtol=1e-5, atol=1e-5)
