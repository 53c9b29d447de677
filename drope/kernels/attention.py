"""Fused causal attention forward: QK-norm, RoPE, per-row softmax scale, GQA and packed documents.

One Triton launch takes raw q/k/v (any strides) and computes, per DESIGN.md's contract,
``softmax((rope(norm(q)) . rope(norm(k))) * scale_i, causal bottom-right) @ v`` with an fp32
online softmax in base 2 (``scale * log2(e)`` is folded into q once per program). Optional
features are ``tl.constexpr`` flags derived from whether the argument is None, so a feature that
is off costs nothing. The causal loop runs in three phases so only blocks that straddle a mask
boundary (the diagonal, a document boundary, the end of the keys) pay for masking; blocks that
no row of the program can see are never visited.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..validation import check_attention, check_kernel_device, interpreter_enabled, scale_rows
from .attention_bwd import attention_backward

__all__ = ["attention"]

LOG2E = 1.4426950408889634


@triton.jit
def _doc_index(CU, rows, N_DOCS, N_ITER):
    """Index d of the packed document holding each row: the largest d < N_DOCS with CU[d] <= row."""
    lo = rows * 0
    hi = lo + N_DOCS
    # ceil(log2(N_DOCS)) halvings leave hi - lo == 1; after that mid == lo and nothing moves
    for _ in range(N_ITER):
        mid = (lo + hi) // 2
        go = tl.load(CU + mid) <= rows
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _rms_scale(b_x1, b_x2, D: tl.constexpr, norm_eps, TWO_HALVES: tl.constexpr):
    """rsqrt(mean(x^2) + eps) per row of a tile held whole (b_x1) or as two halves of D."""
    b_ss = tl.sum(b_x1 * b_x1, 1)
    if TWO_HALVES:
        b_ss += tl.sum(b_x2 * b_x2, 1)
    return tl.math.rsqrt(b_ss / D + norm_eps)


@triton.jit
def _fwd_inner(acc, b_l, b_m, b_q, b_q1, b_q2, p_k, p_v, stride_ks, stride_kd, stride_vs, stride_vd,
               COS, SIN, stride_cs, stride_cd, stride_ss, stride_sd, b_kw, b_kw1, b_kw2, norm_eps,
               CU, N_DOCS, N_ITER, lo_i, hi_i, doc_lo, SK, n_start, n_end,
               D: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDH: tl.constexpr,
               MASKED: tl.constexpr, USE_ROPE: tl.constexpr, USE_KNORM: tl.constexpr,
               PACKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Online-softmax update of one program's rows over key blocks [n_start, n_end), step BN.

    Unmasked (MASKED=False) blocks lie entirely inside every row's visible range [lo_i, hi_i)
    and inside [0, SK): no bound checks, no mask, no -inf guard.
    """
    # TODO(issue 6): K's norm and RoPE run here, once per (q block, query head); measure against a
    # prologue launch that writes normed/rotated K once per KV head, and keep the faster on H100.
    dtype = p_k.dtype.element_ty
    o_d = tl.arange(0, BD)
    o_dh = tl.arange(0, BDH)
    m_dh = o_dh < D // 2
    for start_n in range(n_start, n_end, BN):
        o_n = start_n + tl.arange(0, BN)
        m_n = o_n < SK
        o_n64 = o_n.to(tl.int64)
        if USE_ROPE:
            p_k1 = p_k + o_n64[:, None] * stride_ks + o_dh[None, :] * stride_kd
            if MASKED:
                m_k = m_n[:, None] & m_dh[None, :]
            else:
                m_k = m_dh[None, :]
            b_k1 = tl.load(p_k1, mask=m_k, other=0.0).to(tl.float32)  # [BN, BDH]
            b_k2 = tl.load(p_k1 + (D // 2) * stride_kd, mask=m_k, other=0.0).to(tl.float32)
            if USE_KNORM:
                b_r = _rms_scale(b_k1, b_k2, D, norm_eps, True)
                b_k1 = b_k1 * b_r[:, None] * b_kw1[None, :]
                b_k2 = b_k2 * b_r[:, None] * b_kw2[None, :]
            if PACKED:
                if MASKED:
                    # keys of a masked block may belong to several documents
                    b_doc = _doc_index(CU, tl.minimum(o_n, SK - 1), N_DOCS, N_ITER)
                    pos_k = o_n - tl.load(CU + b_doc).to(tl.int32)
                else:
                    pos_k = o_n - doc_lo
            else:
                pos_k = o_n
            o_pk = pos_k.to(tl.int64)
            b_cos = tl.load(COS + o_pk[:, None] * stride_cs + o_dh[None, :] * stride_cd, mask=m_k, other=0.0).to(tl.float32)
            b_sin = tl.load(SIN + o_pk[:, None] * stride_ss + o_dh[None, :] * stride_sd, mask=m_k, other=0.0).to(tl.float32)
            b_r1 = (b_k1 * b_cos - b_k2 * b_sin).to(dtype)
            b_r2 = (b_k2 * b_cos + b_k1 * b_sin).to(dtype)
            if UPCAST_DOT:
                b_r1, b_r2 = b_r1.to(tl.float32), b_r2.to(tl.float32)
            b_s = tl.dot(b_q1, tl.trans(b_r1), input_precision=DOT_PREC)  # [BM, BN]
            b_s = tl.dot(b_q2, tl.trans(b_r2), b_s, input_precision=DOT_PREC)
        else:
            p_kt = p_k + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd
            if MASKED:
                b_k = tl.load(p_kt, mask=m_n[:, None], other=0.0)  # [BN, BD]
            else:
                b_k = tl.load(p_kt)
            if USE_KNORM:
                b_kf = b_k.to(tl.float32)
                b_r = _rms_scale(b_kf, b_kf, D, norm_eps, False)
                b_k = (b_kf * b_r[:, None] * b_kw[None, :]).to(dtype)
            if UPCAST_DOT:
                b_k = b_k.to(tl.float32)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)  # [BM, BN]
        if MASKED:
            vis = (o_n[None, :] >= lo_i[:, None]) & (o_n[None, :] < hi_i[:, None])
            b_s = tl.where(vis, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        if MASKED:
            # a row that has seen nothing yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN
            b_m_sub = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        else:
            b_m_sub = b_m_new
        b_p = tl.math.exp2(b_s - b_m_sub[:, None])
        b_alpha = tl.math.exp2(b_m - b_m_sub)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        p_vt = p_v + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd
        if MASKED:
            b_v = tl.load(p_vt, mask=m_n[:, None], other=0.0)  # [BN, BD]
        else:
            b_v = tl.load(p_vt)
        if UPCAST_DOT:
            b_v = b_v.to(tl.float32)
        acc = acc * b_alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)
        b_m = b_m_new
    return acc, b_l, b_m


@triton.jit(do_not_specialize=["SQ", "SK", "N_DOCS", "N_ITER"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SCALE_ROWS, COS, SIN, QW, KW, CU,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_rb, stride_rs, stride_cs, stride_cd, stride_ss, stride_sd,
    stride_qwh, stride_qwd, stride_kwh, stride_kwd,
    HQ, SQ, SK, G, N_DOCS, N_ITER, qk_scale, norm_eps,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BDH: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_ROPE: tl.constexpr, USE_QNORM: tl.constexpr, USE_KNORM: tl.constexpr,
    USE_SCALE_ROWS: tl.constexpr, PACKED: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # heads of one KV group run side by side (K/V reuse in L2); longest causal rows first (tail balance)
    i_bh = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // G
    i_b64, i_h64, i_hk64 = i_b.to(tl.int64), i_h.to(tl.int64), i_hk.to(tl.int64)
    dtype = Q.dtype.element_ty

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < SQ
    o_m64 = o_m.to(tl.int64)
    o_d = tl.arange(0, D)
    o_dh = tl.arange(0, BDH)
    m_dh = o_dh < D // 2

    # visible keys of row i: [lo_i, hi_i); over the program's valid rows, keys in [lo_blk, hi_blk)
    # are seen by some row and keys in [full_lo, full_hi) by every row
    if PACKED:
        rows = tl.minimum(o_m, SQ - 1)
        i_doc = _doc_index(CU, rows, N_DOCS, N_ITER)
        lo_i = tl.load(CU + i_doc).to(tl.int32)
        if IS_CAUSAL:
            hi_i = rows + 1
        else:
            hi_i = tl.load(CU + i_doc + 1).to(tl.int32)
        pos_q = rows - lo_i
        lo_blk = tl.min(tl.where(m_m, lo_i, SK), 0)
        hi_blk = tl.max(tl.where(m_m, hi_i, 0), 0)
        full_lo = tl.max(tl.where(m_m, lo_i, 0), 0)
        full_hi = tl.min(tl.where(m_m, hi_i, SK), 0)
    else:
        lo_i = tl.full([BM], 0, dtype=tl.int32)
        lo_blk = 0
        full_lo = 0
        if IS_CAUSAL:
            hi_i = tl.minimum(o_m + (SK - SQ) + 1, SK)
            hi_blk = tl.minimum(tl.minimum(i_m * BM + BM, SQ) + (SK - SQ), SK)
            full_hi = tl.minimum(i_m * BM + (SK - SQ) + 1, SK)
        else:
            hi_i = lo_i + SK
            hi_blk = SK
            full_hi = SK
        pos_q = o_m + (SK - SQ)

    # q prologue: norm, rope, scale * log2(e), once per program
    p_q = Q + i_b64 * stride_qb + i_h64 * stride_qh + o_m64[:, None] * stride_qs
    if USE_SCALE_ROWS:
        b_sc = tl.load(SCALE_ROWS + i_b64 * stride_rb + o_m64 * stride_rs, mask=m_m, other=0.0).to(tl.float32) * qk_scale
    else:
        b_sc = tl.full([BM], qk_scale, dtype=tl.float32)
    # placeholder assignments below fill the arguments _fwd_inner ignores under the current flags
    if USE_ROPE:
        m_q = m_m[:, None] & m_dh[None, :]
        b_x1 = tl.load(p_q + o_dh[None, :] * stride_qd, mask=m_q, other=0.0).to(tl.float32)  # [BM, BDH]
        b_x2 = tl.load(p_q + (o_dh[None, :] + D // 2) * stride_qd, mask=m_q, other=0.0).to(tl.float32)
        if USE_QNORM:
            b_r = _rms_scale(b_x1, b_x2, D, norm_eps, True)
            p_w = QW + i_h64 * stride_qwh + o_dh * stride_qwd
            b_w1 = tl.load(p_w, mask=m_dh, other=0.0).to(tl.float32)
            b_w2 = tl.load(p_w + (D // 2) * stride_qwd, mask=m_dh, other=0.0).to(tl.float32)
            b_x1 = b_x1 * b_r[:, None] * b_w1[None, :]
            b_x2 = b_x2 * b_r[:, None] * b_w2[None, :]
        o_pq = pos_q.to(tl.int64)
        b_cos = tl.load(COS + o_pq[:, None] * stride_cs + o_dh[None, :] * stride_cd, mask=m_q, other=0.0).to(tl.float32)
        b_sin = tl.load(SIN + o_pq[:, None] * stride_ss + o_dh[None, :] * stride_sd, mask=m_q, other=0.0).to(tl.float32)
        b_q1 = ((b_x1 * b_cos - b_x2 * b_sin) * b_sc[:, None]).to(dtype)
        b_q2 = ((b_x2 * b_cos + b_x1 * b_sin) * b_sc[:, None]).to(dtype)
        if UPCAST_DOT:
            b_q1, b_q2 = b_q1.to(tl.float32), b_q2.to(tl.float32)
        b_q = b_q1
        if USE_KNORM:
            p_w = KW + i_hk64 * stride_kwh + o_dh * stride_kwd
            b_kw1 = tl.load(p_w, mask=m_dh, other=0.0).to(tl.float32)
            b_kw2 = tl.load(p_w + (D // 2) * stride_kwd, mask=m_dh, other=0.0).to(tl.float32)
        else:
            b_kw1 = b_sc
            b_kw2 = b_sc
        b_kw = b_kw1
    else:
        b_x = tl.load(p_q + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0).to(tl.float32)  # [BM, D]
        if USE_QNORM:
            b_r = _rms_scale(b_x, b_x, D, norm_eps, False)
            b_w = tl.load(QW + i_h64 * stride_qwh + o_d * stride_qwd).to(tl.float32)
            b_x = b_x * b_r[:, None] * b_w[None, :]
        b_q = (b_x * b_sc[:, None]).to(dtype)
        if UPCAST_DOT:
            b_q = b_q.to(tl.float32)
        b_q1 = b_q
        b_q2 = b_q
        if USE_KNORM:
            b_kw = tl.load(KW + i_hk64 * stride_kwh + o_d * stride_kwd).to(tl.float32)
        else:
            b_kw = b_sc
        b_kw1 = b_kw
        b_kw2 = b_kw

    acc = tl.full([BM, D], 0.0, dtype=tl.float32)
    b_l = tl.full([BM], 0.0, dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    p_k = K + i_b64 * stride_kb + i_hk64 * stride_kh
    p_v = V + i_b64 * stride_vb + i_hk64 * stride_vh

    # key blocks counted from lo_blk: [0, nb_a) masked, [nb_a, nb_b) seen by every row, [nb_b, nb_all) masked
    nb_all = (tl.maximum(hi_blk - lo_blk, 0) + BN - 1) // BN
    nb_a = tl.minimum((full_lo - lo_blk + BN - 1) // BN, nb_all)
    nb_b = tl.maximum(nb_a, tl.minimum(tl.maximum(full_hi - lo_blk, 0) // BN, nb_all))
    acc, b_l, b_m = _fwd_inner(
        acc, b_l, b_m, b_q, b_q1, b_q2, p_k, p_v, stride_ks, stride_kd, stride_vs, stride_vd,
        COS, SIN, stride_cs, stride_cd, stride_ss, stride_sd, b_kw, b_kw1, b_kw2, norm_eps,
        CU, N_DOCS, N_ITER, lo_i, hi_i, full_lo, SK, lo_blk, lo_blk + nb_a * BN,
        D=D, BN=BN, BD=D, BDH=BDH, MASKED=True, USE_ROPE=USE_ROPE, USE_KNORM=USE_KNORM,
        PACKED=PACKED, DOT_PREC=DOT_PREC, UPCAST_DOT=UPCAST_DOT)
    acc, b_l, b_m = _fwd_inner(
        acc, b_l, b_m, b_q, b_q1, b_q2, p_k, p_v, stride_ks, stride_kd, stride_vs, stride_vd,
        COS, SIN, stride_cs, stride_cd, stride_ss, stride_sd, b_kw, b_kw1, b_kw2, norm_eps,
        CU, N_DOCS, N_ITER, lo_i, hi_i, full_lo, SK, lo_blk + nb_a * BN, lo_blk + nb_b * BN,
        D=D, BN=BN, BD=D, BDH=BDH, MASKED=False, USE_ROPE=USE_ROPE, USE_KNORM=USE_KNORM,
        PACKED=PACKED, DOT_PREC=DOT_PREC, UPCAST_DOT=UPCAST_DOT)
    acc, b_l, b_m = _fwd_inner(
        acc, b_l, b_m, b_q, b_q1, b_q2, p_k, p_v, stride_ks, stride_kd, stride_vs, stride_vd,
        COS, SIN, stride_cs, stride_cd, stride_ss, stride_sd, b_kw, b_kw1, b_kw2, norm_eps,
        CU, N_DOCS, N_ITER, lo_i, hi_i, full_lo, SK, lo_blk + nb_b * BN, lo_blk + nb_all * BN,
        D=D, BN=BN, BD=D, BDH=BDH, MASKED=True, USE_ROPE=USE_ROPE, USE_KNORM=USE_KNORM,
        PACKED=PACKED, DOT_PREC=DOT_PREC, UPCAST_DOT=UPCAST_DOT)

    # rows that saw no key (l == 0) output zeros and lse = -inf
    empty = b_l == 0.0
    b_o = acc / tl.where(empty, 1.0, b_l)[:, None]
    p_o = O + i_b64 * stride_ob + i_h64 * stride_oh + o_m64[:, None] * stride_os + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None])
    if STORE_LSE:
        # base-2 running max and sum back to a natural-log LSE: times ln(2)
        b_lse = tl.where(empty, float("-inf"), (b_m + tl.math.log2(tl.where(empty, 1.0, b_l))) * 0.6931471805599453)
        tl.store(LSE + i_bh.to(tl.int64) * SQ + o_m64, b_lse, mask=m_m)


# (BM, BN, num_warps, num_stages): Hopper-sensible starting points; issue 6 tunes these on an H100
_TILES_16BIT = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3)]
# D=256 tiles must fit shared memory; (64, 32, 4, 2) always does
_TILES_16BIT_D256 = [(128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2)]
# fp32 tiles take twice the shared memory, and exact (ieee) dots compile slowly: small tiles only
_TILES_FP32 = [(64, 32, 4, 2), (64, 64, 4, 2)]
_TILES_FP32_D256 = [(64, 32, 4, 2)]


def _tile(c: triton.Config):
    return c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages


def _cuda_configs():
    tiles = dict.fromkeys(_TILES_16BIT + _TILES_16BIT_D256 + _TILES_FP32 + _TILES_FP32_D256)
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args["Q"].dtype == torch.float32:
        keep = _TILES_FP32_D256 if args["D"] >= 256 else _TILES_FP32
    else:
        keep = _TILES_16BIT_D256 if args["D"] >= 256 else _TILES_16BIT
    return [c for c in configs if _tile(c) in keep]


_AUTOTUNE_KEY = ["D", "IS_CAUSAL", "USE_ROPE", "USE_QNORM", "USE_KNORM", "USE_SCALE_ROWS", "PACKED", "DOT_PREC"]
_attn_fwd_tuned = triton.autotune(configs=_cuda_configs(), key=_AUTOTUNE_KEY,
                                  prune_configs_by={"early_config_prune": _prune_configs})(_attn_fwd_kernel)

# interpreter default: big enough to keep the number of (slow, sequential) programs down
_INTERPRETER_BLOCKS = (64, 64)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's TF32 switch (off by default): exact fp32 products unless allowed
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _strides(t: Optional[torch.Tensor], n: int):
    return tuple(t.stride()) if t is not None else (0,) * n


def _weight_strides(w: Optional[torch.Tensor]):
    if w is None:
        return 0, 0
    return (0, w.stride(0)) if w.dim() == 1 else (w.stride(0), w.stride(1))


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                       scale_rows: Optional[torch.Tensor], rope: Optional[Tuple[torch.Tensor, torch.Tensor]],
                       q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor],
                       norm_eps: float, cu_seqlens: Optional[torch.Tensor], return_lse: bool = True,
                       out: Optional[torch.Tensor] = None,
                       block_sizes: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the forward kernel on already-validated inputs (no checks here).

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); any strides, fp16/bf16/fp32, one device.
        causal: bottom-right causal mask (within each document when packed).
        scale: constant factor of the logits (``validation.scale_rows``'s first value).
        scale_rows: None or a (B, Sq) tensor of per-row factors multiplied with ``scale``
            (stride 0 along B is fine); never differentiated.
        rope: None or ``(cos, sin)`` tables (>= Sk, D/2), any strides and float dtype.
        q_norm_weight, k_norm_weight: None, (D,) or (H, D) RMSNorm weights.
        norm_eps: RMSNorm epsilon.
        cu_seqlens: None or int32/int64 (N+1,) document boundaries (B == 1, Sq == Sk); RoPE
            positions restart at 0 in each document.
        return_lse: compute the log-sum-exp too (the backward needs it).
        out: optional (B, Hq, Sq, D) tensor of q's dtype to write the output into (tests poison it).
        block_sizes: optional ``(BM, BN)`` forcing fixed blocks (powers of two >= 16) instead of
            autotuning on CUDA / the interpreter default.

    Returns:
        ``(o, lse)``: o (B, Hq, Sq, D) in q's dtype; lse float32 (B, Hq, Sq) contiguous, natural
        log of the scaled logits' sum of exponentials, -inf on rows with no visible key; lse is
        None when ``return_lse`` is False.
    """
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty((B, HQ, SQ, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, SQ), dtype=torch.float32, device=q.device) if return_lse else None
    if B * HQ * SQ == 0:
        return out, lse
    cos, sin = rope if rope is not None else (None, None)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()  # N+1 boundaries, read by index in the kernel
    n_docs = cu_seqlens.numel() - 1 if cu_seqlens is not None else 1
    args = dict(
        Q=q, K=k, V=v, O=out, LSE=lse, SCALE_ROWS=scale_rows, COS=cos, SIN=sin,
        QW=q_norm_weight, KW=k_norm_weight, CU=cu_seqlens,
        **dict(zip(("stride_qb", "stride_qh", "stride_qs", "stride_qd"), q.stride())),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks", "stride_kd"), k.stride())),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs", "stride_vd"), v.stride())),
        **dict(zip(("stride_ob", "stride_oh", "stride_os", "stride_od"), out.stride())),
        **dict(zip(("stride_rb", "stride_rs"), _strides(scale_rows, 2))),
        **dict(zip(("stride_cs", "stride_cd"), _strides(cos, 2))),
        **dict(zip(("stride_ss", "stride_sd"), _strides(sin, 2))),
        **dict(zip(("stride_qwh", "stride_qwd"), _weight_strides(q_norm_weight))),
        **dict(zip(("stride_kwh", "stride_kwd"), _weight_strides(k_norm_weight))),
        HQ=HQ, SQ=SQ, SK=SK, G=HQ // HKV, N_DOCS=n_docs, N_ITER=(n_docs - 1).bit_length(),
        qk_scale=float(scale) * LOG2E, norm_eps=float(norm_eps),
        D=D, BDH=max(D // 2, 16),
        IS_CAUSAL=bool(causal), USE_ROPE=rope is not None, USE_QNORM=q_norm_weight is not None,
        USE_KNORM=k_norm_weight is not None, USE_SCALE_ROWS=scale_rows is not None,
        PACKED=cu_seqlens is not None, STORE_LSE=return_lse, DOT_PREC=_dot_precision(q.dtype),
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreter_enabled(),
    )
    if block_sizes is None and q.device.type == "cuda" and not interpreter_enabled():
        grid = lambda meta: (B * HQ, triton.cdiv(SQ, meta["BM"]))  # noqa: E731
        _attn_fwd_tuned[grid](**args)
    else:
        BM, BN = block_sizes if block_sizes is not None else _INTERPRETER_BLOCKS
        _attn_fwd_kernel[(B * HQ, triton.cdiv(SQ, BM))](**args, BM=BM, BN=BN, num_warps=4, num_stages=2)
    return out, lse


class _AttentionFunction(torch.autograd.Function):
    """Saves q, k, v, o, the LSE and the (small) weights/tables; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, q_norm_weight, k_norm_weight, scale_rows, cos, sin, cu_seqlens, causal, scale,
                norm_eps):
        rope = None if cos is None else (cos, sin)
        out, lse = _attention_forward(q, k, v, causal=causal, scale=scale, scale_rows=scale_rows, rope=rope,
                                      q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                                      cu_seqlens=cu_seqlens, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, q_norm_weight, k_norm_weight, scale_rows, cos, sin, cu_seqlens)
        ctx.causal, ctx.scale, ctx.norm_eps = causal, scale, norm_eps
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, out, lse, q_norm_weight, k_norm_weight, rows, cos, sin, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        grads = attention_backward(
            do, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale, scale_rows=rows,
            rope=None if cos is None else (cos, sin), q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
            norm_eps=ctx.norm_eps, cu_seqlens=cu_seqlens, dlse=dlse, needs_grad=tuple(ctx.needs_input_grad[:5]))
        return (*grads, None, None, None, None, None, None, None)


# opaque to torch.compile (a graph break): dynamo does not trace the launches or the Function
@torch.compiler.disable
def _attention_autograd(q, k, v, q_norm_weight, k_norm_weight, scale_rows, rope, cu_seqlens, causal, scale,
                        norm_eps):
    cos, sin = rope if rope is not None else (None, None)
    return _AttentionFunction.apply(q, k, v, q_norm_weight, k_norm_weight, scale_rows, cos, sin, cu_seqlens,
                                    causal, scale, norm_eps)


@torch.compiler.disable
def _attention_forward_opaque(*args, **kwargs):
    """The inference path, opaque to torch.compile as well (dynamo cannot trace the launch)."""
    return _attention_forward(*args, **kwargs)


def _autocast_inputs(q, k, v):
    """Under ``torch.autocast`` the attention runs in the autocast dtype, like a matmul."""
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, v)):
        return q, k, v
    dev = q.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return q, k, v
    dtype = torch.get_autocast_dtype(dev)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, softmax_scale=None,
              rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, q_norm_weight: Optional[torch.Tensor] = None,
              k_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6,
              cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Fused attention with in-kernel QK-norm, RoPE, per-row softmax scale and GQA (one Triton launch).

    Semantics are exactly :func:`drope.reference.attention`'s (DESIGN.md "Contract:
    drope.kernels.attention"): per head, ``q, k <- rms_norm`` (if a weight is given), then RoPE
    (if ``rope``), logits ``(q_i . k_j) * scale_i``, bottom-right causal mask, softmax, ``@ v``.

    Args:
        q: (B, Hq, Sq, D) queries; any strides (e.g. a (B, S, H, D) tensor transposed).
        k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv).
            fp16, bf16 or fp32 (one dtype for q, k, v); D in 16, 32, 64, 128, 256.
        causal: key j is visible to query row i iff ``j <= Sk - Sq + i`` (needs Sq <= Sk).
        softmax_scale: None (``D**-0.5``), a float, or a (Sq,) / (B, Sq) tensor of per-row
            multipliers (e.g. DroPE's temperature ``1 + c*ln(L/L_train)`` times ``D**-0.5``).
        rope: optional ``(cos, sin)`` angle tables of shape (>= Sk, D/2) for positions 0..Sk-1;
            query row i sits at position Sk - Sq + i; rotate-half (HF Llama) convention.
        q_norm_weight, k_norm_weight: optional per-head RMSNorm weights, (D,) or (H, D).
        norm_eps: RMSNorm epsilon.
        cu_seqlens: optional int32 (N+1,) boundaries of documents packed along S (B == 1,
            Sq == Sk); each document attends within itself, RoPE positions restart at 0.
        return_lse: also return the natural-log log-sum-exp of the scaled logits.

    Returns:
        out (B, Hq, Sq, D) in q's dtype (rows with no visible key are zeros), or ``(out, lse)``
        with lse float32 (B, Hq, Sq), -inf on rows with no visible key.

    Autograd: differentiable in q, k, v and both norm weights (and through the returned lse); not
    in ``softmax_scale`` or the rope tables. The backward (``drope.kernels.attention_bwd``) is
    deterministic and recomputes the probabilities from the saved LSE (O(S) extra memory).
    Gradients come back in the dtype of their input (norm weights may be any float dtype).
    Under ``torch.autocast`` q, k, v are cast to the autocast dtype (norm weights are not), and
    under ``torch.compile`` the call is a graph break (with or without grad).

    Raises:
        ValueError: any input outside the contract (the message names the argument).
        drope.validation.DeviceError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    q, k, v = _autocast_inputs(q, k, v)
    shape = check_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, rope=rope,
                            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                            cu_seqlens=cu_seqlens, kernel=True)
    check_kernel_device(q, "attention")
    const, rows = scale_rows(softmax_scale, shape.B, shape.SQ, shape.D, q.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, q_norm_weight, k_norm_weight)):
        if rows is not None:
            rows = rows.detach()
        if rope is not None:
            rope = (rope[0].detach(), rope[1].detach())
        out, lse = _attention_autograd(q, k, v, q_norm_weight, k_norm_weight, rows, rope, cu_seqlens, causal,
                                       const, norm_eps)
        return (out, lse) if return_lse else out
    out, lse = _attention_forward_opaque(q, k, v, causal=causal, scale=const, scale_rows=rows, rope=rope,
                                  q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                                  cu_seqlens=cu_seqlens, return_lse=return_lse)
    return (out, lse) if return_lse else out
