"""The optimisation of a population: one pair of parameter groups per member at its own rate, the
papers' step decay, and per-member gradient norms and clipping.

Gradient norms: `torch.nn.utils.clip_grad_norm_` / `get_total_norm` move every parameter's norm to one device before
stacking them: one more dispatched operation per parameter, every step. For small members on a GPU
the host's dispatch time is the step time, so each member's norm is taken here with one foreach
call, one stack and one vector norm; the arithmetic (and so every logged value) is theirs.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from hf_graft.graft.schedule import step_decay
from hf_graft import _compat

__all__ = ["MemberGradients", "is_sharded", "member_grad_norms", "member_param_groups", "step_decay_scheduler"]


def is_sharded(accelerator) -> bool:
    """FSDP and DeepSpeed shard the parameters: per-member norms and fused members do not apply there."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def member_param_groups(members: Sequence[nn.Module], decay_names: Iterable[str], *, learning_rate: float,
                        multipliers: Sequence[float], weight_decay: float) -> list[dict]:
    """Two parameter groups per member (decayed, not decayed), both at `learning_rate * multipliers[k]`
    and tagged `member: k`. `decay_names` are the decayed parameters' names in the population
    (`members.{k}.{name}`); empty groups are left out."""
    decay_names = set(decay_names)
    groups = []
    for k, member in enumerate(members):
        lr = learning_rate * multipliers[k]
        named = [(f"members.{k}.{n}", p) for n, p in member.named_parameters() if p.requires_grad]
        groups.append({"params": [p for n, p in named if n in decay_names], "weight_decay": weight_decay,
                       "lr": lr, "member": k})
        groups.append({"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0,
                       "lr": lr, "member": k})
    return [g for g in groups if g["params"]]


def step_decay_scheduler(optimizer: torch.optim.Optimizer, *, decay_epochs: Sequence[float], steps_per_epoch: float,
                         warmup_steps: int, gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The papers' step decay: every param group's rate times `gamma` at each of `decay_epochs`, after
    `warmup_steps` of linear warm-up (each group keeps its own initial rate)."""
    milestones = sorted(round(e * steps_per_epoch) for e in decay_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, step_decay(milestones, warmup=warmup_steps, gamma=gamma))


def member_grad_norms(members: list[list[torch.nn.Parameter]], device: torch.device,
                      max_norm: float | None = None) -> torch.Tensor:
    """Each member's total 2-norm over its parameters' gradients, as a [K] tensor on `device`; with
    `max_norm`, each member's gradients are then scaled to a norm of at most `max_norm`, as
    `clip_grad_norm_` would per member. A member without gradients has norm 0."""
    norms = []
    for params in members:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            norms.append(torch.zeros((), device=device))
            continue
        norm = torch.linalg.vector_norm(torch.stack(_compat.foreach_norm(grads)))
        if max_norm is not None:
            _compat.foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        norms.append(norm)
    return torch.stack([n.to(device) for n in norms])


class MemberGradients:
    """Each member's trainable parameters, listed once per run (a walk of the modules every step costs more
    host time than a small member's step), and their per-member gradient norms."""

    def __init__(self, members: Sequence[nn.Module]):
        self.members = members
        self._params: list[list[nn.Parameter]] | None = None

    def reset(self) -> None:
        """List the parameters again at the next use (a new `train()` may have changed what trains)."""
        self._params = None

    def norms(self, device: torch.device, max_norm: float | None = None) -> torch.Tensor:
        if self._params is None:
            self._params = [[p for p in m.parameters() if p.requires_grad] for m in self.members]
        return member_grad_norms(self._params, device, max_norm=max_norm)
