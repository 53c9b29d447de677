"""Triton kernels. Imports torch and triton only, never transformers.

The public functions (:mod:`drope.kernels.interface`) are backed by PyTorch operators in the ``drope``
namespace (:mod:`drope.kernels.ops`), so torch.compile and torch.export trace them as single nodes.
"""
from .decode import choose_num_splits  # noqa: F401
from .interface import attention, attention_with_cache, decode_attention, qk_norm_rope  # noqa: F401
