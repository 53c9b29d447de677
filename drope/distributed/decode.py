"""Decoding against a KV cache sharded over the ranks, and the log-sum-exp merge of partial attention results.

Every rank holds a contiguous shard of each sequence's cache: rank r's ``cache_seqlens[b]`` live slots are global
positions ``off_r[b] .. off_r[b] + len_r[b] - 1`` with ``off_r`` the live lengths of the ranks before it; the Sq
queries (the same on every rank) are the last Sq global positions. Each rank attends to its shard with
:func:`drope.kernels.decode_attention` (``return_lse=True``) and the ranks' results are merged by log-sum-exp.

Positions. The kernel places query row i at local position ``len_r - Sq + i`` and lets it see local keys up to
there; the true bound is ``L - off_r - Sq + i`` (L the global length), never smaller. So the kernel's answer is
exact for Sq = 1 (every live key of every rank precedes the query) and misses, for Sq > 1, only keys among a
rank's last Sq - 1 live slots that the row truly sees: those (at most Sq - 1 per row) are attended in fp32 PyTorch
on a gathered (B, Hkv, Sq - 1, D) slice and merged in. Windows and chunks depend on global positions: a key mask
built on the device from the gathered lengths ((B, Smax_r), one per query row when Sq > 1) applies them.

Collectives per call: 1 signature all-gather (``check_ranks``), 1 all-gather of the (B,) live lengths when Sq > 1
or with a window or chunk (positions are then needed), and 1 all-gather of every rank's fp32 (out, lse) for the
merge. Nothing is read back to the host except the signatures. The sinks join the merge once (as a state of zero
output and logit ``sink``), not on every rank.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import kernels
from ..validation import check_decode, check_features, check_scale, host_values, split_scale
from .collectives import exchange, gather_rows, register_signature, signature
from .layout import Group, resolve_group
from .prefill import dims

__all__ = ["decode_attention", "merge_attention_states"]

_FIELDS = ("B", "Hq", "Hkv", "Sq", "D", "q dtype", "k_cache dtype", "v_cache dtype", "device", "cache_seqlens.shape[0]",
           "window", "chunk", "softcap", "softmax_scale", "softmax_scale.shape[0]", "softmax_scale.shape[1]",
           "softmax_scale.shape[2]", "sinks.shape[0]")
register_signature("drope.distributed.decode_attention", _FIELDS)


def _merge(outs: Sequence[Tensor], lses: Sequence[Tensor], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Weights ``exp(lse_i - max)`` (at most 1: no overflow; -inf gives 0), normalised where the sum is positive."""
    stacked = torch.stack([m.to(dtype) for m in lses])  # [N, B, H, S]
    top = stacked.amax(0)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    w = torch.exp(stacked - top)
    total = w.sum(0)
    lse = top + torch.log(total)  # log(0) = -inf: no state saw a key
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    out = sum(w[i][..., None] * o.to(dtype) for i, o in enumerate(outs))
    return out, lse


def merge_attention_states(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Attention over the union of disjoint key sets, from the results over each set.

    ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = log(sum_i exp(lse_i))``, computed in fp32 (fp64 when an
    input is fp64) with the largest lse subtracted first, so no term overflows however far apart the lses are. A
    state whose lse is ``-inf`` (its keys were all masked) contributes nothing; a row with no key anywhere is zeros
    with lse ``-inf``. A sink logit joins as one more state: output zeros, lse the sink.

    Args:
        outs: N >= 1 tensors (B, H, S, D), any float dtypes (each normalised over its own keys).
        lses: N tensors (B, H, S), the natural-log log-sum-exp of each state's logits (fp32).

    Returns:
        ``(out, lse)``: out in the outs' promoted dtype, lse fp32 (fp64 when an input is fp64).

    Raises:
        ValueError: naming ``outs`` or ``lses`` when they are not lists of matching tensors.
    """
    if not isinstance(outs, (list, tuple)) or not outs or not all(isinstance(o, Tensor) for o in outs):
        raise ValueError("outs must be a non-empty list of (B, H, S, D) tensors")
    if not isinstance(lses, (list, tuple)) or len(lses) != len(outs) or not all(isinstance(m, Tensor) for m in lses):
        raise ValueError(f"lses must be a list of {len(outs)} (B, H, S) tensors, one per entry of outs")
    shape = tuple(outs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"outs must hold (B, H, S, D) tensors, got shape {shape}")
    for i, (o, m) in enumerate(zip(outs, lses)):
        if tuple(o.shape) != shape or not o.is_floating_point():
            raise ValueError(f"outs[{i}] must be a floating-point tensor of shape {shape}, got {tuple(o.shape)} "
                             f"{o.dtype}")
        if tuple(m.shape) != shape[:3] or not m.is_floating_point():
            raise ValueError(f"lses[{i}] must be a floating-point tensor of shape {shape[:3]}, got {tuple(m.shape)} "
                             f"{m.dtype}")
        if o.device != outs[0].device or m.device != outs[0].device:
            raise ValueError(f"outs[{i}] / lses[{i}] are on another device than outs[0] ({outs[0].device})")
    wide = any(t.dtype == torch.float64 for t in (*outs, *lses))
    dtype = torch.float64 if wide else torch.float32
    out, lse = _merge(outs, lses, dtype)
    out_dtype = outs[0].dtype
    for o in outs[1:]:
        out_dtype = torch.promote_types(out_dtype, o.dtype)
    return out.to(out_dtype), lse


def _visible(off: Tensor, total: Tensor, slots: Tensor, live: Tensor, SQ: int, window: Optional[int],
             chunk: Optional[int]) -> Tensor:
    """(B, Sq, n) bool: query row i (global position ``total - Sq + i``) sees the local slot ``slots[b, t]`` (global
    position ``off + slot``), a live one, under the causal rule, the window and the chunk."""
    g = (off[:, None] + slots)[:, None, :]  # [B, 1, n]
    p = (total[:, None] - SQ + torch.arange(SQ, device=off.device)[None, :])[:, :, None]  # [B, Sq, 1]
    vis = live[:, None, :] & (g <= p)
    if window is not None:
        vis = vis & (g > p - window)
    if chunk is not None:
        vis = vis & (torch.div(g, chunk, rounding_mode="floor") == torch.div(p, chunk, rounding_mode="floor"))
    return vis


def _recent(q, k_cache, v_cache, lens, off, total, scale: float, scale_rows, window, chunk, softcap):
    """fp32 attention of the Sq rows to each rank-local cache's last Sq - 1 live slots, restricted to the (row, slot)
    pairs the kernel's local causal rule hides but the global one shows (slot index t >= row i)."""
    B, HQ, SQ, D = q.shape
    HKV, SMAX = k_cache.shape[1], k_cache.shape[2]
    n = SQ - 1
    t = torch.arange(n, device=q.device)
    slots = lens[:, None] - n + t[None, :]  # [B, n]
    live = slots >= 0
    vis = _visible(off, total, slots, live, SQ, window, chunk)
    vis = vis & (t[None, None, :] >= torch.arange(SQ, device=q.device)[None, :, None])
    idx = slots.clamp(0, SMAX - 1)[:, None, :, None].expand(B, HKV, n, D)
    # slots before the shard's start read slot 0, which may be stale: zeroed, so that 0 * NaN never reaches the sum
    dead = ~live[:, None, :, None]
    kb = torch.gather(k_cache, 2, idx).float().masked_fill(dead, 0).repeat_interleave(HQ // HKV, 1)  # [B, HQ, n, D]
    vb = torch.gather(v_cache, 2, idx).float().masked_fill(dead, 0).repeat_interleave(HQ // HKV, 1)
    s = torch.matmul(q.float(), kb.transpose(-1, -2))  # [B, HQ, Sq, n]
    s = s * (scale if scale_rows is None else scale_rows[..., None].float())
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~vis[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)[..., None])
    return torch.matmul(p, vb), lse


@torch.library.custom_op("drope::cp_decode", mutates_args=())
def _cp_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale_rows: Optional[Tensor],
               sinks: Optional[Tensor], group_name: str, world_size: int, rank: int, scale: float,
               window: Optional[int], chunk: Optional[int], softcap: Optional[float],
               check: List[float]) -> Tuple[Tensor, Tensor]:
    group = Group(group_name, world_size, rank)
    if check:
        exchange(group, check, device=q.device)
    B, HQ, SQ, D = q.shape
    SMAX = k_cache.shape[2]
    lens = cache_seqlens.to(torch.int64)
    off = total = key_mask = None
    if SQ > 1 or window is not None or chunk is not None:
        table = gather_rows(lens[None], group_name, world_size)  # [W, B]
        off, total = table[:rank].sum(0), table.sum(0)
        if window is not None or chunk is not None:
            j = torch.arange(SMAX, device=q.device)[None, :].expand(B, SMAX)
            key_mask = _visible(off, total, j, j < lens[:, None], SQ, window, chunk)
            key_mask = key_mask[:, 0] if SQ == 1 else key_mask
    if SMAX:
        out, lse = kernels.decode_attention(q, k_cache, v_cache, cache_seqlens=lens.to(torch.int32),
                                            softmax_scale=scale if scale_rows is None else scale_rows, softcap=softcap,
                                            key_mask=key_mask, return_lse=True, check_values=False)
        outs, lses = [out], [lse]
        if SQ > 1:
            o, m = _recent(q, k_cache, v_cache, lens, off, total, scale, scale_rows, window, chunk, softcap)
            outs.append(o)
            lses.append(m)
        out, lse = _merge(outs, lses, torch.float32)
    else:
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    # one all-gather of every rank's (out, lse), packed as (B, Hq, Sq, D + 1) fp32
    states = gather_rows(torch.cat((out, lse[..., None]), -1), group_name, world_size).view(world_size, B, HQ, SQ,
                                                                                            D + 1)
    outs = [states[r, ..., :D] for r in range(world_size)]
    lses = [states[r, ..., D] for r in range(world_size)]
    if sinks is not None:
        outs.append(q.new_zeros(q.shape, dtype=torch.float32))
        lses.append(sinks.float()[None, :, None].expand(B, HQ, SQ))
    out, lse = _merge(outs, lses, torch.float32)
    return out.to(q.dtype), lse


@_cp_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale_rows, sinks, group_name, world_size, rank, scale, window, chunk,
      softcap, check):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _check_local(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, chunk, sinks, softcap):
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required: the (B,) live slots of this rank's shard (0 allowed)")
    shape = check_decode(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                         num_splits=None, kernel=True, window=window, chunk=chunk, sinks=sinks, softcap=softcap,
                         values=False)
    check_scale(softmax_scale, shape.B, shape.HQ, shape.SQ, q)
    check_features(causal=True, window=window, chunk=chunk, sinks=sinks, softcap=softcap, HQ=shape.HQ, q=q)
    if host_values(cache_seqlens) and shape.B:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > shape.SK:
            raise ValueError(f"cache_seqlens holds {lo if lo < 0 else hi}, outside [0, Smax={shape.SK}] (this rank's "
                             "live slots; a rank may hold none)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, sinks)):
        raise ValueError("decode_attention is inference-only (no backward): q/k_cache/v_cache/sinks require grad; "
                         "call it under torch.no_grad()")
    return shape


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, cache_seqlens: Tensor, group=None,
                     softmax_scale=None, window: Optional[int] = None, chunk: Optional[int] = None,
                     sinks: Optional[Tensor] = None, softcap: Optional[float] = None, return_lse: bool = False,
                     check_ranks: bool = True):
    """``drope.kernels.decode_attention`` over a KV cache sharded contiguously over the ranks, on every rank.

    The global cache of batch row b is the ranks' live slots concatenated in rank order (rank 0 first); the Sq
    queries are its last Sq positions (query row i at ``L_b - Sq + i``, ``L_b`` the sum of the ranks' lengths). Every
    rank passes the same q and options and gets the same result.

    Args:
        q: (B, Hq, Sq, D), the same on every rank. fp16 / bf16 / fp32.
        k_cache, v_cache: (B, Hkv, Smax_r, D), this rank's shard (capacities may differ across ranks). Any strides.
        cache_seqlens: (B,) int32 / int64, this rank's live slots per batch row (0 allowed). Checked against
            [0, Smax_r] on the host for CPU tensors; on a GPU a length outside gives NaN rows (as the kernel does).
            A global length below Sq leaves the rows at negative positions seeing nothing (zeros).
        group: the process group over which the cache is sharded (None: the default group).
        softmax_scale, window, chunk, sinks, softcap: as in :func:`drope.kernels.decode_attention`, in global
            positions (the sinks are added once, in the merge).
        return_lse: also return the fp32 log-sum-exp (B, Hq, Sq).
        check_ranks: exchange a small signature first so that ranks that disagree raise on every rank.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, or ``(out, lse)``; the same on every rank.

    Collectives: 1 signature all-gather (``check_ranks``) + 1 all-gather of the lengths (B int64 per rank; only when
    Sq > 1 or with a window or chunk) + 1 all-gather of each rank's fp32 (out, lse) (B*Hq*Sq*(D+1) floats per rank).
    Under ``torch.compile`` the call is one operator, ``drope::cp_decode``.

    Raises:
        ValueError: no process group (``group``), input outside the kernel's contract, ``cache_seqlens`` missing,
            an input requiring grad, or ranks whose shapes, dtypes or options differ (raised on every rank).
    """
    g = resolve_group(group)
    error, shape = None, None
    try:
        shape = _check_local(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, chunk, sinks, softcap)
    except ValueError as e:
        error = e
    sig = []
    if check_ranks:
        number = (int, float)
        scale_kind = -2.0 if isinstance(softmax_scale, Tensor) else softmax_scale
        B, HQ, SQ, D = dims(q, 4)
        sig = signature("drope.distributed.decode_attention", [
            B, HQ, dims(k_cache, 2)[1], SQ, D,
            *(t.dtype if isinstance(t, Tensor) else None for t in (q, k_cache, v_cache)),
            q.device if isinstance(q, Tensor) else None, dims(cache_seqlens, 1)[0],
            *(x if isinstance(x, number) else None for x in (window, chunk, softcap)),
            scale_kind if isinstance(scale_kind, number) else None, *dims(softmax_scale, 3), dims(sinks, 1)[0]])
    if error is not None:
        if torch.compiler.is_compiling() or not check_ranks:
            raise error
        exchange(g, sig, device=q.device if isinstance(q, Tensor) else None, local_error=error)
    const, rows = split_scale(softmax_scale, shape, q.device)
    out, lse = torch.ops.drope.cp_decode(q, k_cache, v_cache, cache_seqlens, rows, sinks, g.name, g.size, g.rank,
                                         float(const), window, chunk, None if softcap is None else float(softcap), sig)
    return (out, lse) if return_lse else out
