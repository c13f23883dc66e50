"""CIFAR-size architectures registered in timm's registry (import hf_graft, then timm.create_model).

Importing this package runs the ``@register_model`` decorators, which makes ``cifar_resnet20``,
``cifar_resnet32``, ``cifar_resnet56``, ``cifar_resnet110``, ``cifar_mobilenetv2`` and
``cifar_wrn28_10`` available to ``timm.create_model`` and ``timm.list_models('cifar_*')``.
"""
from .cifar_mobilenetv2 import CIFAR_MBV2_SETTINGS, CifarMobileNetV2, InvertedResidual, cifar_mobilenetv2
from .cifar_resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    SHORTCUTS,
    BasicBlock,
    CifarResNet,
    ZeroPadShortcut,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet56,
    cifar_resnet110,
)
from .cifar_wide_resnet import CifarWideResNet, PreActBlock, cifar_wrn28_10
from .saved_configs import saved_model_args, saved_shortcut, shortcut_of_weights

__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR_MBV2_SETTINGS', 'SHORTCUTS',
    'BasicBlock', 'CifarResNet', 'ZeroPadShortcut', 'InvertedResidual', 'CifarMobileNetV2',
    'CifarWideResNet', 'PreActBlock',
    'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet56', 'cifar_resnet110', 'cifar_mobilenetv2',
    'cifar_wrn28_10',
    'saved_model_args', 'saved_shortcut', 'shortcut_of_weights',
]
