"""Backward of :func:`drope.kernels.attention`: dq, dk, dv and the QK-norm weight gradients.

FlashAttention-2 style, deterministic (no atomics):

1. ``_qk_prologue_kernel`` writes ``rope(norm(x))`` of q and of k to O(S*D) temporaries (only when
   a norm weight or rope tables are given; otherwise the raw tensors are read through their strides).
2. ``_delta_kernel``: ``delta_i = rowsum(dO_i * O_i)`` in fp32.
3. ``_dkdv_kernel``: one program per (batch x KV head, KV block); it loops over the G query heads
   of the group and the visible query blocks, so the GQA sum happens in registers, in a fixed order.
4. ``_dq_kernel``: one program per (batch x query head, query block), looping over visible KV blocks.
   Both recompute the probabilities from the saved natural-log LSE; the per-row softmax scale is
   applied to the logits and to dS.
5. ``_qk_epilogue_kernel`` maps d(q_hat) to dq through RoPE^T (rotation by -theta) and the RMSNorm
   Jacobian in fp32, and writes per-block partial sums of the weight gradient, reduced with
   ``torch.sum`` (deterministic).

Only O(S) statistics (the LSE) are saved by the forward; nothing of size S x S is ever stored.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..validation import interpreter_enabled

__all__ = ["attention_backward"]

LOG2E = math.log2(math.e)


@triton.jit
def _qk_prologue_kernel(
    X, Y, W, COS, SIN, POS,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_yb, stride_yh, stride_ys, stride_yd,
    stride_wh, stride_cs, stride_cd, stride_ss, stride_sd,
    H, S, pos0, eps,
    HALF: tl.constexpr, BS: tl.constexpr,
    USE_NORM: tl.constexpr, USE_ROPE: tl.constexpr, PACKED: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_s = i_s * BS + tl.arange(0, BS)
    o_d = tl.arange(0, HALF)
    m_s = o_s < S
    o_s64 = o_s.to(tl.int64)
    p_x = X + i_b * stride_xb + i_h * stride_xh + o_s64[:, None] * stride_xs + o_d[None, :] * stride_xd
    b_x1 = tl.load(p_x, mask=m_s[:, None], other=0.0).to(tl.float32)  # [BS, HALF]
    b_x2 = tl.load(p_x + HALF * stride_xd, mask=m_s[:, None], other=0.0).to(tl.float32)
    if USE_NORM:
        b_r = tl.rsqrt((tl.sum(b_x1 * b_x1, 1) + tl.sum(b_x2 * b_x2, 1)) / (2 * HALF) + eps)  # [BS]
        b_w1 = tl.load(W + i_h * stride_wh + o_d).to(tl.float32)
        b_w2 = tl.load(W + i_h * stride_wh + HALF + o_d).to(tl.float32)
        b_x1 = b_x1 * b_r[:, None] * b_w1[None, :]
        b_x2 = b_x2 * b_r[:, None] * b_w2[None, :]
    if USE_ROPE:
        if PACKED:
            o_pos = tl.load(POS + o_s, mask=m_s, other=0).to(tl.int64)
        else:
            o_pos = o_s64 + pos0
        p_c = COS + o_pos[:, None] * stride_cs + o_d[None, :] * stride_cd
        p_sn = SIN + o_pos[:, None] * stride_ss + o_d[None, :] * stride_sd
        b_c = tl.load(p_c, mask=m_s[:, None], other=0.0).to(tl.float32)  # [BS, HALF]
        b_sn = tl.load(p_sn, mask=m_s[:, None], other=0.0).to(tl.float32)
        b_y1 = b_x1 * b_c - b_x2 * b_sn
        b_y2 = b_x2 * b_c + b_x1 * b_sn
    else:
        b_y1, b_y2 = b_x1, b_x2
    p_y = Y + i_b * stride_yb + i_h * stride_yh + o_s64[:, None] * stride_ys + o_d[None, :] * stride_yd
    tl.store(p_y, b_y1.to(Y.dtype.element_ty), mask=m_s[:, None])
    tl.store(p_y + HALF * stride_yd, b_y2.to(Y.dtype.element_ty), mask=m_s[:, None])


@triton.jit
def _qk_epilogue_kernel(
    GY, X, DX, W, DW, COS, SIN, POS,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_dxb, stride_dxh, stride_dxs, stride_dxd,
    stride_wh, stride_cs, stride_cd, stride_ss, stride_sd,
    H, S, pos0, eps,
    HALF: tl.constexpr, BS: tl.constexpr,
    USE_NORM: tl.constexpr, USE_ROPE: tl.constexpr, PACKED: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DW: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_s = i_s * BS + tl.arange(0, BS)
    o_d = tl.arange(0, HALF)
    m_s = o_s < S
    o_s64 = o_s.to(tl.int64)
    p_g = GY + i_b * stride_gb + i_h * stride_gh + o_s64[:, None] * stride_gs + o_d[None, :] * stride_gd
    b_g1 = tl.load(p_g, mask=m_s[:, None], other=0.0).to(tl.float32)  # [BS, HALF]
    b_g2 = tl.load(p_g + HALF * stride_gd, mask=m_s[:, None], other=0.0).to(tl.float32)
    if USE_ROPE:
        if PACKED:
            o_pos = tl.load(POS + o_s, mask=m_s, other=0).to(tl.int64)
        else:
            o_pos = o_s64 + pos0
        p_c = COS + o_pos[:, None] * stride_cs + o_d[None, :] * stride_cd
        p_sn = SIN + o_pos[:, None] * stride_ss + o_d[None, :] * stride_sd
        b_c = tl.load(p_c, mask=m_s[:, None], other=0.0).to(tl.float32)  # [BS, HALF]
        b_sn = tl.load(p_sn, mask=m_s[:, None], other=0.0).to(tl.float32)
        # RoPE^T: rotation by -theta
        b_t1 = b_g1 * b_c + b_g2 * b_sn
        b_g2 = b_g2 * b_c - b_g1 * b_sn
        b_g1 = b_t1
    if USE_NORM:
        p_x = X + i_b * stride_xb + i_h * stride_xh + o_s64[:, None] * stride_xs + o_d[None, :] * stride_xd
        b_x1 = tl.load(p_x, mask=m_s[:, None], other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x + HALF * stride_xd, mask=m_s[:, None], other=0.0).to(tl.float32)
        b_r = tl.rsqrt((tl.sum(b_x1 * b_x1, 1) + tl.sum(b_x2 * b_x2, 1)) / (2 * HALF) + eps)  # [BS]
        if STORE_DW:
            p_dw = DW + (i_bh * tl.num_programs(1) + i_s).to(tl.int64) * (2 * HALF) + o_d
            tl.store(p_dw, tl.sum(b_g1 * b_x1 * b_r[:, None], 0))
            tl.store(p_dw + HALF, tl.sum(b_g2 * b_x2 * b_r[:, None], 0))
        if STORE_DX:
            b_w1 = tl.load(W + i_h * stride_wh + o_d).to(tl.float32)
            b_w2 = tl.load(W + i_h * stride_wh + HALF + o_d).to(tl.float32)
            b_g1 = b_g1 * b_w1[None, :]
            b_g2 = b_g2 * b_w2[None, :]
            # d/dx of x*r: r*g - x*r^3*mean(g*x)
            b_m = (tl.sum(b_g1 * b_x1, 1) + tl.sum(b_g2 * b_x2, 1)) / (2 * HALF)
            b_k = b_r * b_r * b_r * b_m
            b_g1 = b_r[:, None] * b_g1 - b_x1 * b_k[:, None]
            b_g2 = b_r[:, None] * b_g2 - b_x2 * b_k[:, None]
    if STORE_DX:
        p_dx = DX + i_b * stride_dxb + i_h * stride_dxh + o_s64[:, None] * stride_dxs + o_d[None, :] * stride_dxd
        tl.store(p_dx, b_g1.to(DX.dtype.element_ty), mask=m_s[:, None])
        tl.store(p_dx + HALF * stride_dxd, b_g2.to(DX.dtype.element_ty), mask=m_s[:, None])


@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    H, S,
    D: tl.constexpr, BS: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_s = i_s * BS + tl.arange(0, BS)
    o_d = tl.arange(0, D)
    m_s = o_s < S
    o_s64 = o_s.to(tl.int64)
    p_o = O + i_b * stride_ob + i_h * stride_oh + o_s64[:, None] * stride_os + o_d[None, :] * stride_od
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_s64[:, None] * stride_dos + o_d[None, :] * stride_dod
    b_o = tl.load(p_o, mask=m_s[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=m_s[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + i_bh.to(tl.int64) * S + o_s64, tl.sum(b_o * b_do, 1), mask=m_s)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST multiplies (bf16-rounded) operands in fp32 (interpreter bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _operand(x, dtype, UPCAST: tl.constexpr):
    """x as a dot operand of ``dtype``; kept fp32 under UPCAST (the interpreter truncates fp32 -> bf16)."""
    if UPCAST:
        return x
    return x.to(dtype)


@triton.jit
def _visible(o_m, o_n, SQ, SK, DOC, CAUSAL: tl.constexpr, PACKED: tl.constexpr):
    """[BM, BN] mask of (query row, key row) pairs that exist and may attend."""
    m = (o_m[:, None] < SQ) & (o_n[None, :] < SK)
    if PACKED:
        b_dm = tl.load(DOC + o_m, mask=o_m < SQ, other=-1)
        b_dn = tl.load(DOC + o_n, mask=o_n < SK, other=-2)
        m = m & (b_dm[:, None] == b_dn[None, :])
        if CAUSAL:
            m = m & (o_n[None, :] <= o_m[:, None])
    elif CAUSAL:
        m = m & (o_n[None, :] <= o_m[:, None] + (SK - SQ))
    return m


@triton.jit
def _needs_mask(m0, n0, SQ, SK, DOC, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                PACKED: tl.constexpr):
    """Whether the [BM, BN] block at (m0, n0) has any invisible pair (only such blocks pay for masking)."""
    m_end = tl.minimum(m0 + BM, SQ)
    n_end = tl.minimum(n0 + BN, SK)
    ragged = (m_end - m0 < BM) | (n_end - n0 < BN)
    if PACKED:
        d = tl.load(DOC + m0)
        split = (tl.load(DOC + m_end - 1) != d) | (tl.load(DOC + n0) != d) | (tl.load(DOC + n_end - 1) != d)
        ragged = ragged | split
        if CAUSAL:
            ragged = ragged | (n0 + BN - 1 > m0)
    elif CAUSAL:
        ragged = ragged | (n0 + BN - 1 > m0 + (SK - SQ))
    return ragged


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, ROWS, DK, DV, DOC, DSTART, DEND,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_rb, stride_rs,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    HKV, SQ, SK, scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_ROWS: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_bh, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_n = o_n < SK
    o_n64 = o_n.to(tl.int64)
    p_k = K + i_b * stride_kb + i_hk * stride_kh + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd
    p_v = V + i_b * stride_vb + i_hk * stride_vh + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd
    b_k = tl.load(p_k, mask=m_n[:, None], other=0.0)  # [BN, D]
    b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)  # [BN, D]
    # range of query rows that can see this KV block
    if PACKED:
        n_last = tl.minimum(n0 + BN, SK) - 1
        hi = tl.load(DEND + n_last)
        if CAUSAL:
            lo = n0
        else:
            lo = tl.load(DSTART + n0)
    else:
        hi = SQ
        if CAUSAL:
            lo = tl.maximum(n0 - (SK - SQ), 0)
        else:
            lo = 0
    lo = (lo // BM) * BM
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    for g in range(G):
        i_h = i_hk * G + g
        for m0 in range(lo, hi, BM):
            o_m = m0 + tl.arange(0, BM)
            m_m = o_m < SQ
            o_m64 = o_m.to(tl.int64)
            p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qs + o_d[None, :] * stride_qd
            p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_dos + o_d[None, :] * stride_dod
            b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)  # [BM, D]
            b_do = tl.load(p_do, mask=m_m[:, None], other=0.0)  # [BM, D]
            b_lse = tl.load(LSE + i_b * stride_lb + i_h * stride_lh + o_m64 * stride_ls, mask=m_m, other=float("-inf"))
            # rows without a visible key (lse = -inf) get p = 0
            b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
            b_delta = tl.load(DELTA + (i_b * HKV * G + i_h) * SQ + o_m64, mask=m_m, other=0.0)
            if HAS_ROWS:
                b_rows = tl.load(ROWS + i_b * stride_rb + o_m64 * stride_rs, mask=m_m, other=0.0).to(tl.float32) * scale
            else:
                b_rows = tl.full([BM], 1.0, tl.float32) * scale
            b_s = _mm(b_q, tl.trans(b_k), PRECISION, UPCAST)  # [BM, BN]
            b_p = tl.exp2(b_s * (b_rows * 1.4426950408889634)[:, None] - b_lse2[:, None])
            if _needs_mask(m0, n0, SQ, SK, DOC, BM, BN, CAUSAL, PACKED):
                b_p = tl.where(_visible(o_m, o_n, SQ, SK, DOC, CAUSAL, PACKED), b_p, 0.0)
            if COMPUTE_DV:
                b_dv += _mm(tl.trans(_operand(b_p, b_do.dtype, UPCAST)), b_do, PRECISION, UPCAST)
            if COMPUTE_DK:
                b_dp = _mm(b_do, tl.trans(b_v), PRECISION, UPCAST)  # [BM, BN]
                b_ds = b_p * (b_dp - b_delta[:, None]) * b_rows[:, None]
                b_dk += _mm(tl.trans(_operand(b_ds, b_q.dtype, UPCAST)), b_q, PRECISION, UPCAST)
    if COMPUTE_DK:
        p_dk = DK + i_b * stride_dkb + i_hk * stride_dkh + o_n64[:, None] * stride_dks + o_d[None, :] * stride_dkd
        tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_n[:, None])
    if COMPUTE_DV:
        p_dv = DV + i_b * stride_dvb + i_hk * stride_dvh + o_n64[:, None] * stride_dvs + o_d[None, :] * stride_dvd
        tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, ROWS, DQ, DOC, DSTART, DEND,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_rb, stride_rs,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HQ, SQ, SK, scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, PACKED: tl.constexpr, HAS_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # the last query blocks see the most keys (causal): launch them first
    i_bh, i_m = tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)
    i_b, i_h = (i_bh // HQ).to(tl.int64), (i_bh % HQ).to(tl.int64)
    i_hk = i_h // G
    m0 = i_m * BM
    o_m = m0 + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < SQ
    o_m64 = o_m.to(tl.int64)
    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qs + o_d[None, :] * stride_qd
    p_do = DO + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_dos + o_d[None, :] * stride_dod
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)  # [BM, D]
    b_do = tl.load(p_do, mask=m_m[:, None], other=0.0)  # [BM, D]
    b_lse = tl.load(LSE + i_b * stride_lb + i_h * stride_lh + o_m64 * stride_ls, mask=m_m, other=float("-inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * SQ + o_m64, mask=m_m, other=0.0)
    if HAS_ROWS:
        b_rows = tl.load(ROWS + i_b * stride_rb + o_m64 * stride_rs, mask=m_m, other=0.0).to(tl.float32) * scale
    else:
        b_rows = tl.full([BM], 1.0, tl.float32) * scale
    # range of key rows visible to this query block
    if PACKED:
        m_last = tl.minimum(m0 + BM, SQ) - 1
        lo = tl.load(DSTART + m0)
        if CAUSAL:
            hi = m_last + 1
        else:
            hi = tl.load(DEND + m_last)
    else:
        lo = 0
        if CAUSAL:
            hi = tl.minimum(m0 + BM + (SK - SQ), SK)
        else:
            hi = SK
    lo = (lo // BN) * BN
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < SK
        o_n64 = o_n.to(tl.int64)
        p_k = K + i_b * stride_kb + i_hk * stride_kh + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd
        p_v = V + i_b * stride_vb + i_hk * stride_vh + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd
        b_k = tl.load(p_k, mask=m_n[:, None], other=0.0)  # [BN, D]
        b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)  # [BN, D]
        b_s = _mm(b_q, tl.trans(b_k), PRECISION, UPCAST)  # [BM, BN]
        b_p = tl.exp2(b_s * (b_rows * 1.4426950408889634)[:, None] - b_lse2[:, None])
        if _needs_mask(m0, n0, SQ, SK, DOC, BM, BN, CAUSAL, PACKED):
            b_p = tl.where(_visible(o_m, o_n, SQ, SK, DOC, CAUSAL, PACKED), b_p, 0.0)
        b_dp = _mm(b_do, tl.trans(b_v), PRECISION, UPCAST)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None]) * b_rows[:, None]
        b_dq += _mm(_operand(b_ds, b_k.dtype, UPCAST), b_k, PRECISION, UPCAST)
    p_dq = DQ + i_b * stride_dqb + i_h * stride_dqh + o_m64[:, None] * stride_dqs + o_d[None, :] * stride_dqd
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None])


def _blocks(D: int, SQ: int, SK: int, block_m: Optional[int], block_n: Optional[int]) -> Tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for the dK/dV and dQ kernels.

    TODO(issue 6): tune on an H100; these are conservative hand-picked sizes.
    """
    if interpreter_enabled():
        bm = min(64, max(16, triton.next_power_of_2(max(SQ, 1))))
        bn = min(64, max(16, triton.next_power_of_2(max(SK, 1))))
        warps, stages = 4, 1
    elif D <= 64:
        bm, bn, warps, stages = 64, 64, 4, 2
    elif D <= 128:
        bm, bn, warps, stages = 64, 64, 8, 2
    else:
        bm, bn, warps, stages = 32, 32, 8, 1
    return block_m or bm, block_n or bn, warps, stages


def _table_strides(rope) -> dict:
    if rope is None:
        return dict(stride_cs=0, stride_cd=0, stride_ss=0, stride_sd=0)
    cos, sin = rope
    return dict(stride_cs=cos.stride(0), stride_cd=cos.stride(1), stride_ss=sin.stride(0), stride_sd=sin.stride(1))


def _dot_precision(dtype: torch.dtype) -> str:
    # as the forward: fp32 inputs get exact fp32 products unless torch's TF32 switch allows TF32
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _row_block(S: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(S, 1))))


def _strides4(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _norm_prep(w: Optional[torch.Tensor]):
    """Head stride of a (D,) or (H, D) weight, made contiguous along D (a tiny tensor)."""
    if w is None:
        return None, 0
    w = w.contiguous()
    return w, (w.stride(0) if w.dim() == 2 else 0)


def _prologue(x, w, w_stride, rope, pos, pos0: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """rope(norm(x)) of a (B, H, S, D) tensor into a new contiguous tensor of ``dtype``."""
    B, H, S, D = x.shape
    y = torch.empty((B, H, S, D), device=x.device, dtype=dtype)
    cos, sin = rope if rope is not None else (None, None)
    BS = _row_block(S)
    _qk_prologue_kernel[(B * H, triton.cdiv(S, BS))](
        X=x, Y=y, W=w, COS=cos, SIN=sin, POS=pos,
        stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xs=x.stride(2), stride_xd=x.stride(3),
        stride_yb=y.stride(0), stride_yh=y.stride(1), stride_ys=y.stride(2), stride_yd=y.stride(3),
        stride_wh=w_stride, **_table_strides(rope),
        H=H, S=S, pos0=pos0, eps=eps,
        HALF=D // 2, BS=BS, USE_NORM=w is not None, USE_ROPE=rope is not None, PACKED=pos is not None,
    )
    return y


def _epilogue(gy, x, w, w_stride, w_orig, rope, pos, pos0: int, eps: float, need_dx: bool, need_dw: bool):
    """(dx, dw) from the gradient ``gy`` of rope(norm(x)); each None when not asked for."""
    B, H, S, D = x.shape
    BS = _row_block(S)
    nblocks = triton.cdiv(S, BS)
    dx = torch.full((B, H, S, D), float("nan"), device=x.device, dtype=x.dtype) if need_dx else None
    dw_part = None
    if need_dw:
        dw_part = torch.full((B * H, nblocks, D), float("nan"), device=x.device, dtype=torch.float32)
    cos, sin = rope if rope is not None else (None, None)
    _qk_epilogue_kernel[(B * H, nblocks)](
        GY=gy, X=x, DX=dx, W=w, DW=dw_part, COS=cos, SIN=sin, POS=pos,
        stride_gb=gy.stride(0), stride_gh=gy.stride(1), stride_gs=gy.stride(2), stride_gd=gy.stride(3),
        stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xs=x.stride(2), stride_xd=x.stride(3),
        stride_dxb=dx.stride(0) if need_dx else 0, stride_dxh=dx.stride(1) if need_dx else 0,
        stride_dxs=dx.stride(2) if need_dx else 0, stride_dxd=dx.stride(3) if need_dx else 0,
        stride_wh=w_stride, **_table_strides(rope),
        H=H, S=S, pos0=pos0, eps=eps,
        HALF=D // 2, BS=BS, USE_NORM=w is not None, USE_ROPE=rope is not None, PACKED=pos is not None,
        STORE_DX=need_dx, STORE_DW=need_dw,
    )
    dw = None
    if need_dw:
        dw = dw_part.view(B, H, nblocks, D).sum(dim=(0, 2))
        if w_orig.dim() == 1:
            dw = dw.sum(0)
        dw = dw.to(w_orig.dtype)
    return dx, dw


def _packed_tables(cu_seqlens: torch.Tensor, total: int):
    """Per-row document id, document start, document end and position inside the document (int32)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    start, end = cu[:-1][doc], cu[1:][doc]
    pos = torch.arange(total, device=cu.device) - start
    return doc.to(torch.int32), start.to(torch.int32), end.to(torch.int32), pos.to(torch.int32)


def attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, *,
    causal: bool, scale: float, scale_rows: Optional[torch.Tensor], rope, q_norm_weight: Optional[torch.Tensor],
    k_norm_weight: Optional[torch.Tensor], norm_eps: float, cu_seqlens: Optional[torch.Tensor],
    dlse: Optional[torch.Tensor] = None,
    needs_grad: Tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
    block_m: Optional[int] = None, block_n: Optional[int] = None,
):
    """Gradients of :func:`drope.kernels.attention` from its saved inputs, output and LSE.

    Inputs are assumed validated by the forward (``check_attention(..., kernel=True)``); this
    launcher trusts shapes and recomputes the attention probabilities blockwise from ``lse``.
    Deterministic: no atomics, fixed reduction orders.

    Args:
        do: gradient of the output, (B, Hq, Sq, D), any strides (cast to ``o``'s dtype if it differs).
        q, k, v: the forward's raw inputs, (B, Hq, Sq, D) and (B, Hkv, Sk, D), any strides.
        o: the forward's output (B, Hq, Sq, D).
        lse: the forward's natural-log log-sum-exp of the scaled logits, float32 (B, Hq, Sq),
            -inf on rows with no visible key.
        causal: bottom-right aligned causal mask (within each document when packed).
        scale: constant logit multiplier.
        scale_rows: None or a float32 (B, Sq) tensor of per-row multipliers (times ``scale``).
        rope: None or (cos, sin) tables (>= Sk, D/2).
        q_norm_weight, k_norm_weight: None or (D,) / (H, D) RMSNorm weights.
        norm_eps: RMSNorm epsilon.
        cu_seqlens: None or (N+1,) int32/int64 document boundaries (B = 1, Sq = Sk).
        dlse: None or the gradient of ``lse`` (B, Hq, Sq) when the caller differentiates the LSE
            too (d lse_i / d s_ij = p_ij, so it only shifts ``delta``).
        needs_grad: which of (q, k, v, q_norm_weight, k_norm_weight) need a gradient; the others
            come back as None and their work is skipped.
        block_m, block_n: force the query / key block sizes (powers of two >= 16), for tests.

    Returns:
        (dq, dk, dv, d_q_norm_weight, d_k_norm_weight), each in its input's dtype or None.
    """
    need_q, need_k, need_v, need_wq, need_wk = needs_grad
    need_wq = need_wq and q_norm_weight is not None
    need_wk = need_wk and k_norm_weight is not None
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    G = HQ // HKV
    dev = q.device
    if do.dtype != o.dtype:
        do = do.to(o.dtype)

    if SQ == 0 or SK == 0:
        zq = torch.zeros_like(q) if need_q else None
        zk = torch.zeros_like(k) if need_k else None
        zv = torch.zeros_like(v) if need_v else None
        zwq = torch.zeros_like(q_norm_weight) if need_wq else None
        zwk = torch.zeros_like(k_norm_weight) if need_wk else None
        return zq, zk, zv, zwq, zwk

    packed = cu_seqlens is not None
    if packed:
        doc, dstart, dend, pos = _packed_tables(cu_seqlens, SQ)
    else:
        doc = dstart = dend = pos = None
    q_pos0 = SK - SQ
    wq, wq_stride = _norm_prep(q_norm_weight)
    wk, wk_stride = _norm_prep(k_norm_weight)
    q_tf = wq is not None or rope is not None
    k_tf = wk is not None or rope is not None
    # the interpreter's bf16 tl.dot is wrong and its fp32 -> bf16 cast truncates: there, bf16 problems
    # multiply in fp32 (operands rounded once, on the host)
    upcast = q.dtype == torch.bfloat16 and interpreter_enabled()
    hat_dtype = torch.float32 if upcast else q.dtype
    q_hat = _prologue(q, wq, wq_stride, rope, pos, q_pos0, norm_eps, hat_dtype) if q_tf else q
    k_hat = _prologue(k, wk, wk_stride, rope, pos, 0, norm_eps, hat_dtype) if k_tf else k
    if upcast and q_tf:
        q_hat = q_hat.to(torch.bfloat16).to(torch.float32)
    if upcast and k_tf:
        k_hat = k_hat.to(torch.bfloat16).to(torch.float32)

    BS = _row_block(SQ)
    delta = torch.empty((B, HQ, SQ), device=dev, dtype=torch.float32)
    _delta_kernel[(B * HQ, triton.cdiv(SQ, BS))](
        O=o, DO=do, DELTA=delta,
        stride_ob=o.stride(0), stride_oh=o.stride(1), stride_os=o.stride(2), stride_od=o.stride(3),
        stride_dob=do.stride(0), stride_doh=do.stride(1), stride_dos=do.stride(2), stride_dod=do.stride(3),
        H=HQ, S=SQ, D=D, BS=BS,
    )
    if dlse is not None:
        delta -= dlse.to(torch.float32)

    BM, BN, warps, stages = _blocks(D, SQ, SK, block_m, block_n)
    precision = _dot_precision(q.dtype)
    has_rows = scale_rows is not None
    rows_strides = (scale_rows.stride(0), scale_rows.stride(1)) if has_rows else (0, 0)
    common = dict(
        Q=q_hat, K=k_hat, V=v, DO=do, LSE=lse, DELTA=delta, ROWS=scale_rows, DOC=doc, DSTART=dstart, DEND=dend,
        **dict(zip(("stride_qb", "stride_qh", "stride_qs", "stride_qd"), _strides4(q_hat))),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks", "stride_kd"), _strides4(k_hat))),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs", "stride_vd"), _strides4(v))),
        **dict(zip(("stride_dob", "stride_doh", "stride_dos", "stride_dod"), _strides4(do))),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1), stride_ls=lse.stride(2),
        stride_rb=rows_strides[0], stride_rs=rows_strides[1],
        SQ=SQ, SK=SK, scale=float(scale), G=G, D=D, BM=BM, BN=BN,
        CAUSAL=causal, PACKED=packed, HAS_ROWS=has_rows, PRECISION=precision,
        UPCAST=upcast,
        num_warps=warps, num_stages=stages,
    )

    dk = dv = dwk = None
    dk_direct = need_k and not k_tf
    if need_k or need_v or need_wk:
        if need_k or need_wk:
            dk_buf = torch.full((B, HKV, SK, D), float("nan"), device=dev,
                                dtype=k.dtype if dk_direct else torch.float32)
        else:
            dk_buf = None
        dv = torch.full((B, HKV, SK, D), float("nan"), device=dev, dtype=v.dtype) if need_v else None
        dk_s = _strides4(dk_buf) if dk_buf is not None else (0, 0, 0, 0)
        dv_s = _strides4(dv) if dv is not None else (0, 0, 0, 0)
        _dkdv_kernel[(B * HKV, triton.cdiv(SK, BN))](
            DK=dk_buf, DV=dv,
            **dict(zip(("stride_dkb", "stride_dkh", "stride_dks", "stride_dkd"), dk_s)),
            **dict(zip(("stride_dvb", "stride_dvh", "stride_dvs", "stride_dvd"), dv_s)),
            HKV=HKV, COMPUTE_DK=dk_buf is not None, COMPUTE_DV=need_v, **common,
        )
        if dk_buf is not None:
            if dk_direct:
                dk = dk_buf
            else:
                dk, dwk = _epilogue(dk_buf, k, wk, wk_stride, k_norm_weight, rope, pos, 0, norm_eps,
                                    need_dx=need_k, need_dw=need_wk)

    dq = dwq = None
    if need_q or need_wq:
        dq_direct = need_q and not q_tf
        dq_buf = torch.full((B, HQ, SQ, D), float("nan"), device=dev,
                            dtype=q.dtype if dq_direct else torch.float32)
        _dq_kernel[(B * HQ, triton.cdiv(SQ, BM))](
            DQ=dq_buf, **dict(zip(("stride_dqb", "stride_dqh", "stride_dqs", "stride_dqd"), _strides4(dq_buf))),
            HQ=HQ, **common,
        )
        if dq_direct:
            dq = dq_buf
        else:
            dq, dwq = _epilogue(dq_buf, q, wq, wq_stride, q_norm_weight, rope, pos, q_pos0, norm_eps,
                                need_dx=need_q, need_dw=need_wq)
    return dq, dk, dv, dwq, dwk
