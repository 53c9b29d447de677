"""Exact PyTorch kernels of drope's operators for CPU tensors (used when Triton's interpreter is off)."""
