"""CIFAR-size architectures registered in timm's registry (import hf_graft, then timm.create_model).

Importing this package runs the ``@register_model`` decorators, which makes ``cifar_resnet20``,
``cifar_resnet32``, ``cifar_resnet56``, ``cifar_resnet110`` and ``cifar_mobilenetv2`` available to
``timm.create_model`` and ``timm.list_models('cifar_*')``.
"""
from .cifar_mobilenetv2 import CIFAR_MBV2_SETTINGS, CifarMobileNetV2, InvertedResidual, cifar_mobilenetv2
from .cifar_resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BasicBlock,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet56,
    cifar_resnet110,
)

__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR_MBV2_SETTINGS',
    'BasicBlock', 'CifarResNet', 'InvertedResidual', 'CifarMobileNetV2',
    'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet56', 'cifar_resnet110', 'cifar_mobilenetv2',
]
