"""Fused member execution (`member_execution: fused`): the K members as one wide network.

Exactness is checked two ways. In float64 the fused network and the members one after another
compute the same numbers to the last bits, through whole training runs with grafts: any difference
there is a wrong computation. In float32 the two differ by rounding (a grouped convolution sums in
another order), and training amplifies rounding where a ReLU input sits at zero; the float32 run
uses a network with smooth activations (timm's test_efficientnet: SiLU, squeeze-excite,
BatchNormAct2d, depthwise convolutions), where the amplification stays small, and states its bound.
"""

from __future__ import annotations

import timm
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import TrainerCallback

import hf_graft  # noqa: F401
from hf_graft.config import GraftingConfig
from hf_graft.export.student_folder import save_student
from hf_graft.population.fused import FusionError, _FusedDropPath, separate_storage
from hf_graft.population.students import PopulationSpec, StudentPopulation, load_checkpoint_members

from _float64 import FLOAT64_EXACT, Float64Trainer, max_difference as _max_difference
from _tiny_run import SaveAndStopAtStep, build_trainer, population_state

FLOAT32_RUN = 1e-5  # float32, 6 steps and 2 grafts of test_efficientnet: 1.2e-7 measured here



def _population(name: str, K: int, dtype=torch.float64, **kwargs) -> StudentPopulation:
    spec = PopulationSpec(name, K, 10, student_model_kwargs=kwargs)
    return StudentPopulation.from_spec(spec, seed=3).to(dtype)


# ----------------------------------------------------------------------------- the wide network
ARCHITECTURES = [
    ("cifar_resnet20", {}),  # zero-padding (option A) shortcuts: padded per member
    ("cifar_resnet20", {"shortcut": "B"}),  # 1x1 conv + BN projections
    ("cifar_mobilenetv2", {"width_mult": 0.25}),
    ("cifar_wrn28_10", {"depth": 10, "widen_factor": 1}),  # pre-activation blocks, conv shortcuts
    ("test_resnet", {}),  # timm ResNet: BasicBlock and Bottleneck, avg-pool + conv downsample
    ("resnet18", {}),  # timm ResNet: conv downsample
    ("test_efficientnet", {}),  # timm EfficientNet blocks: depthwise, squeeze-excite, BatchNormAct2d, SiLU
    ("mobilenetv2_050", {}),  # timm MobileNetV2: depthwise, BatchNormAct2d, ReLU6
]
ARCHITECTURE_IDS = [name + "-B" * (kwargs.get("shortcut") == "B") for name, kwargs in ARCHITECTURES]


@pytest.mark.parametrize("name,kwargs", ARCHITECTURES, ids=ARCHITECTURE_IDS)
def test_fused_network_computes_exactly_the_members(name, kwargs, single_thread):
    """Training and eval forwards, per-member and shared batches: the same logits, losses, gradients
    and per-member BatchNorm statistics as the members run one after another (float64)."""
    K, B = 3, 4
    loop, fused = _population(name, K, **kwargs), _population(name, K, **kwargs)
    fused.set_execution(fused=True, model_name=name)
    generator = torch.Generator().manual_seed(0)
    per_member = torch.randn(B, K, 3, 16, 16, generator=generator, dtype=torch.float64)
    shared = torch.randn(B, 3, 16, 16, generator=generator, dtype=torch.float64)
    for x, y in ((per_member, torch.randint(0, 10, (B, K), generator=generator)),
                 (shared, torch.randint(0, 10, (B,), generator=generator))):
        outputs = []
        for population in (loop, fused):
            population.train()
            population.zero_grad()
            out = population(pixel_values=x, labels=y)
            out["loss"].backward()
            outputs.append(out)
        assert outputs[1]["logits"].shape == (B, K, 10)
        for key in ("logits", "member_ce", "loss"):
            assert (outputs[0][key] - outputs[1][key]).abs().max().item() <= FLOAT64_EXACT, key
        grads = [{n: p.grad for n, p in population.named_parameters()} for population in (loop, fused)]
        assert _max_difference(*grads) <= FLOAT64_EXACT
        # running statistics (and num_batches_tracked) of every member, exactly as in loop execution
        assert _max_difference(loop.state_dict(), fused.state_dict()) <= FLOAT64_EXACT
    for population in (loop, fused):
        population.eval()
    with torch.no_grad():
        assert (loop(pixel_values=per_member)["logits"] - fused(pixel_values=per_member)["logits"]).abs().max() \
            <= FLOAT64_EXACT
    # the members are distinct networks (the comparison above is not between K copies of one)
    assert not torch.equal(fused.members[0].state_dict()[next(iter(fused.members[0].state_dict()))],
                           fused.members[1].state_dict()[next(iter(fused.members[1].state_dict()))])


def test_parameters_and_state_are_the_members_own(single_thread):
    """The wide network is not a submodule: the population's parameters, state dict keys and
    optimizer groups are the same in both modes; the members' statistics share one buffer per layer."""
    loop, fused = _population("cifar_resnet20", 2), _population("cifar_resnet20", 2)
    fused.set_execution(fused=True)
    assert [n for n, _ in loop.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert list(loop.state_dict()) == list(fused.state_dict())
    bn0, bn1 = fused.members[0].bn1, fused.members[1].bn1
    assert bn0.running_mean.untyped_storage().data_ptr() == bn1.running_mean.untyped_storage().data_ptr()
    assert bn0.num_batches_tracked.untyped_storage().data_ptr() == bn1.num_batches_tracked.untyped_storage().data_ptr()
    # a checkpoint of such a state: contiguous tensors that share no memory, the same values
    state = fused.state_dict()
    separate = separate_storage(state)
    pointers = [t.untyped_storage().data_ptr() for t in separate.values()]
    assert len(set(pointers)) == len(pointers)
    assert all(t.is_contiguous() for t in separate.values())
    assert _max_difference(state, separate) == 0.0


def test_statistics_views_survive_to_and_replaced_buffers(single_thread):
    """`.to()` replaces buffers and `load_state_dict(assign=True)` replaces tensors: the fused
    network re-binds the members' statistics, and a training forward still updates every member's
    own statistics exactly as loop execution does."""
    loop, fused = _population("cifar_resnet20", 2, dtype=torch.float32), _population("cifar_resnet20", 2,
                                                                                       dtype=torch.float32)
    fused.set_execution(fused=True)
    loop, fused = loop.double(), fused.double()  # _apply: new buffer tensors, re-bound
    moved = fused.members[1].layer2[0].bn2.running_var
    assert moved.dtype == torch.float64
    assert moved.untyped_storage().data_ptr() == fused.members[0].layer2[0].bn2.running_var.untyped_storage().data_ptr()
    replacement = {k: v.clone() + 0.5 if "running_mean" in k else v.clone() for k, v in loop.state_dict().items()}
    loop.load_state_dict(replacement)
    fused.load_state_dict({k: v.clone() for k, v in replacement.items()}, assign=True)
    x = torch.randn(4, 2, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (4, 2))
    loop.train(), fused.train()
    loop(pixel_values=x, labels=y), fused(pixel_values=x, labels=y)
    assert _max_difference(loop.state_dict(), fused.state_dict()) <= FLOAT64_EXACT
    count = fused.members[1].bn1.num_batches_tracked
    assert count.dtype == torch.int64 and count.item() == replacement["members.1.bn1.num_batches_tracked"].item() + 1
    assert fused.members[1].bn1.running_mean.untyped_storage().data_ptr() \
        == fused.members[0].bn1.running_mean.untyped_storage().data_ptr()  # re-bound by the forward


def test_fused_drop_path_draws_for_every_member():
    """Stochastic depth in fused execution drops whole samples of each member independently (one
    draw per sample and member, as K separate networks would), scaled by 1 / keep."""
    drop = timm.layers.DropPath(0.5)
    fused = _FusedDropPath(drop, num_members=4).train()
    torch.manual_seed(0)
    out = fused(torch.ones(64, 4 * 3, 2, 2))
    blocks = out.view(64, 4, 3 * 2 * 2)
    assert set(blocks.unique().tolist()) == {0.0, 2.0}
    assert (blocks == blocks[:, :, :1]).all()  # a member's block is kept or dropped as a whole
    kept = blocks[:, :, 0] > 0
    assert (kept.any(dim=1) & ~kept.all(dim=1)).any()  # members of one sample drop independently
    assert 0.3 < kept.float().mean().item() < 0.7
    assert torch.equal(fused.eval()(torch.ones(2, 4, 1, 1)), torch.ones(2, 4, 1, 1))


# ----------------------------------------------------------------------------- architectures that do not fuse
UNFUSABLE = [
    ("test_convnext", "model type timm.models.convnext.ConvNeXt"),
    ("test_efficientnet_gn", "layer bn1 of type timm.layers.norm_act.GroupNormAct"),
]


@pytest.mark.parametrize("name,layer", UNFUSABLE, ids=["convnext", "groupnorm"])
def test_unfusable_architecture_fails_at_construction(tmp_path, digits_small, name, layer, monkeypatch):
    """Refused when the run is built, before any member is initialised or any image transformed or decoded."""
    import hf_graft.training.builder

    def not_yet(*args, **kwargs):
        raise AssertionError("work done before the refusal")

    monkeypatch.setattr(hf_graft.training.builder, "population_datasets", not_yet)
    monkeypatch.setattr(hf_graft.training.builder.StudentPopulation, "from_spec", not_yet)
    with pytest.raises(FusionError) as error:
        build_trainer(digits_small, tmp_path / "run", student_model=name, member_execution="fused")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("GraftingConfig.member_execution: 'fused' cannot run " + name)
    assert layer in message and "member_execution: loop" in message


def test_member_execution_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"GraftingConfig.member_execution: got 'wide'; allowed: loop, fused"):
        GraftingConfig(output_dir=str(tmp_path), member_execution="wide", use_cpu=True)


# ----------------------------------------------------------------------------- whole training runs
class MetricsRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _teacher64():
    torch.manual_seed(11)
    return timm.create_model("cifar_resnet20", num_classes=10).eval()


@pytest.mark.parametrize("setting", ["independent", "shared+teacher+recalibration"])
def test_fused_run_equals_loop_run_float64(tmp_path, digits_small, single_thread, setting):
    """2 epochs x 4 steps, a graft between them, per-member learning rates (cosine spread) and
    per-member clipping: the same member weights, statistics, grafts, learning rates, gradient norms
    and filter metrics in both modes (float64). The second setting adds a grafting+ teacher, a shared
    data order and BatchNorm recalibration after the graft."""
    extra = {}
    if setting != "independent":
        extra = dict(data_order="shared", bn_recalibration_batches=2, kd_weight=0.5)
    runs = {}
    for mode in ("loop", "fused"):
        recorder = MetricsRecorder()
        trainer = build_trainer(
            digits_small, tmp_path / mode, trainer_cls=Float64Trainer, num_train_epochs=2, member_execution=mode,
            max_grad_norm=1.0, callbacks=[recorder], teachers=[_teacher64()] if extra else None, **extra,
        )
        assert (trainer.population.fused is not None) == (mode == "fused")
        trainer.train()
        runs[mode] = (population_state(trainer), recorder.logs, trainer)
    (loop_state, loop_logs, loop_trainer), (fused_state, fused_logs, fused_trainer) = runs["loop"], runs["fused"]
    assert _max_difference(loop_state, fused_state) <= FLOAT64_EXACT
    assert len(loop_trainer.graft_reports) == len(fused_trainer.graft_reports) == 1
    assert loop_trainer.graft_reports[0].members[0].alphas == pytest.approx(
        fused_trainer.graft_reports[0].members[0].alphas, abs=1e-12)
    assert [sorted(log) for log in loop_logs] == [sorted(log) for log in fused_logs]
    for loop_log, fused_log in zip(loop_logs, fused_logs):
        for key, value in loop_log.items():
            if isinstance(value, float) and not key.endswith(("runtime", "per_second")):
                assert fused_log[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    keys = set().union(*map(set, loop_logs))
    assert {"member1_learning_rate", "member1_grad_norm", "eval_member1_top1",
            "graft/member1_invalid_ratio@0.1"} <= keys
    if extra:
        assert "member0_kd" in keys


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_fused_run_equals_loop_run_float32(tmp_path, digits_small, single_thread, channels_last):
    """float32, timm's test_efficientnet, 3 epochs x 2 steps (batch 32), two grafts, per-member
    clipping: the member weights of the two modes differ by float rounding only (bound stated above)."""
    states = {}
    for mode in ("loop", "fused"):
        trainer = build_trainer(
            digits_small, tmp_path / mode, student_model="test_efficientnet", num_train_epochs=3,
            per_device_train_batch_size=32, max_grad_norm=1.0, eval_strategy="no", member_execution=mode,
            channels_last=channels_last,
        )
        trainer.train()
        assert trainer.graft_callback.grafts_done == 2
        states[mode] = population_state(trainer)
    assert all(t.dtype != torch.float64 for t in states["fused"].values())
    assert _max_difference(states["loop"], states["fused"]) <= FLOAT32_RUN




@pytest.mark.parametrize("first,second", [("fused", "loop"), ("loop", "fused")])
def test_checkpoint_of_one_mode_resumes_in_the_other(tmp_path, digits_small, single_thread, first, second):
    """A run checkpointed mid-way in one mode and resumed in the other ends where an uninterrupted
    run ends (float64); the checkpoint holds every member, loadable on its own."""
    common = dict(trainer_cls=Float64Trainer, num_train_epochs=2, eval_strategy="no", save_strategy="no")
    reference = build_trainer(digits_small, tmp_path / "reference", member_execution=second, **common)
    reference.train()

    out = tmp_path / "run"
    stopped = build_trainer(digits_small, out, member_execution=first, callbacks=[SaveAndStopAtStep(6)], **common)
    stopped.train()
    checkpoint = out / "checkpoint-6"
    spec, members = load_checkpoint_members(checkpoint)
    saved = load_file(str(checkpoint / "model.safetensors"))
    for k, member in enumerate(members):
        for name, tensor in member.state_dict().items():
            live = stopped.population.members[k].state_dict()[name]
            assert torch.equal(saved[f"members.{k}.{name}"], live), name
            assert torch.equal(tensor, live.to(tensor.dtype)), name  # rebuilt by timm in float32

    resumed = build_trainer(digits_small, out, member_execution=second, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == reference.state.global_step == 8
    assert _max_difference(population_state(reference), population_state(resumed)) <= FLOAT64_EXACT


def test_export_of_a_fused_member(tmp_path, digits_small, single_thread):
    """The selected member of a fused run exports as an ordinary timm model (the exporter reloads it
    with timm and transformers and compares logits) and its statistics are its own."""
    trainer = build_trainer(digits_small, tmp_path / "run", num_train_epochs=1, member_execution="fused",
                            eval_strategy="no")
    trainer.train()
    member = trainer.population.members[1]
    folder = save_student(member.eval(), tmp_path / "student", architecture="cifar_resnet20",
                          data_config=trainer.population.spec.data_config)
    weights = load_file(str(folder / "model.safetensors"))
    for name, tensor in member.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    other = trainer.population.members[0].state_dict()
    assert not torch.equal(weights["bn1.running_mean"], other["bn1.running_mean"])
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), member(x))


def test_bf16_autocast_fused_on_cpu(tmp_path, digits_small, single_thread):
    """bf16 autocast (Accelerate's `bf16: true` on CPU): the fused convolutions run in bf16, the
    weights stay float32, and the losses follow the loop run's to bf16 precision."""
    dtypes = set()

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            wide_conv = model.fused.wide.conv1
            wide_conv.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))

    states, losses = {}, {}
    for mode in ("loop", "fused"):
        trainer = build_trainer(digits_small, tmp_path / mode, num_train_epochs=1, bf16=True, eval_strategy="no",
                                member_execution=mode, callbacks=[Probe()] if mode == "fused" else None)
        trainer.train()
        states[mode] = population_state(trainer)
        losses[mode] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert dtypes == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for n, t in states["fused"].items() if t.is_floating_point())
    assert losses["fused"][0] == pytest.approx(losses["loop"][0], rel=1e-2)  # the same weights, bf16 rounding
    assert losses["fused"] == pytest.approx(losses["loop"], rel=5e-2)
    assert all(torch.isfinite(t).all() for t in states["fused"].values())


def test_torch_compile_of_the_fused_population(tmp_path, digits_small, single_thread):
    """torch_compile with fused members: the compiled population trains and grafts as the eager one
    (aot_eager on CPU: dynamo capture and AOTAutograd, including the in-place statistics updates)."""
    common = dict(num_train_epochs=2, eval_strategy="no", max_train_samples=32, member_execution="fused")
    eager = build_trainer(digits_small, tmp_path / "eager", **common)
    eager.train()
    compiled = build_trainer(digits_small, tmp_path / "compiled", torch_compile=True,
                             torch_compile_backend="aot_eager", **common)
    compiled.train()
    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.graft_callback.grafts_done == 1
    assert compiled.population.members[0].bn1.num_batches_tracked.item() == 4
    assert _max_difference(population_state(eager), population_state(compiled)) <= 1e-5


def test_fused_population_is_an_ordinary_module_elsewhere():
    """nn.Module machinery on a fused population: the wide network is not in modules(), the train
    flag reaches it, and members can still be run one by one."""
    population = _population("test_resnet", 2, dtype=torch.float32)
    population.set_execution(fused=True)
    assert all(not type(m).__name__.startswith("_Fused") for m in population.modules())
    population.eval()
    assert not population.fused.wide.training
    population.train()
    assert population.fused.wide.training
    assert isinstance(population.members[0].fc, nn.Linear)  # the members keep their own layers


def test_fused_members_under_ddp(tmp_path):
    """Two CPU processes (gloo, DDP): fused and loop execution end with the same members (float64),
    identical on both ranks; DDP's buffer broadcasts reach the members' statistics through the views."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_fused_ddp_worker.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=worker.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["loop_grafts"] == r["fused_grafts"] == 1
        loop = {k: torch.tensor(v, dtype=torch.float64) for k, v in r["loop"].items()}
        fused = {k: torch.tensor(v, dtype=torch.float64) for k, v in r["fused"].items()}
        assert _max_difference(loop, fused) <= FLOAT64_EXACT
    # parameters are identical on both ranks (statistics are each rank's own until a graft syncs them)
    parameters = [k for k in ranks[0]["fused"] if "running_" not in k and "num_batches" not in k]
    assert all(ranks[0]["fused"][k] == ranks[1]["fused"][k] for k in parameters)
