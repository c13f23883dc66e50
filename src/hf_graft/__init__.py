"""hf_graft: filter grafting for timm image classifiers, trained with the Hugging Face Trainer."""

__version__ = "0.1.0"

# Registers the CIFAR architectures (cifar_resnet20/32/56/110, cifar_mobilenetv2) in timm.
from . import models  # noqa: F401
