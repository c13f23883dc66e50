"""Wide ResNets (Zagoruyko & Komodakis, 2016) for 32x32 inputs, registered as timm models.

WRN-d-k: a 3x3 conv stem with 16 channels, then three stages of ``n = (d - 4) / 6``
pre-activation basic blocks with 16k/32k/64k channels (stride 2 at the start of stages 2 and 3),
a final BatchNorm-ReLU, global average pooling and a linear head.  A block is
BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus a shortcut: identity where the shape is kept, a
1x1 conv (no BN) where it changes, applied to the block's pre-activated input.  WRN-28-10 has
36,475,354 parameters for 10 classes.  Initialisation as in the grafting paper's code: Kaiming-normal
(fan-in) convs, BatchNorm scales drawn from U(0, 1) and zero shifts, a zero linear bias.

In ``state_dict()`` order every BatchNorm comes right after the conv that produced its input (the
previous block's last conv, or its shortcut conv), so the grafting code's rule of giving each
entry the coefficient of the nearest preceding weight pairs each BatchNorm with that conv.
"""
from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._base import CifarClassifierBase
from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ['CifarWideResNet', 'PreActBlock']


class PreActBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet (see the module docstring)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, conv_drop_rate: float = 0.,
                 device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(conv_drop_rate) if conv_drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.projects = stride != 1 or in_chs != out_chs
        if self.projects:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        # a projecting shortcut reads the pre-activated input; an identity shortcut the input itself
        residual = self.shortcut(pre) if self.projects else x
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + residual


class CifarWideResNet(CifarClassifierBase):
    """WRN-depth-widen_factor for 32x32 inputs, with the timm classifier interface.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...).
        widen_factor: k, the width multiplier of the three stages (16k, 32k, 64k channels).
        num_classes: classifier outputs; 0 leaves the head as identity (pooled features out).
        in_chans: input image channels.
        global_pool: timm pooling type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
        drop_rate: dropout before the classifier.
        conv_drop_rate: dropout between the two convs of every block (0 in the grafting paper; the
            Wide ResNet paper also trains with 0.3).
    """

    def __init__(
            self,
            depth: int = 28,
            widen_factor: int = 10,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            conv_drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f'Wide ResNet depth must be 6n + 4 with n >= 1, got {depth}')
        if widen_factor < 1:
            raise ValueError(f'Wide ResNet widen_factor must be >= 1, got {widen_factor}')
        dd = dict(device=device, dtype=dtype)
        self.depth = depth
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=16, reduction=1, module='conv1')]
        in_chs, reduction = 16, 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(PreActBlock(in_chs, out_chs, stride if block_idx == 0 else 1, conv_drop_rate, **dd))
                in_chs = out_chs
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            if stage_idx < 2:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{stage_idx + 1}'))
        # the last block's output is not yet normalised (pre-activation): BN-ReLU before pooling,
        # and the last feature map is taken after it
        self.bn = nn.BatchNorm2d(in_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module='act'))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                self.init_classifier(m)

    @torch.jit.ignore
    def init_classifier(self, head: nn.Module) -> None:
        for m in head.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay helpers."""
        return dict(stem=r'^conv1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def _stages(self) -> List[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.run_stages(self.conv1(x), self._stages())))


default_cfgs = generate_default_cfgs({
    # No url / hf_hub_id: no weights are published for this CIFAR model.
    'cifar_wrn28_10': {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
    },
})


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """Wide ResNet 28-10 for CIFAR (4 blocks per stage, 160/320/640 channels, 36.5 M parameters)."""
    model_args = dict(depth=28, widen_factor=10)
    return build_model_with_cfg(
        CifarWideResNet,
        'cifar_wrn28_10',
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **dict(model_args, **kwargs),  # depth / widen_factor may be overridden (small test networks)
    )
