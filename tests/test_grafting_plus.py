"""Grafting+ (docs/method.md §9): a teacher trained and exported inside the test, then a population of students
distilled from it. Teachers stay frozen, outside the optimizer and the checkpoints; each student gets
the teacher's outputs for its own batch; per-member CE and KD are logged; bad teachers fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_graft.config import GraftingConfig
from hf_graft.export.student_folder import save_student
from hf_graft.population.sources import load_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

TAU = 2.0


def _export(member, folder: Path, label_names, data_config) -> Path:
    return save_student(member.eval(), folder, architecture="cifar_resnet20", label_names=label_names,
                        data_config=data_config, verify=False)


@pytest.fixture
def teacher_dir(make_trainer, tmp_path):
    """A baseline (K = 1, no grafting) trained for one epoch on the digits and exported as a student folder."""
    trainer = make_trainer(num_students=1, graft_source="none", num_train_epochs=1, eval_strategy="no",
                           output_dir=str(tmp_path / "teacher_run"))
    trainer.train()
    spec = trainer.model.spec
    return _export(trainer.model.members[0], tmp_path / "teacher", spec.label_names, spec.data_config)


class TeacherProbe:
    """Forward hook: what the teacher was run on, and in which mode."""

    def __init__(self, teacher):
        self.calls = []
        teacher.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls.append({"shape": tuple(inputs[0].shape), "training": module.training,
                           "grad": torch.is_grad_enabled()})


def _kd_reference(student_logits, teacher_logits, tau=TAU):
    pbar = torch.softmax(teacher_logits.float() / tau, dim=-1)
    return tau**2 * -(pbar * F.log_softmax(student_logits.float() / tau, dim=-1)).sum(-1).mean()


def test_grafting_plus_with_a_teacher_trained_in_the_test(make_trainer, teacher_dir, tmp_path):
    exported = load_file(str(teacher_dir / "model.safetensors"))
    trainer = make_trainer(num_students=2, teacher_models=[str(teacher_dir)], kd_temperature=TAU, ce_weight=0.5,
                           kd_weight=2.0, save_strategy="epoch", output_dir=str(tmp_path / "students"))
    assert len(trainer.teachers) == 1
    teacher = trainer.teachers[0]
    before = {n: t.clone() for n, t in teacher.state_dict().items()}
    assert before.keys() == exported.keys() and all(torch.equal(before[n], exported[n]) for n in exported)
    probe = TeacherProbe(teacher)
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 8 and len(trainer.graft_reports) == 1  # grafting among the students still happens

    # frozen: bit-identical weights (BatchNorm statistics included), no gradients, eval mode throughout
    after = teacher.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # independent data order: one teacher pass per step over the K members' own batches (B * K images)
    assert len(probe.calls) == steps
    assert all(c["shape"] == (16 * 2, 3, 16, 16) and not c["training"] and not c["grad"] for c in probe.calls)

    # not trained: outside the optimizer and outside the population module
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in trainer.model.parameters()}
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in trainer.model.parameters()}

    # not in the checkpoints: only the members' tensors
    population_keys = set(trainer.model.state_dict())
    for checkpoint in sorted(Path(trainer.args.output_dir).glob("checkpoint-*")):
        weights = [f for f in checkpoint.rglob("*.safetensors")]
        assert [f.name for f in weights] == ["model.safetensors"]
        assert set(load_file(str(weights[0]))) == population_keys
        assert all(key.startswith("members.") for key in population_keys)

    # per-member CE and KD terms in the logs, and the loss they make up
    logs = [e for e in trainer.state.log_history if "loss" in e and "member0_kd" in e]
    assert len(logs) == steps
    for entry in logs:
        for k in range(2):
            assert entry[f"member{k}_ce"] > 0 and entry[f"member{k}_kd"] > 0
        total = sum(0.5 * entry[f"member{k}_ce"] + 2.0 * entry[f"member{k}_kd"] for k in range(2))
        assert entry["loss"] == pytest.approx(total, abs=1e-4)

    # each student is distilled on its own batch: teacher outputs [M, B, K, C], teacher(x_k) for member k
    batch = next(iter(trainer.get_train_dataloader()))
    pixels, labels = batch["pixel_values"], batch["labels"]
    assert pixels.shape[:2] == (16, 2) and not torch.equal(labels[:, 0], labels[:, 1])
    teacher_logits = trainer.teachers.logits(pixels)
    assert teacher_logits.shape == (1, 16, 2, 10)
    with torch.no_grad():
        for k in range(2):
            torch.testing.assert_close(teacher_logits[0, :, k], teacher(pixels[:, k]), rtol=1e-4, atol=1e-5)
    shared = trainer.teachers.logits(pixels[:, 0])
    assert shared.shape == (1, 16, 10)
    # and the training loss is sum_k ce_weight * CE_k + kd_weight * KD_k with the teacher on x_k
    model = trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        expected = 0.0
        for k, member in enumerate(model.members):
            z = member(pixels[:, k])
            expected += 0.5 * F.cross_entropy(z, labels[:, k]) + 2.0 * _kd_reference(z, teacher(pixels[:, k]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_shared_order_runs_the_teachers_once_per_step_for_all_students(make_trainer, teacher_dir):
    trainer = make_trainer(num_students=2, data_order="shared", teacher_models=[str(teacher_dir), str(teacher_dir)],
                           eval_strategy="no", num_train_epochs=1, max_train_samples=32)
    assert len(trainer.teachers) == 2
    probes = [TeacherProbe(t) for t in trainer.teachers]
    trainer.train()
    for probe in probes:  # each teacher: one pass of the shared batch per step
        assert [c["shape"] for c in probe.calls] == [(16, 3, 16, 16)] * trainer.state.global_step
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].shape == (16, 3, 16, 16)
    assert trainer.teachers.logits(batch["pixel_values"]).shape == (2, 16, 10)


def test_bad_teachers_fail_early_with_one_line(make_trainer, teacher_dir, tmp_path, digits_small):
    import timm

    import hf_graft  # noqa: F401

    def one_line(err, *words):
        message = str(err.value)
        assert "\n" not in message, message
        for word in words:
            assert word in message, message

    # a teacher with another number of classes than the students
    _, data = digits_small
    five = timm.create_model("cifar_resnet20", num_classes=5)
    five_dir = _export(five, tmp_path / "five_classes", [str(i) for i in range(5)],
                       {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
                        "crop_pct": 1.0, "crop_mode": "center"})
    with pytest.raises(ValueError) as err:
        make_trainer(num_students=2, teacher_models=[str(five_dir)])
    one_line(err, "GraftingConfig.teacher_models", "5 classes", "10")

    # a name neither timm nor the disk knows
    from hf_graft.training.builder import check_run_inputs

    with pytest.raises(ValueError) as err:  # checked when a run is built, before any data is loaded
        check_run_inputs(GraftingConfig(output_dir=str(tmp_path), use_cpu=True, teacher_models=["no_such_network_xyz"]))
    one_line(err, "GraftingConfig.teacher_models", "no_such_network_xyz")
    with pytest.raises(ValueError) as err:
        load_teacher("no_such_network_xyz")
    one_line(err, "GraftingConfig.teacher_models", "no_such_network_xyz")
    # a folder that is not an exported model, and a whole training checkpoint
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ValueError) as err:
        load_teacher(str(tmp_path / "not_a_model"))
    one_line(err, "GraftingConfig.teacher_models", "config.json")
    run = make_trainer(num_students=2, graft_source="none", max_steps=1, eval_strategy="no",
                       output_dir=str(tmp_path / "population"), save_strategy="steps", save_steps=1)
    run.train()
    with pytest.raises(ValueError) as err:
        load_teacher(str(tmp_path / "population" / "checkpoint-1"))
    one_line(err, "GraftingConfig.teacher_models", "checkpoint")

    # a temperature that is not positive
    for tau in (0.0, -2.0):
        with pytest.raises(ValueError) as err:
            GraftingConfig(output_dir=str(tmp_path), use_cpu=True, teacher_models=[str(teacher_dir)], kd_temperature=tau)
        one_line(err, "GraftingConfig.kd_temperature")

    # the exported teacher itself loads, frozen and in eval mode
    teacher = load_teacher(str(teacher_dir))
    assert teacher.num_classes == data.num_classes and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
