"""The exact CPU path of ``"drope_triton"`` when Triton's interpreter is off: the kernels' two entry
points (:func:`attention`, :func:`decode_attention`) built on ``torch.nn.functional.scaled_dot_product_attention``.

The per-head query RMSNorm runs first (fp32, as the kernel's prologue) and the softmax scale (a float,
or per row / per head / per head and row) is folded into the queries, so SDPA runs with scale 1; GQA
goes through ``enable_gqa``. Plain causal attention is one SDPA call (torch's CPU flash kernel: O(S)
memory). Windows and chunks run in blocks of at most :data:`BLOCK` queries against the band of keys
they can see (chunks are independent blocks, a window a band behind each query block), so memory
stays O(S * (BLOCK + window)). Sinks are an extra key column whose logit is the sink and whose value is
zero (exactly GPT-OSS's softmax, differentiable). Logit soft-capping has no SDPA form: such a call
runs :mod:`drope.reference` (it materialises that call's logits).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..validation import AttentionShape, check_scale, split_scale

__all__ = ["BLOCK", "attention", "decode_attention"]

# queries per SDPA call when a window, chunk, sink or key bound needs an explicit mask
BLOCK = 512


def _scale_tensor(softmax_scale, q: torch.Tensor, dtype, values: bool = True) -> torch.Tensor:
    """The softmax scale as a tensor (``dtype``) broadcastable to (B, Hq, Sq, 1); the kernels' own
    check and split (:func:`drope.validation.check_scale`, :func:`~drope.validation.split_scale`)."""
    B, HQ, SQ, D = q.shape
    check_scale(softmax_scale, B, HQ, SQ, q, values=values)
    const, rows = split_scale(softmax_scale, AttentionShape(B, HQ, HQ, SQ, SQ, D), q.device, dtype)
    return torch.tensor(const, dtype=dtype, device=q.device) if rows is None else rows[..., None]


def _rms(x, weight, eps):
    """Per-head RMSNorm in fp32 (fp64 for fp64 inputs), as the kernels' prologue."""
    return reference.rms_norm(x.to(reference._compute_dtype(x.dtype)), weight, eps)


def _prepare_q(q, softmax_scale, q_norm_weight, norm_eps, values: bool = True):
    """RMSNorm and the scale folded into q (fp32 arithmetic, fp64 for fp64), back in q's dtype."""
    ct = reference._compute_dtype(q.dtype)
    qf = q.to(ct) if q_norm_weight is None else _rms(q, q_norm_weight, norm_eps)
    return (qf * _scale_tensor(softmax_scale, q, ct, values)).to(q.dtype)


def _sdpa(q, k, v, mask, sinks, is_causal=False):
    """SDPA with scale 1; ``mask`` bool (B or 1, 1, Sq, Sk) or None; ``sinks`` (Hq,) as an extra key column."""
    gqa = q.shape[1] != k.shape[1]
    if sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0, enable_gqa=gqa)
        if mask is not None:
            # rows that see no key: zeros, as the kernels (SDPA leaves NaN there)
            out = out * mask.any(-1, keepdim=True)
        return out
    B, HQ, SQ, _ = q.shape
    SK = k.shape[2]
    k = torch.cat([k, k.new_zeros(k.shape[:2] + (1, k.shape[3]))], dim=2)
    v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, v.shape[3]))], dim=2)
    if mask is None:
        mask = torch.ones(1, 1, SQ, SK, dtype=torch.bool, device=q.device)
        if is_causal:
            mask = mask.tril()
    bias = torch.zeros(mask.shape[:-1] + (SK,), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    sink = sinks.to(device=q.device, dtype=q.dtype)[None, :, None, None].expand(bias.shape[0], HQ, SQ, 1)
    bias = torch.cat([bias.expand(bias.shape[0], HQ, SQ, SK), sink], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0, enable_gqa=gqa)


def _core(q, k, v, *, p0: int, causal: bool, window, chunk, sinks, keys=None, docs=None):
    """Attention of prepared queries (row i at position p0 + i) to keys 0..Sk-1, blocked over queries.

    ``keys``: None or (B, Sk) bool, the attendable key slots. ``docs``: None or (Sk,) int64 document id of each
    slot of a packed row (Sq == Sk); positions then restart at each document (read as ``pos``).
    """
    SQ, SK = q.shape[2], k.shape[2]
    pos = None
    if docs is not None:
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[1:] = docs[1:] != docs[:-1]
        idx = torch.arange(SK, device=q.device)
        pos = idx - torch.cummax(torch.where(starts, idx, 0), 0).values
    if not causal:
        if window is not None or chunk is not None:
            raise ValueError("window and chunk need causal attention")
        mask = None if keys is None else keys[:, None, None, :]
        if docs is not None:
            same = docs[:, None] == docs[None, :]
            mask = same[None, None] if mask is None else mask & same[None, None]
        return _sdpa(q, k, v, mask, sinks)
    last = p0 + SQ - 1
    if window is not None and window > last:
        window = None  # every visible key is inside the window
    if chunk is not None and p0 // chunk == last // chunk and p0 < chunk:
        chunk = None  # one chunk, starting at 0
    if window is None and chunk is None and sinks is None and p0 == 0 and SQ == SK and keys is None and docs is None:
        return _sdpa(q, k, v, None, sinks, is_causal=True)
    outs = []
    a = 0
    while a < SQ:
        p = p0 + a
        e = min(SQ, a + BLOCK)
        lo = 0
        if chunk is not None and docs is None:
            start = (p // chunk) * chunk
            e = min(e, start + chunk - p0)
            lo = start
        if window is not None and docs is None:
            lo = max(lo, p - window + 1)
        hi = p0 + e
        qpos, kpos = torch.arange(p, p0 + e, device=q.device), torch.arange(lo, hi, device=q.device)
        if docs is None:
            # the block lies inside one chunk (its keys start at the chunk's start): causal and window remain
            vis = reference._visible(qpos, kpos, window, None)[None, None]
        else:
            vis = (kpos[None, :] <= qpos[:, None]) & (docs[lo:hi][None, :] == docs[p:p0 + e][:, None])
            vis = vis & reference._visible(pos[p:p0 + e], pos[lo:hi], window, chunk)
            vis = vis[None, None]
        if keys is not None:
            vis = vis & keys[:, None, None, lo:hi]
        outs.append(_sdpa(q[:, :, a:e], k[:, :, lo:hi], v[:, :, lo:hi], vis, sinks))
        a = e
    return torch.cat(outs, dim=2)


def attention(q, k, v, *, causal: bool = True, softmax_scale=None, q_norm_weight=None, k_norm_weight=None,
              norm_eps: float = 1e-6, cu_seqlens=None, window: Optional[int] = None, chunk: Optional[int] = None,
              sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
              key_mask: Optional[torch.Tensor] = None, check_values: bool = True):
    """:func:`drope.kernels.attention` (without RoPE) on SDPA; same arguments and semantics.

    Args:
        q: (B, Hq, Sq, D). k, v: (B, Hkv, Sk, D), Hq % Hkv == 0; query row i at position Sk - Sq + i.
        causal: bottom-right causal mask.
        softmax_scale: None, a float, or a (Sq,), (Hq,), (B, Sq), (B, Hq, Sq) tensor.
        q_norm_weight, k_norm_weight: per-head RMSNorm weights (D,) or (H, D).
        norm_eps: their epsilon.
        cu_seqlens: (N+1,) boundaries of packed documents (B = 1, Sq = Sk), positions restarting at 0;
            read on the device (no host copy), so a traced call stays one graph.
        window, chunk, sinks, softcap, key_mask, check_values: as the kernel (see docs/design.md).

    Returns:
        (B, Hq, Sq, D) in q's dtype.

    Raises:
        ValueError: a window or chunk without causal attention, a scale tensor of another shape.
    """
    if softcap is not None:
        return reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, q_norm_weight=q_norm_weight,
                                   k_norm_weight=k_norm_weight, norm_eps=norm_eps, cu_seqlens=cu_seqlens,
                                   window=window, chunk=chunk, sinks=sinks, softcap=softcap, key_mask=key_mask)
    if k_norm_weight is not None:
        k = _rms(k, k_norm_weight, norm_eps).to(k.dtype)
    q = _prepare_q(q, softmax_scale, q_norm_weight, norm_eps, check_values)
    SQ, SK = q.shape[2], k.shape[2]
    keys = None if key_mask is None else key_mask != 0
    docs = None
    if cu_seqlens is not None:
        docs = torch.searchsorted(cu_seqlens.to(torch.int64), torch.arange(SK, device=q.device), right=True) - 1
    return _core(q, k, v, p0=SK - SQ, causal=causal, window=window, chunk=chunk, sinks=sinks, keys=keys, docs=docs)


def decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, softmax_scale=None, num_splits=None,
                     max_seqlen: Optional[int] = None, window: Optional[int] = None, chunk: Optional[int] = None,
                     sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                     key_mask: Optional[torch.Tensor] = None, check_values: bool = True):
    """:func:`drope.kernels.decode_attention` on SDPA: a few queries against a cache; same semantics
    (query row i of batch b at position ``cache_seqlens[b] - Sq + i``). ``num_splits`` is accepted and
    has no effect; ``max_seqlen`` bounds the keys read."""
    if softcap is not None:
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                                          max_seqlen=max_seqlen, window=window, chunk=chunk, sinks=sinks,
                                          softcap=softcap, key_mask=key_mask)
    B, HQ, SQ, D = q.shape
    SMAX = k_cache.shape[2]
    q = _prepare_q(q, softmax_scale, None, 0.0, check_values)
    if cache_seqlens is None:
        lens = torch.full((B,), SMAX, dtype=torch.int64, device=q.device)
    else:
        lens = cache_seqlens.to(device=q.device, dtype=torch.int64)
    n = SMAX if max_seqlen is None else min(int(max_seqlen), SMAX)
    k_cache, v_cache = k_cache[:, :, :n], v_cache[:, :, :n]
    if (cache_seqlens is None and n == SMAX and window is None and chunk is None and sinks is None and SQ == 1
            and key_mask is None):
        # one query that sees every key: no mask, so SDPA keeps its fused CPU kernel
        return _sdpa(q, k_cache, v_cache, None, None)
    pos = lens[:, None] - SQ + torch.arange(SQ, device=q.device)[None, :]  # (B, Sq)
    vis = reference._visible(pos, torch.arange(n, device=q.device), window, chunk)  # (B, Sq, n)
    if key_mask is not None:
        km = key_mask[..., :n] != 0
        vis = vis & (km if km.dim() == 3 else km[:, None, :])
    return _sdpa(q, k_cache, v_cache, vis[:, None], sinks)
