"""Small utilities shared by the tests."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` (B, H, S, D) behind a (B, S, H, D) memory layout, as HF hands them."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def with_cache(model, cache) -> dict:
    """Keyword argument passing a KV cache to ``model``: ``cache`` on transformers >= 5.24, else ``past_key_values``."""
    from drope.hf import cache_argument

    return {cache_argument(model): cache}
