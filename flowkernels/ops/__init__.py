"""The fused flow ops, one module per op: reference, kernels, torch.library op, autograd, API."""
