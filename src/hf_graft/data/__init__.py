"""Image data: loading and checks through `datasets`, timm transforms, per-member example order, data decoded
onto the training device, and the copy of batches to it."""
