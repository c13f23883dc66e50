"""Members for graft tests: K differently initialised timm models whose BatchNorm parameters and buffers
differ too (so their mixing shows), and a copy of a model's state."""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

import hf_graft  # noqa: F401  (registers the cifar_* architectures)


def make_members(name: str, K: int, seed0: int = 0, **kwargs) -> list[nn.Module]:
    members = []
    for k in range(K):
        torch.manual_seed(seed0 + k)
        m = timm.create_model(name, pretrained=False, **kwargs)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.normal_(0, 0.1)
                mod.num_batches_tracked.fill_(100 + k)
        members.append(m)
    return members


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every entry of `model`'s state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
