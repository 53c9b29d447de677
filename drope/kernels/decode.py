"""Split-KV (flash-decoding) attention of a few new query rows against a long NoPE KV cache.

Stage 1 launches one program per (batch, KV head, split, block of packed query rows): the query
heads of a GQA group and the Sq new rows are packed into the M dimension (row ``m`` is query row
``m // G`` of head ``m % G`` of the group), so each K/V tile of the split is read once for the whole
group. Each program writes an fp32 partial output, already normalised, and its log2-sum-exp.
Stage 2 merges the splits by log-sum-exp. With one split, stage 1 writes the final output directly.

How the KV range is split: every batch row divides *its own* live length ``cache_seqlens[b]`` (narrowed
to the attendable keys of its key mask, and to what its window / chunk lets the new rows see) into
``num_splits`` runs of whole tiles, read on the device, so a ragged batch keeps all splits busy and no
program reads past its row's live length. The *number* of splits and the grid come from capacities
(batch, heads, cache size Smax, or a host ``max_seqlen`` hint) and the device only, never from the
values in ``cache_seqlens`` (:func:`num_splits_for`): nothing is read back to the host, and one
captured CUDA graph replays for any lengths. Results never depend on the split count beyond float
rounding.

Chunked prefill (a prompt fed in chunks against its growing cache) gives the same rows with this
kernel (Sq up to ~64) and with :func:`drope.kernels.attention` (bottom-right causal, Sq < Sk).
Which is faster is not measured yet (no GPU in the session that wrote this). Expected: this kernel
when B x Hkv is small next to the SM count and a chunk's G x Sq rows fit one or two row blocks (it
spreads the keys over the SMs and reads each K/V tile once per GQA group); ``attention`` for chunks
of a few hundred rows or more, whose query blocks already fill the GPU, so that splits and the merge
would be pure overhead. The decode/prefill benchmarks measure the crossover once a GPU runs them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..validation import MAX_MULTIPLIER
from .toolkit import LN2, LN2_C, LOG2E, LOG2E_C, aligned16, cached_plan, cdiv, dot_precision, ensure_tma_allocator, \
    exp2_rel, is_recording, key_bounds, launch, mm, named_strides, next_pow2, operand, padded_dim, paged_tma_ok, \
    phases, tanh, tma_ok, upcast, with_sink

__all__ = ["choose_num_splits", "decode_block_n", "decode_launch", "num_splits_for", "prefer_fused"]

MAX_MULTIPLIER_C = tl.constexpr(MAX_MULTIPLIER)

MAX_GRID_Y = 65535


@triton.jit
def _decode_tiles(b_acc, b_l, b_m, b_q, b_sc, softcap2, p_k, p_v, t_k, t_v, stride_ks, stride_kd, stride_vs,
                  stride_vd, start, end, hi, pos, lo_r, o_d, m_d, p_km, stride_mq, stride_ms, o_i, m_row, p_bt,
                  stride_bp, stride_kp, stride_vp, NUM_PAGES, BN: tl.constexpr, MASKED: tl.constexpr,
                  HAS_LO: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_KMASK: tl.constexpr, KMASK_ROWS: tl.constexpr, PAGED: tl.constexpr,
                  PAGE: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax of the packed rows over key tiles [start, end); MASKED tiles check pos / lo_r / hi and
    the key mask (one per batch row, or under KMASK_ROWS one per query row). PAGED: key p of the batch row is
    row p % PAGE of page ``p_bt[p // PAGE]``; a page index outside [0, NUM_PAGES) is never dereferenced and
    makes the logits of its keys NaN (a wrong table on the device gives NaN rows, not a plausible number).
    Under USE_TMA, ``t_k``/``t_v`` are the page pool's [pages x PAGE, D] descriptors, read by unmasked tiles."""
    for n0 in range(start, end, BN):
        o_n = n0 + tl.arange(0, BN)
        if USE_TMA and PAGED and not MASKED:
            # the tile lies in one page (PAGE % BN == 0) and in the live length: one lookup, one TMA load of rows
            # of the page (a masked edge tile takes the row path below, whose masked loads never read rows of the
            # page past the live length: zeroing them here cost a V tile of shared memory, 3 -> 2 CTAs per SM)
            pg = tl.load(p_bt + (n0 // PAGE) * stride_bp).to(tl.int32)
            bad = (pg < 0) | (pg >= NUM_PAGES)
            row0 = tl.where(bad, 0, pg) * PAGE + n0 % PAGE
            b_k = t_k.load([row0, 0])  # [BN, BD]
            b_v = t_v.load([row0, 0])
        elif USE_TMA and not PAGED:
            b_k = p_k.load([n0, 0])  # [BN, BD]
            b_v = p_v.load([n0, 0])
        elif PAGED:
            pg = tl.load(p_bt + (o_n // PAGE).to(tl.int64) * stride_bp, mask=o_n < hi, other=0).to(tl.int64)
            bad = (pg < 0) | (pg >= NUM_PAGES)
            pg = tl.where(bad, 0, pg)
            r64 = (o_n % PAGE).to(tl.int64)
            m_kv = (o_n < hi)[:, None] & m_d[None, :]
            b_k = tl.load(p_k + (pg * stride_kp + r64 * stride_ks)[:, None] + o_d[None, :] * stride_kd, mask=m_kv,
                          other=0.0)
            b_v = tl.load(p_v + (pg * stride_vp + r64 * stride_vs)[:, None] + o_d[None, :] * stride_vd, mask=m_kv,
                          other=0.0)
        else:
            o_n64 = o_n.to(tl.int64)
            m_kv = (o_n < hi)[:, None] & m_d[None, :]
            b_k = tl.load(p_k + o_n64[:, None] * stride_ks + o_d[None, :] * stride_kd, mask=m_kv, other=0.0)
            b_v = tl.load(p_v + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd, mask=m_kv, other=0.0)
        b_s = mm(b_q, tl.trans(b_k), None, DOT_PREC, UPCAST)  # [BM, BN]
        if PAGED and USE_TMA and not MASKED:
            b_s = tl.where(bad, float("nan"), b_s)
        elif PAGED:
            b_s = tl.where(bad[None, :], float("nan"), b_s)
        if HAS_SOFTCAP:
            b_s = tanh(b_s * b_sc[:, None]) * softcap2
        else:
            b_s = b_s * b_sc[:, None]  # log2 units
        if MASKED:
            vis = (o_n[None, :] <= pos[:, None]) & (o_n < hi)[None, :]
            if HAS_LO:
                vis = vis & (o_n[None, :] >= lo_r[:, None])
            if HAS_KMASK:
                o_n64 = o_n.to(tl.int64)
                if KMASK_ROWS:
                    p_m = p_km + o_i.to(tl.int64)[:, None] * stride_mq + o_n64[None, :] * stride_ms
                    vis = vis & (tl.load(p_m, mask=m_row[:, None] & (o_n < hi)[None, :], other=0) != 0)
                else:
                    vis = vis & (tl.load(p_km + o_n64 * stride_ms, mask=o_n < hi, other=0) != 0)[None, :]
            b_s = tl.where(vis, b_s, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            # rows that have seen no key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
            b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        else:
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            b_ref = b_m_new
        b_p = tl.exp2(b_s - b_ref[:, None])
        b_alpha = tl.exp2(b_m - b_ref)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = mm(operand(b_p, b_v.dtype, UPCAST), b_v, b_acc * b_alpha[:, None], DOT_PREC, UPCAST)
        b_m = b_m_new
    return b_acc, b_l, b_m


# lengths, split counts and window sizes change from call to call: one compile for all of them
@triton.jit(do_not_specialize=["SQ", "SMAX", "NUM_SPLITS", "WINDOW", "CHUNK"])
def _decode_split_kernel(
    Q, K, V, O, LSE, SEQLENS, SCALE, SINKS, KMASK, BT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_sl, stride_rb, stride_rh, stride_rs, stride_mb, stride_mq, stride_ms, stride_bb, stride_bp,
    qk_scale, softcap2, lse_scale,
    HKV, SQ, SMAX, NUM_SPLITS, WINDOW, CHUNK, NUM_PAGES,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ADD_SINKS: tl.constexpr, HAS_KMASK: tl.constexpr, KMASK_ROWS: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_split = tl.program_id(1)
    i_m = tl.program_id(2)
    i_b = i_bh // HKV
    i_hkv = i_bh % HKV
    i_b64 = i_b.to(tl.int64)
    # a device-side length outside [0, SMAX] (unchecked on a GPU: that would sync) reads nothing and makes the
    # batch row's outputs NaN: never a clamped, plausible answer
    bad_len = False
    if HAS_SEQLENS:
        L = tl.load(SEQLENS + i_b64 * stride_sl).to(tl.int32)
        bad_len = (L < 0) | (L > SMAX)
        L = tl.where(bad_len, 0, L)
    else:
        L = SMAX

    o_m = i_m * BM + tl.arange(0, BM)
    m_row = o_m < G * SQ
    o_i = o_m // G
    o_h = i_hkv * G + o_m % G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # each packed row sees keys [lo_r, pos + 1); pos is negative when the row sees nothing
    pos = L - SQ + o_i
    lo_r = pos * 0
    # the batch row's earliest visible key (query row 0's window / chunk start): splits cover [k_lo, L)
    k_lo = L * 0
    if HAS_WINDOW:
        lo_r = tl.maximum(lo_r, pos - WINDOW + 1)
        k_lo = tl.maximum(k_lo, L - SQ - WINDOW + 1)
    if HAS_CHUNK:
        lo_r = tl.maximum(lo_r, (tl.maximum(pos, 0) // CHUNK) * CHUNK)
        k_lo = tl.maximum(k_lo, (tl.maximum(L - SQ, 0) // CHUNK) * CHUNK)

    # the key mask narrows the range to its attendable keys [s_lo, s_hi); with holes (or one mask per
    # query row) every tile is masked
    k_end = L
    dense = L >= 0
    p_km = KMASK
    if HAS_KMASK:
        p_km = KMASK + i_b64 * stride_mb
        if KMASK_ROWS:
            dense = L < 0
        else:
            s_lo, s_hi, dense = key_bounds(p_km, stride_ms, L, 1024)
            k_lo = tl.maximum(k_lo, s_lo)
            k_end = tl.minimum(k_end, s_hi)

    # tiles start at multiples of BN (a paged TMA tile must lie in one page); the keys of the first tile before
    # k_lo are masked there by the window / chunk bounds or the key mask
    k_lo_blk = (k_lo // BN) * BN
    n_tiles = (tl.maximum(k_end - k_lo_blk, 0) + BN - 1) // BN
    tiles_per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    lo = k_lo_blk + i_split * tiles_per_split * BN
    last_i = (tl.minimum(i_m * BM + BM, G * SQ) - 1) // G
    hi = tl.minimum(tl.minimum(lo + tiles_per_split * BN, L - SQ + last_i + 1), k_end)

    p_q = (Q + i_b64 * stride_qb + o_h[:, None].to(tl.int64) * stride_qh
           + o_i[:, None].to(tl.int64) * stride_qs + o_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    if HAS_SCALE:
        b_sc = tl.load(SCALE + i_b64 * stride_rb + o_h.to(tl.int64) * stride_rh + o_i.to(tl.int64) * stride_rs,
                       mask=m_row, other=0.0).to(tl.float32)
        # multipliers outside [0, MAX] (unchecked on a GPU: that would sync) give NaN rows, never a plausible number
        b_sc = tl.where((b_sc >= 0) & (b_sc <= MAX_MULTIPLIER_C), b_sc * qk_scale, float("nan"))
    else:
        b_sc = tl.zeros([BM], dtype=tl.float32) + qk_scale

    # paged: the batch row's keys are reached through its block-table row; stride_kb is then the page stride
    p_bt = BT
    if PAGED:
        p_bt = BT + i_b64 * stride_bb
        p_k = K + i_hkv.to(tl.int64) * stride_kh
        p_v = V + i_hkv.to(tl.int64) * stride_vh
    else:
        p_k = K + i_b64 * stride_kb + i_hkv.to(tl.int64) * stride_kh
        p_v = V + i_b64 * stride_vb + i_hkv.to(tl.int64) * stride_vh
    t_k = p_k
    t_v = p_v
    if USE_TMA and PAGED:
        # every page's rows of this KV head as one [pages x page size, D] matrix (whole tiles; edge tiles use p_k)
        t_k = tl.make_tensor_descriptor(p_k, shape=[NUM_PAGES * PAGE, D], strides=[stride_ks, 1], block_shape=[BN, BD])
        t_v = tl.make_tensor_descriptor(p_v, shape=[NUM_PAGES * PAGE, D], strides=[stride_vs, 1], block_shape=[BN, BD])
    elif USE_TMA:
        # [L, D]: TMA zero-fills keys past the row's live length (never read stale cache slots)
        p_k = tl.make_tensor_descriptor(p_k, shape=[tl.maximum(L, 1), D], strides=[stride_ks, 1], block_shape=[BN, BD])
        p_v = tl.make_tensor_descriptor(p_v, shape=[tl.maximum(L, 1), D], strides=[stride_vs, 1], block_shape=[BN, BD])
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    # tiles seen whole by every packed row skip the mask, so they must lie in [k_lo, k_end), where every key is
    # attendable; only the split's edges pay for the mask
    f_lo = tl.where(dense, tl.maximum(tl.max(tl.where(m_row, lo_r, 0), 0), k_lo), SMAX)
    f_hi = tl.minimum(tl.min(tl.where(m_row, pos + 1, SMAX), 0), k_end)
    ph_a, ph_b, ph_end = phases(lo, hi, f_lo, f_hi, BN)
    b_acc, b_l, b_m = _decode_tiles(b_acc, b_l, b_m, b_q, b_sc, softcap2, p_k, p_v, t_k, t_v, stride_ks, stride_kd,
                                    stride_vs, stride_vd, lo, ph_a, hi, pos, lo_r, o_d, m_d, p_km, stride_mq, stride_ms,
                                    o_i, m_row, p_bt, stride_bp, stride_kb, stride_vb, NUM_PAGES, BN, True,
                                    HAS_WINDOW or HAS_CHUNK, HAS_SOFTCAP, HAS_KMASK, KMASK_ROWS, PAGED, PAGE, USE_TMA,
                                    DOT_PREC, UPCAST)
    b_acc, b_l, b_m = _decode_tiles(b_acc, b_l, b_m, b_q, b_sc, softcap2, p_k, p_v, t_k, t_v, stride_ks, stride_kd,
                                    stride_vs, stride_vd, ph_a, ph_b, hi, pos, lo_r, o_d, m_d, p_km, stride_mq,
                                    stride_ms, o_i, m_row, p_bt, stride_bp, stride_kb, stride_vb, NUM_PAGES, BN, False,
                                    HAS_WINDOW or HAS_CHUNK, HAS_SOFTCAP, HAS_KMASK, KMASK_ROWS, PAGED, PAGE, USE_TMA,
                                    DOT_PREC, UPCAST)
    b_acc, b_l, b_m = _decode_tiles(b_acc, b_l, b_m, b_q, b_sc, softcap2, p_k, p_v, t_k, t_v, stride_ks, stride_kd,
                                    stride_vs, stride_vd, ph_b, ph_end, hi, pos, lo_r, o_d, m_d, p_km, stride_mq,
                                    stride_ms, o_i, m_row, p_bt, stride_bp, stride_kb, stride_vb, NUM_PAGES, BN, True,
                                    HAS_WINDOW or HAS_CHUNK, HAS_SOFTCAP, HAS_KMASK, KMASK_ROWS, PAGED, PAGE, USE_TMA,
                                    DOT_PREC, UPCAST)

    if ADD_SINKS:
        # one split: the head's sink logit joins the denominator here (else in the merge)
        b_sink = tl.load(SINKS + o_h, mask=m_row, other=float("-inf")).to(tl.float32) * LOG2E_C
        b_acc, b_l, b_m = with_sink(b_acc, b_l, b_m, b_sink)
    has = b_l > 0
    b_l_safe = tl.where(has, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    b_lse = tl.where(has, (b_m + tl.log2(b_l_safe)) * lse_scale, float("-inf"))
    if HAS_SEQLENS:
        b_o = tl.where(bad_len, float("nan"), b_o)
        b_lse = tl.where(bad_len, float("nan"), b_lse)
    p_o = (O + i_split.to(tl.int64) * stride_os + i_b64 * stride_ob + o_h[:, None].to(tl.int64) * stride_oh
           + o_i[:, None].to(tl.int64) * stride_om + o_d[None, :] * stride_od)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    p_lse = (LSE + i_split.to(tl.int64) * stride_ls + i_b64 * stride_lb + o_h.to(tl.int64) * stride_lh
             + o_i.to(tl.int64) * stride_lm)
    tl.store(p_lse, b_lse, mask=m_row)


@triton.jit(do_not_specialize=["ROWS", "NUM_SPLITS"])
def _decode_merge_kernel(O_PART, LSE_PART, OUT, LSE, SINKS, stride_os, stride_ls, ROWS, NUM_SPLITS, HQ, SQ,
                         D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, HAS_SINKS: tl.constexpr):
    # rows r of (B, Hq, Sq) flattened; partials are (splits, rows, D) and (splits, rows), output (rows, D)
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < ROWS
    o_d = tl.arange(0, BD)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BR], dtype=tl.float32)
    b_acc = tl.zeros([BR, BD], dtype=tl.float32)
    if HAS_SINKS:
        # the sink is one more "split" with weight exp(sink) and no output
        b_m = tl.load(SINKS + (o_r // SQ) % HQ, mask=m_r, other=float("-inf")).to(tl.float32) * LOG2E_C
        b_l = tl.where(b_m == float("-inf"), 0.0, 1.0)
    # pointers advance split by split: 64-bit pointer sums, no int32 product of split x stride
    p_lse = LSE_PART + o_r
    p_o = O_PART + o_r[:, None] * D + o_d[None, :]
    for _ in range(0, NUM_SPLITS):
        b_lse_s = tl.load(p_lse, mask=m_r, other=float("-inf"))
        b_m_new = tl.maximum(b_m, b_lse_s)
        b_alpha = exp2_rel(b_m, b_m_new)
        b_w = tl.where(b_lse_s == float("-inf"), 0.0, exp2_rel(b_lse_s, b_m_new))
        b_l = b_l * b_alpha + b_w
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * tl.load(p_o, mask=m_rd, other=0.0)
        b_m = b_m_new
        p_lse += stride_ls
        p_o += stride_os
    has = b_l > 0
    b_l_safe = tl.where(has, b_l, 1.0)
    tl.store(OUT + o_r[:, None] * D + o_d[None, :], (b_acc / b_l_safe[:, None]).to(OUT.dtype.element_ty), mask=m_rd)
    tl.store(LSE + o_r, tl.where(has, (b_m + tl.log2(b_l_safe)) * LN2_C, float("-inf")), mask=m_r)


@lru_cache(maxsize=4096)
def choose_num_splits(max_seqlen: int, programs: int, num_sms: int, *, block_n: int = 64,
                      min_tiles_per_split: int = 4, max_splits: int = 128, programs_per_sm: int = 2) -> int:
    """How many KV splits stage 1 should use, from the longest *live* length (never the capacity).

    Splitting pays when the programs of one split (``programs`` = batch x KV heads x row blocks)
    leave SMs idle; each split costs a partial write and a merge, so a split keeps at least
    ``min_tiles_per_split`` key tiles. A wave is ``num_sms * programs_per_sm`` resident programs.
    Among the split counts that change the tiles per split, it takes the smallest one whose wave
    efficiency (programs x splits over whole waves) is within 85 % of the best reachable. Pure host
    arithmetic: pass the live length the host already knows, never one read back from the device.

    Args:
        max_seqlen: longest live length (keys, new rows included) in the batch.
        programs: stage-1 programs per split.
        num_sms: streaming multiprocessors of the device (1 on CPU: the interpreter is serial).
        block_n: keys per tile.
        min_tiles_per_split: fewest key tiles a split should get.
        max_splits: upper bound on the result.
        programs_per_sm: stage-1 programs one SM holds at once (4 warps each: two).

    Returns:
        The number of splits, between 1 and ``max_splits``.

    Raises:
        ValueError: if a size is negative or a count is smaller than 1.
    """
    for name, value, least in (("max_seqlen", max_seqlen, 0), ("programs", programs, 0), ("num_sms", num_sms, 1),
                               ("block_n", block_n, 1), ("min_tiles_per_split", min_tiles_per_split, 1),
                               ("max_splits", max_splits, 1), ("programs_per_sm", programs_per_sm, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    n_tiles = cdiv(max_seqlen, block_n)
    slots = num_sms * programs_per_sm
    if programs == 0 or programs >= 0.8 * slots:
        return 1
    cap = min(max_splits, n_tiles // min_tiles_per_split)
    if cap <= 1:
        return 1
    candidates = [s for s in range(1, cap + 1) if s == 1 or cdiv(n_tiles, s) != cdiv(n_tiles, s - 1)]

    def efficiency(s: int) -> float:
        waves = programs * s / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in candidates)
    return next(s for s in candidates if efficiency(s) >= 0.85 * best)


@lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def decode_block_n(D: int) -> int:
    """Keys per tile of the decode kernel for head dim D (tiles start at multiples of it)."""
    return 64 if padded_dim(D) <= 128 else 32


@lru_cache(maxsize=4096)
def _blocks(G: int, SQ: int, BD: int):
    """(BM, BN, num_warps, num_stages) for the packed G*Sq rows (BD: the padded head dim).

    TODO(issue 13): tune on an H100/H200 with the decode benchmark; these are untuned defaults.
    """
    bm_cap = 64 if BD <= 128 else 32
    BM = min(bm_cap, max(16, next_pow2(G * SQ)))
    BN = decode_block_n(BD)
    # three stages: two K/V tiles in flight while one is multiplied (decode is bound by HBM)
    return BM, BN, 4, 3


# Warp-instructions of one 64-key tile's main loop, compiled for sm_90a, D 128, bf16 (`python -m drope.kernels.inspect
# --arch sm_90a --op decode|prefill_fwd --dtype bf16 --heads 32 --kv-heads 8 --seq 32768 --head-dim 128 [--q-len N]`,
# 2026-12-07, Triton 3.9): the split-KV kernel per packed row block (4 warps; 255, 391, 401 instructions at 16, 32
# and 64 rows) and the fused forward per query block (128 x 64 with 8 warps: 350; 64 x 64 with 4 warps: 378).
_DECODE_TILE = {16: 255 * 4, 32: 391 * 4, 64: 401 * 4}
_FUSED_TILES = ((128, 350 * 8), (64, 378 * 4))


@lru_cache(maxsize=4096)
def prefer_fused(G: int, SQ: int) -> bool:
    """Whether Sq new query rows (G query heads per KV head) against a cache cost less in the fused forward than in
    the split-KV kernel, by the compiled kernels' instruction counts per key tile (``_DECODE_TILE``, ``_FUSED_TILES``).

    The split-KV kernel packs the G x Sq rows of a KV group into blocks of up to 64 and reads each K/V tile once per
    block; the forward runs each head's Sq rows in blocks of 64 or 128. By these counts the forward costs less from
    Sq = 17 at G = 1, 33 at G = 2, 49 at G = 4 and 57 at G = 8 (the two stay within a few percent of each other
    beyond); below that the split-KV kernel. Measured on the compiled code, not timed: on a GPU occupancy and
    bandwidth may move it (``benchmarks/test_crossover.py`` times both once a GPU runs it).
    """
    BM = min(64, max(16, next_pow2(G * SQ)))
    split = cdiv(G * SQ, BM) * _DECODE_TILE[BM]
    fused = G * min(cdiv(SQ, bm) * cost for bm, cost in _FUSED_TILES)
    return fused < split


@lru_cache(maxsize=4096)
def num_splits_for(shape, device: torch.device, *, max_seqlen: Optional[int] = None, window: Optional[int] = None,
                   chunk: Optional[int] = None) -> int:
    """The split count of a call, from capacities and the device only (never from ``cache_seqlens``' values):
    one captured CUDA graph then replays for any lengths. ``max_seqlen`` (a host int) may lower the bound.
    Memoised: a decode step asks the same question at every layer."""
    G, SQ, SMAX = shape.G, shape.SQ, shape.SK
    BM, BN, _, _ = _blocks(G, SQ, padded_dim(shape.D))
    live = SMAX if max_seqlen is None else max_seqlen
    if window is not None:
        live = min(live, window + SQ - 1)
    if chunk is not None:
        live = min(live, chunk + SQ - 1)
    splits = choose_num_splits(live, shape.B * shape.HKV * cdiv(G * SQ, BM), _num_sms(device), block_n=BN)
    return splits


def _plan_key(q, k_cache, v_cache, cache_seqlens, rows, sinks, km, block_table, const, num_splits, window, chunk,
              softcap) -> tuple:
    """What the launch's non-tensor arguments depend on: shapes, strides, dtypes, None-ness, alignment (TMA), the
    flags; a decode step asks the same at every layer."""
    fp32_tf32 = q.dtype == torch.float32 and dot_precision(q.dtype) == "tf32"
    return (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), v_cache.stride(),
            aligned16(k_cache, v_cache), fp32_tf32, is_recording(),
            None if cache_seqlens is None else cache_seqlens.stride(), None if rows is None else rows.stride(),
            sinks is None, None if km is None else (km.shape, km.stride()),
            None if block_table is None else (block_table.shape, block_table.stride()),
            const, num_splits, window, chunk, softcap)


def _plan(q, k_cache, v_cache, cache_seqlens, rows, sinks, km, block_table, const, num_splits, window, chunk, softcap):
    """(grid, the split kernel's non-tensor arguments, splits, the merge's non-tensor arguments or None)."""
    B, HQ, SQ, D = q.shape
    paged = block_table is not None
    if paged:
        HKV, SMAX = k_cache.shape[2], block_table.shape[1] * k_cache.shape[1]
    else:
        HKV, SMAX = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HKV
    BD = padded_dim(D)
    BM, BN, num_warps, num_stages = _blocks(G, SQ, BD)
    splits = min(num_splits, max(1, cdiv(SMAX, BN)), MAX_GRID_Y)
    if splits == 1:
        o_strides = (0, *torch.empty((B, HQ, SQ, D), device="meta").stride())
        l_strides = (0, *torch.empty((B, HQ, SQ), device="meta").stride())
        lse_scale = LN2
    else:
        o_strides = torch.empty((splits, B, HQ, SQ, D), device="meta").stride()
        l_strides = torch.empty((splits, B, HQ, SQ), device="meta").stride()
        lse_scale = 1.0
    km_strides = (0, 0, 0) if km is None else (km.stride(0), km.stride(1), km.stride(2)) if km.dim() == 3 else (
        km.stride(0), 0, km.stride(1))
    args = dict(
        **named_strides("q", q, "bhsd"),
        # paged (num_pages, page_size, Hkv, D): "b" is the page stride, "s" the row-in-page stride
        **named_strides("k", k_cache, "bshd" if paged else "bhsd"),
        **named_strides("v", v_cache, "bshd" if paged else "bhsd"), **named_strides("b", block_table, "bp"),
        **dict(zip(("stride_os", "stride_ob", "stride_oh", "stride_om", "stride_od"), o_strides)),
        **dict(zip(("stride_ls", "stride_lb", "stride_lh", "stride_lm"), l_strides)),
        stride_sl=cache_seqlens.stride(0) if cache_seqlens is not None else 0, **named_strides("r", rows, "bhs"),
        **dict(zip(("stride_mb", "stride_mq", "stride_ms"), km_strides)),
        qk_scale=const / softcap if softcap is not None else const * LOG2E,
        softcap2=softcap * LOG2E if softcap is not None else 0.0, lse_scale=lse_scale,
        HKV=HKV, SQ=SQ, SMAX=SMAX, NUM_SPLITS=splits, WINDOW=window or 0, CHUNK=chunk or 0,
        NUM_PAGES=k_cache.shape[0] if paged else 0, PAGED=paged, PAGE=k_cache.shape[1] if paged else 16,
        G=G, D=D, BD=BD, BM=BM, BN=BN, HAS_SEQLENS=cache_seqlens is not None, HAS_SCALE=rows is not None,
        HAS_WINDOW=window is not None, HAS_CHUNK=chunk is not None, HAS_SOFTCAP=softcap is not None,
        ADD_SINKS=sinks is not None and splits == 1, HAS_KMASK=km is not None,
        KMASK_ROWS=km is not None and km.dim() == 3,
        USE_TMA=((paged_tma_ok(k_cache, v_cache) and k_cache.shape[1] % BN == 0) if paged
                 else tma_ok(k_cache, v_cache)),
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast(q.dtype), num_warps=num_warps, num_stages=num_stages)
    merge = None
    if splits > 1:
        rows_total = B * HQ * SQ
        merge = ((cdiv(rows_total, 16),), dict(stride_os=o_strides[0], stride_ls=l_strides[0], ROWS=rows_total,
                                               NUM_SPLITS=splits, HQ=HQ, SQ=SQ, D=D, BD=BD, BR=16,
                                               HAS_SINKS=sinks is not None, num_warps=4))
    return (B * HKV, splits, cdiv(G * SQ, BM)), args, splits, merge


_PLANS: dict = {}  # toolkit.cached_plan's store for decode_launch


def decode_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: Optional[torch.Tensor],
                  const: float, rows: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
                  key_mask: Optional[torch.Tensor], num_splits: int, window: Optional[int], chunk: Optional[int],
                  softcap: Optional[float], block_table: Optional[torch.Tensor] = None):
    """Launch stage 1 (and the merge when split) on validated inputs; returns (out, lse).

    ``const`` is the constant logit multiplier and ``rows`` None or a (B, Hq, Sq) fp32 view of per-row /
    per-head multipliers (``validation.split_scale``); ``num_splits`` is capped at one split per key tile
    of the capacity (more would be empty) and at the grid's limit. With ``block_table`` (B, max_pages) the
    caches are paged, (num_pages, page_size, Hkv, D). The non-tensor arguments are built once per kind of call
    (:func:`_plan_key`) and reused: the host cost of a decode step's every layer after the first is the tensors.
    """
    B, HQ, SQ, D = q.shape
    out = torch.empty((B, HQ, SQ, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, SQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    km = key_mask.view(torch.uint8) if key_mask is not None and key_mask.dtype == torch.bool else key_mask
    key = _plan_key(q, k_cache, v_cache, cache_seqlens, rows, sinks, km, block_table, const, num_splits, window, chunk,
                    softcap)
    grid, args, splits, merge = cached_plan(_PLANS, key, lambda: _plan(
        q, k_cache, v_cache, cache_seqlens, rows, sinks, km, block_table, const, num_splits, window, chunk, softcap))
    if args["USE_TMA"]:
        ensure_tma_allocator(q)
    if splits == 1:
        o_buf, lse_buf = out, lse
    else:
        o_buf = torch.empty((splits, B, HQ, SQ, D), dtype=torch.float32, device=q.device)
        lse_buf = torch.empty((splits, B, HQ, SQ), dtype=torch.float32, device=q.device)
    launch(_decode_split_kernel, grid, Q=q, K=k_cache, V=v_cache, O=o_buf, LSE=lse_buf, SEQLENS=cache_seqlens,
           SCALE=rows, SINKS=sinks, KMASK=km, BT=block_table, **args)
    if merge is not None:
        launch(_decode_merge_kernel, merge[0], O_PART=o_buf, LSE_PART=lse_buf, OUT=out, LSE=lse, SINKS=sinks,
               **merge[1])
    return out, lse
