"""MobileNetV2 (Sandler et al., 2018) for 32x32 inputs, as the grafting paper trained it; a timm model.

The inverted-residual table is the MobileNetV2 paper's (expansion t, channels c, repeats n,
stride s), width 1.0, 1280-channel head.  Two strides are set to 1 so a 32 px image is
downsampled only 8x (32 -> 4) instead of 32x (32 -> 1): the stem conv and the first block of the
second stage (24 channels).

Blocks are those of the widely used CIFAR variant the grafting paper's code trains, which differ
from the MobileNetV2 paper in three ways: ReLU (not ReLU6) after the expansion and depthwise
convs; a 1x1 expansion conv in every block, also where t = 1; and a residual on every stride-1
block, identity where the width is kept and a 1x1 conv + BatchNorm projection where it changes
(the first block of the t = 1, 24-, 96- and 320-channel stages).  Stride-2 blocks have no
residual.  2,296,922 parameters for 10 classes.  Weights keep PyTorch's default initialisation,
as in the paper's code.  Depthwise convs are ``nn.Conv2d(..., groups=channels)``.

Modules are declared in forward order (conv, then its BN) so that ``state_dict()`` lists each
BatchNorm right after the conv it normalises; the grafting code relies on that order.
"""
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._base import CifarClassifierBase
from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ['CifarMobileNetV2', 'InvertedResidual', 'CIFAR_MBV2_SETTINGS']

# (expansion t, out channels c, repeats n, stride of the first repeat s); paper Table 2 except the
# second row's stride, 2 -> 1 for 32 px inputs.
CIFAR_MBV2_SETTINGS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round_channels(chs: float, divisor: int = 8) -> int:
    """Round a width-scaled channel count to a multiple of 8 without losing more than 10%."""
    rounded = max(divisor, int(chs + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * chs:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; on stride-1 blocks plus a shortcut
    (identity, or a 1x1 conv + BN projection where the width changes)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        hidden = in_chs * expand_ratio
        self.has_residual = stride == 1
        # Declaration order == forward order == state_dict order.
        self.conv_pw = nn.Conv2d(in_chs, hidden, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(hidden, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(hidden, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.conv_pwl = nn.Conv2d(hidden, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        if self.has_residual and in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, bias=False, **dd),
                nn.BatchNorm2d(out_chs, **dd),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + self.shortcut(x) if self.has_residual else out


class CifarMobileNetV2(CifarClassifierBase):
    """MobileNetV2 (the grafting paper's CIFAR variant) for 32x32 inputs, with the timm classifier interface.

    Args:
        num_classes: classifier outputs; 0 leaves the head as identity (pooled features out).
        in_chans: input image channels.
        global_pool: timm pooling type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
        drop_rate: dropout before the classifier (0 by default, as in CIFAR recipes).
        width_mult: channel multiplier; 1.0 is the model described above.
        settings: inverted-residual table, see ``CIFAR_MBV2_SETTINGS``.
        stem_stride: stride of the stem conv (1 for CIFAR, 2 for ImageNet).
    """

    classifier_name = 'classifier'

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            width_mult: float = 1.0,
            settings: Sequence[Tuple[int, int, int, int]] = CIFAR_MBV2_SETTINGS,
            stem_stride: int = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_chs = _round_channels(32 * width_mult)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, stride=stem_stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=stem_stride, module='act1')]

        stages, in_chs, reduction = [], stem_chs, stem_stride
        for stage_idx, (t, c, n, s) in enumerate(settings):
            out_chs = _round_channels(c * width_mult)
            if s > 1 and len(stages) > 0:
                # Record the last full-resolution map before this stage downsamples it.
                self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'blocks.{stage_idx - 1}'))
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t, **dd))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            reduction *= s
        self.blocks = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = _round_channels(1280 * max(1.0, width_mult))
        self.conv_head = nn.Conv2d(in_chs, self.num_features, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(self.num_features, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.feature_info.append(dict(num_chs=self.num_features, reduction=reduction, module='act2'))

        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights()  # PyTorch's defaults, as the paper's code

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay helpers."""
        return dict(
            stem=r'^conv_stem|bn1',
            blocks=r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)',
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_stages(self.act1(self.bn1(self.conv_stem(x))), self.blocks)
        return self.act2(self.bn2(self.conv_head(x)))



default_cfgs = generate_default_cfgs({
    # No url / hf_hub_id: no weights are published for this CIFAR variant.
    'cifar_mobilenetv2': {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier',
    },
})


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """MobileNetV2 1.0 for 32 px inputs, the grafting paper's CIFAR variant (2.30 M parameters)."""
    return build_model_with_cfg(
        CifarMobileNetV2,
        'cifar_mobilenetv2',
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4), flatten_sequential=True),
        **kwargs,
    )
