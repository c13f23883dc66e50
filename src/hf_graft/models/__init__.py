"""CIFAR-size architectures registered in timm's registry (import hf_graft, then timm.create_model)."""
