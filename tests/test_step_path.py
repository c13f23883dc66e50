"""What the trainer does around the model at every step: the mode and gradient resets the Trainer calls,
results that stay right when the model's outputs are overwritten after use (as torch.compile's CUDA
graphs do), what a compiled step reads as per-call inputs and how often it is traced, the copy of
the training batches to the GPU on a side stream, and the cuDNN setting of a run."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from hf_graft.config import GraftingConfig
from hf_graft.population.students import PopulationSpec, StudentPopulation

from conftest import TINY_SIZE, TINY_STUDENT


@pytest.mark.parametrize("fused", [False, True])
def test_train_eval_and_zero_grad_reach_every_module_and_parameter(fused):
    population = StudentPopulation.from_spec(PopulationSpec(TINY_STUDENT, 2, 10), seed=0)
    population.set_execution(fused=fused, model_name=TINY_STUDENT)
    modules = list(population.modules())
    params = list(population.parameters())

    population.members[1].fc.eval()  # one module out of step with the rest
    population.members[0].layer2.eval()
    assert population.training
    population.train()
    assert all(m.training for m in modules)
    population.eval()
    assert not any(m.training for m in modules)
    population.train()
    assert all(m.training for m in modules)

    x, y = torch.randn(4, 2, 3, TINY_SIZE, TINY_SIZE), torch.randint(0, 10, (4, 2))
    population(pixel_values=x, labels=y)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    population.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    population(pixel_values=x, labels=y)["loss"].backward()
    population.zero_grad()
    assert all(p.grad is None for p in params)
    assert len(params) == sum(len(list(m.parameters())) for m in population.members)


def _overwrite_outputs_after_use(population: StudentPopulation) -> None:
    """Each call first fills the previous call's outputs with nan, as a CUDA graph replay overwrites
    the memory of the outputs it handed out."""
    forward, previous = population.forward, []

    def replaying_forward(*args, **kwargs):
        with torch.no_grad():
            for tensor in previous:
                tensor.detach().fill_(float("nan"))
        outputs = forward(*args, **kwargs)
        previous[:] = [v for v in outputs.values() if torch.is_tensor(v) and v.is_floating_point()]
        return outputs

    population.forward = replaying_forward


@pytest.mark.parametrize("member_execution", ["loop", "fused"])
def test_logs_and_evaluation_do_not_keep_outputs_a_replay_overwrites(make_trainer, tmp_path, member_execution,
                                                                     single_thread):
    """Member losses are summed between logs and evaluation keeps every batch's logits: from copies, so
    the logged losses and the evaluation equal those of a run whose outputs stay untouched."""
    kwargs = dict(num_train_epochs=1, logging_steps=2, per_device_eval_batch_size=16,
                  member_execution=member_execution)
    plain = make_trainer(output_dir=tmp_path / "plain", **kwargs)
    plain.train()
    replayed = make_trainer(output_dir=tmp_path / "replayed", **kwargs)
    _overwrite_outputs_after_use(replayed.population)
    replayed.train()

    def logged(trainer):
        return [{k: v for k, v in e.items() if k.startswith(("member", "loss", "eval_"))
                 and not k.endswith(("runtime", "per_second"))}
                for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]

    expected, got = logged(plain), logged(replayed)
    assert len(expected) == 3  # two training logs (steps 2 and 4) and the epoch's evaluation
    assert any("member0_ce" in e for e in expected) and any("eval_ensemble_top1" in e for e in expected)
    assert got == expected
    measured = ("train_loss", "eval_top1", "eval_ensemble_top1", "eval_member1_top5", "selected_member")
    assert [replayed.results[k] for k in measured] == [plain.results[k] for k in measured]


def test_cudnn_benchmark_is_set_for_the_run_and_restored(make_trainer, caplog):
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(torch.backends.cudnn.benchmark)

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        make_trainer(num_train_epochs=1, eval_strategy="no", cudnn_benchmark=True, callbacks=[Probe()]).train()
        assert seen == [True] * 4 and torch.backends.cudnn.benchmark is False
        assert caplog.text.count("GraftingConfig.cudnn_benchmark: true has no effect on cpu") == 1
        seen.clear()
        # null on CPU: left as it is
        torch.backends.cudnn.benchmark = True
        make_trainer(num_train_epochs=1, eval_strategy="no", callbacks=[Probe()], replace_output_dir=True).train()
        assert seen == [True] * 4 and torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_cudnn_benchmark_with_full_determinism_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^GraftingConfig.cudnn_benchmark: got true with full_determinism true"):
        GraftingConfig(output_dir=str(tmp_path), student_model=TINY_STUDENT, cudnn_benchmark=True,
                       full_determinism=True)


@pytest.mark.parametrize("fused", [False, True])
def test_under_torch_compile_only_the_batch_is_a_per_call_input(fused):
    """CUDA graphs (torch_compile with the cudagraphs backend or mode reduce-overhead) replay a step
    only when every tensor it reads or updates in place, other than the batch, keeps its address:
    the members' parameters, their BatchNorm statistics and, fused, the shared statistics buffers
    must all reach the compiler as static inputs."""
    population = StudentPopulation.from_spec(PopulationSpec(TINY_STUDENT, 2, 10), seed=0)
    population.set_execution(fused=fused, model_name=TINY_STUDENT)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph_module.forward

    compiled = torch.compile(population, backend=recording_backend)
    x, y = torch.randn(4, 2, 3, TINY_SIZE, TINY_SIZE), torch.randint(0, 10, (4, 2))
    compiled(pixel_values=x, labels=y)["loss"].backward()
    assert len(graphs) == 1  # one graph: no break inside the step

    inputs = graphs[0]
    per_call = [t for t in inputs if getattr(t, "_dynamo_static_input_type", None) is None]
    assert sorted(tuple(t.shape) for t in per_call) == sorted([tuple(x.shape), tuple(y.shape)])
    static = {id(t) for t in inputs} - {id(t) for t in per_call}
    assert {id(p) for p in population.parameters()} <= static
    if fused:
        statistics = [t for norm in population.fused.norms for t in norm.fused.values()]
        assert len(statistics) == 3 * len(population.fused.norms) and {id(t) for t in statistics} <= static
    else:
        assert {id(b) for b in population.buffers()} <= static


class _RecordingCopy:
    """Stands in for the CUDA side-stream copy on CPU: counts the batches it is given, returns copies."""

    def __init__(self):
        self.batches = 0

    def __call__(self, batch):
        from accelerate.utils import recursively_apply

        self.batches += 1
        return recursively_apply(lambda t: t.clone(), batch)


def test_training_batches_reach_the_device_through_the_trainers_copy_only(make_trainer, tmp_path, single_thread):
    """On CUDA, Accelerate's dataloader leaves the training batches on the host and the trainer copies
    each one itself (on a side stream): every training batch exactly once, no evaluation batch, the same
    training, and a mid-epoch resume skips the same batches."""
    kwargs = dict(num_train_epochs=2, save_strategy="steps", save_steps=6)
    plain = make_trainer(output_dir=tmp_path / "plain", **kwargs)
    plain.train()
    copied = make_trainer(output_dir=tmp_path / "copied", **kwargs)
    copied._batch_copy = copy = _RecordingCopy()
    copied.train()
    assert copy.batches == 8  # 2 epochs of 4 steps; the 2 evaluations and the final one copy nothing
    from accelerate import skip_first_batches

    assert plain.get_train_dataloader().device is not None  # Accelerate moves the batches itself
    loader = copied.get_train_dataloader()
    assert loader.device is None and skip_first_batches(loader, 2).device is None  # resume keeps it so
    for a, b in zip(plain.population.state_dict().values(), copied.population.state_dict().values()):
        assert torch.equal(a, b)

    resumed = make_trainer(output_dir=tmp_path / "copied", **kwargs)
    resumed._batch_copy = copy = _RecordingCopy()
    resumed.train(resume_from_checkpoint=str(tmp_path / "copied" / "checkpoint-6"))
    assert copy.batches == 2  # steps 7 and 8
    for a, b in zip(plain.population.state_dict().values(), resumed.population.state_dict().values()):
        assert torch.equal(a, b)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_side_stream_copy_is_complete_before_the_step_reads_it():
    """A large pinned batch copied on the side stream, read at once by a kernel on the training
    stream: the values are the batch's (the training stream waited for the copy)."""
    from hf_graft.data.transfer import SideStreamCopy

    device = torch.device("cuda", torch.cuda.current_device())
    batch = {"pixel_values": torch.randn(256, 2, 3, 224, 224).pin_memory(),
             "labels": [torch.arange(256).pin_memory()]}
    expected = batch["pixel_values"].double().sum().item()
    copy = SideStreamCopy(device)
    for _ in range(3):
        out = copy(batch)
        assert out["pixel_values"].device == device and out["labels"][0].device == device
        assert out["pixel_values"].double().sum().item() == pytest.approx(expected, rel=1e-12)
        assert torch.equal(out["labels"][0].cpu(), batch["labels"][0])


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_training_through_the_side_stream_copy_matches_accelerates_copy(make_trainer, tmp_path):
    runs = {}
    for pinned in (True, False):
        trainer = make_trainer(output_dir=tmp_path / str(pinned), use_cpu=False, num_train_epochs=1,
                               eval_strategy="no", dataloader_pin_memory=pinned, cudnn_benchmark=False)
        assert (trainer._batch_copy is not None) == pinned
        trainer.train()
        runs[pinned] = {k: v.float().cpu() for k, v in trainer.population.state_dict().items()}
    for name, value in runs[True].items():
        # the same batches and steps; cuDNN's own nondeterminism leaves float-rounding differences
        torch.testing.assert_close(value, runs[False][name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("dynamic", [False, None])
def test_a_compiled_fused_run_with_data_on_the_device_traces_one_graph_per_batch_size(tmp_path, digits_small,
                                                                                      single_thread, monkeypatch,
                                                                                      dynamic):
    """What a CUDA-graph run (`torch_compile`) of small fused members on device-resident data compiles:
    the training forward once for the full batches and once for the epoch's last, smaller batch,
    across two epochs, a graft and two evaluations; no other recompilation. With
    `torch_compile_dynamic: false` (the default) both graphs have fixed sizes; with null, torch makes
    the second one shape-generic, and every later full batch then runs through it. (aot_eager on CPU:
    the capture without code generation.)"""
    import dataclasses

    from torch._dynamo.backends import registry
    from torch._dynamo.utils import counters

    from _tiny_run import build_trainer

    aot_eager = registry.lookup_backend("aot_eager")
    traced = []  # per graph: its batch sizes, or "shape-generic"

    def recording(gm, example_inputs):
        symbolic = any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in x.shape)) for x in example_inputs)
        traced.append("shape-generic" if symbolic else "fixed")
        return aot_eager(gm, example_inputs)

    monkeypatch.setitem(registry._COMPILER_FNS, "aot_eager", recording)
    data_args, data = digits_small
    digits_on_device = (dataclasses.replace(data_args, data_on_device=True), data)
    torch._dynamo.reset()
    counters.clear()
    trainer = build_trainer(digits_on_device, tmp_path / "run", num_train_epochs=2, max_train_samples=56,
                            member_execution="fused", torch_compile=True, torch_compile_backend="aot_eager",
                            torch_compile_dynamic=dynamic)
    trainer.train()
    assert trainer.graft_callback.grafts_done == 1
    assert len([e for e in trainer.state.log_history if "eval_ensemble_top1" in e]) == 2
    assert counters["stats"]["unique_graphs"] == 2  # batches of 16, then the epoch's last 8
    assert traced == (["fixed", "fixed"] if dynamic is False else ["fixed", "shape-generic"])
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_uint8_batches_normalised_on_the_device_train_exactly_as_float_batches(tmp_path, digits_small, single_thread):
    """`DataArguments.normalize_on_device`: the datasets give uint8 pixels, the trainer normalises every
    training and evaluation batch (and the BatchNorm recalibration after a graft) on the device; the run
    is the float run to the last bit: weights, logged losses and evaluations."""
    import dataclasses

    from _tiny_run import build_trainer

    data_args, data = digits_small
    runs = {}
    for uint8 in (False, True):
        digits = (dataclasses.replace(data_args, normalize_on_device=uint8), data)
        trainer = build_trainer(digits, tmp_path / str(uint8), num_train_epochs=2, bn_recalibration_batches=2)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["pixel_values"].dtype == (torch.uint8 if uint8 else torch.float32)
        trainer.train()
        assert trainer.graft_callback.grafts_done == 1
        logs = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]
        runs[uint8] = (trainer.population.state_dict(), logs)
    (float_state, float_logs), (uint8_state, uint8_logs) = runs[False], runs[True]
    assert len(float_logs) == 8 + 2  # a training log every step, an evaluation every epoch
    assert uint8_logs == float_logs
    assert all(torch.equal(float_state[k], uint8_state[k]) for k in float_state)


def test_uint8_batches_without_the_students_statistics_stop_with_one_line(make_trainer):
    trainer = make_trainer(num_train_epochs=1)
    trainer.population.spec.data_config = {"input_size": [3, TINY_SIZE, TINY_SIZE]}  # no mean, no std
    batch = {"pixel_values": torch.zeros(2, 2, 3, TINY_SIZE, TINY_SIZE, dtype=torch.uint8),
             "labels": torch.zeros(2, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"^pixel_values: uint8 batches are normalised with the students' mean"):
        trainer._prepare_inputs(batch)


def test_uint8_batches_of_a_population_without_a_data_config_use_the_students_own(make_trainer):
    """No data_config in the spec: the statistics are the ones timm resolves for the students (those an
    exported student records then too)."""
    from hf_graft.data.transforms import resolve_student_data_config

    trainer = make_trainer(num_train_epochs=1)
    trainer.population.spec.data_config = {}
    raw = torch.randint(0, 256, (2, 2, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    out = trainer._prepare_inputs({"pixel_values": raw, "labels": torch.zeros(2, 2, dtype=torch.long)})
    config = resolve_student_data_config(trainer.population.members[0])
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    assert torch.equal(out["pixel_values"], (raw.float() / 255 - mean) / std)
