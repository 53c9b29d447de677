"""Hugging Face integration: the "drope_triton" attention, DroPE model classes, conversion, temperature.

Importing this package registers ``"drope_triton"`` and ``"drope_cp"`` (context parallelism: :mod:`.parallel`) with
transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and the ``llama_drope`` / ``qwen2_drope`` /
``qwen3_drope`` / ``gemma_drope`` model types with the Auto classes; ``import drope`` imports it as soon as
transformers is imported.
"""

from . import attention, batching, modeling, parallel
from .attention import ATTN_IMPLEMENTATION, drope_attention_forward, drope_mask
from .batching import KERNEL_REPO, continuous_batching_attention
from .convert import to_drope
from .parallel import CP_IMPLEMENTATION, ContextParallel, context_parallel
from .modeling import (
    DropeAttention,
    GemmaDropeConfig,
    GemmaDropeForCausalLM,
    GemmaDropeModel,
    LlamaDropeConfig,
    LlamaDropeForCausalLM,
    LlamaDropeModel,
    Qwen2DropeConfig,
    Qwen2DropeForCausalLM,
    Qwen2DropeModel,
    Qwen3DropeConfig,
    Qwen3DropeForCausalLM,
    Qwen3DropeModel,
    cache_argument,
)
from .temperature import get_temperature, set_temperature, temperature_rows, temperature_scale, validate_temperature

attention.register()
parallel.register()
modeling.register()

__all__ = [
    "ATTN_IMPLEMENTATION", "CP_IMPLEMENTATION", "ContextParallel", "context_parallel",
    "KERNEL_REPO", "continuous_batching_attention", "drope_attention_forward", "drope_mask",
    "to_drope", "DropeAttention",
    "GemmaDropeConfig", "GemmaDropeForCausalLM", "GemmaDropeModel",
    "LlamaDropeConfig", "LlamaDropeForCausalLM", "LlamaDropeModel", "Qwen2DropeConfig", "Qwen2DropeForCausalLM",
    "Qwen2DropeModel", "Qwen3DropeConfig", "Qwen3DropeForCausalLM", "Qwen3DropeModel", "get_temperature",
    "set_temperature", "temperature_rows", "temperature_scale", "validate_temperature", "cache_argument",
]
