"""flash-attention's Python interface on drope's kernels: code written for ``flash_attn`` runs by changing one import.

    from drope.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same tensor layouts as flash-attn ((batch, seqlen, nheads, headdim); packed (total, nheads, headdim); paged caches
(num_blocks, page_block_size, nheads_k, headdim)), argument names, defaults and return values, for everything
drope supports; on any GPU Triton supports, and on the CPU in Triton's interpreter (``TRITON_INTERPRET=1`` set
before importing drope). What drope does not support raises ``ValueError`` naming the argument.

Mapping (flash-attn -> drope):

- ``window_size=(left, right)``: a query at position p sees keys ``[p - left, p + right]``. With ``causal=True``
  (or ``right == 0``) that is drope's causal ``window=left + 1``; ``(-1, -1)`` is no window. A right side with
  ``causal=False`` (``right != 0``) has no drope equivalent and is refused, except for single-row decode steps,
  where no key lies right of the query.
- ``softcap=0.0`` is off (drope: None); ``softmax_scale=None`` is ``headdim ** -0.5`` in both.
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: drope never materialises probabilities.
- ``flash_attn_with_kvcache``: flash's ``cache_seqlens`` counts the keys *before* ``k`` / ``v`` are appended (drope's
  ``decode_attention`` counts the new tokens too: the wrapper adds them on the device, no sync);
  ``cache_leftpad`` becomes a key mask; ``num_splits=0`` is drope's automatic choice.
- ``deterministic`` is accepted: drope's backward is always deterministic.

Not supported (``ValueError``): ``dropout_p > 0``, ``alibi_slopes``, rotary embedding inside
``flash_attn_with_kvcache`` (``rotary_cos`` / ``rotary_sin``: rotate first), ``cache_batch_idx``, non-causal
attention of several new rows to a cache, and, in the varlen functions, a document with more queries than keys
(flash gives its first rows zeros; drope's contract asks Lq <= Lk).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .kernels.interface import attention, decode_attention

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _window(window_size, causal: bool, *, single_row: bool = False) -> Tuple[bool, Optional[int]]:
    """(causal, window) in drope's terms for flash's ``window_size`` and ``causal``."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), got {window_size!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = window_size
    if causal or single_row or right == 0:
        if not causal and not single_row and left == -1 and right == -1:
            return False, None
        return True, (left + 1 if left >= 0 else None)
    if left == -1 and right == -1:
        return False, None
    raise ValueError(f"window_size={tuple(window_size)} with causal=False has a right side: drope's windows are "
                     "causal (key j visible to position p iff p - window < j <= p); use causal=True or right=0")


def _common(dropout_p, alibi_slopes, softcap) -> Optional[float]:
    """Refuse what drope lacks; flash's softcap (0.0 = off) as drope's (None = off)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0 (drope's kernels have no attention dropout), got {dropout_p!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by drope (no ALiBi bias); pass None")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0.0 = off), got {softcap!r}")
    return float(softcap) if softcap > 0 else None


def _dims(name: str, t, n: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != n:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be {layout}, got {got}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_func``: q (batch, seqlen_q, nheads, headdim), k / v (batch, seqlen_k, nheads_k,
    headdim); returns out (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse, None)`` with
    ``return_attn_probs`` (lse (batch, nheads, seqlen_q)). Differentiable in q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _dims(name, t, 4, "(batch, seqlen, nheads, headdim)")
    cap = _common(dropout_p, alibi_slopes, softcap)
    causal, window = _window(window_size, causal)
    out, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                         softmax_scale=softmax_scale, window=window, softcap=cap, return_lse=True)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, nheads, headdim)."""
    _dims("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_kvpacked_func``: kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    _dims("kv", kv, 5, "(batch, seqlen, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ValueError(f"kv must be (batch, seqlen, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def _max_seqlen(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (the longest sequence, known on the host), got {value!r}")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """``flash_attn.flash_attn_varlen_func``: q (total_q, nheads, headdim), k / v (total_k, nheads_k, headdim), or
    paged caches (num_blocks, page_block_size, nheads_k, headdim) with ``block_table`` (batch, max_blocks);
    cu_seqlens int32 (batch + 1,). Returns out (total_q, nheads, headdim), or ``(out, softmax_lse, None)`` (lse
    (nheads, total_q)). Differentiable in q, k, v without ``block_table``. ``max_seqlen_*`` are checked, unused."""
    _dims("q", q, 3, "(total_q, nheads, headdim)")
    layout = "(num_blocks, page_block_size, nheads_k, headdim) with block_table" if block_table is not None else \
        "(total_k, nheads_k, headdim)"
    for name, t in (("k", k), ("v", v)):
        _dims(name, t, 4 if block_table is not None else 3, layout)
    _max_seqlen("max_seqlen_q", max_seqlen_q)
    _max_seqlen("max_seqlen_k", max_seqlen_k)
    cap = _common(dropout_p, alibi_slopes, softcap)
    causal, window = _window(window_size, causal)
    if block_table is None:
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    out, lse = attention(q.transpose(0, 1)[None], k, v, causal=causal, softmax_scale=softmax_scale, window=window,
                         softcap=cap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, block_table=block_table,
                         return_lse=True)
    out = out[0].transpose(0, 1)
    return (out, lse[0], None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn.flash_attn_varlen_qkvpacked_func``: qkv (total, 3, nheads, headdim)."""
    _dims("qkv", qkv, 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_varlen_kvpacked_func``: kv (total_k, 2, nheads_k, headdim)."""
    _dims("kv", kv, 4, "(total_k, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise ValueError(f"kv must be (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """``flash_attn.flash_attn_with_kvcache``: q (batch, seqlen_q, nheads, headdim) against k_cache / v_cache
    (batch, seqlen_cache, nheads_k, headdim), or paged (num_blocks, page_block_size, nheads_k, headdim) with
    ``block_table`` (batch, max_blocks) (any page size that is a multiple of 16). ``k`` / ``v`` (batch, seqlen_q,
    nheads_k, headdim), when given, are written into the caches in place at ``cache_seqlens`` (the lengths before
    them) and attended in the same call. Returns out (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse)``
    with ``return_softmax_lse``. Inference only."""
    _dims("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _dims(name, t, 4, "(batch, seqlen_cache, nheads_k, headdim), or paged (num_blocks, page_block_size, "
                          "nheads_k, headdim) with block_table")
    if rotary_cos is not None or rotary_sin is not None:
        raise ValueError("rotary_cos / rotary_sin are not supported by drope.flash_attn.flash_attn_with_kvcache: "
                         "rotate q and k first (drope.kernels.qk_norm_rope), then pass rotary_cos=None")
    if cache_batch_idx is not None:
        raise ValueError("cache_batch_idx is not supported: index the caches yourself (row b of the batch reads row b "
                         "of k_cache / v_cache, or its block_table row)")
    if (k is None) != (v is None):
        raise ValueError("k and v go together: pass both (the new tokens' keys and values) or neither")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    cap = _common(0.0, alibi_slopes, softcap)
    B, SQ = q.shape[0], q.shape[1]
    causal, window = _window(window_size, causal, single_row=SQ == 1)
    if not causal and SQ > 1:
        raise ValueError("causal=False with several query rows (seqlen_q > 1) is not supported: drope's decode is "
                         "causal among the new rows (pass causal=True, or one row at a time)")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _dims(name, t, 4, "(batch, seqlen_q, nheads_k, headdim)")
        if k.shape[1] != SQ:
            raise ValueError(f"k / v must hold one new token per query row (seqlen {SQ}), got seqlen {k.shape[1]}")
        if cache_seqlens is None:
            raise ValueError("k / v need cache_seqlens: the position where each row's new tokens are written")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    lens = cache_seqlens
    if lens is not None and k is not None:
        if not isinstance(lens, torch.Tensor):
            raise ValueError(f"cache_seqlens must be an int or a (batch,) int32 tensor, got {type(lens).__name__}")
        lens = lens + SQ  # drope's lengths count the new tokens (a device op: no sync)
    paged = block_table is not None
    kc = k_cache if paged else k_cache.transpose(1, 2)
    vc = v_cache if paged else v_cache.transpose(1, 2)
    key_mask = None
    if cache_leftpad is not None:
        if not isinstance(cache_leftpad, torch.Tensor) or tuple(cache_leftpad.shape) != (B,):
            raise ValueError(f"cache_leftpad must be a ({B},) int32 tensor, got {cache_leftpad!r}")
        smax = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
        key_mask = torch.arange(smax, device=q.device)[None, :] >= cache_leftpad.to(q.device)[:, None]
    out, lse = decode_attention(q.transpose(1, 2), kc, vc, cache_seqlens=lens, softmax_scale=softmax_scale,
                                num_splits=num_splits or None, return_lse=True, window=window, softcap=cap,
                                key_mask=key_mask, block_table=block_table,
                                k_new=None if k is None else k.transpose(1, 2),
                                v_new=None if v is None else v.transpose(1, 2))
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out
