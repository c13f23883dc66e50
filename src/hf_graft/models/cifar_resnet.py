"""CIFAR ResNets (He et al., 2016, section 4.2) registered as timm models.

Layout: a 3x3 conv stem with 16 channels, then three stages of ``n = (depth - 2) / 6`` basic
blocks with 16/32/64 channels, stride 2 at the start of stages 2 and 3, global average pooling
and a linear head.  For a 32x32 input the last feature map is 8x8.

Shortcuts are identity where the shape is kept.  Where it changes (the first block of stages 2
and 3), the default is **option A** of the ResNet paper, the one its CIFAR networks and the
grafting paper's networks use: keep every second pixel and pad the channels with zeros, no
parameters.  ResNet-20/32/56/110 then have 269,722 / 464,154 / 853,018 / 1,727,962 parameters for
10 classes.  ``shortcut="B"`` uses a 1x1 conv + BatchNorm projection instead (2,752 parameters
more).  Conv and linear weights are Kaiming-normal (fan-in), as in the paper's networks.

Modules are declared in forward order (conv, then its BN, ...) so that ``state_dict()`` lists
each BatchNorm right after the conv it normalises; the grafting code relies on that order.
"""
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from hf_graft import _compat

from ._base import CifarClassifierBase, kaiming_normal_fan_in
from .saved_configs import saved_shortcut

__all__ = ['CifarResNet', 'BasicBlock', 'ZeroPadShortcut', 'SHORTCUTS', 'CIFAR10_MEAN', 'CIFAR10_STD']

# CIFAR normalisation of the grafting paper's code (and of many CIFAR recipes).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

SHORTCUTS = ('A', 'B')


class ZeroPadShortcut(nn.Module):
    """Option A: every ``stride``-th pixel, and zero channels added before and after the input's.

    For ``out_chs = 2 * in_chs`` (a stage change) the input lands in the middle, ``in_chs / 2``
    zero channels on each side.  No parameters.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f'a zero-padding shortcut cannot narrow {in_chs} channels to {out_chs}')
        self.stride = stride
        self.pad_front = (out_chs - in_chs) // 2
        self.pad_back = out_chs - in_chs - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_grouped(x, 1)

    def forward_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """``groups`` inputs side by side along the channels (fused members), each padded on its own."""
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        x = x[:, :, ::self.stride, ::self.stride]
        pad = (0, 0, 0, 0, self.pad_front, self.pad_back)
        out = F.pad(x, pad) if groups == 1 else F.pad(x.unflatten(1, (groups, -1)), pad).flatten(1, 2)
        # keep the input's memory layout, which the residual sum then keeps too
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut: identity where the shape is kept, else option A
    (``ZeroPadShortcut``) or option B (1x1 conv + BN projection)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, shortcut: str = 'A', device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        # Declaration order == forward order == state_dict order (see module docstring).
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        if stride == 1 and in_chs == out_chs:
            self.shortcut = nn.Identity()
        elif shortcut == 'A':
            self.shortcut = ZeroPadShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd),
                nn.BatchNorm2d(out_chs, **dd),
            )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(CifarClassifierBase):
    """ResNet-(6n+2) for 32x32 inputs, with the timm classifier interface.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs; 0 leaves the head as identity (pooled features out).
        in_chans: input image channels.
        global_pool: timm pooling type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
        drop_rate: dropout before the classifier (0 as in the paper).
        widths: channels of the stem and of the three stages.
        shortcut: 'A' (zero padding, parameter-free, the default) or 'B' (1x1 conv + BN projection)
            where a block changes the shape.
    """

    def __init__(
            self,
            depth: int = 20,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            widths=(16, 32, 64),
            shortcut: str = 'A',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f'CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}')
        if shortcut not in SHORTCUTS:
            raise ValueError(f'CIFAR ResNet shortcut must be one of {SHORTCUTS}, got {shortcut!r}')
        dd = dict(device=device, dtype=dtype)
        self.depth = depth
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.shortcut_type = shortcut
        # timm's reconstruction arguments: every saved config (hf-graft export, timm's save_for_hf)
        # then names the shortcut, and a config that does not predates option A (saved_configs.py)
        _compat.record_model_args(self, shortcut=shortcut)
        self.grad_checkpointing = False
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='act1')]

        in_chs, reduction = widths[0], 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(BasicBlock(in_chs, out_chs, stride if block_idx == 0 else 1, shortcut, **dd))
                in_chs = out_chs
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{stage_idx + 1}'))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        kaiming_normal_fan_in(self)

    @torch.jit.ignore
    def init_classifier(self, head: nn.Module) -> None:
        kaiming_normal_fan_in(head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay helpers."""
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def _stages(self) -> List[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_stages(self.act1(self.bn1(self.conv1(x))), self._stages())



def _cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR-10 data config; no url / hf_hub_id because no weights are published for these."""
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'cifar_resnet20': _cfg(),
    'cifar_resnet32': _cfg(),
    'cifar_resnet56': _cfg(),
    'cifar_resnet110': _cfg(),
})


def _create_cifar_resnet(variant: str, depth: int, pretrained: bool = False, **kwargs) -> CifarResNet:
    """Build through timm so pretrained_cfg, num_classes/in_chans defaults and features_only work.

    Without a ``shortcut`` argument, a model rebuilt from a saved config (``local-dir:`` /
    ``hf-hub:``) gets the shortcut its weights were trained with (see saved_configs.py).
    """
    if 'shortcut' not in kwargs:
        shortcut = saved_shortcut(kwargs.get('pretrained_cfg'))
        if shortcut is not None:
            kwargs['shortcut'] = shortcut
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        depth=depth,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27 M parameters with option A)."""
    return _create_cifar_resnet('cifar_resnet20', 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.46 M parameters with option A)."""
    return _create_cifar_resnet('cifar_resnet32', 32, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85 M parameters with option A)."""
    return _create_cifar_resnet('cifar_resnet56', 56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage, 1.73 M parameters with option A)."""
    return _create_cifar_resnet('cifar_resnet110', 110, pretrained, **kwargs)
