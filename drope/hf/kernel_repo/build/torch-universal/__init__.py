"""drope's attention as a kernel repository for transformers' continuous batching (see drope/hf/batching.py): the
``kernels`` package loads this directory through ``LOCAL_KERNELS`` (drope.hf.continuous_batching_attention())."""

from drope.hf.batching import flash_attn_forward, flash_attn_with_kvcache, supports_flash_attn  # noqa: F401
