"""GraftingTrainer end to end on a tiny real timm model and real digits: when weights change (grafts at
epoch or step boundaries, and only there), per-member learning rates and clipping, evaluation metrics,
logging, the other scion sources, and GraftingConfig validation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.utils.data import default_collate
from transformers import TrainerCallback

from hf_graft.config import GraftingConfig
from hf_graft.graft.grafting import adaptive_alpha, anchor_plan, layer_information
from hf_graft.training.optimization import member_grad_norms
from hf_graft.metrics.accuracy import population_accuracy as population_metrics  # checked by hand below

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS_PER_EPOCH = 4  # 64 training digits, batch 16


# ----------------------------------------------------------------------------- helpers
def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


class WeightRecorder(TrainerCallback):
    """The population's full state (parameters and buffers) before and after every optimizer step."""

    def __init__(self):
        self.begin: dict[int, dict] = {}  # global_step (steps done) -> state before the next step
        self.end: dict[int, dict] = {}  # global_step -> state after that step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.begin[state.global_step] = _snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.end[state.global_step] = _snapshot(model)


def _member(state: dict, k: int) -> dict[str, torch.Tensor]:
    prefix = f"members.{k}."
    return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}


def _anchor_of(state: dict) -> dict[str, str]:
    """docs/method.md §3 written out: conv/linear weights are anchors, other float entries take the
    nearest preceding anchor, integer buffers are not mixed."""
    anchors, current = {}, None
    first = next(n for n, t in state.items() if t.is_floating_point() and t.ndim >= 2)
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        if t.ndim >= 2:
            current = name
        anchors[name] = current or first
    return anchors


def _assert_states_equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys()
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert not changed, f"{where}: weights changed outside a graft: {changed[:5]}"


def _assert_graft(pre: dict, post: dict, report, num_members: int, A=0.4, c=500.0, bins=10) -> None:
    """post == the in-parallel ring graft of pre: W_k' = alpha W_k + (1 - alpha) W_{k-1}, one alpha per
    anchor (checked against the report and recomputed from the pre-graft weights)."""
    members = [_member(pre, k) for k in range(num_members)]
    anchors = _anchor_of(members[0])
    for k in range(num_members):
        j = (k - 1) % num_members
        rep = report.members[k]
        assert rep.scion == j and rep.skipped_reason is None
        grafted = _member(post, k)
        assert set(rep.alphas) == set(anchors.values())
        for anchor in set(anchors.values()):
            mine = adaptive_alpha(layer_information(members[k][anchor], bins=bins),
                                  layer_information(members[j][anchor], bins=bins), A, c)
            assert rep.alphas[anchor] == pytest.approx(float(mine), abs=1e-6)
        for name, t in members[k].items():
            if name not in anchors:  # num_batches_tracked
                assert torch.equal(grafted[name], t), name
                continue
            alpha = rep.alphas[anchors[name]]
            expected = alpha * t.double() + (1.0 - alpha) * members[j][name].double()
            torch.testing.assert_close(grafted[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def _max_change(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a if a[n].is_floating_point())


def _graft_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "graft/count" in entry]


def _eval_batch(trainer):
    ds = trainer.eval_dataset
    return default_collate([ds[i] for i in range(len(ds))])


# ----------------------------------------------------------------------------- grafting schedule
def test_two_epoch_run_grafts_once_at_the_epoch_boundary_after_eval_and_checkpoint(make_trainer, tmp_path):
    recorder = WeightRecorder()
    trainer = make_trainer(num_students=2, save_strategy="epoch", callbacks=[recorder])
    initial = _snapshot(trainer.model)
    trainer.train()
    total = 2 * STEPS_PER_EPOCH
    assert sorted(recorder.begin) == list(range(total)) and sorted(recorder.end) == list(range(1, total + 1))

    # exactly one graft, at the boundary between epoch 1 and 2
    assert len(trainer.graft_reports) == 1
    _assert_states_equal(initial, recorder.begin[0], "before the first step")
    for t in range(1, total):
        if t != STEPS_PER_EPOCH:
            _assert_states_equal(recorder.end[t], recorder.begin[t], f"between steps {t} and {t + 1}")
    pre, post = recorder.end[STEPS_PER_EPOCH], recorder.begin[STEPS_PER_EPOCH]
    assert _max_change(pre, post) > 1e-2  # the graft really moved the weights
    _assert_graft(pre, post, trainer.graft_reports[0], num_members=2)
    # K = 2: both members are the same network right after the graft (docs/method.md §5)
    m0, m1 = _member(post, 0), _member(post, 1)
    for name in m0:
        torch.testing.assert_close(m0[name], m1[name], rtol=1e-5, atol=1e-6)
    # no graft after the last epoch
    _assert_states_equal(recorder.end[total], _snapshot(trainer.model), "after the last epoch")

    # logged through the Trainer: one graft entry, after epoch 1's evaluation, with the report's numbers
    history = trainer.state.log_history
    (graft_log,) = _graft_logs(trainer)
    assert graft_log["step"] == STEPS_PER_EPOCH and graft_log["epoch"] == pytest.approx(1.0)
    for member in trainer.graft_reports[0].members:
        alphas = list(member.alphas.values())
        key = f"graft/member{member.index}"
        assert graft_log[f"{key}_alpha_mean"] == pytest.approx(sum(alphas) / len(alphas))
        assert graft_log[f"{key}_alpha_min"] == pytest.approx(min(alphas))
        assert graft_log[f"{key}_alpha_max"] == pytest.approx(max(alphas))
        assert graft_log[f"{key}_information"] == pytest.approx(sum(member.information.values()))
        assert 0.3 - 1e-6 <= min(alphas) and max(alphas) <= 0.7 + 1e-6  # (0.5 - A/2, 0.5 + A/2)
    evals = [e for e in history if "eval_member0_top1" in e]
    assert [e["epoch"] for e in evals] == pytest.approx([1.0, 2.0])
    assert history.index(evals[0]) < history.index(graft_log) < history.index(evals[1])

    # epoch 1 was evaluated and saved with the pre-graft weights
    population = copy.deepcopy(trainer.model).eval()
    population.load_state_dict(pre)
    batch = _eval_batch(trainer)
    with torch.no_grad():
        expected = population_metrics(population(pixel_values=batch["pixel_values"])["logits"], batch["labels"])
    for k in range(2):
        assert evals[0][f"eval_member{k}_top1"] == pytest.approx(expected[f"member{k}_top1"])
    saved = load_file(str(Path(trainer.args.output_dir) / f"checkpoint-{STEPS_PER_EPOCH}" / "model.safetensors"))
    assert saved.keys() == pre.keys()
    assert all(torch.equal(saved[n], pre[n]) for n in pre)


def test_graft_every_steps_rings_three_members(make_trainer):
    recorder = WeightRecorder()
    trainer = make_trainer(num_students=3, graft_every_steps=3, eval_strategy="no", callbacks=[recorder])
    trainer.train()
    total = 2 * STEPS_PER_EPOCH
    graft_points = [3, 6]  # before steps 4 and 7; not at the epoch boundary (4), not after the end
    assert len(trainer.graft_reports) == len(graft_points)
    assert [e["step"] for e in _graft_logs(trainer)] == graft_points
    for t in range(1, total):
        if t not in graft_points:
            _assert_states_equal(recorder.end[t], recorder.begin[t], f"between steps {t} and {t + 1}")
    for report, t in zip(trainer.graft_reports, graft_points):
        _assert_graft(recorder.end[t], recorder.begin[t], report, num_members=3)
        post = recorder.begin[t]
        # K = 3: the ring keeps the members distinct
        assert _max_change(_member(post, 0), _member(post, 1)) > 1e-3
        assert _max_change(_member(post, 1), _member(post, 2)) > 1e-3
    _assert_states_equal(recorder.end[total], _snapshot(trainer.model), "after the last step")


@pytest.mark.parametrize("source", ["none", "noise", "internal"])
def test_other_graft_sources(make_trainer, source):
    recorder = WeightRecorder()
    trainer = make_trainer(num_students=2, graft_source=source, eval_strategy="no", max_train_samples=32,
                           graft_noise_a=0.05, graft_noise_first_t=1, graft_invalid_threshold=1e9, callbacks=[recorder])
    trainer.train()
    boundary, total = 2, 4
    for t in range(1, total):
        if t != boundary or source == "none":
            _assert_states_equal(recorder.end[t], recorder.begin[t], f"{source}: between steps {t} and {t + 1}")
    assert trainer.graft_reports == []  # only the external source writes alpha reports
    logs = _graft_logs(trainer)
    if source == "none":
        assert logs == [] and not any(k.startswith("graft/") for e in trainer.state.log_history for k in e)
        return
    assert len(logs) == 1 and logs[0]["step"] == boundary
    pre, post = recorder.end[boundary], recorder.begin[boundary]
    diffs = []
    for k in range(2):
        before, after = _member(pre, k), _member(post, k)
        convs = [n for n, t in before.items() if t.is_floating_point() and t.ndim == 4]
        # threshold 1e9: every filter is invalid, so every conv filter is grafted
        assert logs[0][f"graft/member{k}_filters_grafted"] == sum(before[n].shape[0] for n in convs)
        for name in before:
            if name not in convs:
                assert torch.equal(before[name], after[name]), f"{source} changed {name}"
        if source == "noise":  # N(0, a**t) on every filter, t = 1 after the first epoch with graft_noise_first_t=1
            delta = torch.cat([(after[n] - before[n]).flatten() for n in convs])
            assert float(delta.std()) == pytest.approx(0.05, rel=0.02)
            assert abs(float(delta.mean())) < 1e-3
            diffs.append(delta)
        else:  # the i-th largest filter (l1) is added into the i-th smallest, from pre-graft values
            for name in convs:
                w = before[name].flatten(1)
                ascending = torch.argsort(w.abs().sum(1))
                expected = w.clone()
                expected[ascending] += w[ascending.flip(0)]
                torch.testing.assert_close(after[name].flatten(1), expected)
    if source == "noise":
        assert not torch.equal(diffs[0], diffs[1])  # every member draws its own noise


# ----------------------------------------------------------------------------- per-member learning rates
class OptimizerProbe(TrainerCallback):
    """Each member's classifier weight, its gradient and the learning rates around optimizer.step()."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        fcs = [m.fc.weight for m in model.members]
        self.steps.append({"before": [p.detach().clone() for p in fcs], "grad": [p.grad.clone() for p in fcs],
                           "grad_norms": [torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item()
                                          for m in model.members]})

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps[-1]["after"] = [m.fc.weight.detach().clone() for m in model.members]
        self.steps[-1]["lrs"] = [(g["member"], g["lr"]) for g in optimizer.param_groups]


def test_cosine_lr_spread_gives_each_member_its_own_rate_through_the_schedule(make_trainer):
    probe = OptimizerProbe()
    trainer = make_trainer(num_students=2, lr_spread=["cosine"], learning_rate=0.1, weight_decay=0.0,
                           optim_args="momentum=0.0", eval_strategy="no", max_train_samples=32, callbacks=[probe])
    assert trainer.args.lr_multipliers == [0.5, 1.0]  # (1 + cos(pi (K - i) / K)) / 2, K = 2
    trainer.train()
    total = 4
    assert len(probe.steps) == total
    history = [e for e in trainer.state.log_history if "member0_learning_rate" in e]
    for t, step in enumerate(probe.steps):
        schedule = 0.5 * (1 + math.cos(math.pi * t / total))  # cosine, no warm-up
        for k, mult in enumerate([0.5, 1.0]):
            lr = 0.1 * mult * schedule
            assert [g_lr for member, g_lr in step["lrs"] if member == k] == pytest.approx([lr, lr])
            # plain SGD: the update is -lr_k * grad, so the rate really is applied to member k
            torch.testing.assert_close(step["after"][k] - step["before"][k], -lr * step["grad"][k],
                                       rtol=1e-4, atol=1e-7)
            # logged: the rate this step used, as the Trainer's own learning_rate
            assert history[t][f"member{k}_learning_rate"] == pytest.approx(lr)
        assert history[t]["learning_rate"] == pytest.approx(history[t]["member0_learning_rate"])
        assert history[t]["member0_ce"] > 0 and history[t]["member1_ce"] > 0


def test_lr_spread_list_and_cosine_multipliers(make_trainer):
    for K, expected in [(2, [0.5, 1.0]), (3, [0.25, 0.75, 1.0]), (4, [(1 - 2**-0.5) / 2, 0.5, (1 + 2**-0.5) / 2, 1.0])]:
        config = GraftingConfig(output_dir="unused", num_students=K, lr_spread=["cosine"], use_cpu=True)
        assert config.lr_multipliers == pytest.approx(expected)
    assert GraftingConfig(output_dir="unused", num_students=3, use_cpu=True).lr_multipliers == [1.0, 1.0, 1.0]
    assert GraftingConfig(output_dir="unused", lr_spread="0.5, 2", use_cpu=True).lr_multipliers == [0.5, 2.0]
    trainer = make_trainer(num_students=2, lr_spread=["0.25", "2"], learning_rate=0.2, eval_strategy="no")
    optimizer = trainer.create_optimizer()
    by_member = {}
    for group in optimizer.param_groups:
        by_member.setdefault(group["member"], set()).add(group["lr"])
        for p in group["params"]:  # every group holds only its member's parameters
            assert any(p is q for q in trainer.model.members[group["member"]].parameters())
    assert by_member == {0: {0.05}, 1: {0.4}}
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len(list(trainer.model.parameters()))


# ----------------------------------------------------------------------------- per-member clipping
def test_each_member_is_clipped_on_its_own(make_trainer):
    trainer = make_trainer(num_students=2, max_grad_norm=1.0, eval_strategy="no")
    trainer.create_optimizer()
    members = trainer.model.members
    generator = torch.Generator().manual_seed(0)
    for member, target in zip(members, (0.5, 1000.0)):
        grads = [torch.randn(p.shape, generator=generator) for p in member.parameters()]
        scale = target / torch.cat([g.flatten() for g in grads]).norm()
        for p, g in zip(member.parameters(), grads):
            p.grad = g * scale
    small_before = [p.grad.clone() for p in members[0].parameters()]
    total = trainer._clip_grad_norm(trainer.model)
    # the quiet member is untouched (a global clip would have scaled it by ~1/1000) ...
    assert all(torch.equal(p.grad, g) for p, g in zip(members[0].parameters(), small_before))
    # ... and the loud one is clipped to max_grad_norm
    assert torch.cat([p.grad.flatten() for p in members[1].parameters()]).norm().item() == pytest.approx(1.0, rel=1e-4)
    assert trainer.member_logs.grad_norms.tolist() == pytest.approx([0.5, 1000.0], rel=1e-4)
    assert float(total) == pytest.approx(math.hypot(0.5, 1000.0), rel=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_member_grad_norms_equal_torch_clip_grad_norm_per_member(device):
    """The per-member norms and clipping in a few operations give torch's own per-member results, to the
    last bit: the logged norms and the clipped gradients do not depend on which computes them."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (16,), (10, 16), (10,)]

    def members():
        scales = (0.01, 50.0, 2.0)
        made = [[nn.Parameter(torch.zeros(s, device=device)) for s in shapes] for _ in scales]
        for params, scale in zip(made, scales):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=generator) * scale).to(device)
        made[2][1].grad = None  # a parameter without a gradient is skipped, as torch skips it
        return made

    for max_norm in (None, 1.5):
        ours = members()
        theirs = [[nn.Parameter(p.detach().clone()) for p in params] for params in ours]
        for mine, other in zip(ours, theirs):
            for p, q in zip(mine, other):
                q.grad = None if p.grad is None else p.grad.clone()
        norms = member_grad_norms(ours, device, max_norm=max_norm)
        if max_norm is None:
            expected = [torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None]) for params in theirs]
        else:
            expected = [torch.nn.utils.clip_grad_norm_(params, max_norm) for params in theirs]
        assert torch.equal(norms, torch.stack(expected))
        assert norms.shape == (3,) and float(norms[0]) < 1.5 < float(norms[1])
        for mine, other in zip(ours, theirs):
            for p, q in zip(mine, other):
                assert (p.grad is None) == (q.grad is None)
                assert p.grad is None or torch.equal(p.grad, q.grad)
    empty = member_grad_norms([[nn.Parameter(torch.ones(2, device=device))]], device, max_norm=1.0)
    assert empty.tolist() == [0.0]  # no gradients (a diverged member's are dropped): norm 0, nothing scaled


def test_clipping_during_training_bounds_every_member_separately(make_trainer):
    probe = OptimizerProbe()
    trainer = make_trainer(num_students=2, max_grad_norm=0.5, eval_strategy="no", max_train_samples=32,
                           num_train_epochs=1, callbacks=[probe])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "member0_grad_norm" in e]
    assert len(logs) == len(probe.steps) == 2
    for log, step in zip(logs, probe.steps):
        for k in range(2):
            pre_clip = log[f"member{k}_grad_norm"]
            assert step["grad_norms"][k] == pytest.approx(min(pre_clip, 0.5), rel=1e-3)


# ----------------------------------------------------------------------------- evaluation metrics
def test_population_metrics_against_hand_computed_values():
    # 4 examples, 2 members, 6 classes; labels 0, 1, 2, 3
    member0 = [[5, 0, 0, 0, 0, 0], [0, 5, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0], [5, 4, 3, -9, 2, 1]]
    member1 = [[5, 0, 0, 0, 0, 0], [3, 2, 1, 0, -1, -2], [5, 4, -9, 3, 2, 1], [5, 4, 0, 3, -1, -2]]
    logits = torch.tensor([member0, member1], dtype=torch.float32).transpose(0, 1)  # [N, K, C]
    labels = torch.tensor([0, 1, 2, 3])
    m = population_metrics(logits, labels)
    # member 0: right on 3 of 4; the 4th label is its last choice (outside the top 5 of 6)
    assert (m["member0_top1"], m["member0_top5"]) == (75.0, 75.0)
    # member 1: right on 1 of 4; example 2's label is its last choice
    assert (m["member1_top1"], m["member1_top5"]) == (25.0, 75.0)
    # ensemble (mean softmax): examples 0-2 right, example 3 wrong but its label is not the least likely
    assert (m["ensemble_top1"], m["ensemble_top5"]) == (75.0, 100.0)
    assert m["selected_member"] == 0 and m["top1"] == 75.0 and m["top5"] == 75.0
    fixed = population_metrics(logits, labels, select_student="1")
    assert fixed["selected_member"] == 1 and fixed["top1"] == 25.0
    assert population_metrics(logits, labels[:, None].expand(4, 2)) == m  # per-member labels [N, K]


def _topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return 100.0 * float(np.mean([label in row for row, label in zip(top, labels)]))


def test_evaluate_reports_members_ensemble_and_selected(make_trainer):
    trainer = make_trainer(num_students=2, num_train_epochs=1, eval_strategy="no")
    trainer.train()
    metrics = trainer.evaluate()
    prediction = trainer.predict(trainer.eval_dataset)
    logits, labels = prediction.predictions, prediction.label_ids
    assert logits.shape == (64, 2, 10) and labels.shape == (64,)
    # the predictions are the members' own logits on the eval images
    batch = _eval_batch(trainer)
    with torch.no_grad():
        direct = torch.stack([m.eval()(batch["pixel_values"]) for m in trainer.model.members], dim=1)
    np.testing.assert_allclose(logits, direct.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(labels, batch["labels"].numpy())

    top1 = [_topk(logits[:, k], labels, 1) for k in range(2)]
    for k in range(2):
        assert metrics[f"eval_member{k}_top1"] == pytest.approx(top1[k])
        assert metrics[f"eval_member{k}_top5"] == pytest.approx(_topk(logits[:, k], labels, 5))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert metrics["eval_ensemble_top1"] == pytest.approx(_topk(probs.mean(1), labels, 1))
    selected = int(np.argmax(top1))
    assert metrics["eval_selected_member"] == selected
    assert metrics["eval_top1"] == pytest.approx(top1[selected])


def test_metric_for_best_model_on_the_ensemble(make_trainer):
    trainer = make_trainer(num_students=2, num_train_epochs=3, save_strategy="epoch", max_train_samples=32,
                           metric_for_best_model="eval_ensemble_top1", load_best_model_at_end=True, save_total_limit=None)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_ensemble_top1" in e]
    assert len(evals) == 3
    scores = [e["eval_ensemble_top1"] for e in evals]
    best = int(np.argmax(scores))  # the first of equal scores stays best
    assert trainer.args.greater_is_better is True
    assert trainer.state.best_metric == pytest.approx(scores[best])
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{evals[best]['step']}"
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    current = trainer.model.state_dict()
    assert all(torch.equal(saved[n], current[n]) for n in saved)  # the best population was loaded back


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"graft_source": "neighbours"}, "graft_source"),
        ({"num_students": 0}, "num_students"),
        ({"num_students": 1}, "num_students"),  # external grafting needs two members
        ({"num_students": 2, "lr_spread": ["0.5", "1", "2"]}, "lr_spread"),
        ({"num_students": 2, "lr_spread": ["0.5", "-1"]}, "lr_spread"),
        ({"num_students": 2, "lr_spread": ["fast"]}, "lr_spread"),
        ({"num_students": 2, "select_student": "2"}, "select_student"),
        ({"num_students": 2, "select_student": "worst"}, "select_student"),
        ({"kd_temperature": 0.0}, "kd_temperature"),
        ({"kd_temperature": -1.0}, "kd_temperature"),
        ({"data_order": "random"}, "data_order"),
        ({"graft_criterion": "l2"}, "graft_criterion"),
        ({"graft_every_steps": 0}, "graft_every_steps"),
    ],
)
def test_grafting_config_rejects_nonsense_with_one_line(kwargs, field):
    with pytest.raises(ValueError) as err:
        GraftingConfig(output_dir="unused", use_cpu=True, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"GraftingConfig.{field}:"), message


# ----------------------------------------------------------------------------- graft events
class GraftEventRecorder(TrainerCallback):
    """Copies of the population right before and right after every graft, as a user callback sees them."""

    def __init__(self):
        self.events = []

    def on_graft_begin(self, args, state, control, *, model, graft_index, **kwargs):
        self.events.append({"index": graft_index, "step": state.global_step,
                            "before": {n: t.detach().clone() for n, t in model.state_dict().items()}})

    def on_graft_end(self, args, state, control, *, model, graft_index, report=None, **kwargs):
        assert self.events[-1]["index"] == graft_index
        self.events[-1].update(report=report, after={n: t.detach().clone() for n, t in model.state_dict().items()})


@pytest.mark.parametrize("recalibration", [0, 2])
def test_graft_events_see_the_weights_before_and_after_each_graft(make_trainer, recalibration):
    recorder = GraftEventRecorder()
    trainer = make_trainer(num_students=2, num_train_epochs=3, eval_strategy="no", max_train_samples=32,
                           bn_recalibration_batches=recalibration, callbacks=[recorder])
    trainer.train()
    assert [(e["index"], e["step"]) for e in recorder.events] == [(0, 2), (1, 4)]  # 2 steps an epoch
    for event, report in zip(recorder.events, trainer.graft_reports):
        assert event["report"] is report
        before, after = event["before"], event["after"]
        alphas = report.members[0].alphas  # member 0 takes member 1 (K = 2)
        own = {n[len("members.0."):]: t for n, t in before.items() if n.startswith("members.0.")}
        mixed, statistics = 0, []
        for name, anchor in anchor_plan(own):
            w0, w1, alpha = before[f"members.0.{name}"], before[f"members.1.{name}"], alphas[anchor]
            expected = alpha * w0 + (1 - alpha) * w1
            if name.endswith(("running_mean", "running_var")):
                statistics.append(torch.allclose(after[f"members.0.{name}"], expected, atol=1e-6))
            else:
                torch.testing.assert_close(after[f"members.0.{name}"], expected)
                mixed += 1
        assert mixed > 40 and statistics
        # without recalibration the statistics are mixed like the weights; with it, re-estimated from data
        assert all(statistics) if not recalibration else not any(statistics)


# ----------------------------------------------------------------------------- the end of a run
class EvaluationCounter(TrainerCallback):
    """The global step of every evaluation, and how many filter reports existed at each."""

    def __init__(self, reports: list):
        self.steps, self.reports_at, self._reports = [], [], reports

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        self.reports_at.append(len(self._reports))


@pytest.mark.parametrize("eval_strategy", ["epoch", "no"])
def test_the_end_of_a_run_evaluates_selects_and_measures_once(make_trainer, tmp_path, monkeypatch, caplog,
                                                              eval_strategy):
    """With eval_strategy epoch the last epoch's evaluation is the run's final one (2 evaluations for
    2 epochs); without, the run evaluates once at the end. The member is selected once, and the filter
    statistics of the results are the final evaluation's. The student, all_results.json and the
    closing summary (the `hf_graft.training.trainer` logger) come out of `train()` itself."""
    import json
    import logging

    import timm

    import hf_graft.graft.filters
    import hf_graft.run.results as results_module


    reports, selections = [], []
    original_report, original_select = hf_graft.graft.filters.filter_report, results_module.select_member

    def counting_report(*args, **kwargs):
        reports.append(1)
        return original_report(*args, **kwargs)

    def counting_select(*args, **kwargs):
        selections.append(1)
        return original_select(*args, **kwargs)

    monkeypatch.setattr(hf_graft.graft.filters, "filter_report", counting_report)
    monkeypatch.setattr(results_module, "select_member", counting_select)
    counter = EvaluationCounter(reports)
    out = tmp_path / "run"
    trainer = make_trainer(num_students=2, eval_strategy=eval_strategy, export_student=True, output_dir=str(out),
                           callbacks=[counter], graft_source="none")
    caplog.set_level(logging.INFO)
    trainer.train()

    total = 2 * STEPS_PER_EPOCH
    assert counter.steps == ([STEPS_PER_EPOCH, total] if eval_strategy == "epoch" else [total])
    assert counter.reports_at[-1] == len(reports)  # no filter statistics computed after the last evaluation
    assert len(selections) == 1
    evals = [e for e in trainer.state.log_history if "eval_runtime" in e]
    assert len(evals) == len(counter.steps)
    final = evals[-1]
    results = trainer.results
    top1 = [final["eval_member0_top1"], final["eval_member1_top1"]]
    assert results["selected_member"] == int(np.argmax(top1)) == final["eval_selected_member"]
    assert results["eval_ensemble_top1"] == final["eval_ensemble_top1"]
    for k in range(2):
        assert results["filters"][f"member{k}"] == {"invalid_ratio@0.01": final[f"eval_member{k}_invalid_ratio@0.01"],
                                                    "invalid_ratio@0.1": final[f"eval_member{k}_invalid_ratio@0.1"],
                                                    "total_entropy": final[f"eval_member{k}_total_entropy"]}
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["selected_member"] == results["selected_member"] and saved["student_dir"] == str(out / "student")
    assert saved["wall_time_s"] > 0 and saved["eval_member1_top1"] == top1[1]

    # the student folder is the selected member, loadable by timm
    student = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True).eval()
    member = trainer.population.members[results["selected_member"]].eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x), member(x), rtol=1e-5, atol=1e-5)

    # the run ends with a summary, and nothing about temporary folders
    closing = [r.getMessage() for r in caplog.records if r.name == "hf_graft.training.trainer"]
    selected = results["selected_member"]
    assert closing[0] == f"student: member {selected}, written to {out / 'student'}"
    assert closing[1].startswith(f"selected because member {selected} has the highest eval top1")
    assert closing[2].startswith("eval top-1 (%): member 0 ") and "ensemble" in closing[2]
    assert closing[3].startswith("wall time: ")
    assert not [r for r in caplog.records if ".tmp-" in r.getMessage() or "tmp-checkpoint" in r.getMessage()]


def test_push_to_hub_uploads_only_the_student(make_trainer, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi, RepoUrl

    uploads = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # else refused before training
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    out = tmp_path / "run"
    trainer = make_trainer(num_students=2, num_train_epochs=1, max_train_samples=32, output_dir=str(out),
                           save_strategy="epoch", push_to_hub=True, hub_model_id="someone/grafted")
    assert trainer.args.push_to_hub is True  # the config as given; the Trainer's own pushes are the student's
    trainer.train()
    assert trainer.student_dir is None and not (out / "student").exists()  # export_student is off here
    url = trainer.push_to_hub()
    assert url == "https://huggingface.co/someone/grafted"
    (upload,) = uploads
    assert Path(upload["folder_path"]) == out / "student" and upload["repo_id"] == "someone/grafted"
    assert sorted(upload["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]
    assert "hf-hub:someone/grafted" in (out / "student" / "README.md").read_text()  # the card names the repo
