"""Mixed precision, torch.compile and gradient accumulation with grafting.

CPU runs use bf16 autocast (what Accelerate does for `bf16: true` on a CPU). fp16 autocast with a
loss scaler, bf16 autocast on CUDA and compile with inductor need a GPU: those tests skip here
and say so.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from transformers import TrainerCallback

import hf_graft  # noqa: F401
from hf_graft.graft.grafting import graft_members
from hf_graft.training.trainer import GraftingTrainer

from _tiny_run import CountingTrainer, build_trainer

NO_CUDA = "needs a CUDA GPU (fp16 autocast/GradScaler, CUDA bf16 and inductor kernels are GPU paths)"


def _finite_losses(trainer):
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)
    return losses


class AutocastProbe(TrainerCallback):
    """Records the dtype of the first conv's output of member 0 during training steps."""

    def __init__(self):
        self.dtypes = set()
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        population = model.module if hasattr(model, "module") else model
        conv = next(m for m in population.members[0].modules() if isinstance(m, nn.Conv2d))
        self.handle = conv.register_forward_hook(
            lambda module, inputs, output: self.dtypes.add(output.dtype) if module.training else None
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def _run_mixed_precision(tmp_path, digits_small, **precision):
    probe = AutocastProbe()
    trainer = build_trainer(digits_small, tmp_path / "run", trainer_cls=CountingTrainer, num_train_epochs=2,
                            eval_strategy="no", max_train_samples=32, callbacks=[probe], **precision)
    trainer.train()
    assert trainer.graft_log == [(0, 2)]  # 32 images / 16 = 2 steps an epoch; one graft between the epochs
    _finite_losses(trainer)
    for name, tensor in trainer.population.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name  # autocast: the weights stay float32
            assert torch.isfinite(tensor).all(), name
    return trainer, probe


def test_bf16_on_cpu_trains_and_grafts(tmp_path, digits_small, single_thread):
    trainer, probe = _run_mixed_precision(tmp_path, digits_small, bf16=True)
    assert probe.dtypes == {torch.bfloat16}  # the forward really ran in bf16
    alphas = trainer.graft_reports[0].members[0].alpha_values
    assert alphas and all(0.0 < a < 1.0 for a in alphas)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("precision", [{"fp16": True}, {"bf16": True}])
def test_half_precision_on_cuda_trains_and_grafts(tmp_path, digits_small, precision):
    trainer, probe = _run_mixed_precision(tmp_path, digits_small, use_cpu=False, **precision)
    assert probe.dtypes == {torch.float16 if precision.get("fp16") else torch.bfloat16}
    assert next(trainer.population.parameters()).device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graft_of_half_precision_weights_is_float32_math_rounded_once(dtype):
    """Members stored in bf16/fp16 are grafted in float32 and written back in their dtype: the result
    equals the float32 graft of the same values, rounded once."""
    import timm

    def members():
        out = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = timm.create_model("cifar_resnet20", num_classes=10)
            with torch.no_grad():  # non-trivial BatchNorm statistics as well
                for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
            out.append(m.to(dtype))
        return out

    low = members()
    high = [m.float() for m in members()]  # the same (already rounded) values, in float32
    report_low = graft_members(low)
    report_high = graft_members(high)
    assert report_low.members[0].alpha_values == report_high.members[0].alpha_values
    for m_low, m_high in zip(low, high):
        state_low, state_high = m_low.state_dict(), m_high.state_dict()
        for name, t in state_low.items():
            if t.is_floating_point():
                assert t.dtype == dtype, name
                assert torch.equal(t, state_high[name].to(dtype)), name
            else:
                assert torch.equal(t, state_high[name]), name


@pytest.mark.parametrize("member_execution", ["loop", "fused"])
def test_torch_compile_sees_the_grafted_weights(tmp_path, digits_small, single_thread, member_execution):
    """With torch_compile the Trainer trains a compiled population; grafting mixes the weights in place
    and the compiled graph computes with the new values (no stale copy, no recompilation needed).

    On CPU the test uses the aot_eager backend (dynamo capture + AOTAutograd without code
    generation): inductor compiles the same tiny run in about 2 minutes on this 2-core machine.
    """

    class ProbeTrainer(GraftingTrainer):
        def graft(self, step):
            compiled, population = self.model_wrapped, self.population
            x = self.probe_input
            population.eval()
            with torch.no_grad():
                before = compiled(pixel_values=x)["logits"]
                report = super().graft(step)
                after = compiled(pixel_values=x)["logits"]
                eager = torch.stack([member(x) for member in population.members], dim=1)
            population.train()
            self.probe = (before, after, eager)
            return report

    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    trainer = build_trainer(digits_small, tmp_path / "run", trainer_cls=ProbeTrainer, num_train_epochs=2,
                            eval_strategy="no", max_train_samples=32, torch_compile=True,
                            torch_compile_backend=backend, use_cpu=not torch.cuda.is_available(),
                            member_execution=member_execution)
    trainer.probe_input = torch.stack([trainer.eval_dataset[i]["pixel_values"] for i in range(4)]).to(
        trainer.args.device)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.graft_callback.grafts_done == 1
    before, after, eager = trainer.probe
    assert not torch.allclose(before, after, atol=1e-3)  # the graft changed what the compiled model computes
    torch.testing.assert_close(after, eager, rtol=1e-4, atol=1e-4)
    _finite_losses(trainer)


def test_gradient_accumulation_with_per_member_clipping(tmp_path, digits_small, single_thread):
    """gradient_accumulation_steps=2: 4 optimizer steps an epoch from 8 micro-batches, a graft between
    the epochs, and clipping per member: with a tiny max_grad_norm every member's gradient norm is
    clipped to exactly max_grad_norm (one global clip would leave each member below it)."""
    max_norm = 1e-3

    class ClipProbe(TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            population = model.module if hasattr(model, "module") else model
            self.norms.append([
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]))
                .item()
                for m in population.members
            ])

    probe = ClipProbe()
    trainer = build_trainer(digits_small, tmp_path / "run", trainer_cls=CountingTrainer, num_train_epochs=2,
                            eval_strategy="no", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                            max_grad_norm=max_norm, learning_rate=0.5, callbacks=[probe])
    trainer.train()
    assert trainer.state.global_step == 8  # 64 images / (8 x 2) = 4 optimizer steps an epoch
    assert trainer.graft_log == [(0, 4)]
    assert len(probe.norms) == 8
    for norms in probe.norms:
        assert norms == pytest.approx([max_norm, max_norm], rel=1e-4)
    logged = [e for e in trainer.state.log_history if "member0_grad_norm" in e]
    assert logged and all(e["member0_grad_norm"] > max_norm and e["member1_grad_norm"] > max_norm for e in logged)
    _finite_losses(trainer)
