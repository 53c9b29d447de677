"""Writing the new tokens' keys and values into a KV cache (contiguous or paged) on the device.

``decode_attention(..., k_new=, v_new=)`` calls this before attending, in the same call: the Sq new rows of batch
row b go to positions ``cache_seqlens[b] - Sq + i`` (``cache_seqlens`` counts the new tokens, as everywhere in
drope). Positions are computed on the device from ``cache_seqlens``; nothing is read back to the host, so a decode
step with an append captures in a CUDA graph. A position outside [0, Smax) (a length the host did not check) is
skipped, and a page index outside the cache is never written through.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .toolkit import cdiv, launch, named_strides, padded_dim

__all__ = ["append_kv"]


@triton.jit(do_not_specialize=["SQ", "SMAX", "NUM_PAGES"])
def _append_kernel(
    KN, VN, K, V, SEQLENS, BT,
    stride_nb, stride_nh, stride_ns, stride_nd, stride_wb, stride_wh, stride_ws, stride_wd,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_sl, stride_bb, stride_bp,
    HKV, SQ, SMAX, NUM_PAGES,
    D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr,
    PAGE: tl.constexpr,
):
    # one program per (batch row, KV head, block of new rows)
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    o_s = i_s * BS + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    if HAS_SEQLENS:
        L = tl.load(SEQLENS + i_b * stride_sl).to(tl.int32)
    else:
        L = SMAX
    pos = L - SQ + o_s
    ok = (o_s < SQ) & (pos >= 0) & (pos < SMAX)
    if PAGED:
        pg = tl.load(BT + i_b * stride_bb + (tl.maximum(pos, 0) // PAGE).to(tl.int64) * stride_bp, mask=ok,
                     other=0).to(tl.int64)
        ok = ok & (pg >= 0) & (pg < NUM_PAGES)
        r = (tl.maximum(pos, 0) % PAGE).to(tl.int64)
        k_row = pg * stride_kb + r * stride_ks + i_h * stride_kh
        v_row = pg * stride_vb + r * stride_vs + i_h * stride_vh
    else:
        p64 = tl.maximum(pos, 0).to(tl.int64)
        k_row = i_b * stride_kb + i_h * stride_kh + p64 * stride_ks
        v_row = i_b * stride_vb + i_h * stride_vh + p64 * stride_vs
    m = ok[:, None] & (o_d < D)[None, :]
    o_s64 = o_s.to(tl.int64)
    b_k = tl.load(KN + i_b * stride_nb + i_h * stride_nh + o_s64[:, None] * stride_ns + o_d[None, :] * stride_nd,
                  mask=m)
    b_v = tl.load(VN + i_b * stride_wb + i_h * stride_wh + o_s64[:, None] * stride_ws + o_d[None, :] * stride_wd,
                  mask=m)
    tl.store(K + k_row[:, None] + o_d[None, :] * stride_kd, b_k, mask=m)
    tl.store(V + v_row[:, None] + o_d[None, :] * stride_vd, b_v, mask=m)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              cache_seqlens: Optional[torch.Tensor], block_table: Optional[torch.Tensor]) -> None:
    """Write ``k_new`` / ``v_new`` (B, Hkv, Sq, D) into the caches, in place (inputs validated by ``check_decode``).

    Caches are (B, Hkv, Smax, D), or paged (num_pages, page_size, Hkv, D) with ``block_table`` (B, max_pages).
    """
    B, HKV, SQ, D = k_new.shape
    if B * HKV * SQ * D == 0:
        return
    paged = block_table is not None
    smax = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
    layout = "bshd" if paged else "bhsd"
    BS = min(64, max(16, 1 << (SQ - 1).bit_length()))
    launch(_append_kernel, (B * HKV, cdiv(SQ, BS)), KN=k_new, VN=v_new, K=k_cache, V=v_cache,
           SEQLENS=cache_seqlens, BT=block_table, **named_strides("n", k_new, "bhsd"),
           **named_strides("w", v_new, "bhsd"), **named_strides("k", k_cache, layout),
           **named_strides("v", v_cache, layout), stride_sl=cache_seqlens.stride(0) if cache_seqlens is not None else 0,
           **named_strides("b", block_table, "bp"), HKV=HKV, SQ=SQ, SMAX=smax,
           NUM_PAGES=k_cache.shape[0] if paged else 0, D=D, BD=padded_dim(D), BS=BS,
           HAS_SEQLENS=cache_seqlens is not None, PAGED=paged, PAGE=k_cache.shape[1] if paged else 16, num_warps=4)
