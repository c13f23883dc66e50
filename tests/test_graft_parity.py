"""The graft as the authors' code does it, as options (docs/method.md §2-§4, §8 and the closing table).

Every reference here is written from the description of the authors' procedure, as a plain loop,
without calling hf_graft's helpers:
- the authors' histogram: `bins` half-open bins [lo + i s, lo + (i + 1) s), s = (max - min) / bins,
  edges computed in float32, share = count / numel;
- the authors' key rule: walk the state dict in order, compute alpha (rounded to 2 decimals) at every
  entry whose key contains "conv", mix every floating entry with the latest alpha;
- the authors' filter level: per channel |g_self| / (|g_self| + |g_other|) from the BatchNorm after a conv;
- the authors' internal scions: filters in ascending l1 order, the i-th smallest (while invalid)
  receives the i-th largest, one after the other, in place.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from transformers import TrainerCallback

import hf_graft  # noqa: F401  (registers the CIFAR models in timm)
from hf_graft.config import GraftingConfig
from hf_graft.graft.grafting import anchor_plan, bn_scale_alpha, graft_internal, graft_members, graft_noise
from hf_graft.graft.information import batched_entropy, layer_information
from _members import make_members, snapshot


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py



# ----------------------------------------------------------------------------- the authors' rule, written out
def authors_entropy(w: torch.Tensor, bins: int = 10) -> float:
    x = w.detach().float().reshape(-1)
    lo = x.min()
    step = (x.max() - lo) / bins
    h = 0.0
    for i in range(bins):
        count = int(((x >= lo + i * step) & (x < lo + (i + 1) * step)).sum())
        if count:
            p = count / x.numel()
            h -= p * math.log(p)
    return h


def authors_alpha(own: torch.Tensor, scion: torch.Tensor, A: float = 0.4, c: float = 500.0) -> float:
    return round(A / math.pi * math.atan(c * (authors_entropy(own) - authors_entropy(scion))) + 0.5, 2)


def authors_graft(pre: list[dict[str, torch.Tensor]]):
    """Per member: (new state in float64, {conv key: alpha}), ring k <- k - 1, from the pre-graft states."""
    K = len(pre)
    out = []
    for k in range(K):
        own, scion = pre[k], pre[(k - 1) % K]
        # the authors' models start with a conv; entries before the first "conv" key take its alpha
        first = next(n for n, t in own.items() if "conv" in n and t.is_floating_point())
        alpha = authors_alpha(own[first], scion[first])
        new, alphas = {}, {}
        for name, w in own.items():
            if not w.is_floating_point():  # integer counters are not mixed
                new[name] = w.clone()
                continue
            if "conv" in name:
                alpha = authors_alpha(w, scion[name])
                alphas[name] = alpha
            new[name] = alpha * w.double() + (1 - alpha) * scion[name].double()
        out.append((new, alphas))
    return out


def assert_states_match(members, expected, atol=1e-6):
    for k, m in enumerate(members):
        state = m.state_dict()
        for name, want in expected[k][0].items():
            if want.is_floating_point():
                err = (state[name].double() - want).abs().max().item() if want.numel() else 0.0
                assert err <= atol, (k, name, err)
            else:
                assert torch.equal(state[name], want), (k, name)


AUTHORS = dict(anchor="authors", alpha_decimals=2, include_max=False)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("model", ["cifar_resnet20", "cifar_resnet56", "cifar_mobilenetv2"])
def test_authors_rule_matches_the_written_out_loop(model, K):
    members = make_members(model, K, seed0=7)
    pre = [snapshot(m) for m in members]
    expected = authors_graft(pre)
    report = graft_members(members, **AUTHORS)
    assert_states_match(members, expected)
    for k in range(K):
        got = report.members[k].alphas
        assert list(got) == list(expected[k][1])  # the anchors are exactly the "conv" keys, in order
        for name, alpha in expected[k][1].items():
            assert got[name] == pytest.approx(alpha, abs=1e-6), (k, name)


def test_each_authors_detail_changes_the_result():
    """The default rule, and the authors' rule without its rounding or with the max in the histogram,
    all give other weights than the written-out authors' loop: the parity test can fail."""
    members = make_members("cifar_resnet20", 3, seed0=7)
    expected = authors_graft([snapshot(m) for m in members])
    for settings in (dict(), dict(AUTHORS, anchor="nearest"), dict(AUTHORS, alpha_decimals=None),
                     dict(AUTHORS, include_max=True)):
        trial = copy.deepcopy(members)
        graft_members(trial, **settings)
        worst = max((trial[k].state_dict()[n].double() - w).abs().max().item()
                    for k in range(3) for n, w in expected[k][0].items() if w.is_floating_point())
        assert worst > 1e-4, settings


def test_authors_rule_on_keys_without_conv():
    """The rule is generic over keys: entries before the first "conv" key take its alpha, a conv bias
    whose key contains "conv" is an anchor of its own, and a network without any shortcut conv (or
    with a projection named otherwise) follows the last "conv" entry."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3)  # no "conv" in its key: takes the first conv's alpha
            self.conv_a = nn.Conv2d(6, 6, 3)  # conv_a.weight and conv_a.bias are both anchors
            self.norm = nn.BatchNorm2d(6)
            self.proj = nn.Conv2d(6, 8, 1)  # a projection named otherwise: follows conv_a.bias
            self.head = nn.Linear(8, 4)

    members = []
    for k in range(3):
        torch.manual_seed(40 + k)
        m = Net()
        m.norm.running_var.uniform_(0.5, 1.5)
        members.append(m)
    plan = dict(anchor_plan(members[0].state_dict(), "authors"))
    assert plan["stem.weight"] == "conv_a.weight" and plan["conv_a.bias"] == "conv_a.bias"
    assert plan["proj.weight"] == plan["head.weight"] == plan["norm.running_var"] == "conv_a.bias"
    assert "norm.num_batches_tracked" not in plan
    pre = [snapshot(m) for m in members]
    graft_members(members, **AUTHORS)
    assert_states_match(members, authors_graft(pre))
    with pytest.raises(ValueError, match="contains 'conv'"):
        graft_members([nn.Linear(3, 2), nn.Linear(3, 2)], anchor="authors")


def test_authors_anchor_on_cifar_resnet_shortcut_and_classifier():
    # option B: a shortcut conv whose key has no "conv" (option A, the default, has no shortcut tensor)
    state = timm.create_model("cifar_resnet20", shortcut="B").state_dict()
    authors, nearest = dict(anchor_plan(state, "authors")), dict(anchor_plan(state, "nearest"))
    assert authors["layer2.0.shortcut.0.weight"] == "layer2.0.conv2.weight"  # a shortcut conv
    assert nearest["layer2.0.shortcut.0.weight"] == "layer2.0.shortcut.0.weight"
    assert authors["fc.weight"] == authors["fc.bias"] == "layer3.2.conv2.weight"  # the classifier
    assert nearest["fc.bias"] == "fc.weight"


def test_parity_options_are_checked():
    a, b = make_members("cifar_resnet20", 2)
    with pytest.raises(ValueError, match="anchor must be one of"):
        graft_members([a, b], anchor="first")
    with pytest.raises(ValueError, match="needs level='layer'"):
        graft_members([a, b], anchor="authors", level="filter")
    with pytest.raises(ValueError, match="alpha_decimals"):
        graft_members([a, b], alpha_decimals=-1)


# ----------------------------------------------------------------------------- the histogram's maximum
def test_histogram_without_the_maximum_hand_values():
    # [0, 0, 0, 1], 2 bins [0, .5), [.5, 1): the 1 is in no bin; shares stay count / 4
    assert layer_information(torch.tensor([0.0, 0.0, 0.0, 1.0]), bins=2, include_max=False).item() == \
        pytest.approx(-0.75 * math.log(0.75), abs=1e-7)
    # three values at the maximum: only the 0 is counted
    assert layer_information(torch.tensor([0.0, 1.0, 1.0, 1.0]), bins=2, include_max=False).item() == \
        pytest.approx(-0.25 * math.log(0.25), abs=1e-7)
    # with the max counted (torch.histc): 3 and 1 in the two bins
    assert layer_information(torch.tensor([0.0, 1.0, 1.0, 1.0]), bins=2).item() == \
        pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-7)
    # a constant tensor: every bin is empty, entropy 0; NaN stays NaN
    assert layer_information(torch.full((5,), 3.0), include_max=False).item() == 0.0
    assert math.isnan(layer_information(torch.tensor([1.0, float("nan")]), include_max=False).item())
    # rows, each over its own range, as the written-out histogram
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 40, generator=g) * torch.arange(1, 8).unsqueeze(1)
    rows[2] = 0.5
    got = batched_entropy(rows, include_max=False)
    assert got.tolist() == pytest.approx([authors_entropy(r) for r in rows], abs=1e-6)


def test_histogram_top_edge_follows_the_float32_edges():
    """The top edge lo + bins * s, computed in float32, lands above the maximum in some layers: the
    authors' code counts the maximum there, and so does include_max=False."""
    above = 0
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet56")
    for w in model.state_dict().values():
        if not w.is_floating_point() or w.ndim < 2:
            continue
        x = w.reshape(-1)
        lo, hi = x.min(), x.max()
        above += bool(lo + 10 * ((hi - lo) / 10) > hi)
        assert layer_information(w, include_max=False).item() == pytest.approx(authors_entropy(w), abs=1e-6)
    assert above > 0


# ----------------------------------------------------------------------------- filter level: BatchNorm scales
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)


def test_bn_scale_hand_values():
    members = [ConvBN(), ConvBN()]
    torch.manual_seed(0)
    with torch.no_grad():
        for m, gamma in zip(members, ([1.0, -3.0, 0.0], [3.0, 1.0, 0.0])):
            m.conv.weight.normal_()
            m.bn.weight.copy_(torch.tensor(gamma))
            m.bn.bias.normal_()
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 1.5)
            m.fc.weight.normal_()
    pre = [snapshot(m) for m in members]
    report = graft_members(members, level="bn_scale")
    alpha0 = torch.tensor([0.25, 0.75, 0.5])  # |1| / (1 + 3), |-3| / (3 + 1), both 0 -> 0.5
    alphas = [alpha0, 1 - alpha0]
    for k in range(2):
        own, other = pre[k], pre[1 - k]
        state = members[k].state_dict()
        a = alphas[k]
        want = a.view(3, 1, 1, 1) * own["conv.weight"] + (1 - a.view(3, 1, 1, 1)) * other["conv.weight"]
        torch.testing.assert_close(state["conv.weight"], want, atol=1e-6, rtol=0)
        for name in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
            torch.testing.assert_close(state[name], a * own[name] + (1 - a) * other[name], atol=1e-6, rtol=0)
        assert torch.equal(state["bn.num_batches_tracked"], own["bn.num_batches_tracked"])
        # no BatchNorm after the classifier: its layer alpha from eq. 7
        fc_alpha = 0.4 / math.pi * math.atan(500 * (layer_information(own["fc.weight"]).item()
                                                    - layer_information(other["fc.weight"]).item())) + 0.5
        for name in ("fc.weight", "fc.bias"):
            torch.testing.assert_close(state[name], fc_alpha * own[name] + (1 - fc_alpha) * other[name],
                                       atol=1e-6, rtol=0)
        assert report.members[k].alphas["conv.weight"] == pytest.approx(a.mean().item(), abs=1e-7)
        assert report.members[k].alphas["fc.weight"] == pytest.approx(fc_alpha, abs=1e-5)
    assert bn_scale_alpha(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])).tolist() == [0.5, 0.5]
    assert bn_scale_alpha(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])).tolist() == [1.0, 0.0]


def test_bn_scale_on_cifar_resnet20_matches_the_written_out_rule():
    members = make_members("cifar_resnet20", 3, seed0=21, shortcut="B")  # shortcut convs with their BatchNorm
    pre = [snapshot(m) for m in members]
    # the BatchNorm after each conv, from the module order
    modules = list(members[0].named_modules())
    bn_after = {}
    for i, (name, mod) in enumerate(modules):
        if isinstance(mod, nn.Conv2d):
            bn_after[name] = next(n for n, m in modules[i + 1:] if isinstance(m, nn.BatchNorm2d))
    assert bn_after["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    graft_members(members, level="bn_scale")
    for k in range(3):
        own, other = pre[k], pre[k - 1]
        state = members[k].state_dict()
        expected = {}
        for conv, bn in bn_after.items():
            g, h = own[f"{bn}.weight"].abs(), other[f"{bn}.weight"].abs()
            a = g / (g + h)
            expected[f"{conv}.weight"] = a.view(-1, 1, 1, 1)
            for part in ("weight", "bias", "running_mean", "running_var"):
                expected[f"{bn}.{part}"] = a
        fc_alpha = 0.4 / math.pi * math.atan(500 * (layer_information(own["fc.weight"]).item()
                                                    - layer_information(other["fc.weight"]).item())) + 0.5
        expected["fc.weight"] = expected["fc.bias"] = torch.tensor(fc_alpha)
        for name, w in own.items():
            if not w.is_floating_point():
                assert torch.equal(state[name], w)
                continue
            a = expected[name]
            torch.testing.assert_close(state[name], a * w + (1 - a) * other[name], atol=1e-6, rtol=0,
                                       msg=lambda m: f"{k} {name}: {m}")
    with pytest.raises(ValueError, match="bn_scale"):
        graft_members([nn.Linear(3, 2), nn.Linear(3, 2)], level="bn_scale")


# ----------------------------------------------------------------------------- noise and internal scions
def test_noise_defaults_are_the_authors():
    """a = 0.975 and t counted from 0: after epoch 1 sigma = 1, after epoch 3 sigma = 0.975 ** 2;
    first_t=1 counts t from 1."""
    for epoch, first_t, sigma in ((1, 0, 1.0), (3, 0, 0.975**2), (3, 1, 0.975**3)):
        conv = nn.Conv2d(4, 64, 3, bias=False)
        with torch.no_grad():
            conv.weight.zero_()  # every filter is invalid
        graft_noise(conv, epoch=epoch, first_t=first_t, generator=torch.Generator().manual_seed(9))
        draw = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(conv.weight.data, draw * sigma, atol=0, rtol=1e-6)


def filters_1x1(values: list[float]) -> nn.Conv2d:
    conv = nn.Conv2d(1, len(values), 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(values).view(-1, 1, 1, 1))
    return conv


@pytest.mark.parametrize("values, threshold, snapshot_want, sequential_want", [
    # four filters, all invalid: ascending a, b, c, d receive d, c, b, a; c and d read already-grafted ones
    ([1, 2, 4, 8], 100, [9, 6, 6, 9], [9, 6, 10, 17]),
    # three invalid of four: c receives b after b has received c
    ([1, 2, 4, 8], 5, [9, 6, 6, 8], [9, 6, 10, 8]),
    # three filters, all invalid (ascending 1, 2, 4): the middle one receives itself, 4 receives 1 + 4
    ([4, 1, 2], 100, [5, 5, 4], [9, 5, 4]),
    # half or fewer invalid: the two orders agree
    ([1, 2, 4, 8, 16], 5, [17, 10, 8, 8, 16], [17, 10, 8, 8, 16]),
])
def test_internal_orders_on_hand_built_filters(values, threshold, snapshot_want, sequential_want):
    scale = 1e-3
    for order, want in (("snapshot", snapshot_want), ("sequential", sequential_want)):
        conv = filters_1x1([v * scale for v in values])
        counts = graft_internal(conv, threshold=threshold * scale, order=order)
        assert counts == {"weight": sum(v < threshold for v in values)}
        assert conv.weight.view(-1).tolist() == pytest.approx([v * scale for v in want], rel=1e-6), order


def test_internal_sequential_matches_the_in_place_loop():
    torch.manual_seed(5)
    model = timm.create_model("cifar_resnet20")
    pre = snapshot(model)
    norms = torch.cat([w.flatten(1).abs().sum(1) for w in pre.values() if w.ndim == 4])
    threshold = norms.quantile(0.6).item()  # more than half of the filters of some layers are invalid
    graft_internal(model, threshold=threshold, order="sequential")
    differs = 0
    for name, w in pre.items():
        if w.ndim != 4:
            assert torch.equal(model.state_dict()[name], w)
            continue
        u = w.clone()
        order = sorted(range(u.shape[0]), key=lambda j: u[j].abs().sum().item())
        for i, j in enumerate(order):
            if u[j].abs().sum().item() >= threshold:
                break
            u[j] += u[order[-1 - i]]
        torch.testing.assert_close(model.state_dict()[name], u, atol=1e-6, rtol=0)
        snapshot_model = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False)
        with torch.no_grad():
            snapshot_model.weight.copy_(w)
        graft_internal(snapshot_model, threshold=threshold, order="snapshot")
        differs += not torch.allclose(snapshot_model.weight, u)
    assert differs > 0
    with pytest.raises(ValueError, match="order must be one of"):
        graft_internal(model, order="random")


# ----------------------------------------------------------------------------- the config and the Trainer
def test_config_fields_are_checked(tmp_path):
    ok = GraftingConfig(output_dir=str(tmp_path), graft_anchor="authors", graft_alpha_decimals=2,
                        graft_histogram_include_max=False, graft_internal_order="sequential", graft_noise_first_t=1)
    assert (ok.graft_anchor, ok.graft_alpha_decimals, ok.graft_histogram_include_max) == ("authors", 2, False)
    defaults = GraftingConfig(output_dir=str(tmp_path))
    assert (defaults.graft_noise_a, defaults.graft_noise_first_t, defaults.graft_anchor,
            defaults.graft_internal_order) == (0.975, 0, "nearest", "snapshot")
    for bad, field in ((dict(graft_anchor="first"), "graft_anchor"),
                       (dict(graft_anchor="authors", graft_level="filter"), "graft_anchor"),
                       (dict(graft_level="channel"), "graft_level"),
                       (dict(graft_alpha_decimals=-1), "graft_alpha_decimals"),
                       (dict(graft_histogram_include_max="no"), "graft_histogram_include_max"),
                       (dict(graft_noise_first_t=-1), "graft_noise_first_t"),
                       (dict(graft_internal_order="random"), "graft_internal_order")):
        with pytest.raises(ValueError, match=f"GraftingConfig.{field}"):
            GraftingConfig(output_dir=str(tmp_path), **bad)


class GraftProbe(TrainerCallback):
    def on_graft_begin(self, args, state, control, model=None, **kwargs):
        self.before = [snapshot(m) for m in model.members]

    def on_graft_end(self, args, state, control, model=None, report=None, **kwargs):
        self.after = [snapshot(m) for m in model.members]


def test_trainer_grafts_with_the_authors_settings(make_trainer):
    probe = GraftProbe()
    trainer = make_trainer(num_students=2, eval_strategy="no", max_train_samples=32, callbacks=[probe],
                           graft_anchor="authors", graft_alpha_decimals=2, graft_histogram_include_max=False)
    trainer.train()
    expected = authors_graft(probe.before)
    for k in range(2):
        for name, want in expected[k][0].items():
            got = probe.after[k][name]
            if want.is_floating_point():
                assert (got.double() - want).abs().max().item() <= 1e-6, (k, name)
            else:
                assert torch.equal(got, want)
