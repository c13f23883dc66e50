"""The grafting math (docs/method.md §2-§5, §8) against hand-computed values and a plain reference loop.

The reference below is written the straightforward way, independently of hf_graft.grafting:
a loop over the state dict in order, `torch.histc` for the histogram, Python floats for the
entropy and alpha, and the anchor rule as a running "last conv/linear alpha" variable.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import timm
import torch
import torch.nn as nn

import hf_graft  # noqa: F401  (registers cifar_resnet20 in timm)
from hf_graft.graft.grafting import (
    GraftReport, adaptive_alpha, anchor_plan, graft_internal, graft_members, graft_noise,
)
from hf_graft.graft.information import COUNT_METHODS, _row_bin_counts, _scaled, batched_entropy, layer_information
from hf_graft.graft.schedule import cosine_lr_multipliers
from hf_graft.graft.sharded import sharded_information, sharded_layer_information
from _members import make_members, snapshot


# ----------------------------------------------------------------------------- reference
def ref_entropy(w: torch.Tensor, bins: int = 10) -> float:
    x = w.detach().float().reshape(-1)
    counts = torch.histc(x, bins=bins)  # range = [min, max] of the data; max goes to the last bin
    p = [c / x.numel() for c in counts.tolist() if c > 0]
    return -sum(q * math.log(q) for q in p)


def ref_info(w: torch.Tensor, criterion: str, bins: int = 10) -> float:
    if criterion == "entropy":
        return ref_entropy(w, bins)
    return float(w.detach().double().abs().sum())


def ref_alpha(h_self: float, h_other: float, A: float = 0.4, c: float = 500.0) -> float:
    return A / math.pi * math.atan(c * (h_self - h_other)) + 0.5


def ref_graft(pre: list[dict[str, torch.Tensor]], *, criterion="entropy", bins=10, A=0.4, c=500.0):
    """Per member: (new state, {anchor: alpha}), all from the pre-graft states, ring k <- k-1."""
    K = len(pre)
    out = []
    for k in range(K):
        own, other = pre[k], pre[(k - 1) % K]
        anchors = [n for n, t in own.items() if t.is_floating_point() and t.ndim >= 2]
        alphas = {n: ref_alpha(ref_info(own[n], criterion, bins), ref_info(other[n], criterion, bins), A, c)
                  for n in anchors}
        alpha = alphas[anchors[0]]
        new = {}
        for name, w in own.items():
            if not w.is_floating_point():
                new[name] = w.clone()
                continue
            if name in alphas:
                alpha = alphas[name]
            new[name] = alpha * w.float() + (1 - alpha) * other[name].float()
        out.append((new, alphas))
    return out



pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- information
def test_entropy_hand_values():
    # [0, 0, 0, 1], 2 bins over [0, 1]: counts 3, 1 (the max goes to the last bin)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert layer_information(torch.tensor([0.0, 0.0, 0.0, 1.0]), bins=2).item() == pytest.approx(h, abs=1e-6)
    # with 10 bins the 1.0 is alone in bin 9, the zeros in bin 0: the same entropy
    assert layer_information(torch.tensor([0.0, 0.0, 0.0, 1.0]), bins=10).item() == pytest.approx(h, abs=1e-6)
    # [0, 1, 2, 3]: 2 bins split {0, 1} | {2, 3} -> ln 2; 4 bins -> one value each -> ln 4
    w = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # any shape: the whole layer is flattened
    assert layer_information(w, bins=2).item() == pytest.approx(math.log(2), abs=1e-6)
    assert layer_information(w, bins=4).item() == pytest.approx(math.log(4), abs=1e-6)
    # one bin, a constant tensor and zeros: 0
    assert layer_information(w, bins=1).item() == 0.0
    assert layer_information(torch.full((3, 3), 0.25)).item() == 0.0
    assert layer_information(torch.zeros(7)).item() == 0.0
    # [-1, -1, 0.5, 1] over 4 bins of width 0.5: bins 0, 0, 3, 3 -> ln 2 (natural log, not bits)
    assert layer_information(torch.tensor([-1.0, -1.0, 0.5, 1.0]), bins=4).item() == pytest.approx(math.log(2))
    out = layer_information(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.ndim == 0
    assert math.isnan(layer_information(torch.tensor([1.0, float("nan"), 2.0])).item())
    assert math.isnan(layer_information(torch.tensor([1.0, float("inf"), 2.0])).item())


def test_l1_hand_values():
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert layer_information(w, criterion="l1").item() == 10.0
    assert layer_information(torch.zeros(3, 3), criterion="l1").item() == 0.0
    assert layer_information(w.bfloat16(), criterion="l1").dtype == torch.float32


@pytest.mark.parametrize("method", COUNT_METHODS)
def test_bin_counts_equal_torch_histc_exactly(method):
    """Every counting kernel gives exactly torch.histc's histogram (the reference binning, docs/method.md §2)."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(n, generator=g) * s for n, s in [(1000, 1.0), (4097, 1e-3), (33, 50.0)]]
    cases += [torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]), torch.full((9,), 3.0), torch.rand(50, generator=g).round()]
    # values one float below a bin edge of [0, 1]: a kernel that adds before it floors gets these wrong
    edges = torch.arange(1, 64, dtype=torch.float32) / 64
    cases += [torch.cat([torch.tensor([0.0, 1.0]), torch.nextafter(edges, torch.zeros(63))])]
    for bins in (1, 2, 7, 10, 64):
        for x in cases:
            lo, hi = torch.aminmax(x)
            counts = _row_bin_counts(_scaled(x, lo, hi, bins), bins, method=method)[0]
            assert torch.equal(counts, torch.histc(x, bins=bins)), (method, bins, x[:5])
        # several rows at once, each over its own range, in one kernel
        rows = torch.stack([torch.randn(300, generator=g) * (i + 1) for i in range(5)])
        rows[1] = 2.0
        lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
        counts = _row_bin_counts(_scaled(rows, lo, hi, bins), bins, method=method)
        assert torch.equal(counts, torch.stack([torch.histc(r, bins=bins) for r in rows])), (method, bins)


def test_entropy_matches_histc_reference_on_every_layer():
    model = timm.create_model("resnet10t", pretrained=False)
    for name, w in model.state_dict().items():
        if w.is_floating_point() and w.ndim >= 2:
            assert layer_information(w).item() == pytest.approx(ref_entropy(w), abs=2e-6), name
            assert layer_information(w, bins=32).item() == pytest.approx(ref_entropy(w, 32), abs=2e-6), name
            assert layer_information(w, "l1").item() == pytest.approx(ref_info(w, "l1"), rel=1e-5), name


def test_batched_entropy_rows_match_histc():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 50, generator=g)
    rows[2] = 0.5  # constant row
    rows[4, 7] = float("nan")
    got = batched_entropy(rows, bins=10)
    for i in range(6):
        if i == 4:
            assert math.isnan(got[i].item())
        else:
            assert got[i].item() == pytest.approx(ref_entropy(rows[i]), abs=1e-6)
    assert got[2].item() == 0.0


def test_adaptive_alpha_hand_values():
    # c * (s - o) = 1 -> arctan = pi/4 -> A/4 + 0.5
    assert adaptive_alpha(1.002, 1.0) == pytest.approx(0.6, abs=1e-12)
    assert adaptive_alpha(1.0, 1.002) == pytest.approx(0.4, abs=1e-12)
    assert adaptive_alpha(2.0, 2.0) == 0.5
    # c = 1, s - o = sqrt(3) -> arctan = pi/3 -> A/3 + 0.5
    assert adaptive_alpha(math.sqrt(3), 0.0, A=0.6, c=1.0) == pytest.approx(0.6 / 3 + 0.5, abs=1e-12)
    for s, o in [(0.0, 5.0), (3.0, -1.0), (1.0, 1.0001)]:
        assert adaptive_alpha(s, o, A=0.0, c=500.0) == 0.5  # A = 0: plain average
        assert adaptive_alpha(s, o, A=0.4, c=7.0) == pytest.approx(0.4 / math.pi * math.atan(7.0 * (s - o)) + 0.5)
    # bounded by 0.5 +- A/2; tensors give the same numbers, in float32
    big = adaptive_alpha(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]))
    assert big.dtype == torch.float32
    assert 0.7 - 1e-3 < big[0].item() < 0.7 and 0.3 < big[1].item() < 0.3 + 1e-3
    t = adaptive_alpha(torch.tensor(1.002), torch.tensor(1.0))
    assert t.item() == pytest.approx(0.6, abs=1e-6)


def test_cosine_lr_multipliers():
    assert cosine_lr_multipliers(2) == pytest.approx([0.5, 1.0])
    c = math.cos(math.pi / 4)
    assert cosine_lr_multipliers(4) == pytest.approx([(1 - c) / 2, 0.5, (1 + c) / 2, 1.0])


# ----------------------------------------------------------------------------- graft_members
def assert_state_matches(model, expected, atol=5e-6, rtol=1e-5, names=None):
    # the engine computes entropy in float32, the reference in float64; c = 500 amplifies the
    # difference into alpha (~1e-5), hence ~1e-6 on the weights
    state = model.state_dict()
    for name in names or expected:
        got, want = state[name], expected[name]
        if not want.is_floating_point():
            assert torch.equal(got, want), name
        else:
            assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), (
                name, (got.float() - want.float()).abs().max().item())


def test_graft_members_matches_reference_loop_k3_resnet10t():
    """Ring k <- k-1 with K = 3, in-parallel (all from pre-graft weights), on timm resnet10t."""
    members = make_members("resnet10t", 3)
    pre = [snapshot(m) for m in members]
    report = graft_members(members)
    expected = ref_graft(pre)
    anchors = [n for n, t in pre[0].items() if t.is_floating_point() and t.ndim >= 2]
    for k, (member, (new, alphas)) in enumerate(zip(members, expected)):
        assert_state_matches(member, new)
        mr = report.members[k]
        assert mr.index == k and mr.scion == (k - 1) % 3 and mr.finite and mr.skipped_reason is None
        assert list(mr.alphas) == anchors  # keyed by state-dict name, in order
        for name in anchors:
            assert mr.alphas[name] == pytest.approx(alphas[name], abs=2e-5), name
            assert mr.information[name] == pytest.approx(ref_entropy(pre[k][name]), abs=2e-6), name
            assert mr.scion_information[name] == pytest.approx(ref_entropy(pre[(k - 1) % 3][name]), abs=2e-6)
            assert 0.3 < mr.alphas[name] < 0.7
    assert report.skipped == []
    # alphas of receiver k and of its scion's own graft are not tied for K = 3: members stay distinct
    w = [m.state_dict()["conv1.0.weight"] for m in members]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


def test_in_parallel_semantics_with_plain_average():
    """A = 0 gives alpha = 0.5: member k becomes the mean of pre-graft k and pre-graft k-1 exactly,
    so member 1 must hold (W1 + W0_pre) / 2, not a mix with member 0's new weights."""
    members = make_members("cifar_resnet20", 3)
    pre = [snapshot(m) for m in members]
    report = graft_members(members, A=0.0)
    for k in range(3):
        assert set(report.members[k].alphas.values()) == {0.5}
        state = members[k].state_dict()
        for name, w in pre[k].items():
            if w.is_floating_point():
                want = (w + pre[(k - 1) % 3][name]) / 2
                assert torch.allclose(state[name], want, atol=1e-7, rtol=0), name
            else:
                assert torch.equal(state[name], w)


ANCHOR_RULE_MODELS = [
    ("resnet10t", {}),
    ("cifar_resnet20", {}),  # parameter-free (zero-padding) shortcuts: 19 convs + fc
    ("cifar_resnet20", {"shortcut": "B"}),  # projection shortcuts: their BN follows their own conv
    ("cifar_wrn28_10", {"depth": 10, "widen_factor": 1}),  # pre-activation: a BN follows the conv feeding it
]


@pytest.mark.parametrize("name,kwargs", ANCHOR_RULE_MODELS, ids=["resnet10t", "cifar-A", "cifar-B", "wrn"])
def test_anchor_rule_on_timm_model(name, kwargs):
    """BatchNorm weight/bias/running stats take the alpha of the conv before them; the classifier
    bias takes the classifier weight's; num_batches_tracked is not mixed (docs/method.md §3)."""
    members = make_members(name, 2, seed0=10, **kwargs)
    with torch.no_grad():
        for m in members:  # classifier biases that differ (a Wide ResNet starts them at zero)
            m.get_classifier().bias.normal_(0, 0.1)
    pre = [snapshot(m) for m in members]
    report = graft_members(members)
    modules = dict(members[0].named_modules())
    names = list(pre[0])
    convs = [n for n in names if n.endswith(".weight") and isinstance(modules[n.rsplit(".", 1)[0]], nn.Conv2d)]
    assert list(report.members[0].alphas) == [n for n in names if pre[0][n].ndim >= 2 and pre[0][n].is_floating_point()]
    assert set(convs) | {"fc.weight"} == set(report.members[0].alphas)
    n_bn = 0
    for k in range(2):
        state = members[k].state_dict()
        own, other = pre[k], pre[1 - k]
        last_anchor = None
        for name in names:
            owner = modules[name.rsplit(".", 1)[0]]
            if name in report.members[k].alphas:
                last_anchor = name
            if isinstance(owner, nn.BatchNorm2d):
                if name.endswith("num_batches_tracked"):
                    assert torch.equal(state[name], own[name]) and state[name].item() == 100 + k
                    continue
                n_bn += 1
                # the conv feeding this BN (same number of channels) is the anchor before it
                assert isinstance(modules[last_anchor.rsplit(".", 1)[0]], nn.Conv2d)
                assert own[last_anchor].shape[0] == own[name].shape[0]
                # the alpha actually used, recovered from the numbers, is that conv's alpha
                d = own[name] - other[name]
                used = ((state[name] - other[name]) * d).sum() / (d * d).sum()
                assert used.item() == pytest.approx(report.members[k].alphas[last_anchor], abs=1e-5), name
        used = ((state["fc.bias"] - other["fc.bias"]) * (own["fc.bias"] - other["fc.bias"])).sum()
        used = used / ((own["fc.bias"] - other["fc.bias"]) ** 2).sum()
        assert used.item() == pytest.approx(report.members[k].alphas["fc.weight"], abs=1e-5)
    assert n_bn == 2 * 4 * sum(isinstance(m, nn.BatchNorm2d) for m in members[0].modules())
    if name == "cifar_resnet20":  # the 20 weight layers of ResNet-20, plus two projections with option B
        assert len(report.members[0].alphas) == (22 if kwargs.get("shortcut") == "B" else 20)


def test_anchor_plan_entries_before_first_anchor_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))  # before any anchor: takes the first anchor
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5)
            self.head.weight = self.emb.weight  # tied: mixed once
            self.register_buffer("steps", torch.tensor(3))

    plan = anchor_plan(Tied().state_dict())
    assert plan == [("scale", "emb.weight"), ("emb.weight", "emb.weight"), ("head.bias", "emb.weight")]


def test_l1_criterion_matches_reference():
    members = make_members("cifar_resnet20", 2, seed0=3)
    pre = [snapshot(m) for m in members]
    report = graft_members(members, criterion="l1", c=0.05)
    expected = ref_graft(pre, criterion="l1", c=0.05)
    for k in range(2):
        assert_state_matches(members[k], expected[k][0], atol=1e-5)
        for name, a in expected[k][1].items():
            assert report.members[k].alphas[name] == pytest.approx(a, abs=1e-5)
            assert report.members[k].information[name] == pytest.approx(ref_info(pre[k][name], "l1"), rel=1e-5)


def test_two_members_are_identical_after_a_graft():
    members = make_members("cifar_resnet20", 2, seed0=5)
    report = graft_members(members)
    a0, a1 = report.members[0].alphas, report.members[1].alphas
    for name in a0:
        assert a1[name] == pytest.approx(1 - a0[name], abs=1e-6)
    assert len(set(round(v, 3) for v in a0.values())) > 1  # the alphas really vary by layer
    s0, s1 = members[0].state_dict(), members[1].state_dict()
    for name in s0:
        if s0[name].is_floating_point():
            assert torch.allclose(s0[name], s1[name], atol=1e-6, rtol=1e-6), name
        else:
            assert not torch.equal(s0[name], s1[name])  # num_batches_tracked stays each member's own


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_member_is_never_a_scion(bad):
    """K = 3, member 1 broken: member 2 (its receiver) keeps its own weights with alpha 1; member 1
    still receives from member 0 (its finite layers mix as usual); member 0 is grafted normally."""
    members = make_members("cifar_resnet20", 3, seed0=7)
    broken = "layer2.0.conv1.weight"
    with torch.no_grad():
        members[1].state_dict()[broken][0, 0, 0, 0] = bad
    pre = [snapshot(m) for m in members]
    report = graft_members(members)
    assert report.skipped == [2]
    assert "member 1" in report.members[2].skipped_reason and "non-finite" in report.members[2].skipped_reason
    assert set(report.members[2].alphas.values()) == {1.0}
    assert [m.finite for m in report.members] == [True, False, True]
    for name, w in pre[2].items():  # bit-identical
        assert torch.equal(members[2].state_dict()[name], w), name
    # member 0 <- member 2, both finite: as the reference
    expected0 = ref_graft([pre[0], pre[2]])[0][0]
    assert_state_matches(members[0], expected0)
    # member 1 <- member 0: every layer but the broken one (and the entries that follow it) as the reference
    plan = dict(anchor_plan(pre[1]))
    fine = [n for n in pre[1] if not pre[1][n].is_floating_point() or plan.get(n) != broken]
    ref1_pre = {n: pre[1][n] for n in fine}
    ref0_pre = {n: pre[0][n] for n in fine}
    expected1, alphas1 = ref_graft([ref1_pre, ref0_pre])[0]
    assert_state_matches(members[1], expected1, names=fine)
    for name, a in alphas1.items():
        assert report.members[1].alphas[name] == pytest.approx(a, abs=2e-5)
    assert report.members[1].skipped_reason is None
    assert math.isnan(report.members[1].alphas[broken]) and math.isnan(report.members[1].information[broken])
    assert not torch.isfinite(members[1].state_dict()[broken]).all()
    logs = report.to_log_dict()
    assert logs["graft/member2_skipped"] == 1.0 and logs["graft/member0_skipped"] == 0.0


def test_filter_level_matches_reference():
    members = make_members("cifar_resnet20", 2, seed0=11)
    pre = [snapshot(m) for m in members]
    report = graft_members(members, level="filter")
    for k in range(2):
        own, other = pre[k], pre[1 - k]
        state = members[k].state_dict()
        alpha = None
        for name, w in own.items():
            if not w.is_floating_point():
                assert torch.equal(state[name], w)
                continue
            if w.ndim >= 2:
                alpha = torch.tensor([ref_alpha(ref_entropy(w[j]), ref_entropy(other[name][j]))
                                      for j in range(w.shape[0])])
                assert report.members[k].alphas[name] == pytest.approx(alpha.mean().item(), abs=1e-5)
            a = alpha.view(-1, *([1] * (w.ndim - 1)))
            want = a * w + (1 - a) * other[name]
            assert torch.allclose(state[name], want, atol=1e-5), name
            assert alpha.std() > 0  # alphas really differ between filters


def test_filter_level_entries_of_another_length_take_the_mean_alpha():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.extra = nn.Parameter(torch.randn(7))  # not 4 long: takes the mean of conv's alphas

    torch.manual_seed(0)
    members = [Net(), Net()]
    pre = [snapshot(m) for m in members]
    report = graft_members(members, level="filter")
    for k in range(2):
        a = report.members[k].alphas["conv.weight"]
        want = a * pre[k]["extra"] + (1 - a) * pre[1 - k]["extra"]
        assert torch.allclose(members[k].extra.data, want, atol=1e-6)


def test_bf16_members_stay_bf16_and_information_is_float32():
    members = [m.to(torch.bfloat16) for m in make_members("cifar_resnet20", 2, seed0=13)]
    pre = [snapshot(m) for m in members]
    report = graft_members(members)
    expected = ref_graft(pre)  # reference mixes in float32 from the bf16 values
    for k in range(2):
        state = members[k].state_dict()
        for name, w in pre[k].items():
            assert state[name].dtype == w.dtype, name
            if w.is_floating_point():
                want = expected[k][0][name]
                # the float32 mix rounded once to bf16: at most one bf16 ulp away (8 significant
                # bits), plus the float32-vs-float64 alpha difference near cancellations
                ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 8)
                assert ((state[name].float() - want).abs() <= ulp + 5e-6).all(), name
        for name, h in report.members[k].information.items():
            # from the float32 values of the bf16 weights, as torch.histc bins them in float32
            assert h == pytest.approx(ref_entropy(pre[k][name].float()), abs=2e-6)
    # bf16 arithmetic would have lost these: mixing 0.6 * 1.0039 + 0.4 * 1.0 is not representable
    # in bf16 before the final rounding; check the mix was not computed in bf16
    a = report.members[0].alphas["conv1.weight"]
    w0, w1 = pre[0]["conv1.weight"], pre[1]["conv1.weight"]
    in_bf16 = (torch.tensor(a, dtype=torch.bfloat16) * w0 + (1 - torch.tensor(a, dtype=torch.bfloat16)) * w1)
    got = members[0].state_dict()["conv1.weight"]
    want32 = (a * w0.float() + (1 - a) * w1.float()).bfloat16()
    assert (got == want32).float().mean() > (got == in_bf16).float().mean()


def test_graft_members_reads_nothing_back_to_the_host(monkeypatch):
    """graft_members itself makes no host read at all (no .item(), .tolist(), .cpu(), bool() of a
    tensor...): on a GPU it only queues kernels. The report copies its numbers to the host in
    exactly one transfer when it is first read (a Trainer logs it right away: one sync per graft),
    and never again."""
    members = make_members("cifar_resnet20", 3, seed0=17)
    pre = [snapshot(m) for m in members]
    calls = {"cpu": 0}

    def forbidden(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read in graft_members: Tensor.{name}")
        return f

    real_cpu = torch.Tensor.cpu
    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            mp.setattr(torch.Tensor, name, forbidden(name))
        report = graft_members(members)
        report_filter = graft_members(members, level="filter", criterion="l1")
        # the authors' settings (half-open histogram, rounded alphas) and the BatchNorm-scale level too
        report_authors = graft_members(members, anchor="authors", alpha_decimals=2, include_max=False)
        report_bn = graft_members(members, level="bn_scale")
        # the numbers were not read back yet
        assert report._pending is not None and report_filter._pending is not None
        assert report_authors._pending is not None and report_bn._pending is not None

    def counting_cpu(self, *args, **kwargs):
        calls["cpu"] += 1
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    alphas = report.members[0].alphas
    assert calls["cpu"] == 1
    report.to_log_dict()
    _ = report.members[2].information
    assert calls["cpu"] == 1
    # and the values are those of the reference
    expected = ref_graft(pre)
    for name, a in expected[0][1].items():
        assert alphas[name] == pytest.approx(a, abs=2e-5)


def test_graft_members_rejects_bad_input():
    a, b = make_members("cifar_resnet20", 2)
    with pytest.raises(ValueError, match="K >= 2"):
        graft_members([a])
    with pytest.raises(ValueError, match="criterion"):
        graft_members([a, b], criterion="kl")
    with pytest.raises(ValueError, match="level"):
        graft_members([a, b], level="channel")
    with pytest.raises(ValueError, match="bins"):
        graft_members([a, b], bins=0)
    with pytest.raises(ValueError, match="member 1"):
        graft_members([a, timm.create_model("cifar_resnet20", num_classes=7)])


def test_report_log_dict():
    report = GraftReport(members=[])
    assert report.to_log_dict() == {}
    members = make_members("cifar_resnet20", 2, seed0=19)
    report = graft_members(members)
    logs = report.to_log_dict()
    values = list(report.members[1].alphas.values())
    assert logs["graft/member1_alpha_mean"] == pytest.approx(sum(values) / len(values))
    assert logs["graft/member1_alpha_min"] == min(values) and logs["graft/member1_alpha_max"] == max(values)
    assert logs["graft/member0_information"] == pytest.approx(sum(report.members[0].information.values()))


# ----------------------------------------------------------------------------- other scion sources
def test_noise_source_adds_a_pow_t_noise_to_invalid_filters_only():
    model = timm.create_model("cifar_resnet20", pretrained=False)
    target = "layer3.0.conv2.weight"
    with torch.no_grad():
        model.state_dict()[target][[1, 5, 9, 40]] = 0.0
    pre = snapshot(model)
    twin = copy.deepcopy(model)
    epoch, a = 3, 0.8
    t = epoch - 1  # t counted from 0: the graft after the first epoch has t = 0
    counts = graft_noise(model, epoch=epoch, a=a, threshold=0.1, generator=torch.Generator().manual_seed(42))
    assert counts[target] == 4 and sum(counts.values()) == 4
    # the reference: the same generator draws a whole layer of N(0, 1) per conv, in state-dict order
    g = torch.Generator().manual_seed(42)
    state = model.state_dict()
    for name, w in pre.items():
        if w.ndim != 4:
            assert torch.equal(state[name], w)
            continue
        noise = torch.randn(w.shape, generator=g) * a**t
        if name == target:
            for j in range(w.shape[0]):
                if j in (1, 5, 9, 40):
                    assert torch.equal(state[name][j], noise[j])
                else:
                    assert torch.equal(state[name][j], w[j])
        else:
            assert torch.equal(state[name], w), name
    sample = torch.cat([state[target][j].reshape(-1) for j in (1, 5, 9, 40)])
    assert sample.std().item() == pytest.approx(a**t, rel=0.08)  # sigma_t = a ** t
    # reproducible with the same seed, different with another
    same = graft_noise(copy.deepcopy(twin), epoch=epoch, a=a, generator=torch.Generator().manual_seed(42))
    assert same == counts
    again = copy.deepcopy(twin)
    graft_noise(again, epoch=epoch, a=a, generator=torch.Generator().manual_seed(42))
    assert torch.equal(again.state_dict()[target], state[target])
    graft_noise(twin, epoch=epoch, a=a, generator=torch.Generator().manual_seed(43))
    assert not torch.equal(twin.state_dict()[target], state[target])
    with pytest.raises(ValueError, match="a must"):
        graft_noise(model, epoch=1, a=1.5)
    with pytest.raises(ValueError, match="epoch must"):
        graft_noise(model, epoch=0)
    with pytest.raises(ValueError, match="first_t must"):
        graft_noise(model, epoch=1, first_t=-1)


def test_internal_source_matches_reference():
    model = timm.create_model("cifar_resnet20", pretrained=False)
    target = "layer1.0.conv1.weight"  # 16 filters
    with torch.no_grad():
        w = model.state_dict()[target]
        for j, s in [(2, 1e-4), (7, 3e-4), (11, 2e-3)]:
            w[j] *= s  # three invalid filters at threshold 0.1, with distinct norms
    pre = snapshot(model)
    counts = graft_internal(model, threshold=0.1)
    assert counts[target] == 3 and sum(counts.values()) == 3
    l1 = [pre[target][j].abs().sum().item() for j in range(16)]
    ascending = sorted(range(16), key=lambda j: l1[j])
    descending = ascending[::-1]
    want = pre[target].clone()
    for i, j in enumerate(ascending):
        if l1[j] < 0.1:
            want[j] += pre[target][descending[i]]
    assert torch.equal(model.state_dict()[target], want)
    for name, t in pre.items():
        if name != target:
            assert torch.equal(model.state_dict()[name], t)


# ----------------------------------------------------------------------------- sharded (FSDP)
class ThreadGroup:
    """A simulated process group: one thread per rank, all-reduce through a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.ops: list[str] = []

    def reducer(self, rank: int):
        def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = {"min": stacked.amin(0), "max": stacked.amax(0), "sum": stacked.sum(0)}[op]
            if rank == 0:
                self.ops.append(op)
            self.barrier.wait()  # everyone has read the slots before they are reused
            return t.copy_(out)

        return all_reduce

    def run(self, fn, pieces_per_rank):
        results = [None] * self.world
        errors = []

        def target(rank):
            try:
                results[rank] = fn(pieces_per_rank[rank], self.reducer(rank))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def split_uneven(t: torch.Tensor, world: int, gen: torch.Generator, dim0: bool, empty_last=False):
    """`world` uneven pieces, along dim 0 (as FSDP2 shards) or of the flattened tensor (as FSDP1)."""
    n = t.shape[0] if dim0 else t.numel()
    cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=gen).tolist())
    if empty_last:
        cuts[-1] = n
    return list(torch.tensor_split(t if dim0 else t.reshape(-1), cuts, dim=0))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_information_equals_whole_tensor(world):
    model = timm.create_model("cifar_resnet20", pretrained=False)
    layers = [w for w in model.state_dict().values() if w.is_floating_point() and w.ndim >= 2]
    layers += [torch.full((6, 2), 0.5), torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat(5, 1)]
    gen = torch.Generator().manual_seed(world)
    pieces = [[] for _ in range(world)]
    for i, w in enumerate(layers):
        for r, p in enumerate(split_uneven(w, world, gen, dim0=i % 2 == 0, empty_last=i == 0)):
            pieces[r].append(p)
    assert pieces[world - 1][0].numel() == 0  # a rank without any of layer 0

    # include_max=False: the authors' half-open bins, counted from each shard against the global edges
    for criterion, include_max in (("entropy", True), ("entropy", False), ("l1", True)):
        group = ThreadGroup(world)
        results = group.run(lambda p, red: sharded_information(p, criterion=criterion, all_reduce=red,
                                                               include_max=include_max), pieces)
        whole = torch.stack([layer_information(w, criterion, include_max=include_max) for w in layers])
        for r in range(world):
            assert torch.equal(results[r], results[0])  # every rank gets the same numbers
            tol = dict(abs=1e-6) if criterion == "entropy" else dict(rel=1e-5)
            assert results[r].tolist() == [pytest.approx(v, **tol) for v in whole.tolist()]
        # all layers at once: entropy needs two collectives (MAX of extremes, SUM of counts), l1 one
        assert group.ops == (["max", "sum"] if criterion == "entropy" else ["sum"])
    # the two histograms differ where the maximum is left out: the test can tell them apart
    with_max = torch.stack([layer_information(w) for w in layers])
    without = torch.stack([layer_information(w, include_max=False) for w in layers])
    assert (with_max - without).abs().max() > 1e-3


def test_sharded_counts_equal_whole_histogram_exactly():
    from hf_graft.graft.sharded import _sharded_histograms

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 5, 3, 3, generator=gen)
    w[3, 0, 0, 0] = w.max() + 1.0  # a unique max: it must land in the last bin on its shard
    for world in (2, 3, 4):
        pieces = split_uneven(w, world, gen, dim0=True)
        group = ThreadGroup(world)
        out = group.run(lambda p, red: _sharded_histograms(p, bins=10, all_reduce=red), [[p] for p in pieces])
        for counts, total, bad in out:
            assert torch.equal(counts[0].float(), torch.histc(w, bins=10))
            assert total[0].item() == w.numel() and bad[0].item() == 0


def test_sharded_information_non_finite_and_single_process():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, generator=gen)
    pieces = [w[:15].clone(), w[15:].clone()]
    pieces[1][3] = float("nan")  # only one rank sees it; MAX may drop NaN, the flag carries it
    out = ThreadGroup(2).run(lambda p, red: sharded_layer_information(p[0], all_reduce=red), [[pieces[0]], [pieces[1]]])
    assert all(math.isnan(v.item()) for v in out)
    # no process group: the local shard is the whole weight
    assert sharded_layer_information(w).item() == pytest.approx(layer_information(w).item(), abs=1e-7)
    assert sharded_information([w, w[:4]], criterion="l1").tolist() == pytest.approx(
        [w.abs().sum().item(), w[:4].abs().sum().item()], rel=1e-6)


_GLOO_WORKER = textwrap.dedent(
    """
    import importlib, json, os, sys, types
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    path, rank, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # sharded.py and information.py are pure torch: load them without the package's __init__ (timm)
    package = types.ModuleType("package_under_test")
    package.__path__ = [os.path.dirname(path)]
    sys.modules["package_under_test"] = package
    g = importlib.import_module("package_under_test.sharded")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layers = [torch.randn(5, 3, 3, 3), torch.randn(7, 20), torch.full((3, 4), 2.0)]
    cuts = [[2], [60], [12]]  # uneven; the last layer's rank-1 piece is empty
    local = [torch.tensor_split(w.reshape(-1) if i else w, c)[rank] for i, (w, c) in enumerate(zip(layers, cuts))]
    result = {
        "entropy": g.sharded_information(local).tolist(),
        "l1": g.sharded_information(local, criterion="l1").tolist(),
        "whole_entropy": [g.layer_information(w).item() for w in layers],
        "whole_l1": [g.layer_information(w, "l1").item() for w in layers],
        "local_numel": [p.numel() for p in local],
    }
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (2,))
    dts = [distribute_tensor(w, mesh, [Shard(0)]) for w in layers]  # FSDP2's placement (uneven dim 0)
    result["dtensor_local_rows"] = [d.to_local().shape[0] for d in dts]
    result["dtensor_entropy"] = g.sharded_information(dts).tolist()
    # a replicated DTensor is whole on each rank: counted once, also next to sharded ones
    mixed = [distribute_tensor(layers[1], mesh, [Replicate()]), dts[0]]
    result["mixed_l1"] = g.sharded_information(mixed, criterion="l1").tolist()
    result["mixed_entropy"] = g.sharded_information(mixed).tolist()
    with open(out, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip the slow interpreter teardown of the distributed modules
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_sharded_information_on_two_gloo_processes(tmp_path):
    """Two real processes, each holding its uneven piece (plain tensors and FSDP2-style DTensors)."""
    import hf_graft.graft.sharded as sharded

    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, sharded.__file__, str(r), port, str(tmp_path / f"{r}.json")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert res[0]["local_numel"] == [2 * 27, 60, 12] and res[1]["local_numel"] == [3 * 27, 80, 0]
    assert res[0]["dtensor_local_rows"] == [3, 4, 2] and res[1]["dtensor_local_rows"] == [2, 3, 1]
    for r in res:
        assert r["entropy"] == res[0]["entropy"]
        assert r["entropy"] == [pytest.approx(v, abs=1e-6) for v in r["whole_entropy"]]
        assert r["dtensor_entropy"] == [pytest.approx(v, abs=1e-6) for v in r["whole_entropy"]]
        assert r["l1"] == [pytest.approx(v, rel=1e-6) for v in r["whole_l1"]]
        assert r["entropy"][2] == 0.0  # the constant layer
        assert r["mixed_l1"] == [pytest.approx(r["whole_l1"][1], rel=1e-6), pytest.approx(r["whole_l1"][0], rel=1e-6)]
        assert r["mixed_entropy"] == [pytest.approx(r["whole_entropy"][1], abs=1e-6),
                                      pytest.approx(r["whole_entropy"][0], abs=1e-6)]
