"""The kernels behind ``"drope_triton"``: :mod:`drope.kernels` with the HF layer's call signature, checked once.

The HF layer builds every argument itself: q, k, v come from the model's projections (consistent shapes),
the scales, lengths, key masks and boundaries from :mod:`drope.hf.attention`. What a model can still get wrong
(the dtype, the head dim, the device) is checked once per kind of call, with the kernels' own messages, and
the per-call argument checks of :func:`drope.kernels.attention` are skipped: they are most of the Python
time of an attention call, which this layer must keep at or below ``sdpa_attention_forward``'s
(``benchmarks/test_host.py``). Same signatures as :mod:`drope.hf.sdpa_path`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import interface
from ..kernels.decode import num_splits_for
from ..kernels.toolkit import check_device
from ..validation import AttentionShape, check_qkv, interpreter_enabled

__all__ = ["attention", "decode_attention"]

_CHECKED = set()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str) -> None:
    key = (q.dtype, q.shape[-1], q.device.type, interpreter_enabled(), op)
    if key not in _CHECKED:
        check_qkv(q, k, v, kernel=True)
        check_device(q, op)
        _CHECKED.add(key)


def _scale(softmax_scale, q: torch.Tensor):
    """(constant, rows): the layer passes a float or a (B, Hq or 1, Sq) float32 tensor."""
    if isinstance(softmax_scale, torch.Tensor):
        return 1.0, softmax_scale.expand(q.shape[0], q.shape[1], q.shape[2])
    return float(softmax_scale), None


def attention(q, k, v, *, causal: bool = True, softmax_scale=None, q_norm_weight=None, norm_eps: float = 1e-6,
              cu_seqlens=None, window: Optional[int] = None, chunk: Optional[int] = None,
              sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
              key_mask: Optional[torch.Tensor] = None, check_values: bool = False):
    """:func:`drope.kernels.attention` for the HF layer (``softmax_scale`` a float or (B, Hq or 1, Sq) fp32)."""
    _check(q, k, v, "attention")
    const, rows = _scale(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale, q)
    return interface.run_attention(q, k, v, const, rows, causal=causal, q_norm_weight=q_norm_weight,
                                   norm_eps=norm_eps, cu_seqlens=cu_seqlens, window=window, chunk=chunk, sinks=sinks,
                                   softcap=softcap, key_mask=key_mask)


def decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, softmax_scale=None, window: Optional[int] = None,
                     chunk: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
                     softcap: Optional[float] = None, key_mask: Optional[torch.Tensor] = None,
                     check_values: bool = False):
    """:func:`drope.kernels.decode_attention` for the HF layer (split count from capacities, as the public one)."""
    _check(q, k_cache, v_cache, "decode_attention")
    B, HQ, SQ, D = q.shape
    shape = AttentionShape(B, HQ, k_cache.shape[1], SQ, k_cache.shape[2], D)
    const, rows = _scale(D ** -0.5 if softmax_scale is None else softmax_scale, q)
    splits = num_splits_for(shape, q.device, window=window, chunk=chunk)
    return interface.run_decode(q, k_cache, v_cache, const, rows, splits, cache_seqlens=cache_seqlens,
                                window=window, chunk=chunk, sinks=sinks, softcap=softcap, key_mask=key_mask)
