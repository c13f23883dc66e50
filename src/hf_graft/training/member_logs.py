"""Per-member numbers of the training log: each member's CE and KD terms, gradient norm and rate.

They are accumulated on the device between two logging steps (no host read per step) and read once
when the Trainer logs, next to its own `loss`, `grad_norm` and `learning_rate`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MemberLogs"]


class MemberLogs:
    def __init__(self):
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.grad_norms: torch.Tensor | None = None  # the last step's, one per member
        self.learning_rates: dict[int, float] = {}

    def record_losses(self, outputs: dict, optimizer=None) -> None:
        """A training forward's `member_ce` (and `member_kd`), and the rates its update uses."""
        for key in ("member_ce", "member_kd"):
            if key in outputs:
                # a copy, never the output itself: under torch.compile's CUDA graphs (mode
                # "reduce-overhead") the next step's replay overwrites the outputs in place
                step_loss = outputs[key].detach()
                total = self.loss_sums.get(key)
                self.loss_sums[key] = step_loss.clone() if total is None else total + step_loss
        self.count += 1
        if optimizer is not None:  # the scheduler steps after this update
            self.learning_rates = {g.get("member", 0): g["lr"] for g in optimizer.param_groups}

    def entries(self) -> tuple[dict[str, float], bool]:
        """The log entries since the last call (`member{k}_ce`, `_kd`, `_grad_norm`, `_learning_rate`), and
        whether a member's mean loss was non-finite (the step's `loss` must then not look finite)."""
        out: dict[str, float] = {}
        non_finite = False
        if not self.count:
            return out, non_finite
        for key, total in self.loss_sums.items():
            term = key.split("_", 1)[1]
            for k, value in enumerate((total / self.count).tolist()):
                out[f"member{k}_{term}"] = round(value, 6)
                non_finite = non_finite or not math.isfinite(value)
        self.loss_sums, self.count = {}, 0
        if self.grad_norms is not None:
            out.update({f"member{k}_grad_norm": round(v, 6) for k, v in enumerate(self.grad_norms.tolist())})
        out.update({f"member{k}_learning_rate": lr for k, lr in sorted(self.learning_rates.items())})
        return out, non_finite
