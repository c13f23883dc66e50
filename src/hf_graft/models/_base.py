"""What the CIFAR architectures share: timm's classifier-head interface and the initialisations."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from torch.utils.checkpoint import checkpoint

__all__ = ["CifarClassifierBase", "kaiming_normal_fan_in"]


def kaiming_normal_fan_in(module: nn.Module) -> None:
    """Kaiming-normal weights, std sqrt(2 / fan_in), on every conv and linear layer of `module`
    (the paper's CIFAR ResNets); biases and BatchNorm keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')


class CifarClassifierBase(nn.Module):
    """timm's head interface (get/reset_classifier, forward_head, grad checkpointing) for a model
    with ``num_features``, ``global_pool``, ``drop_rate`` and a linear head named ``classifier_name``.

    ``init_weights`` (called at the end of ``__init__``) and ``init_classifier`` (called on a head
    made by ``reset_classifier``) keep PyTorch's default initialisation unless a model overrides
    them, so a new head starts the way the model's own head did.
    """

    classifier_name = 'fc'

    @torch.jit.ignore
    def init_weights(self) -> None:
        pass

    @torch.jit.ignore
    def init_classifier(self, head: nn.Module) -> None:
        pass

    @torch.jit.ignore
    def run_stages(self, x: torch.Tensor, stages) -> torch.Tensor:
        """`x` through `stages` in order, each checkpointed when gradient checkpointing is on."""
        for stage in stages:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return self.classifier_name if name_only else getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head (e.g. to fine-tune on another label set); keeps pooling if None."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        dd = get_device_dtype(self)
        self.global_pool, head = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_classifier(head)
        setattr(self, self.classifier_name, head)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        head.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else getattr(self, self.classifier_name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
