"""Split-KV (flash-decoding) attention of a few new query rows against a long NoPE KV cache.

Stage 1 launches one program per (batch, KV head, split, block of packed query rows): the query
heads of a GQA group and the Sq new rows are packed into the M dimension (row ``m`` is query row
``m // G`` of head ``m % G`` of the group), so each K/V tile of the split is read once for the whole
group. Each program writes an fp32 partial output, already normalised, and its log2-sum-exp.
Stage 2 merges the splits by log-sum-exp. With one split, stage 1 writes the final output directly.

How the KV range is split: every batch row divides *its own* live length ``cache_seqlens[b]`` into
``num_splits`` runs of whole tiles, read on the device, so a ragged batch keeps all splits busy and
no program reads past its row's live length. The *number* of splits is chosen on the host by
:func:`choose_num_splits` from the longest live length, which the host knows without a device sync
when ``cache_seqlens`` is None (every row is Smax long), lives on the CPU, or when the caller passes
``max_seqlen``. With CUDA ``cache_seqlens`` and no ``max_seqlen``, the capacity Smax is the only
bound known on the host and is used instead: correct, but possibly more (then empty) splits than the
live lengths need. Results never depend on the split count beyond float rounding.

Chunked prefill (a prompt fed in chunks against its growing cache) gives the same rows with this
kernel (Sq up to ~64) and with :func:`drope.kernels.attention` (bottom-right causal, Sq < Sk).
Which is faster is not measured yet (no GPU in the session that wrote this). Expected: this kernel
when B x Hkv is small next to the SM count and a chunk's G x Sq rows fit one or two row blocks (it
spreads the keys over the SMs and reads each K/V tile once per GQA group); ``attention`` for chunks
of a few hundred rows or more, whose query blocks already fill the GPU, so that splits and the merge
would be pure overhead. TODO(issue 6): measure the crossover with the decode/prefill benchmarks.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..validation import check_decode, check_kernel_device, interpreter_enabled, scale_rows

__all__ = ["decode_attention", "choose_num_splits"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# jit functions may read only constexpr globals
_LN2_C = tl.constexpr(LN2)
MAX_GRID_Y = 65535


# lengths and split counts change from call to call: one compile for all of them
@triton.jit(do_not_specialize=["SQ", "SMAX", "NUM_SPLITS"])
def _decode_split_kernel(
    Q, K, V, O, LSE, SEQLENS, ROW_SCALE,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_sl, stride_rb, stride_rm,
    qk_scale, lse_scale,
    HKV, SQ, SMAX, NUM_SPLITS,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_split = tl.program_id(1)
    i_m = tl.program_id(2)
    i_b = i_bh // HKV
    i_hkv = i_bh % HKV
    i_b64 = i_b.to(tl.int64)
    if HAS_SEQLENS:
        # clamped so that a bad device-side length can never address outside the cache
        L = tl.load(SEQLENS + i_b64 * stride_sl).to(tl.int32)
        L = tl.minimum(tl.maximum(L, 0), SMAX)
    else:
        L = SMAX

    o_m = i_m * BM + tl.arange(0, BM)
    m_row = o_m < G * SQ
    o_i = o_m // G
    o_h = i_hkv * G + o_m % G
    o_d = tl.arange(0, D)
    # last key visible to each packed row; negative when the row sees nothing
    pos = L - SQ + o_i

    n_tiles = (L + BN - 1) // BN
    tiles_per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    lo = i_split * tiles_per_split * BN
    last_i = (tl.minimum(i_m * BM + BM, G * SQ) - 1) // G
    hi = tl.minimum(lo + tiles_per_split * BN, L - SQ + last_i + 1)

    p_q = (Q + i_b64 * stride_qb + o_h[:, None].to(tl.int64) * stride_qh
           + o_i[:, None].to(tl.int64) * stride_qs + o_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.0)  # [BM, D]
    if UPCAST_DOT:
        b_q = b_q.to(tl.float32)
    if HAS_ROW_SCALE:
        b_scale = tl.load(ROW_SCALE + i_b64 * stride_rb + o_i.to(tl.int64) * stride_rm, mask=m_row,
                          other=0.0).to(tl.float32) * qk_scale
    else:
        b_scale = tl.zeros([BM], dtype=tl.float32) + qk_scale

    p_k = K + i_b64 * stride_kb + i_hkv.to(tl.int64) * stride_kh
    p_v = V + i_b64 * stride_vb + i_hkv.to(tl.int64) * stride_vh
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < hi
        o_n64 = o_n.to(tl.int64)
        b_k = tl.load(p_k + o_n64[None, :] * stride_ks + o_d[:, None] * stride_kd, mask=m_n[None, :], other=0.0)  # [D, BN]
        if UPCAST_DOT:
            b_k = b_k.to(tl.float32)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION) * b_scale[:, None]  # [BM, BN], log2 units
        b_s = tl.where((o_n[None, :] <= pos[:, None]) & m_n[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # rows that have seen no key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp2(b_s - b_ref[:, None])
        b_alpha = tl.exp2(b_m - b_ref)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(p_v + o_n64[:, None] * stride_vs + o_d[None, :] * stride_vd, mask=m_n[:, None], other=0.0)  # [BN, D]
        b_p = b_p.to(b_v.dtype)
        if UPCAST_DOT:
            b_p, b_v = b_p.to(tl.float32), b_v.to(tl.float32)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    has = b_l > 0
    b_l_safe = tl.where(has, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    b_lse = tl.where(has, (b_m + tl.log2(b_l_safe)) * lse_scale, float("-inf"))
    p_o = (O + i_split.to(tl.int64) * stride_os + i_b64 * stride_ob + o_h[:, None].to(tl.int64) * stride_oh
           + o_i[:, None].to(tl.int64) * stride_om + o_d[None, :] * stride_od)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_row[:, None])
    p_lse = (LSE + i_split.to(tl.int64) * stride_ls + i_b64 * stride_lb + o_h.to(tl.int64) * stride_lh
             + o_i.to(tl.int64) * stride_lm)
    tl.store(p_lse, b_lse, mask=m_row)


@triton.jit(do_not_specialize=["ROWS", "NUM_SPLITS"])
def _decode_merge_kernel(O_PART, LSE_PART, OUT, LSE, stride_os, stride_ls, ROWS, NUM_SPLITS,
                         D: tl.constexpr, BR: tl.constexpr):
    # rows r of (B, Hq, Sq) flattened; partials are (splits, rows, D) and (splits, rows), output (rows, D)
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < ROWS
    o_d = tl.arange(0, D)
    b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BR], dtype=tl.float32)
    b_acc = tl.zeros([BR, D], dtype=tl.float32)
    # pointers advance split by split: 64-bit pointer sums, no int32 product of split x stride
    p_lse = LSE_PART + o_r
    p_o = O_PART + o_r[:, None] * D + o_d[None, :]
    for _ in range(0, NUM_SPLITS):
        b_lse_s = tl.load(p_lse, mask=m_r, other=float("-inf"))
        b_m_new = tl.maximum(b_m, b_lse_s)
        b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_ref)
        b_w = tl.exp2(b_lse_s - b_ref)
        b_l = b_l * b_alpha + b_w
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * tl.load(p_o, mask=m_r[:, None], other=0.0)
        b_m = b_m_new
        p_lse += stride_ls
        p_o += stride_os
    has = b_l > 0
    b_l_safe = tl.where(has, b_l, 1.0)
    tl.store(OUT + o_r[:, None] * D + o_d[None, :], (b_acc / b_l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=m_r[:, None])
    tl.store(LSE + o_r, tl.where(has, (b_m + tl.log2(b_l_safe)) * _LN2_C, float("-inf")), mask=m_r)


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
    n_tiles = triton.cdiv(max_seqlen, block_n)
    slots = num_sms * programs_per_sm
    if programs == 0 or programs >= 0.8 * slots:
        return 1
    cap = min(max_splits, n_tiles // min_tiles_per_split)
    if cap <= 1:
        return 1
    candidates = [s for s in range(1, cap + 1) if s == 1 or triton.cdiv(n_tiles, s) != triton.cdiv(n_tiles, s - 1)]

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


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer the launcher allocates comes from here (tests replace it to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(G: int, SQ: int, D: int):
    """(BM, BN, num_warps, num_stages) for the packed G*Sq rows.

    TODO(issue 6): tune on an H100/H200 with the decode benchmark; these are untuned defaults.
    """
    bm_cap = 64 if D <= 128 else 32
    BM = min(bm_cap, max(16, triton.next_power_of_2(G * SQ)))
    BN = 64 if D <= 128 else 32
    return BM, BN, 4, 2


def _live_bound(cache_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int], SMAX: int) -> int:
    """Longest live length known on the host without a device sync (capacity as the last resort)."""
    if max_seqlen is not None:
        return max_seqlen
    if cache_seqlens is None:
        return SMAX
    if cache_seqlens.device.type == "cpu":
        return int(cache_seqlens.max()) if cache_seqlens.numel() else 0
    return SMAX


def _decode_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits, max_seqlen):
    shape = check_decode(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                         num_splits=num_splits, kernel=True, max_seqlen=max_seqlen)
    B, HQ, HKV, SQ, SMAX, D, G = shape.B, shape.HQ, shape.HKV, shape.SQ, shape.SK, shape.D, shape.G
    check_kernel_device(q, "decode_attention")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError("decode_attention is inference-only (no backward): q/k_cache/v_cache require grad; "
                         "call it under torch.no_grad() or use drope.kernels.attention for a differentiable pass")

    out = _empty((B, HQ, SQ, D), q.dtype, q.device)
    lse = _empty((B, HQ, SQ), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse

    BM, BN, num_warps, num_stages = _blocks(G, SQ, D)
    m_blocks = triton.cdiv(G * SQ, BM)
    n_key_tiles = max(1, triton.cdiv(SMAX, BN))
    if num_splits is None:
        splits = choose_num_splits(_live_bound(cache_seqlens, max_seqlen, SMAX), B * HKV * m_blocks,
                                   _num_sms(q.device), block_n=BN)
    else:
        splits = num_splits
    # beyond one split per key tile of the capacity every extra split would be empty
    splits = min(splits, n_key_tiles, MAX_GRID_Y)

    const, rows = scale_rows(softmax_scale, B, SQ, D, q.device, torch.float32)
    if splits == 1:
        o_buf, lse_buf, lse_scale = out, lse, LN2
        o_strides = (0, *out.stride())
        l_strides = (0, *lse.stride())
    else:
        o_buf = _empty((splits, B, HQ, SQ, D), torch.float32, q.device)
        lse_buf = _empty((splits, B, HQ, SQ), torch.float32, q.device)
        lse_scale = 1.0
        o_strides, l_strides = o_buf.stride(), lse_buf.stride()

    # Triton's interpreter computes tl.dot on bf16 wrongly: there, bf16 operands go through fp32
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu" and interpreter_enabled()
    qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
    grid = (B * HKV, splits, m_blocks)
    _decode_split_kernel[grid](
        Q=q, K=k_cache, V=v_cache, O=o_buf, LSE=lse_buf, SEQLENS=cache_seqlens, ROW_SCALE=rows,
        stride_qb=qs[0], stride_qh=qs[1], stride_qs=qs[2], stride_qd=qs[3],
        stride_kb=ks[0], stride_kh=ks[1], stride_ks=ks[2], stride_kd=ks[3],
        stride_vb=vs[0], stride_vh=vs[1], stride_vs=vs[2], stride_vd=vs[3],
        stride_os=o_strides[0], stride_ob=o_strides[1], stride_oh=o_strides[2], stride_om=o_strides[3],
        stride_od=o_strides[4],
        stride_ls=l_strides[0], stride_lb=l_strides[1], stride_lh=l_strides[2], stride_lm=l_strides[3],
        stride_sl=cache_seqlens.stride(0) if cache_seqlens is not None else 0,
        stride_rb=rows.stride(0) if rows is not None else 0,
        stride_rm=rows.stride(1) if rows is not None else 0,
        qk_scale=const * LOG2E, lse_scale=lse_scale,
        HKV=HKV, SQ=SQ, SMAX=SMAX, NUM_SPLITS=splits,
        G=G, D=D, BM=BM, BN=BN,
        HAS_SEQLENS=cache_seqlens is not None, HAS_ROW_SCALE=rows is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST_DOT=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        rows_total = B * HQ * SQ
        BR = 16
        _decode_merge_kernel[(triton.cdiv(rows_total, BR),)](
            O_PART=o_buf, LSE_PART=lse_buf, OUT=out, LSE=lse, stride_os=o_buf.stride(0), stride_ls=lse_buf.stride(0),
            ROWS=rows_total, NUM_SPLITS=splits, D=D, BR=BR, num_warps=4,
        )
    return out, lse


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     cache_seqlens: Optional[torch.Tensor] = None, softmax_scale=None,
                     num_splits: Optional[int] = None, return_lse: bool = False,
                     max_seqlen: Optional[int] = None):
    """NoPE attention of a few new query rows against a long KV cache, split over the keys (flash-decoding).

    Query row ``i`` of batch ``b`` sits at position ``cache_seqlens[b] - Sq + i`` and sees keys
    ``0 .. that position`` (causal among the new rows). Query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Inference only: no backward.

    Args:
        q: (B, Hq, Sq, D), the Sq newest tokens (1 for decode; up to ~64 for chunked prefill or
            speculative steps). fp16, bf16 or fp32; D in 16, 32, 64, 128, 256. Any strides.
        k_cache, v_cache: (B, Hkv, Smax, D), same dtype as q, Hq % Hkv == 0. Any strides (e.g. a view
            of a (B, Smax, Hkv, D) buffer); positions at or past a row's live length are never read.
        cache_seqlens: (B,) int32 (int64 accepted) live lengths *including* the Sq new tokens, on q's
            device; None means every row holds Smax. Each must lie in [Sq, Smax]; checked on the host
            only when the tensor lives on the CPU (no device sync). On the device a length is clamped
            to [0, Smax]; rows whose position is then negative output zeros (LSE -inf).
        softmax_scale: None (D**-0.5), a float, or a (B, Sq) / (Sq,) tensor of per-row multipliers
            (DroPE temperature on top of D**-0.5 goes in here).
        num_splits: None picks it with :func:`choose_num_splits` from the longest live length and the
            device's SM count; an int forces it (capped at one split per key tile of the capacity,
            beyond which extra splits would be empty). Results agree for every split count.
        return_lse: also return the natural-log log-sum-exp of the scaled logits, (B, Hq, Sq) fp32.
        max_seqlen: optional host-side int, the longest entry of ``cache_seqlens``, used only to pick
            the split count when ``cache_seqlens`` lives on the GPU (reading it there would sync).
            Results never depend on it; a wrong hint only costs speed.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: on input outside the contract (shapes, dtypes, lengths, scale, num_splits,
            max_seqlen), naming the argument; also when an input requires grad with grad enabled.
        DeviceError: CPU tensors without ``TRITON_INTERPRET=1`` (a ``ValueError`` subclass).
    """
    out, lse = _decode_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits, max_seqlen)
    return (out, lse) if return_lse else out
