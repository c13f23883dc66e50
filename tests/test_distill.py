"""kd_loss (docs/method.md §9, paper eqs. 8-12) against a hand-written reference and its known limits."""

from __future__ import annotations

import math

import pytest
import torch

from hf_graft.graft.distill import averaged_teacher_probs, kd_loss


def ref_kd(student, teachers, tau):
    """tau^2 * mean_b sum_k pbar_k * -log softmax(student / tau)_k, in Python floats (float64)."""
    s = student.double().tolist()
    ts = [t.double().tolist() for t in teachers]
    total = 0.0
    for b in range(len(s)):
        pbar = [0.0] * len(s[b])
        for t in ts:
            row = [v / tau for v in t[b]]
            m = max(row)
            e = [math.exp(v - m) for v in row]
            for k, v in enumerate(e):
                pbar[k] += v / sum(e) / len(ts)
        row = [v / tau for v in s[b]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += sum(p * -(v - lse) for p, v in zip(pbar, row))
    return tau**2 * total / len(s)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g) * 3
    teachers = [torch.randn(5, 7, generator=g) * 2 for _ in range(3)]
    return student, teachers


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.5])
def test_kd_loss_matches_reference(logits, tau):
    student, teachers = logits
    want = ref_kd(student, teachers, tau)
    as_list = kd_loss(student, teachers, temperature=tau)
    as_tensor = kd_loss(student, torch.stack(teachers), temperature=tau)  # [M, B, C]
    assert as_list.dtype == torch.float32 and as_list.ndim == 0
    assert as_list.item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(as_list, as_tensor)
    # one teacher as a [B, C] tensor, or as a one-element list
    one = kd_loss(student, teachers[0], temperature=tau)
    assert one.item() == pytest.approx(ref_kd(student, teachers[:1], tau), rel=1e-5)
    assert torch.equal(one, kd_loss(student, [teachers[0]], temperature=tau))


def test_averaged_teacher_probs_is_the_mean_of_softmaxes(logits):
    _, teachers = logits
    pbar = averaged_teacher_probs(teachers, temperature=3.0)
    want = sum(torch.softmax(t / 3.0, dim=-1) for t in teachers) / 3
    assert torch.allclose(pbar, want, atol=1e-7)
    assert torch.allclose(pbar.sum(-1), torch.ones(5))
    # not the softmax of the mean logits (which is what a naive "average teacher" would give)
    assert not torch.allclose(pbar, torch.softmax(torch.stack(teachers).mean(0) / 3.0, -1), atol=1e-3)


def test_tau_squared_scaling():
    # a uniform student: -log_softmax = ln C for every class, whatever tau: KD = tau^2 ln C
    g = torch.Generator().manual_seed(1)
    teachers = torch.randn(2, 4, 10, generator=g)
    for tau in (0.5, 1.0, 2.0, 3.0):
        assert kd_loss(torch.zeros(4, 10), teachers, tau).item() == pytest.approx(tau**2 * math.log(10), rel=1e-6)


def test_identical_logits_at_tau_one_give_the_student_entropy(logits):
    student, _ = logits
    p = torch.softmax(student.double(), dim=-1)
    entropy = -(p * p.log()).sum(-1).mean().item()
    assert kd_loss(student, [student.clone()], temperature=1.0).item() == pytest.approx(entropy, rel=1e-5)
    # and it is the minimum over students for that teacher (cross-entropy >= entropy)
    assert kd_loss(student + torch.randn(5, 7), [student], temperature=1.0).item() > entropy


def test_uniform_teachers(logits):
    student, _ = logits
    tau = 2.0
    teachers = [torch.full((5, 7), 3.0), torch.zeros(5, 7)]  # equal logits per row: uniform softmax
    want = tau**2 * (-torch.log_softmax(student / tau, -1)).mean(-1).mean().item()  # sum_k (1/C) * ...
    assert kd_loss(student, teachers, tau).item() == pytest.approx(want, rel=1e-6)


def test_large_logits_do_not_overflow():
    student = torch.tensor([[1e4, -1e4, 0.0], [0.0, 3e4, -2e4]])
    teachers = [torch.tensor([[-1e4, 1e4, 5e3], [2e4, 0.0, 1e4]]), torch.tensor([[1e4, 1e4, 0.0], [0.0, 0.0, 0.0]])]
    for tau in (1.0, 2.0):
        out = kd_loss(student, teachers, tau)
        assert torch.isfinite(out)
        assert out.item() == pytest.approx(ref_kd(student, teachers, tau), rel=1e-6)
    half = kd_loss(student.half(), [t.half() for t in teachers], 2.0)  # fp16 holds 3e4 but not its exp
    assert torch.isfinite(half) and half.dtype == torch.float32


def test_bf16_inputs_are_computed_in_float32(logits):
    student, teachers = logits
    s16, t16 = student.bfloat16(), [t.bfloat16() for t in teachers]
    out = kd_loss(s16, t16, 2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # exactly the float32 computation on the (bf16-rounded) values: no bf16 arithmetic inside
    exact = kd_loss(s16.float(), [t.float() for t in t16], 2.0)
    assert out.item() == pytest.approx(exact.item(), rel=1e-6)
    assert out.item() == pytest.approx(kd_loss(student, teachers, 2.0).item(), rel=2e-2)
    # under CPU bf16 autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = kd_loss(s16, t16, 2.0)
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(exact.item(), rel=1e-6)


def test_gradient_reaches_the_student_only(logits):
    student, teachers = logits
    s = student.clone().requires_grad_(True)
    ts = [t.clone().requires_grad_(True) for t in teachers]
    tau = 2.0
    kd_loss(s, ts, tau).backward()
    assert all(t.grad is None for t in ts)
    # d/ds of tau^2 * mean_b CE(pbar, softmax(s / tau)) = tau / B * (softmax(s / tau) - pbar)
    pbar = sum(torch.softmax(t / tau, -1) for t in teachers) / len(teachers)
    want = tau / student.shape[0] * (torch.softmax(student / tau, -1) - pbar)
    assert torch.allclose(s.grad, want, atol=1e-6)
    stacked = torch.stack(teachers).requires_grad_(True)
    s.grad = None
    kd_loss(s, stacked, tau).backward()
    assert stacked.grad is None and torch.allclose(s.grad, want, atol=1e-6)


def test_bad_input_fails_clearly(logits):
    student, teachers = logits
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teachers, temperature=0.0)
    with pytest.raises(ValueError, match="at least one"):
        kd_loss(student, [], temperature=2.0)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(student[:, :5], teachers, temperature=2.0)
    with pytest.raises(ValueError, match=r"\[M, B, C\]"):
        kd_loss(student, torch.zeros(2, 3, 5, 7), temperature=2.0)
