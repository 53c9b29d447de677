"""``drope::decode`` on CPU tensors: a few new query rows against a (paged) KV cache, exact.

Batch row b's query row i sits at position ``cache_seqlens[b] - Sq + i`` and sees keys 0..that position (and the
window / chunk / key mask). One call of PyTorch's CPU flash-attention kernel over the live keys (up to the longest
live length), with an additive (B, 1, Sq, n) mask; soft-capped logits are computed explicitly (Sq is small). As on
a GPU, a length outside [0, Smax] or a page outside the pool makes the rows that depend on it NaN: never a clamped,
plausible answer.
"""

from __future__ import annotations

import torch

from .attention import _FLASH, _core, _scaled, _sinked, _softcapped
from .prologue import compute_dtype

__all__ = ["decode"]


def _logical(cache: torch.Tensor, block_table, n: int):
    """(B, Hkv, n, D) keys 0..n-1 of each batch row (a view of a contiguous cache; gathered from pages), and a
    (B, n) bool of keys on a page outside the pool (None when not paged)."""
    if block_table is None:
        return cache[:, :, :n], None
    page = cache.shape[1]
    need = -(-n // page)
    idx = block_table[:, :need].long()
    bad = (idx < 0) | (idx >= cache.shape[0])
    pages = cache[idx.clamp(0, max(cache.shape[0] - 1, 0))]  # (B, need, page, Hkv, D)
    keys = pages.reshape(idx.shape[0], need * page, *cache.shape[2:])[:, :n].transpose(1, 2)
    return keys, bad.repeat_interleave(page, dim=1)[:, :n]


def _uniform_length(cache_seqlens, smax: int, B: int):
    """The live length every batch row shares (the capacity without ``cache_seqlens``), or None when the rows
    differ or a length lies outside [0, smax] (the general path then makes those rows NaN)."""
    if cache_seqlens is None:
        return smax
    if B == 0:
        return None
    lo, hi = (int(cache_seqlens[0]),) * 2 if B == 1 else (int(x) for x in torch.aminmax(cache_seqlens))
    return lo if lo == hi and 0 <= lo <= smax else None


def decode(q, k_cache, v_cache, cache_seqlens, scale_rows, sinks, key_mask, block_table, scale, window, chunk,
           softcap):
    """(out (B, Hq, Sq, D) in q's dtype, lse fp32 (B, Hq, Sq)) of :func:`drope.kernels.decode_attention`."""
    B, HQ, SQ, D = q.shape
    smax = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[2]
    L = _uniform_length(cache_seqlens, smax, B)
    if (L is not None and block_table is None and softcap is None and SQ <= L
            and (key_mask is None or key_mask.dim() == 2)):
        # every batch row holds L keys (a single sequence, a static cache's capacity): one bottom-right causal
        # problem over the first L slots, as the forward runs it (its window / chunk / (B, Smax) key-mask blocks)
        keys = None if key_mask is None else key_mask[:, :L] != 0
        if keys is not None and bool(keys.all()):
            keys = None  # a static cache's live slots: no mask to build
        qs, sc = _scaled(q, scale_rows, scale)
        out, lse = _core(qs, k_cache[:, :, :L].to(qs.dtype), v_cache[:, :, :L].to(qs.dtype), p0=L - SQ, causal=True,
                         window=window, chunk=chunk, keys=keys, scale=sc)
        out = out.to(q.dtype)
        return _sinked(out, lse, sinks) if sinks is not None else (out, lse)
    lens = torch.full((B,), smax, dtype=torch.int64) if cache_seqlens is None else cache_seqlens.long()
    bad_len = (lens < 0) | (lens > smax)
    lens = torch.where(bad_len, 0, lens)
    n = int(lens.max()) if B else 0
    out = q.new_zeros(q.shape)
    lse = torch.full((B, HQ, SQ), float("-inf"), dtype=torch.float32)
    if n and SQ:
        k, bad_key = _logical(k_cache, block_table, n)
        v, _ = _logical(v_cache, block_table, n)
        pos = lens[:, None] - SQ + torch.arange(SQ)[None, :]  # (B, Sq)
        j = torch.arange(n)[None, None, :]
        vis = (j <= pos[..., None]) & (j < lens[:, None, None])
        if window is not None:
            vis = vis & (j > pos[..., None] - window)
        if chunk is not None:
            vis = vis & (torch.div(j, chunk, rounding_mode="floor") == torch.div(pos, chunk, rounding_mode="floor")[
                ..., None])
        if key_mask is not None:
            km = key_mask[..., :n] != 0
            vis = vis & (km if km.dim() == 3 else km[:, None, :])
        ct = compute_dtype(q.dtype)
        if softcap is not None:
            sc = scale if scale_rows is None else (scale_rows * scale)[..., None]
            for b in range(B):  # rows of different lengths: one explicit problem each (Sq is small)
                o, l = _softcapped(q[b:b + 1], k[b:b + 1], v[b:b + 1], p0=0, causal=False, window=None, chunk=None,
                                   keys=None, scale=sc if not isinstance(sc, torch.Tensor) else sc[b:b + 1],
                                   softcap=softcap, visible=vis[b:b + 1])
                out[b:b + 1], lse[b:b + 1] = o, l
        else:
            qs, sc = (q, scale) if scale_rows is None else (q.to(ct) * (scale_rows * scale)[..., None].to(ct), 1.0)
            mask = torch.zeros(vis.shape, dtype=qs.dtype).masked_fill_(~vis, float("-inf"))[:, None]
            o, l = _FLASH(qs, k.to(qs.dtype), v.to(qs.dtype), 0.0, False, attn_mask=mask, scale=sc)
            out, lse = o.to(q.dtype), torch.where(vis.any(-1)[:, None], l, float("-inf"))
        if bad_key is not None:
            # a row that sees a key on a page outside the pool is NaN
            bad_len = bad_len[:, None] | (vis & bad_key[:, None, :]).any(-1)  # (B, Sq)
    if sinks is not None:
        out, lse = _sinked(out, lse, sinks)
    bad = bad_len.reshape(B, 1, -1).expand(B, HQ, SQ) if bad_len.dim() == 2 else bad_len[:, None, None].expand(
        B, HQ, SQ)
    out = torch.where(bad[..., None], float("nan"), out)
    lse = torch.where(bad, float("nan"), lse)
    return out, lse
