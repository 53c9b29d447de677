"""Fused causal attention forward: QK-norm, RoPE, per-row/per-head softmax scale, GQA, packed
documents, sliding windows, chunks, attention sinks and logit soft-capping.

QK-norm and RoPE run first, once, in ``qk_transform``'s prologue (O(S*D) traffic); the attention
kernel's hot loop is then plain attention: an fp32 online softmax in base 2, the per-row scale
applied to the logits in the softmax's own multiply-add, K/V tiles reached by pointer increments.
Optional features are ``tl.constexpr`` flags derived from whether the argument is None, so a
feature that is off costs nothing. Each row's visible keys form one interval ``[lo_i, hi_i)``
(causal, document, window and chunk bounds folded together); the loop runs in three phases so
only key blocks that straddle some row's interval pay for masking, and blocks no row of the
program can see are never visited (so a window's cost falls with its width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..validation import MAX_MULTIPLIER
from .qk_transform import packed_tables, qk_hat
from .toolkit import LN2_C, LOG2E, LOG2E_C, TRITON_VERSION, aligned16, autotuned, cached_plan, cdiv, compiled, \
    dot_precision, ensure_tma_allocator, is_recording, key_bounds, launch, mm, named_strides, next_pow2, operand, \
    padded_dim, paged_tma_ok, tanh, tma_ok, upcast, with_sink

__all__ = ["Options", "attention_forward"]

MAX_MULTIPLIER_C = tl.constexpr(MAX_MULTIPLIER)


@dataclass(frozen=True)
class Options:
    """Everything of a validated call but q, k, v, the norm weights and the sinks (what autograd tracks)."""

    causal: bool
    scale: float                                          # constant logit multiplier
    rows: Optional[torch.Tensor]                          # None or a (B, Hq, Sq) fp32 view, times ``scale``
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]]
    norm_eps: float
    cu_seqlens: Optional[torch.Tensor]
    window: Optional[int]
    chunk: Optional[int]
    softcap: Optional[float]
    key_mask: Optional[torch.Tensor] = None               # None or (B, Sk) bool / uint8 / int8
    cu_seqlens_k: Optional[torch.Tensor] = None           # None (keys packed with the queries) or (N+1,)
    block_table: Optional[torch.Tensor] = None            # None, or (N, max_pages): k / v are paged caches


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
def _fwd_loop(acc, b_l, b_m, b_q, p_k, p_v, t_k, t_v, stride_ks, stride_kd, stride_vs, stride_vd, b_sc, softcap2, lo_i,
              hi_i, n_start, n_end, SK, p_km, stride_ms, BT, stride_bb, stride_bp, stride_kp, stride_vp, CU_K, N_DOCS,
              N_ITER, NUM_PAGES, MAX_PAGES, doc_u, k0_u, BN: tl.constexpr, BD: tl.constexpr, MASKED: tl.constexpr,
              PAD_D: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_KMASK: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, TILE_TMA: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of one program's rows over key blocks [n_start, n_end), step BN.

    ``p_k``/``p_v`` are [Sk, D] tensor descriptors of the (batch, KV head) under USE_TMA (TMA
    zero-fills rows past Sk and lanes past D), else base pointers whose tile addresses are rebuilt
    from the block start each iteration (a loop-carried [BN, BD] pointer tile costs a register per
    element). Unmasked (MASKED=False) blocks lie inside every row's interval [lo_i, hi_i) and inside
    [0, SK), and hold only attendable keys: no bounds, no mask, no -inf guard. Masked blocks also
    read the key mask row ``p_km`` under HAS_KMASK.

    PAGED: key j (packed index) is position ``j - CU_K[d]`` of document d, in page ``BT[d, pos // PAGE]``;
    unmasked blocks lie in the program's one document ``doc_u`` (its keys start at ``k0_u``), masked ones find
    each key's document. Under TILE_TMA (PAGE % BN == 0, blocks aligned to the document's start) an unmasked block
    is rows of one page: one table lookup and a TMA load from ``t_k``/``t_v``, [pages x PAGE, D] descriptors of the
    page pool. A page index outside [0, NUM_PAGES) is never dereferenced: its keys' logits are NaN.
    """
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    for start_n in range(n_start, n_end, BN):
        o_n = start_n + tl.arange(0, BN)
        if TILE_TMA and not MASKED:
            # a block of the program's document, aligned to its start: rows of one page
            loc0 = start_n - k0_u
            in_table = loc0 // PAGE < MAX_PAGES
            pg = tl.load(BT + doc_u.to(tl.int64) * stride_bb + (loc0 // PAGE) * stride_bp, mask=in_table,
                         other=-1).to(tl.int32)
            bad = (pg < 0) | (pg >= NUM_PAGES)
            row0 = tl.where(bad, 0, pg) * PAGE + loc0 % PAGE
            b_k = t_k.load([row0, 0])  # [BN, BD]
        elif PAGED:
            if MASKED:
                d_n = _doc_index(CU_K, o_n, N_DOCS, N_ITER)
                loc = o_n - tl.load(CU_K + d_n).to(tl.int32)
                live = o_n < SK
            else:
                d_n = o_n * 0 + doc_u
                loc = o_n - k0_u
                live = o_n >= 0
            # a key past its block_table row (lengths unchecked on the device) or on a page outside the cache is never
            # read: its logits are NaN, never a plausible number
            ok_n = live & (loc < MAX_PAGES * PAGE)
            pg = tl.load(BT + d_n.to(tl.int64) * stride_bb + (loc // PAGE) * stride_bp, mask=ok_n, other=-1)
            bad = live & ((pg < 0) | (pg >= NUM_PAGES))
            ok_n = ok_n & ~bad
            row = tl.where(ok_n, pg, 0).to(tl.int64) * stride_kp + (loc % PAGE).to(tl.int64) * stride_ks
            row_v = tl.where(ok_n, pg, 0).to(tl.int64) * stride_vp + (loc % PAGE).to(tl.int64) * stride_vs
            m_kv = ok_n[:, None] & m_d[None, :]
            b_k = tl.load(p_k + row[:, None] + o_d[None, :] * stride_kd, mask=m_kv, other=0.0)
        elif USE_TMA:
            b_k = p_k.load([start_n, 0])  # [BN, BD]
        else:
            o_n64 = o_n.to(tl.int64)
            p_kt = p_k + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd
            p_vt = p_v + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd
        if USE_TMA or PAGED:
            pass
        elif MASKED:
            m_kv = (o_n < SK)[:, None]
            if PAD_D:
                m_kv = m_kv & m_d[None, :]
            b_k = tl.load(p_kt, mask=m_kv, other=0.0)  # [BN, BD]
        elif PAD_D:
            b_k = tl.load(p_kt, mask=m_d[None, :], other=0.0)
        else:
            b_k = tl.load(p_kt)
        b_s = mm(b_q, tl.trans(b_k), None, DOT_PREC, UPCAST)  # [BM, BN]
        if TILE_TMA and not MASKED:
            b_s = tl.where(bad, float("nan"), b_s)
        elif PAGED:
            b_s = tl.where(bad[None, :], float("nan"), b_s)
        if HAS_SOFTCAP:
            b_s = tanh(b_s * b_sc[:, None]) * softcap2
        elif MASKED:
            b_s = b_s * b_sc[:, None]
        if MASKED:
            vis = (o_n[None, :] >= lo_i[:, None]) & (o_n[None, :] < hi_i[:, None])
            if HAS_KMASK:
                vis = vis & (tl.load(p_km + o_n.to(tl.int64) * stride_ms, mask=o_n < SK, other=0) != 0)[None, :]
            b_s = tl.where(vis, b_s, float("-inf"))
        if HAS_SOFTCAP or MASKED:
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            if MASKED:
                # a row that has seen nothing yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN
                b_m_sub = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            else:
                b_m_sub = b_m_new
            b_p = tl.math.exp2(b_s - b_m_sub[:, None])
        else:
            # the scale is >= 0, so max(s * sc) = max(s) * sc: scale and shift in one multiply-add
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * b_sc)
            b_m_sub = b_m_new
            b_p = tl.math.exp2(b_s * b_sc[:, None] - b_m_sub[:, None])
        b_alpha = tl.math.exp2(b_m - b_m_sub)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if TILE_TMA and not MASKED:
            b_v = t_v.load([row0, 0])  # [BN, BD]
        elif PAGED:
            b_v = tl.load(p_v + row_v[:, None] + o_d[None, :] * stride_vd, mask=m_kv, other=0.0)
        elif USE_TMA:
            b_v = p_v.load([start_n, 0])  # [BN, BD]
        elif MASKED:
            b_v = tl.load(p_vt, mask=m_kv, other=0.0)  # [BN, BD]
        elif PAD_D:
            b_v = tl.load(p_vt, mask=m_d[None, :], other=0.0)
        else:
            b_v = tl.load(p_vt)
        acc = mm(operand(b_p, b_v.dtype, UPCAST), b_v, acc * b_alpha[:, None], DOT_PREC, UPCAST)
        b_m = b_m_new
    return acc, b_l, b_m


@triton.jit(do_not_specialize=["SQ", "SK", "N_DOCS", "N_ITER", "WINDOW", "CHUNK", "SK_BUCKET", "NUM_PAGES",
                            "MAX_PAGES"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SCALE, SINKS, CU, CU_K, KMASK, BT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_rb, stride_rh, stride_rs, stride_mb, stride_ms, stride_bb, stride_bp,
    HQ, SQ, SK, G, N_DOCS, N_ITER, WINDOW, CHUNK, SK_BUCKET, NUM_PAGES, MAX_PAGES, qk_scale, softcap2,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KMASK: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, PAGE_TMA: tl.constexpr, STORE_LSE: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # heads of one KV group run side by side (K/V reuse in L2); longest causal rows first (tail balance)
    i_bh = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_b64, i_h64, i_hk64 = i_b.to(tl.int64), i_h.to(tl.int64), (i_h // G).to(tl.int64)
    PAD_D: tl.constexpr = BD != D
    # paged keys readable through TMA (the launcher checked the pool's layout) in tiles of one page each
    TILE_TMA: tl.constexpr = PAGE_TMA and PAGE % BN == 0

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < SQ
    rows = tl.minimum(o_m, SQ - 1)
    o_m64 = o_m.to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D

    # row i sees keys [lo_i, hi_i); k0_i is the key index of the row's position 0
    if VARLEN_K:
        # the document's queries are the last of its keys: row -> key index rows + (its key end - its query end)
        i_doc = _doc_index(CU, rows, N_DOCS, N_ITER)
        k0_i = tl.load(CU_K + i_doc).to(tl.int32)
        k_end = tl.load(CU_K + i_doc + 1).to(tl.int32)
        pos_i = rows + (k_end - tl.load(CU + i_doc + 1).to(tl.int32)) - k0_i
        if IS_CAUSAL:
            hi_i = k0_i + pos_i + 1
        else:
            hi_i = k_end
    elif PACKED:
        i_doc = _doc_index(CU, rows, N_DOCS, N_ITER)
        k0_i = tl.load(CU + i_doc).to(tl.int32)
        pos_i = rows - k0_i
        if IS_CAUSAL:
            hi_i = rows + 1
        else:
            hi_i = tl.load(CU + i_doc + 1).to(tl.int32)
    else:
        k0_i = rows * 0
        pos_i = rows + (SK - SQ)
        if IS_CAUSAL:
            hi_i = tl.minimum(pos_i + 1, SK)
        else:
            hi_i = k0_i + SK
    lo_i = k0_i
    if HAS_WINDOW:
        lo_i = tl.maximum(lo_i, k0_i + pos_i - WINDOW + 1)
    if HAS_CHUNK:
        if VARLEN_K:
            # a row at a negative position sees nothing whatever its chunk (hi_i <= k0_i): no negative division
            pos_i = tl.maximum(pos_i, 0)
        lo_i = tl.maximum(lo_i, k0_i + (pos_i // CHUNK) * CHUNK)
    if PACKED:
        # rows after the last boundary (a batch padded to a fixed size) see nothing: zeros, never a neighbour's keys
        hi_i = tl.where(rows < tl.load(CU + N_DOCS), hi_i, lo_i)
    p_km = KMASK
    if HAS_KMASK:
        # attendable keys span [k_lo, k_hi) of this batch row; with holes every block is masked
        p_km = KMASK + i_b64 * stride_mb
        k_lo, k_hi, k_dense = key_bounds(p_km, stride_ms, SK, 1024)
        lo_i = tl.maximum(lo_i, k_lo)
        hi_i = tl.minimum(hi_i, k_hi)
    # over the program's valid rows: keys in [lo_blk, hi_blk) are seen by some row, [full_lo, full_hi) by all
    lo_blk = tl.min(tl.where(m_m, lo_i, SK), 0)
    hi_blk = tl.max(tl.where(m_m, hi_i, 0), 0)
    full_lo = tl.max(tl.where(m_m, lo_i, 0), 0)
    full_hi = tl.min(tl.where(m_m, hi_i, SK), 0)
    if HAS_KMASK:
        full_lo = tl.where(k_dense, full_lo, SK)

    m_q = m_m[:, None] & m_d[None, :]
    p_q = Q + i_b64 * stride_qb + i_h64 * stride_qh + o_m64[:, None] * stride_qs + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_q, other=0.0)  # [BM, BD]
    if HAS_SCALE:
        b_sc = tl.load(SCALE + i_b64 * stride_rb + i_h64 * stride_rh + o_m64 * stride_rs, mask=m_m,
                       other=0.0).to(tl.float32)
        # the contract asks for multipliers in [0, MAX] (checked on the host for CPU tensors): others give NaN rows
        b_sc = tl.where((b_sc >= 0) & (b_sc <= MAX_MULTIPLIER_C), b_sc * qk_scale, float("nan"))
    else:
        b_sc = tl.full([BM], qk_scale, dtype=tl.float32)

    acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    doc_u = 0
    k0_u = 0
    if PAGED:
        # paged keys (num_pages, page, Hkv, D): stride_kb is the page stride; the packed key count is on the device
        # (the host passed a bound as SK); unmasked blocks lie in one document, the valid rows' first
        SK = tl.load(CU_K + N_DOCS).to(tl.int32)
        doc_u = tl.min(tl.where(m_m, i_doc, N_DOCS), 0)
        k0_u = tl.load(CU_K + doc_u).to(tl.int32)
        p_k = K + i_hk64 * stride_kh
        p_v = V + i_hk64 * stride_vh
    else:
        p_k = K + i_b64 * stride_kb + i_hk64 * stride_kh
        p_v = V + i_b64 * stride_vb + i_hk64 * stride_vh
    t_k = p_k
    t_v = p_v
    if TILE_TMA:
        # every page's rows of this KV head as one [pages x page size, D] matrix; key blocks start at multiples
        # of BN from the document's first key, so an unmasked block is rows of one page
        t_k = tl.make_tensor_descriptor(p_k, shape=[NUM_PAGES * PAGE, D], strides=[stride_ks, 1], block_shape=[BN, BD])
        t_v = tl.make_tensor_descriptor(p_v, shape=[NUM_PAGES * PAGE, D], strides=[stride_vs, 1], block_shape=[BN, BD])
        lo_blk = k0_u + ((lo_blk - k0_u) // BN) * BN
    if USE_TMA:
        p_k = tl.make_tensor_descriptor(p_k, shape=[SK, D], strides=[stride_ks, 1], block_shape=[BN, BD])
        p_v = tl.make_tensor_descriptor(p_v, shape=[SK, D], strides=[stride_vs, 1], block_shape=[BN, BD])

    # key blocks counted from lo_blk: [0, nb_a) masked, [nb_a, nb_b) seen by every row, [nb_b, nb_all) masked
    # (toolkit.phases' split; calling it, or naming the starts first, compiled to 4 more registers at D=128
    # 128x64 on sm_90a: 169 vs 165)
    nb_all = (tl.maximum(hi_blk - lo_blk, 0) + BN - 1) // BN
    nb_a = tl.minimum((tl.maximum(full_lo - lo_blk, 0) + BN - 1) // BN, nb_all)
    nb_b = tl.maximum(nb_a, tl.minimum(tl.maximum(full_hi - lo_blk, 0) // BN, nb_all))
    # the three phases, unrolled: PH is a constexpr, so each picks its bounds and MASKED at compile time
    for PH in tl.static_range(3):
        start = lo_blk if PH == 0 else lo_blk + (nb_a if PH == 1 else nb_b) * BN
        end = lo_blk + (nb_a if PH == 0 else (nb_b if PH == 1 else nb_all)) * BN
        acc, b_l, b_m = _fwd_loop(acc, b_l, b_m, b_q, p_k, p_v, t_k, t_v, stride_ks, stride_kd, stride_vs, stride_vd,
                                  b_sc, softcap2, lo_i, hi_i, start, end, SK, p_km, stride_ms, BT, stride_bb,
                                  stride_bp, stride_kb, stride_vb, CU_K, N_DOCS, N_ITER, NUM_PAGES, MAX_PAGES, doc_u,
                                  k0_u, BN=BN, BD=BD, D=D, MASKED=PH != 1, PAD_D=PAD_D, USE_TMA=USE_TMA,
                                  HAS_SOFTCAP=HAS_SOFTCAP, HAS_KMASK=HAS_KMASK, PAGED=PAGED, PAGE=PAGE,
                                  TILE_TMA=TILE_TMA, DOT_PREC=DOT_PREC, UPCAST=UPCAST)

    if HAS_SINKS:
        # the head's sink logit joins the denominator only
        acc, b_l, b_m = with_sink(acc, b_l, b_m, tl.load(SINKS + i_h).to(tl.float32) * LOG2E_C)
    # rows that saw no key (l == 0) output zeros and lse = -inf
    empty = b_l == 0.0
    b_o = acc / tl.where(empty, 1.0, b_l)[:, None]
    p_o = O + i_b64 * stride_ob + i_h64 * stride_oh + o_m64[:, None] * stride_os + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_q)
    if STORE_LSE:
        # base-2 running max and sum back to a natural-log LSE
        b_lse = tl.where(empty, float("-inf"), (b_m + tl.math.log2(tl.where(empty, 1.0, b_l))) * LN2_C)
        tl.store(LSE + i_bh.to(tl.int64) * SQ + o_m64, b_lse, mask=m_m)


# (BM, BN, num_warps, num_stages); candidate lists per dtype and padded D, pruned by the compile check
# of tests/test_inspect.py (sm_90a: no spills, no serialised wgmma, shared memory within an H100's)
_TILES_16BIT = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3)]
_TILES_16BIT_D256 = [(128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2)]
# fp32 tiles take twice the shared memory, and exact (ieee) dots compile slowly: small tiles only
_TILES_FP32 = [(64, 32, 4, 2), (64, 64, 4, 2)]
_TILES_FP32_D256 = [(64, 32, 4, 2)]


# paged keys (per-key page lookups, pointer loads): the tiles that hold their addresses without spilling (sm_90a;
# at D=128 128x64 w8 spilled 264 B, 64x128 w4 2124 B; at D=256 every wgmma tile tried spilled 16-1628 B)
_TILES_PAGED = [(64, 64, 4, 3), (128, 32, 8, 3)]
_TILES_PAGED_D256 = [(32, 32, 4, 2)]
# page-sized key blocks (PAGE % BN == 0, the pool read through TMA): only the masked blocks keep per-key addresses,
# and these tiles fit too (sm_90a, page 64: 128x64 w8 211 registers; D=256 128x32 w8 251; 128x128 w8 and 128x32 w4
# still spill 44-64 B, D=256 64-row tiles 12-28 B)
_TILES_PAGED_TMA = [(128, 64, 8, 3)]
_TILES_PAGED_TMA_D256 = [(128, 32, 8, 3)]


def _tiles(dtype: torch.dtype, BD: int, paged: bool = False, tma_page: int = 0, row_tables: bool = False):
    """Candidate tiles; ``tma_page``: the page size when a paged pool can be read through TMA, else 0;
    ``row_tables``: a key mask or packed documents (per-row key bounds read in the kernel)."""
    if dtype == torch.float32:
        return _TILES_FP32_D256 if BD > 128 else _TILES_FP32
    if paged:
        tma = _TILES_PAGED_TMA_D256 if BD > 128 else _TILES_PAGED_TMA
        return ((_TILES_PAGED_D256 if BD > 128 else _TILES_PAGED)
                + [t for t in tma if tma_page and tma_page % t[1] == 0])
    if BD > 128:
        return _TILES_16BIT_D256
    # 128x64 with 4 warps spills at D=128 (sm_90a, 248 B of stack): 8 warps only there; Triton 3.6 (the GPU
    # machines') also spills 128x32 w4 s4 there with a key mask (28 B) or packed documents (16 B)
    drop = {(128, 64, 4, 3)} | ({(128, 32, 4, 4)} if row_tables and TRITON_VERSION < (3, 9) else set())
    return _TILES_16BIT if BD <= 64 else [t for t in _TILES_16BIT if t not in drop]


def _config(tile) -> triton.Config:
    bm, bn, w, s = tile
    return triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)


_CONFIGS = [_config(t) for t in dict.fromkeys(_TILES_16BIT + _TILES_16BIT_D256 + _TILES_FP32 + _TILES_FP32_D256
                                               + _TILES_PAGED + _TILES_PAGED_D256 + _TILES_PAGED_TMA
                                               + _TILES_PAGED_TMA_D256)]


def _keep(c: triton.Config, args) -> bool:
    tile = (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages)
    return tile in _tiles(args["Q"].dtype, args["BD"], args["PAGED"], args["PAGE"] if args["PAGE_TMA"] else 0,
                          args["HAS_KMASK"] or args["PACKED"])


_AUTOTUNE_KEY = ["D", "IS_CAUSAL", "PACKED", "VARLEN_K", "HAS_SCALE", "HAS_WINDOW", "HAS_CHUNK", "HAS_SINKS",
                 "HAS_SOFTCAP", "HAS_KMASK", "PAGED", "PAGE", "PAGE_TMA", "DOT_PREC", "SK_BUCKET"]
_attn_fwd_tuned = autotuned(_attn_fwd_kernel, _CONFIGS, _AUTOTUNE_KEY, _keep)

# interpreter default: big enough to keep the number of (slow, sequential) programs down
_INTERPRETER_BLOCKS = (64, 64)


def _sk_bucket(SK: int) -> int:
    """Autotune bucket of the key length: powers of two from 1k to 32k (tiles differ by length)."""
    return min(max(next_pow2(max(SK, 1)), 1024), 32768)


_PLANS: dict = {}


def _plan(q, q_hat, k, k_hat, v, out, sinks, opt: Options, km, cu, cu_k, return_lse: bool, block_sizes):
    """(kernel, grid, the launch's non-tensor arguments) of an :func:`attention_forward` call (its plan)."""
    B, HQ, SQ, D = q.shape
    bt = opt.block_table
    HKV, SK = (k.shape[2], bt.shape[0] * bt.shape[1] * k.shape[1]) if bt is not None else (k.shape[1], k.shape[2])
    n_docs = cu.numel() - 1 if cu is not None else 1
    cap = opt.softcap
    kv_dims = "bshd" if bt is not None else "bhsd"  # paged: "b" is the page stride, "s" the row in the page
    args = dict(
        **named_strides("q", q_hat, "bhsd"), **named_strides("k", k_hat, kv_dims),
        **named_strides("v", v, kv_dims), **named_strides("o", out, "bhsd"), **named_strides("r", opt.rows, "bhs"),
        **named_strides("m", km, "bs"), **named_strides("b", bt, "bp"),
        HQ=HQ, SQ=SQ, SK=SK, G=HQ // HKV, N_DOCS=n_docs, N_ITER=(n_docs - 1).bit_length(),
        WINDOW=opt.window or 0, CHUNK=opt.chunk or 0, SK_BUCKET=_sk_bucket(SK),
        NUM_PAGES=k.shape[0] if bt is not None else 0, MAX_PAGES=bt.shape[1] if bt is not None else 0,
        PAGED=bt is not None, PAGE=k.shape[1] if bt is not None else 16,
        PAGE_TMA=bt is not None and paged_tma_ok(k_hat, v),
        qk_scale=opt.scale / cap if cap is not None else opt.scale * LOG2E,
        softcap2=cap * LOG2E if cap is not None else 0.0,
        D=D, BD=padded_dim(D), IS_CAUSAL=opt.causal, PACKED=cu is not None, VARLEN_K=cu_k is not None,
        HAS_SCALE=opt.rows is not None,
        HAS_WINDOW=opt.window is not None, HAS_CHUNK=opt.chunk is not None, HAS_SINKS=sinks is not None,
        HAS_SOFTCAP=cap is not None, HAS_KMASK=km is not None, STORE_LSE=return_lse,
        USE_TMA=bt is None and tma_ok(k_hat, v),
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast(q.dtype),
    )
    if block_sizes is None and compiled(q):
        return _attn_fwd_tuned, lambda meta: (B * HQ, cdiv(SQ, meta["BM"])), args
    BM, BN = block_sizes if block_sizes is not None else _INTERPRETER_BLOCKS
    return _attn_fwd_kernel, (B * HQ, cdiv(SQ, BM)), dict(args, BM=BM, BN=BN, num_warps=4, num_stages=2)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: Optional[torch.Tensor],
                       k_norm_weight: Optional[torch.Tensor], sinks: Optional[torch.Tensor], opt: Options, *,
                       return_lse: bool = True,
                       block_sizes: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the prologue (if any) and the attention kernel on validated inputs (no checks here).

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D), or paged (num_pages, page_size, Hkv, D) caches with
            ``opt.block_table``; any strides, fp16/bf16/fp32, one device.
        q_norm_weight, k_norm_weight: None, (D,) or (H, D) RMSNorm weights.
        sinks: None or the (Hq,) sink logits.
        opt: the call's other options (see :class:`Options`).
        return_lse: compute the log-sum-exp too (the backward needs it).
        block_sizes: optional ``(BM, BN)`` forcing fixed blocks (powers of two >= 16) instead of
            autotuning on CUDA / the interpreter default.

    Returns:
        ``(o, lse)``: o (B, Hq, Sq, D) in q's dtype and memory layout; lse float32 (B, Hq, Sq) contiguous, natural
        log of the scaled logits' sum of exponentials (the sink included), -inf on rows with no
        visible key and no sink; lse is None when ``return_lse`` is False.
    """
    B, HQ, SQ, D = q.shape
    bt = opt.block_table
    # paged keys: SK bounds the packed key count (the kernel reads the real one from cu_seqlens_k)
    SK = bt.shape[0] * bt.shape[1] * k.shape[1] if bt is not None else k.shape[2]
    # q's memory layout: a (B, S, H, D) buffer seen as (B, H, S, D) (how HF hands q) gets its output back
    # the same way, so the caller's transpose to (B, S, H, D) costs no copy
    out = torch.empty_like(q)
    lse = torch.empty((B, HQ, SQ), dtype=torch.float32, device=q.device) if return_lse else None
    if B * HQ * SQ == 0:
        return out, lse
    cu, cu_k = opt.cu_seqlens, opt.cu_seqlens_k
    pos = None
    if cu_k is not None:
        cu_k = cu_k.contiguous()
    if cu is not None:
        cu = cu.contiguous()  # N+1 boundaries, read by index in the kernel
        if opt.rope is not None:
            pos = packed_tables(cu, SQ)[2]
    q_hat = qk_hat(q, q_norm_weight, opt.rope, pos, SK - SQ, opt.norm_eps)
    k_hat = qk_hat(k, k_norm_weight, opt.rope, pos, 0, opt.norm_eps)
    km = opt.key_mask
    if km is not None and km.dtype == torch.bool:
        km = km.view(torch.uint8)
    # everything the launch's other arguments read; the same at every layer of a forward
    key = (q_hat.shape, q_hat.stride(), q.dtype, q.device, k.shape, k_hat.stride(), v.stride(), out.stride(),
           aligned16(k_hat, v), q.dtype == torch.float32 and dot_precision(q.dtype) == "tf32", is_recording(),
           None if opt.rows is None else opt.rows.stride(), None if km is None else km.stride(),
           None if bt is None else (bt.shape, bt.stride()), None if cu is None else cu.numel(), cu_k is None,
           sinks is None, opt.causal, opt.scale, opt.softcap, opt.window, opt.chunk, return_lse, block_sizes)
    kernel, grid, args = cached_plan(_PLANS, key, lambda: _plan(q, q_hat, k, k_hat, v, out, sinks, opt, km, cu,
                                                                cu_k, return_lse, block_sizes))
    if args["USE_TMA"] or args["PAGE_TMA"]:
        ensure_tma_allocator(q)
    launch(kernel, grid, Q=q_hat, K=k_hat, V=v, O=out, LSE=lse, SCALE=opt.rows, SINKS=sinks, CU=cu, CU_K=cu_k,
           KMASK=km, BT=bt, **args)
    return out, lse
