"""Triton kernels. Imports torch and triton only, never transformers."""
from .decode import choose_num_splits, decode_attention  # noqa: F401
from .attention import attention  # noqa: F401
