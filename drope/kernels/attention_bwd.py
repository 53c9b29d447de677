"""Backward of :func:`drope.kernels.attention`: dq, dk, dv, the QK-norm weight and the sink gradients.

FlashAttention-2 style, deterministic (no atomics):

1. ``qk_transform.qk_prologue`` writes ``rope(norm(x))`` of q and of k to O(S*D) temporaries (only
   when a norm weight or rope tables are given; otherwise the raw tensors are read through their strides).
2. ``_delta_kernel``: ``delta_i = rowsum(dO_i * O_i)`` in fp32 (minus d lse_i when the LSE is differentiated).
3. ``_dkdv_kernel``: one program per (batch x KV head, KV block); it loops over the G query heads
   of the group and the query blocks that can see the block, so the GQA sum happens in registers, in a
   fixed order.
4. ``_dq_kernel``: one program per (batch x query head, query block), looping over visible KV blocks.
   Both recompute the probabilities from the saved natural-log LSE (the sink included); the per-row /
   per-head scale and the soft-cap's derivative are applied to dS.
5. ``qk_transform.qk_epilogue`` maps d(q_hat) to dq through RoPE^T and the RMSNorm Jacobian.
6. Sinks: ``d sink_h = -sum_i exp(sink_h - lse_i) * delta_i``, an O(S) reduction in torch.

Only O(S) statistics (the LSE) are saved by the forward; nothing of size S x S is ever stored.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .qk_transform import packed_tables, qk_epilogue, qk_prologue
from ..validation import interpreter_enabled
from .toolkit import LOG2E_C, dot_precision, launch, mm, named_strides, operand, padded_dim, tanh, upcast

__all__ = ["attention_backward"]


@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    H, S,
    D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_s = i_s * BS + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m = (o_s < S)[:, None] & (o_d < D)[None, :]
    o_s64 = o_s.to(tl.int64)
    p_o = O + i_b * stride_ob + i_h * stride_oh + o_s64[:, None] * stride_os + o_d[None, :] * stride_od
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_s64[:, None] * stride_dos + o_d[None, :] * stride_dod
    b_o = tl.load(p_o, mask=m, other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + i_bh.to(tl.int64) * S + o_s64, tl.sum(b_o * b_do, 1), mask=o_s < S)


@triton.jit
def _visible(o_m, o_n, SQ, SK, DOC, DSTART, WINDOW, CHUNK, IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr,
             HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """[BM, BN] mask of (query row, key row) pairs that exist and may attend."""
    m = (o_m[:, None] < SQ) & (o_n[None, :] < SK)
    if PACKED:
        b_dm = tl.load(DOC + o_m, mask=o_m < SQ, other=-1)
        b_dn = tl.load(DOC + o_n, mask=o_n < SK, other=-2)
        m = m & (b_dm[:, None] == b_dn[None, :])
        pos_m = o_m - tl.load(DSTART + o_m, mask=o_m < SQ, other=0)
        pos_n = o_n - tl.load(DSTART + o_n, mask=o_n < SK, other=0)
    else:
        pos_m = o_m + (SK - SQ)
        pos_n = o_n
    if IS_CAUSAL:
        m = m & (pos_n[None, :] <= pos_m[:, None])
    if HAS_WINDOW:
        m = m & (pos_n[None, :] > pos_m[:, None] - WINDOW)
    if HAS_CHUNK:
        m = m & ((pos_n // CHUNK)[None, :] == (pos_m // CHUNK)[:, None])
    return m


@triton.jit
def _needs_mask(m0, n0, SQ, SK, DOC, WINDOW, CHUNK, BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                PACKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Whether the [BM, BN] block at (m0, n0) has any invisible pair (only such blocks pay for masking)."""
    m_end = tl.minimum(m0 + BM, SQ)
    n_end = tl.minimum(n0 + BN, SK)
    ragged = (m_end - m0 < BM) | (n_end - n0 < BN)
    if PACKED:
        d = tl.load(DOC + m0)
        split = (tl.load(DOC + m_end - 1) != d) | (tl.load(DOC + n0) != d) | (tl.load(DOC + n_end - 1) != d)
        ragged = ragged | split
        if IS_CAUSAL:
            ragged = ragged | (n0 + BN - 1 > m0)
        if HAS_WINDOW or HAS_CHUNK:
            ragged = ragged | (m0 >= 0)
    else:
        pos_first = m0 + (SK - SQ)
        pos_last = m_end - 1 + (SK - SQ)
        if IS_CAUSAL:
            ragged = ragged | (n0 + BN - 1 > pos_first)
        if HAS_WINDOW:
            ragged = ragged | (n0 <= pos_last - WINDOW)
        if HAS_CHUNK:
            ragged = ragged | (n0 // CHUNK != pos_last // CHUNK)
    return ragged


@triton.jit
def _probs(b_q, b_k, b_lse2, b_sc, softcap, m0, n0, o_m, o_n, SQ, SK, DOC, DSTART, WINDOW, CHUNK,
           BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr,
           HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Probabilities [BM, BN] of a block from the saved LSE, and d(logit)/d(q.k) per element (or row)."""
    b_s = mm(b_q, tl.trans(b_k), None, DOT_PREC, UPCAST)  # [BM, BN]
    if HAS_SOFTCAP:
        b_t = tanh(b_s * (b_sc / softcap)[:, None])
        b_p = tl.math.exp2(b_t * (softcap * LOG2E_C) - b_lse2[:, None])
        b_dsdx = (1.0 - b_t * b_t) * b_sc[:, None]
    else:
        b_p = tl.math.exp2(b_s * (b_sc * LOG2E_C)[:, None] - b_lse2[:, None])
        b_dsdx = b_sc[:, None]
    if _needs_mask(m0, n0, SQ, SK, DOC, WINDOW, CHUNK, BM, BN, IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK):
        b_p = tl.where(_visible(o_m, o_n, SQ, SK, DOC, DSTART, WINDOW, CHUNK, IS_CAUSAL, PACKED, HAS_WINDOW,
                                HAS_CHUNK), b_p, 0.0)
    return b_p, b_dsdx


@triton.jit
def _row_stats(LSE, DELTA, SCALE, i_b, i_h, o_m64, m_m, stride_lb, stride_lh, stride_ls, stride_rb, stride_rh,
               stride_rs, HQ, SQ, scale, BM: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Per query row: base-2 LSE (+inf where the row saw nothing, so p = 0), delta, natural scale."""
    b_lse = tl.load(LSE + i_b * stride_lb + i_h * stride_lh + o_m64 * stride_ls, mask=m_m, other=float("-inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_C)
    b_delta = tl.load(DELTA + (i_b * HQ + i_h) * SQ + o_m64, mask=m_m, other=0.0)
    if HAS_SCALE:
        b_sc = tl.load(SCALE + i_b * stride_rb + i_h * stride_rh + o_m64 * stride_rs, mask=m_m,
                       other=0.0).to(tl.float32) * scale
    else:
        b_sc = tl.full([BM], 1.0, tl.float32) * scale
    return b_lse2, b_delta, b_sc


@triton.jit(do_not_specialize=["SQ", "SK", "WINDOW", "CHUNK"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, SCALE, DK, DV, DOC, DSTART, DEND,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_rb, stride_rh, stride_rs,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    HKV, SQ, SK, WINDOW, CHUNK, scale, softcap,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    i_bh, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_nd = (o_n < SK)[:, None] & m_d[None, :]
    o_n64 = o_n.to(tl.int64)
    p_k = K + i_b * stride_kb + i_hk * stride_kh + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd
    p_v = V + i_b * stride_vb + i_hk * stride_vh + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd
    b_k = tl.load(p_k, mask=m_nd, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_nd, other=0.0)  # [BN, BD]
    # query rows [lo, hi) that can see some key of this block
    n_last = tl.minimum(n0 + BN, SK) - 1
    if PACKED:
        hi = tl.load(DEND + n_last)
        if IS_CAUSAL:
            lo = n0
        else:
            lo = tl.load(DSTART + n0)
        if HAS_WINDOW:
            hi = tl.minimum(hi, n_last + WINDOW)
        if HAS_CHUNK:
            ds = tl.load(DSTART + n_last)
            hi = tl.minimum(hi, ds + ((n_last - ds) // CHUNK + 1) * CHUNK)
    else:
        hi = SQ
        if IS_CAUSAL:
            lo = tl.maximum(n0 - (SK - SQ), 0)
        else:
            lo = 0
        if HAS_WINDOW:
            hi = tl.minimum(hi, n_last + WINDOW - (SK - SQ))
        if HAS_CHUNK:
            hi = tl.minimum(hi, (n_last // CHUNK + 1) * CHUNK - (SK - SQ))
    lo = (lo // BM) * BM
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for g in range(G):
        i_h = i_hk * G + g
        for m0 in range(lo, hi, BM):
            o_m = m0 + tl.arange(0, BM)
            m_m = o_m < SQ
            m_md = m_m[:, None] & m_d[None, :]
            o_m64 = o_m.to(tl.int64)
            p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qs + o_d[None, :] * stride_qd
            p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_dos + o_d[None, :] * stride_dod
            b_q = tl.load(p_q, mask=m_md, other=0.0)  # [BM, BD]
            b_do = tl.load(p_do, mask=m_md, other=0.0)  # [BM, BD]
            b_lse2, b_delta, b_sc = _row_stats(LSE, DELTA, SCALE, i_b, i_h, o_m64, m_m, stride_lb, stride_lh,
                                               stride_ls, stride_rb, stride_rh, stride_rs, HKV * G, SQ, scale,
                                               BM, HAS_SCALE)
            b_p, b_dsdx = _probs(b_q, b_k, b_lse2, b_sc, softcap, m0, n0, o_m, o_n, SQ, SK, DOC, DSTART, WINDOW,
                                 CHUNK, BM, BN, IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK, HAS_SOFTCAP, DOT_PREC,
                                 UPCAST)
            if COMPUTE_DV:
                b_dv = mm(tl.trans(operand(b_p, b_do.dtype, UPCAST)), b_do, b_dv, DOT_PREC, UPCAST)
            if COMPUTE_DK:
                b_dp = mm(b_do, tl.trans(b_v), None, DOT_PREC, UPCAST)  # [BM, BN]
                b_ds = b_p * (b_dp - b_delta[:, None]) * b_dsdx
                b_dk = mm(tl.trans(operand(b_ds, b_q.dtype, UPCAST)), b_q, b_dk, DOT_PREC, UPCAST)
    if COMPUTE_DK:
        p_dk = DK + i_b * stride_dkb + i_hk * stride_dkh + o_n64[:, None] * stride_dks + o_d[None, :] * stride_dkd
        tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_nd)
    if COMPUTE_DV:
        p_dv = DV + i_b * stride_dvb + i_hk * stride_dvh + o_n64[:, None] * stride_dvs + o_d[None, :] * stride_dvd
        tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_nd)


@triton.jit(do_not_specialize=["SQ", "SK", "WINDOW", "CHUNK"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, SCALE, DQ, DOC, DSTART, DEND,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_rb, stride_rh, stride_rs,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HQ, SQ, SK, WINDOW, CHUNK, scale, softcap,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # the last query blocks see the most keys (causal): launch them first
    i_bh, i_m = tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)
    i_b, i_h = (i_bh // HQ).to(tl.int64), (i_bh % HQ).to(tl.int64)
    i_hk = i_h // G
    m0 = i_m * BM
    o_m = m0 + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_m = o_m < SQ
    m_md = m_m[:, None] & m_d[None, :]
    o_m64 = o_m.to(tl.int64)
    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qs + o_d[None, :] * stride_qd
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_dos + o_d[None, :] * stride_dod
    b_q = tl.load(p_q, mask=m_md, other=0.0)  # [BM, BD]
    b_do = tl.load(p_do, mask=m_md, other=0.0)  # [BM, BD]
    b_lse2, b_delta, b_sc = _row_stats(LSE, DELTA, SCALE, i_b, i_h, o_m64, m_m, stride_lb, stride_lh, stride_ls,
                                       stride_rb, stride_rh, stride_rs, HQ, SQ, scale, BM, HAS_SCALE)
    # key rows [lo, hi) visible to some row of this query block
    m_last = tl.minimum(m0 + BM, SQ) - 1
    if PACKED:
        ds = tl.load(DSTART + m0)
        lo = ds
        if IS_CAUSAL:
            hi = m_last + 1
        else:
            hi = tl.load(DEND + m_last)
        if HAS_WINDOW:
            lo = tl.maximum(lo, m0 - WINDOW + 1)
        if HAS_CHUNK:
            lo = tl.maximum(lo, ds + ((m0 - ds) // CHUNK) * CHUNK)
    else:
        lo = 0
        if IS_CAUSAL:
            hi = tl.minimum(m_last + 1 + (SK - SQ), SK)
        else:
            hi = SK
        if HAS_WINDOW:
            lo = tl.maximum(lo, m0 + (SK - SQ) - WINDOW + 1)
        if HAS_CHUNK:
            lo = tl.maximum(lo, ((m0 + (SK - SQ)) // CHUNK) * CHUNK)
    lo = (lo // BN) * BN
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_nd = (o_n < SK)[:, None] & m_d[None, :]
        o_n64 = o_n.to(tl.int64)
        p_k = K + i_b * stride_kb + i_hk * stride_kh + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd
        p_v = V + i_b * stride_vb + i_hk * stride_vh + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd
        b_k = tl.load(p_k, mask=m_nd, other=0.0)  # [BN, BD]
        b_v = tl.load(p_v, mask=m_nd, other=0.0)  # [BN, BD]
        b_p, b_dsdx = _probs(b_q, b_k, b_lse2, b_sc, softcap, m0, n0, o_m, o_n, SQ, SK, DOC, DSTART, WINDOW, CHUNK,
                             BM, BN, IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK, HAS_SOFTCAP, DOT_PREC, UPCAST)
        b_dp = mm(b_do, tl.trans(b_v), None, DOT_PREC, UPCAST)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None]) * b_dsdx
        b_dq = mm(operand(b_ds, b_k.dtype, UPCAST), b_k, b_dq, DOT_PREC, UPCAST)
    p_dq = DQ + i_b * stride_dqb + i_h * stride_dqh + o_m64[:, None] * stride_dqs + o_d[None, :] * stride_dqd
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_md)


def _blocks(BD: int, SQ: int, SK: int, block_m: Optional[int], block_n: Optional[int]) -> Tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for the dK/dV and dQ kernels.

    TODO(issue 13): per-D tiles checked by the compile inspector; these are hand-picked sizes.
    """
    if interpreter_enabled():
        bm = min(64, max(16, triton.next_power_of_2(max(SQ, 1))))
        bn = min(64, max(16, triton.next_power_of_2(max(SK, 1))))
        warps, stages = 4, 1
    elif BD <= 64:
        bm, bn, warps, stages = 64, 64, 4, 2
    elif BD <= 128:
        bm, bn, warps, stages = 64, 64, 8, 2
    else:
        bm, bn, warps, stages = 32, 32, 8, 1
    return block_m or bm, block_n or bn, warps, stages


def _row_block(S: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(S, 1))))


def _hat(x, w, rope, pos, pos0: int, eps: float):
    """rope(norm(x)) for the backward's products (fp32 of bf16-rounded values under the interpreter)."""
    if upcast(x.dtype):
        return qk_prologue(x, w, rope, pos, pos0, eps, torch.float32).to(torch.bfloat16).to(torch.float32)
    return qk_prologue(x, w, rope, pos, pos0, eps, x.dtype)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor],
                       sinks: Optional[torch.Tensor], opt, *, dlse: Optional[torch.Tensor] = None,
                       needs_grad: Tuple[bool, ...] = (True,) * 6, block_m: Optional[int] = None,
                       block_n: Optional[int] = None):
    """Gradients of :func:`drope.kernels.attention` from its saved inputs, output and LSE.

    Inputs are assumed validated by the forward (``check_attention(..., kernel=True)``); this
    launcher trusts shapes and recomputes the attention probabilities blockwise from ``lse``.
    Deterministic: no atomics, fixed reduction orders.

    Args:
        do: gradient of the output, (B, Hq, Sq, D), any strides (cast to ``o``'s dtype if it differs).
        q, k, v: the forward's raw inputs, (B, Hq, Sq, D) and (B, Hkv, Sk, D), any strides.
        o: the forward's output (B, Hq, Sq, D).
        lse: the forward's natural-log log-sum-exp of the scaled logits (sink included), float32
            (B, Hq, Sq), -inf on rows with no visible key and no sink.
        q_norm_weight, k_norm_weight: None or (D,) / (H, D) RMSNorm weights.
        sinks: None or the (Hq,) sink logits.
        opt: the forward's ``attention.Options`` (mask, scale, rope, eps, packing, window, chunk, softcap).
        dlse: None or the gradient of ``lse`` (B, Hq, Sq) when the caller differentiates the LSE
            too (d lse_i / d s_ij = p_ij, so it only shifts ``delta``).
        needs_grad: which of (q, k, v, q_norm_weight, k_norm_weight, sinks) need a gradient; the
            others come back as None and their work is skipped.
        block_m, block_n: force the query / key block sizes (powers of two >= 16), for tests.

    Returns:
        (dq, dk, dv, d_q_norm_weight, d_k_norm_weight, d_sinks), each in its input's dtype or None.
    """
    need_q, need_k, need_v, need_wq, need_wk, need_sinks = (tuple(needs_grad) + (True,) * 6)[:6]
    need_wq = need_wq and q_norm_weight is not None
    need_wk = need_wk and k_norm_weight is not None
    need_sinks = need_sinks and sinks is not None
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    dev = q.device
    if do.dtype != o.dtype:
        do = do.to(o.dtype)

    BS = _row_block(SQ)
    BD = padded_dim(D)
    delta = torch.zeros((B, HQ, SQ), device=dev, dtype=torch.float32)
    if SQ:
        launch(_delta_kernel, (B * HQ, triton.cdiv(SQ, BS)), role="other", O=o, DO=do, DELTA=delta,
               **named_strides("o", o, "bhsd"), **named_strides("do", do, "bhsd"), H=HQ, S=SQ, D=D, BD=BD, BS=BS)
    if dlse is not None:
        delta -= dlse.to(torch.float32)
    dsinks = None
    if need_sinks:
        # d sink_h = -sum_i p_sink_i * delta_i, p_sink_i = exp(sink_h - lse_i)
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)
        dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)

    if SQ == 0 or SK == 0:
        zeros = [torch.zeros_like(t) if need else None for t, need in
                 ((q, need_q), (k, need_k), (v, need_v), (q_norm_weight, need_wq), (k_norm_weight, need_wk))]
        return (*zeros, dsinks)

    cu = opt.cu_seqlens
    doc = dstart = dend = pos = None
    if cu is not None:
        doc, dstart, dend, pos = packed_tables(cu, SQ)
    q_pos0 = SK - SQ
    rope, eps = opt.rope, opt.norm_eps
    q_tf = q_norm_weight is not None or rope is not None
    k_tf = k_norm_weight is not None or rope is not None
    q_hat = _hat(q, q_norm_weight, rope, pos, q_pos0, eps) if q_tf else q
    k_hat = _hat(k, k_norm_weight, rope, pos, 0, eps) if k_tf else k

    BM, BN, warps, stages = _blocks(BD, SQ, SK, block_m, block_n)
    common = dict(
        Q=q_hat, K=k_hat, V=v, DO=do, LSE=lse, DELTA=delta, SCALE=opt.rows, DOC=doc, DSTART=dstart, DEND=dend,
        **named_strides("q", q_hat, "bhsd"), **named_strides("k", k_hat, "bhsd"), **named_strides("v", v, "bhsd"),
        **named_strides("do", do, "bhsd"), **named_strides("l", lse, "bhs"), **named_strides("r", opt.rows, "bhs"),
        SQ=SQ, SK=SK, WINDOW=opt.window or 0, CHUNK=opt.chunk or 0, scale=float(opt.scale),
        softcap=float(opt.softcap or 0.0), G=HQ // HKV, D=D, BD=BD, BM=BM, BN=BN,
        IS_CAUSAL=opt.causal, PACKED=cu is not None, HAS_SCALE=opt.rows is not None,
        HAS_WINDOW=opt.window is not None, HAS_CHUNK=opt.chunk is not None, HAS_SOFTCAP=opt.softcap is not None,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast(q.dtype), num_warps=warps, num_stages=stages,
    )

    dk = dv = dwk = None
    if need_k or need_v or need_wk:
        dk_buf = None
        if need_k or need_wk:
            dk_buf = torch.empty((B, HKV, SK, D), device=dev, dtype=k.dtype if not k_tf else torch.float32)
        dv = torch.empty((B, HKV, SK, D), device=dev, dtype=v.dtype) if need_v else None
        launch(_dkdv_kernel, (B * HKV, triton.cdiv(SK, BN)), role="attention", DK=dk_buf, DV=dv,
               **named_strides("dk", dk_buf, "bhsd"), **named_strides("dv", dv, "bhsd"),
               HKV=HKV, COMPUTE_DK=dk_buf is not None, COMPUTE_DV=need_v, **common)
        if dk_buf is not None:
            if k_tf:
                dk, dwk = qk_epilogue(dk_buf, k, k_norm_weight, rope, pos, 0, eps, need_dx=need_k, need_dw=need_wk)
            else:
                dk = dk_buf

    dq = dwq = None
    if need_q or need_wq:
        dq_buf = torch.empty((B, HQ, SQ, D), device=dev, dtype=q.dtype if not q_tf else torch.float32)
        launch(_dq_kernel, (B * HQ, triton.cdiv(SQ, BM)), role="attention", DQ=dq_buf,
               **named_strides("dq", dq_buf, "bhsd"), HQ=HQ, **common)
        if q_tf:
            dq, dwq = qk_epilogue(dq_buf, q, q_norm_weight, rope, pos, q_pos0, eps, need_dx=need_q, need_dw=need_wq)
        else:
            dq = dq_buf
    return dq, dk, dv, dwq, dwk, dsinks
