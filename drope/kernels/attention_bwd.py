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

from .qk_transform import packed_tables, qk_epilogue, qk_hat, row_block
from .visibility import full_keys, full_rows, visible
from .toolkit import LOG2E_C, TRITON_VERSION, cdiv, defined_interpreted, dot_precision, key_bounds, launch, mm, named_strides, \
    next_pow2, operand, padded_dim, phases, tanh, tma_ok, upcast

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
def _probs(b_s, b_lse2, b_sc, softcap, o_m, o_n, b_kv, SQ, SK, TAB, WINDOW, CHUNK, MASKED: tl.constexpr,
           IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr,
           HAS_KMASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TRANS: tl.constexpr):
    """Probabilities of a block of raw products ``b_s`` (q.k) from the saved LSE, and d(logit)/d(q.k).

    [BM, BN], or [BN, BM] under TRANS (row statistics then broadcast along axis 0). Only MASKED
    blocks (some pair invisible, or past the ends) pay for the mask.
    """
    if TRANS:
        b_lse2, b_sc = b_lse2[None, :], b_sc[None, :]
    else:
        b_lse2, b_sc = b_lse2[:, None], b_sc[:, None]
    if HAS_SOFTCAP:
        b_t = tanh(b_s * (b_sc / softcap))
        b_p = tl.math.exp2(b_t * (softcap * LOG2E_C) - b_lse2)
        b_dsdx = (1.0 - b_t * b_t) * b_sc
    else:
        b_p = tl.math.exp2(b_s * (b_sc * LOG2E_C) - b_lse2)
        # per-row scales multiply dS here; a constant one multiplies dK / dQ once, at the end
        b_dsdx = b_sc
    if MASKED:
        b_p = tl.where(visible(o_m, o_n, b_kv, SQ, SK, TAB, WINDOW, CHUNK, IS_CAUSAL, PACKED, HAS_WINDOW,
                                HAS_CHUNK, HAS_KMASK, TRANS), b_p, 0.0)
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


@triton.jit
def _tile(P, desc, row0, o_r, N, stride_r, stride_d, o_d, m_d, USE_TMA: tl.constexpr, THREE_D: tl.constexpr,
          i_h, BR: tl.constexpr, BD: tl.constexpr):
    """A [BR, BD] tile of rows row0.. of a (rows, D) matrix: TMA (zero past N and D) or masked pointer loads."""
    if USE_TMA:
        if THREE_D:
            b_x = tl.reshape(desc.load([i_h.to(tl.int32), row0, 0]), [BR, BD])
        else:
            b_x = desc.load([row0, 0])
    else:
        p = P + o_r.to(tl.int64)[:, None] * stride_r + o_d[None, :] * stride_d
        b_x = tl.load(p, mask=(o_r < N)[:, None] & m_d[None, :], other=0.0)
    return b_x


@triton.jit
def _dkdv_block(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, LSE, DELTA, SCALE, TAB, m0, o_n, p_km, stride_ms,
                i_b, i_h, o_d, m_d, stride_qs, stride_qd, stride_dos, stride_dod, stride_lb, stride_lh, stride_ls,
                stride_rb, stride_rh, stride_rs, HQ, SQ, SK, WINDOW, CHUNK, scale, softcap, BM: tl.constexpr, BD: tl.constexpr,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    """dK and dV of one key block from the query block at m0 of head i_h (S^T = K Q^T orientation); masked
    blocks read the block's key-mask entries at ``p_km`` (L1-resident; kept live across the loop they spilled)."""
    o_m = m0 + tl.arange(0, BM)
    b_kv = o_n < SK
    if MASKED and HAS_KMASK:
        b_kv = tl.load(p_km + o_n.to(tl.int64) * stride_ms, mask=o_n < SK, other=0) != 0
    m_m = o_m < SQ
    o_m64 = o_m.to(tl.int64)
    b_q = _tile(p_q, d_q, m0, o_m, SQ, stride_qs, stride_qd, o_d, m_d, USE_TMA, True, i_h, BM, BD)  # [BM, BD]
    b_do = _tile(p_do, d_do, m0, o_m, SQ, stride_dos, stride_dod, o_d, m_d, USE_TMA, True, i_h, BM, BD)
    b_lse2, b_delta, b_sc = _row_stats(LSE, DELTA, SCALE, i_b, i_h, o_m64, m_m, stride_lb, stride_lh, stride_ls,
                                       stride_rb, stride_rh, stride_rs, HQ, SQ, scale, BM, HAS_SCALE)
    b_st = mm(b_k, tl.trans(b_q), None, DOT_PREC, UPCAST)  # [BN, BM]
    b_pt, b_dsdx = _probs(b_st, b_lse2, b_sc, softcap, o_m, o_n, b_kv, SQ, SK, TAB, WINDOW, CHUNK, MASKED,
                          IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK, HAS_KMASK, HAS_SOFTCAP, True)
    if COMPUTE_DV:
        b_dv = mm(operand(b_pt, b_do.dtype, UPCAST), b_do, b_dv, DOT_PREC, UPCAST)
    if COMPUTE_DK:
        b_dpt = mm(b_v, tl.trans(b_do), None, DOT_PREC, UPCAST)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        if HAS_SCALE or HAS_SOFTCAP:
            b_dst = b_dst * b_dsdx
        b_dk = mm(operand(b_dst, b_q.dtype, UPCAST), b_q, b_dk, DOT_PREC, UPCAST)
    return b_dk, b_dv


@triton.jit
def _dq_block(b_dq, b_q, b_do, b_lse2, b_delta, b_sc, p_k, p_v, d_k, d_v, TAB, n0, o_m, o_d, m_d, p_km,
              stride_ms, stride_ks, stride_kd, stride_vs, stride_vd, SQ, SK, WINDOW, CHUNK, softcap, BN: tl.constexpr,
              BD: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_KMASK: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ of one query block from the key block at n0 (masked blocks read the key mask row ``p_km``)."""
    o_n = n0 + tl.arange(0, BN)
    b_kv = o_n < SK
    if MASKED and HAS_KMASK:
        b_kv = tl.load(p_km + o_n.to(tl.int64) * stride_ms, mask=o_n < SK, other=0) != 0
    b_k = _tile(p_k, d_k, n0, o_n, SK, stride_ks, stride_kd, o_d, m_d, USE_TMA, False, 0, BN, BD)  # [BN, BD]
    b_v = _tile(p_v, d_v, n0, o_n, SK, stride_vs, stride_vd, o_d, m_d, USE_TMA, False, 0, BN, BD)
    b_s = mm(b_q, tl.trans(b_k), None, DOT_PREC, UPCAST)  # [BM, BN]
    b_p, b_dsdx = _probs(b_s, b_lse2, b_sc, softcap, o_m, o_n, b_kv, SQ, SK, TAB, WINDOW, CHUNK, MASKED,
                         IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK, HAS_KMASK, HAS_SOFTCAP, False)
    b_dp = mm(b_do, tl.trans(b_v), None, DOT_PREC, UPCAST)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    if HAS_SCALE or HAS_SOFTCAP:
        b_ds = b_ds * b_dsdx
    return mm(operand(b_ds, b_k.dtype, UPCAST), b_k, b_dq, DOT_PREC, UPCAST)


@triton.jit(do_not_specialize=["SQ", "SK", "NB", "WINDOW", "CHUNK"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, SCALE, DK, DV, TAB, CU, KMASK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_rb, stride_rh, stride_rs, stride_mb, stride_ms,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    HKV, SQ, SK, NB, WINDOW, CHUNK, scale, softcap,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KMASK: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # transposed orientation (S^T = K Q^T): P^T and dS^T are the A operands of dV and dK as they are
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
    HQ = HKV * G
    p_qb = Q + i_b * stride_qb
    p_dob = DO + i_b * stride_dob
    d_q = p_qb
    d_do = p_dob
    if USE_TMA:
        # (Hq, Sq, D) descriptors of this batch row: every query head of the group through one each
        d_q = tl.make_tensor_descriptor(p_qb, shape=[HQ, SQ, D], strides=[stride_qh, stride_qs, 1],
                                        block_shape=[1, BM, BD])
        d_do = tl.make_tensor_descriptor(p_dob, shape=[HQ, SQ, D], strides=[stride_doh, stride_dos, 1],
                                         block_shape=[1, BM, BD])
    # query rows [lo, hi) that can see some key of this block
    n_last = tl.minimum(n0 + BN, SK) - 1
    if PACKED:
        # documents d0 (first key) and dl (last key); document d's query row r sits at key index r + off_d
        d0 = tl.load(TAB + 2 * SQ + n0)
        dl = tl.load(TAB + 2 * SQ + n_last)
        hi = tl.load(CU + dl + 1)
        lo = tl.load(CU + d0)
        if IS_CAUSAL:
            lo = tl.maximum(lo, n0 - (tl.load(CU + NB + d0 + 1) - tl.load(CU + d0 + 1)))
        if HAS_WINDOW or HAS_CHUNK:
            q_l = tl.load(CU + dl)
            ks_l = tl.load(CU + NB + dl)
            off_l = tl.load(CU + NB + dl + 1) - hi
        if HAS_WINDOW:
            hi = tl.minimum(hi, tl.maximum(q_l, n_last + WINDOW - off_l))
        if HAS_CHUNK:
            hi = tl.minimum(hi, tl.maximum(q_l, ks_l + ((n_last - ks_l) // CHUNK + 1) * CHUNK - off_l))
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
    f_lo, f_hi = full_rows(n0, SQ, SK, TAB, CU, NB, WINDOW, CHUNK, BN, IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK)
    p_km = KMASK
    if HAS_KMASK:
        # this block's keys under the key mask: none attendable, nothing to do; some not, every block masked
        p_km = KMASK + i_b * stride_mb
        n_kv = tl.sum((tl.load(p_km + o_n64 * stride_ms, mask=o_n < SK, other=0) != 0).to(tl.int32), 0)
        hi = tl.where(n_kv == 0, lo, hi)
        f_hi = tl.where(n_kv == tl.minimum(SK - n0, BN), f_hi, f_lo)
    ph_a, ph_b, ph_end = phases(lo, hi, f_lo, f_hi, BM)
    for g in range(G):
        i_h = i_hk * G + g
        p_q = p_qb + i_h * stride_qh
        p_do = p_dob + i_h * stride_doh
        # the three phases, unrolled: PH is a constexpr, so each picks its bounds and MASKED at compile time
        for PH in tl.static_range(3):
            m_lo = lo if PH == 0 else (ph_a if PH == 1 else ph_b)
            m_hi = ph_a if PH == 0 else (ph_b if PH == 1 else ph_end)
            for m0 in range(m_lo, m_hi, BM):
                b_dk, b_dv = _dkdv_block(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, LSE, DELTA, SCALE, TAB, m0,
                                         o_n, p_km, stride_ms, i_b, i_h, o_d, m_d, stride_qs, stride_qd, stride_dos,
                                         stride_dod, stride_lb, stride_lh, stride_ls, stride_rb, stride_rh, stride_rs,
                                         HQ, SQ, SK, WINDOW, CHUNK, scale, softcap, BM, BD, PH != 1, IS_CAUSAL, PACKED,
                                         HAS_SCALE, HAS_WINDOW, HAS_CHUNK, HAS_KMASK, HAS_SOFTCAP, COMPUTE_DK,
                                         COMPUTE_DV, USE_TMA, DOT_PREC, UPCAST)
    if COMPUTE_DK:
        if not (HAS_SCALE or HAS_SOFTCAP):
            b_dk = b_dk * scale
        p_dk = DK + i_b * stride_dkb + i_hk * stride_dkh + o_n64[:, None] * stride_dks + o_d[None, :] * stride_dkd
        tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_nd)
    if COMPUTE_DV:
        p_dv = DV + i_b * stride_dvb + i_hk * stride_dvh + o_n64[:, None] * stride_dvs + o_d[None, :] * stride_dvd
        tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_nd)


@triton.jit(do_not_specialize=["SQ", "SK", "NB", "WINDOW", "CHUNK"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, SCALE, DQ, TAB, CU, KMASK,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_rb, stride_rh, stride_rs, stride_mb, stride_ms,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HQ, SQ, SK, NB, WINDOW, CHUNK, scale, softcap,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KMASK: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
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
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    d_k = p_k
    d_v = p_v
    if USE_TMA:
        d_k = tl.make_tensor_descriptor(p_k, shape=[SK, D], strides=[stride_ks, 1], block_shape=[BN, BD])
        d_v = tl.make_tensor_descriptor(p_v, shape=[SK, D], strides=[stride_vs, 1], block_shape=[BN, BD])
    # key rows [lo, hi) visible to some row of this query block
    m_last = tl.minimum(m0 + BM, SQ) - 1
    if PACKED:
        # documents d0 (first row) and dl (last row); document d's query row r sits at key index r + off_d
        d0 = tl.load(TAB + m0)
        dl = tl.load(TAB + m_last)
        ks = tl.load(CU + NB + d0)
        lo = ks
        if IS_CAUSAL:
            hi = tl.maximum(tl.load(CU + NB + dl), m_last + 1 + tl.load(CU + NB + dl + 1) - tl.load(CU + dl + 1))
        else:
            hi = tl.load(CU + NB + dl + 1)
        if HAS_WINDOW or HAS_CHUNK:
            k0 = m0 + tl.load(CU + NB + d0 + 1) - tl.load(CU + d0 + 1)
        if HAS_WINDOW:
            lo = tl.maximum(lo, k0 - WINDOW + 1)
        if HAS_CHUNK:
            lo = tl.maximum(lo, ks + (tl.maximum(k0 - ks, 0) // CHUNK) * CHUNK)
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
    f_lo, f_hi = full_keys(m0, SQ, SK, TAB, CU, NB, WINDOW, CHUNK, BM, IS_CAUSAL, PACKED, HAS_WINDOW, HAS_CHUNK)
    p_km = KMASK
    if HAS_KMASK:
        # attendable keys span [k_lo, k_hi) of this batch row; with holes every block is masked
        p_km = KMASK + i_b * stride_mb
        k_lo, k_hi, k_dense = key_bounds(p_km, stride_ms, SK, 1024)
        lo = tl.maximum(lo, k_lo)
        hi = tl.minimum(hi, k_hi)
        f_lo = tl.where(k_dense, tl.maximum(f_lo, k_lo), SK)
        f_hi = tl.minimum(f_hi, k_hi)
    lo = (lo // BN) * BN
    ph_a, ph_b, ph_end = phases(lo, hi, f_lo, f_hi, BN)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    # the three phases, as in the dK/dV kernel
    for PH in tl.static_range(3):
        n_lo = lo if PH == 0 else (ph_a if PH == 1 else ph_b)
        n_hi = ph_a if PH == 0 else (ph_b if PH == 1 else ph_end)
        for n0 in range(n_lo, n_hi, BN):
            b_dq = _dq_block(b_dq, b_q, b_do, b_lse2, b_delta, b_sc, p_k, p_v, d_k, d_v, TAB, n0, o_m, o_d, m_d,
                             p_km, stride_ms, stride_ks, stride_kd, stride_vs, stride_vd, SQ, SK, WINDOW, CHUNK,
                             softcap, BN, BD, PH != 1, IS_CAUSAL, PACKED, HAS_SCALE, HAS_WINDOW, HAS_CHUNK, HAS_KMASK,
                             HAS_SOFTCAP, USE_TMA, DOT_PREC, UPCAST)
    if not (HAS_SCALE or HAS_SOFTCAP):
        b_dq = b_dq * scale
    p_dq = DQ + i_b * stride_dqb + i_h * stride_dqh + o_m64[:, None] * stride_dqs + o_d[None, :] * stride_dqd
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_md)


def _blocks(BD: int, SQ: int, SK: int, block_m: Optional[int], block_n: Optional[int], pressure: int):
    """Tiles ``(BM, BN, num_warps, num_stages)`` of the dK/dV kernel and of the dQ kernel.

    dK/dV holds a wide key block and walks narrow query blocks, dQ the opposite. Chosen with the
    sm_90a compile check (``drope.inspect``; bf16, B1 H32 KV8 S8192), none spills with Triton
    3.9: unmasked loops of 299 (dK/dV) and 182 (dQ) SASS instructions at D=64, 350 and 217 at D=128.
    ``pressure`` counts what the masked dK/dV blocks hold besides the tile (:func:`_pressure`): at D=128 one
    such feature needs 16 query rows, two a 64-key block (32x64 w8 s3). Triton 3.6 spills both D=128 dK/dV tiles: 32x64 w8 s2
    there, 16x64 w8 s2 with two or more. At D=256 the dK/dV accumulators alone fill a warpgroup's registers: small mma.sync tiles.
    Forced ``block_m`` / ``block_n`` (tests) apply to both kernels.
    """
    if block_m or block_n or defined_interpreted():
        bm = block_m or min(64, max(16, next_pow2(max(SQ, 1))))
        bn = block_n or min(64, max(16, next_pow2(max(SK, 1))))
        tile = (bm, bn, 4, 1) if defined_interpreted() else (bm, bn, 4, 2)
        return tile, tile
    if BD <= 64:
        return (32, 128, 8, 3), (128, 32, 8, 3)
    if BD <= 128:
        if TRITON_VERSION < (3, 9):
            # Triton 3.6 (the GPU machines') spills the 128-key tiles at D=128 (160 B, 8 B with per_element), and
            # 32x64 w8 s2 with three masked-block features (20 B; 32x64 w8 s3 60 B, 16x64 w4 120 B): 16 query rows
            return (16, 64, 8, 2) if pressure >= 2 else (32, 64, 8, 2), (128, 32, 8, 3)
        if pressure >= 2:
            # 16x128 spilled 20-136 B with two of them, 32x64 w8 s2 16-72 B, 16x64 w4 12-152 B; this one none
            return (32, 64, 8, 3), (128, 32, 8, 3)
        return ((16, 128, 8, 3) if pressure else (32, 128, 8, 3)), (128, 32, 8, 3)
    return (32, 32, 8, 2), (64, 32, 4, 2)


def _pressure(opt, km) -> int:
    """Register pressure of the dK/dV kernel's masked blocks: an element-wise dS factor (per-row scale, soft-cap),
    the key mask's entries, packed documents' four row tables; with the key mask, each counts one."""
    elementwise = opt.rows is not None or opt.softcap is not None
    if km is None:
        return int(elementwise or opt.cu_seqlens is not None)
    return 1 + int(elementwise) + int(opt.cu_seqlens is not None)


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
        opt: the forward's ``attention.Options`` (mask, scale, rope, eps, packing, window, chunk, softcap, key mask).
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

    BS = row_block(SQ)
    BD = padded_dim(D)
    delta = torch.zeros((B, HQ, SQ), device=dev, dtype=torch.float32)
    if SQ:
        launch(_delta_kernel, (B * HQ, cdiv(SQ, BS)), O=o, DO=do, DELTA=delta,
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
    tab = cus = pos = None
    if cu is not None:
        tab, cus, pos = packed_tables(cu, SQ, opt.cu_seqlens_k, SK)
    q_pos0 = SK - SQ
    rope, eps = opt.rope, opt.norm_eps
    q_tf = q_norm_weight is not None or rope is not None
    k_tf = k_norm_weight is not None or rope is not None
    q_hat = qk_hat(q, q_norm_weight, rope, pos, q_pos0, eps)
    k_hat = qk_hat(k, k_norm_weight, rope, pos, 0, eps)

    km = opt.key_mask
    if km is not None and km.dtype == torch.bool:
        km = km.view(torch.uint8)
    (BM1, BN1, warps1, stages1), (BM2, BN2, warps2, stages2) = _blocks(BD, SQ, SK, block_m, block_n,
                                                                 _pressure(opt, km))
    common = dict(
        Q=q_hat, K=k_hat, V=v, DO=do, LSE=lse, DELTA=delta, SCALE=opt.rows, TAB=tab, CU=cus,
        **named_strides("q", q_hat, "bhsd"), **named_strides("k", k_hat, "bhsd"), **named_strides("v", v, "bhsd"),
        **named_strides("do", do, "bhsd"), **named_strides("l", lse, "bhs"), **named_strides("r", opt.rows, "bhs"),
        SQ=SQ, SK=SK, NB=0 if cu is None else cu.numel(), WINDOW=opt.window or 0, CHUNK=opt.chunk or 0, scale=float(opt.scale),
        softcap=float(opt.softcap or 0.0), G=HQ // HKV, D=D, BD=BD, KMASK=km, **named_strides("m", km, "bs"),
        IS_CAUSAL=opt.causal, PACKED=cu is not None, HAS_SCALE=opt.rows is not None,
        HAS_WINDOW=opt.window is not None, HAS_CHUNK=opt.chunk is not None, HAS_SOFTCAP=opt.softcap is not None,
        HAS_KMASK=km is not None,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast(q.dtype), USE_TMA=tma_ok(q_hat, k_hat, v, do),
    )

    dk = dv = dwk = None
    if need_k or need_v or need_wk:
        dk_buf = None
        if need_k or need_wk:
            dk_buf = torch.empty((B, HKV, SK, D), device=dev, dtype=k.dtype if not k_tf else torch.float32)
        dv = torch.empty((B, HKV, SK, D), device=dev, dtype=v.dtype) if need_v else None
        launch(_dkdv_kernel, (B * HKV, cdiv(SK, BN1)), DK=dk_buf, DV=dv,
               BM=BM1, BN=BN1, num_warps=warps1, num_stages=stages1,
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
        launch(_dq_kernel, (B * HQ, cdiv(SQ, BM2)), DQ=dq_buf,
               BM=BM2, BN=BN2, num_warps=warps2, num_stages=stages2,
               **named_strides("dq", dq_buf, "bhsd"), HQ=HQ, **common)
        if q_tf:
            dq, dwq = qk_epilogue(dq_buf, q, q_norm_weight, rope, pos, q_pos0, eps, need_dx=need_q, need_dw=need_wq)
        else:
            dq = dq_buf
    return dq, dk, dv, dwq, dwk, dsinks
