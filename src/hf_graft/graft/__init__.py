"""The method's math, pure torch (no Trainer): layer information, the graft and its scion sources, distillation,
filter statistics and the learning-rate spread of a population (docs/method.md)."""
