"""Pure-PyTorch oracle of the kernels: same signatures, same semantics, any float dtype, CPU or GPU.

Arithmetic is float32 for 16/32-bit inputs and float64 for float64 inputs. It materialises the
full (Sq, Sk) logits: it is the oracle of every test, not a fast path (the Hugging Face layer's
CPU path is built on SDPA instead).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .validation import check_attention, check_decode, query_boundaries, split_scale

__all__ = ["attention", "decode_attention", "rms_norm", "apply_rope", "rope_tables", "logical_cache", "write_new_tokens",
           "packed_from_pages"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_pow2(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``, a power of two c >= max|x| / 2 when max|x| > 1, else 1 (float, keepdim).

    ``x / c`` is exact and its squares cannot overflow, and ``rsqrt(mean((x/c)^2) + eps/c^2) / c``
    rounds exactly as ``rsqrt(mean(x^2) + eps)`` wherever the latter does not overflow.
    """
    m = x.detach().abs().amax(-1, keepdim=True)
    return torch.exp2(torch.ceil(torch.log2(m.clamp_min(1.0))))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * w``.

    ``x`` (B, H, S, D); ``weight`` (D,) shared by all heads or (H, D). Computes in ``x``'s dtype,
    scaled by a power of two per row (:func:`norm_pow2`) so that inputs up to the dtype's maximum do
    not overflow ``x^2`` (the kernels' prologue does the same).
    """
    w = weight.to(x.dtype)
    if w.dim() == 2:
        w = w[None, :, None, :]
    c = norm_pow2(x)
    return x * (torch.rsqrt((x / c).pow(2).mean(-1, keepdim=True) + eps / (c * c)) / c) * w


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention): ``[x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin]``.

    ``x`` (..., S, D); ``cos``/``sin`` (S, D/2) for the S rows of ``x``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_tables(seq_len: int, head_dim: int, *, base: float = 10000.0, device=None,
                dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard RoPE angle tables ``(cos, sin)`` of shape (seq_len, head_dim/2) for positions 0..seq_len-1."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _visible(pos_q: torch.Tensor, pos_k: torch.Tensor, window: Optional[int], chunk: Optional[int]) -> torch.Tensor:
    """Causal visibility (.., Sq, Sk) of keys at ``pos_k`` (Sk,) to queries at ``pos_q`` (.., Sq).

    Key j is visible to position p iff j <= p, and p - window < j (sliding window), and
    j // chunk == p // chunk (chunked attention).
    """
    p, j = pos_q[..., :, None], pos_k
    vis = j <= p
    if window is not None:
        vis = vis & (j > p - window)
    if chunk is not None:
        vis = vis & (torch.div(j, chunk, rounding_mode="floor") == torch.div(p, chunk, rounding_mode="floor"))
    return vis


def _attend(q, k, v, scale, visible, sinks=None, softcap=None):
    """softmax(cap(q k^T * scale), masked by ``visible``, sink logits in the denominator) @ v.

    ``q`` (B, Hq, Sq, D); ``k``/``v`` (B, Hq, Sk, D); ``scale`` broadcastable to (B, Hq, Sq, 1);
    ``visible`` broadcastable bool (.., Sq, Sk) or None; ``sinks`` (Hq,) or None; ``softcap`` float
    or None. Returns (out, lse): rows that see no key output zeros, lse = -inf (the sink logit
    when ``sinks`` is given: it is then the whole denominator).
    """
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    any_visible = None
    if visible is not None:
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        any_visible = visible.any(-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(logits.dtype)[None, :, None, None].expand(*logits.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat((logits, sink), dim=-1), dim=-1, keepdim=True)
        p = torch.exp(logits - lse)
        if visible is not None:
            p = p * visible
        return torch.matmul(p, v), lse.squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse)
    if any_visible is not None:
        # finite fill keeps gradients NaN-free; the row is then zeroed explicitly
        p = p * any_visible
        lse = lse.masked_fill(~any_visible, float("-inf"))
    return torch.matmul(p, v), lse.squeeze(-1)


def _prepare_qk(q, k, rope, q_norm_weight, k_norm_weight, norm_eps, q_pos0: int):
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, norm_eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, norm_eps)
    if rope is not None:
        cos, sin = rope
        SQ, SK = q.shape[-2], k.shape[-2]
        q = apply_rope(q, cos[q_pos0:q_pos0 + SQ], sin[q_pos0:q_pos0 + SQ])
        k = apply_rope(k, cos[:SK], sin[:SK])
    return q, k


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              softmax_scale=None, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
              q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None,
              norm_eps: float = 1e-6, cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False,
              window: Optional[int] = None, chunk: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
              softcap: Optional[float] = None, key_mask: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
              block_table: Optional[torch.Tensor] = None):
    """Reference of :func:`drope.kernels.attention` (contract: docs/design.md).

    Args:
        q: (B, Hq, Sq, D). k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA, query head h reads
            KV head h // (Hq // Hkv)).
        causal: bottom-right aligned causal mask: key j visible to row i iff j <= Sk - Sq + i.
        softmax_scale: None (D**-0.5), a float, or a tensor of per-row / per-head multipliers:
            (Sq,), (B, Sq), (Hq,) or (B, Hq, Sq) (3-D with 1s broadcast; a 1-D tensor of length
            Sq == Hq is read as (Sq,)).
        rope: optional (cos, sin) tables (>= Sk, D/2); query row i is at position Sk - Sq + i.
        q_norm_weight, k_norm_weight: optional per-head RMSNorm weights, (D,) or (H, D).
        norm_eps: RMSNorm epsilon.
        cu_seqlens: optional (N+1,) boundaries of documents packed along S (B must be 1, Sq == Sk);
            each document is attended alone, positions restarting at 0.
        return_lse: also return the natural-log log-sum-exp of the scaled logits, (B, Hq, Sq),
            -inf on rows with no visible key (the sink logit when ``sinks`` is given).
        window: sliding window (needs causal): key j visible to position p iff p - window < j <= p.
        chunk: chunked attention (needs causal): visible iff j <= p and j // chunk == p // chunk.
        sinks: (Hq,) logits, one per query head, added to the softmax denominator only.
        softcap: logits become ``softcap * tanh(s / softcap)`` after the scale.
        key_mask: optional (B, Sk) bool / uint8 / int8, nonzero where key slot j may be attended
            (padding, holes, unwritten cache slots); positions and the causal rule are unchanged.
        cu_seqlens_k: optional (N+1,) boundaries of the keys when they are packed apart from the
            queries (needs ``cu_seqlens`` for the queries; q (1, Hq, total_q, D), k/v (1, Hkv, total_k,
            D)): document d's query row i sits at position ``Lk_d - Lq_d + i`` of its Lk_d keys
            (bottom-right causal per document: chunked prefill, a prefill and decodes in one batch).
            Each document needs Lq_d <= Lk_d; not with ``rope``.
        cu_seqlens_q: flash-attention's name for ``cu_seqlens`` (pass one of the two).
        block_table: optional (N, max_pages) int32: k and v are then paged caches (num_pages,
            page_size, Hkv, D) and document d's Lk_d keys (``cu_seqlens_k``) are positions 0..Lk_d-1
            of its row, position p in page ``block_table[d, p // page_size]``, row ``p % page_size``
            (inference: a chunked prefill or decode over a paged cache). Not with ``key_mask``.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: on any input outside the contract, naming the argument.
    """
    cu_seqlens = query_boundaries(cu_seqlens, cu_seqlens_q)
    shape = check_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, rope=rope,
                            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                            cu_seqlens=cu_seqlens, window=window, chunk=chunk, sinks=sinks, softcap=softcap,
                            key_mask=key_mask, kernel=False, cu_seqlens_k=cu_seqlens_k, block_table=block_table)
    if block_table is not None:
        k, v = packed_from_pages(k, block_table, cu_seqlens_k), packed_from_pages(v, block_table, cu_seqlens_k)
    SQ, SK, G = shape.SQ, shape.SK, shape.G
    ct = _compute_dtype(q.dtype)
    const, rows = split_scale(softmax_scale, shape, q.device, ct)
    scale = const if rows is None else rows[..., None]
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    extra = dict(sinks=None if sinks is None else sinks.to(ct), softcap=softcap)
    dev = q.device
    keys = None if key_mask is None else (key_mask != 0)[:, None, None, :]  # (B, 1, 1, Sk)

    if cu_seqlens is None:
        qf, kf = _prepare_qk(qf, kf, rope, q_norm_weight, k_norm_weight, norm_eps, SK - SQ)
        kf, vf = _repeat_kv(kf, G), _repeat_kv(vf, G)
        visible = None
        if causal:
            visible = _visible(torch.arange(SQ, device=dev) + (SK - SQ), torch.arange(SK, device=dev), window, chunk)
        out, lse = _attend(qf, kf, vf, scale, _and(visible, keys), **extra)
    else:
        outs, lses = [], []
        bounds = cu_seqlens.tolist()
        kbounds = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
        for a, b, ka, kb in zip(bounds[:-1], bounds[1:], kbounds[:-1], kbounds[1:]):
            qd, kd = _prepare_qk(qf[:, :, a:b], kf[:, :, ka:kb], rope, q_norm_weight, k_norm_weight, norm_eps, 0)
            kd, vd = _repeat_kv(kd, G), _repeat_kv(vf[:, :, ka:kb], G)
            pos_k = torch.arange(kb - ka, device=dev)
            pos_q = torch.arange(b - a, device=dev) + ((kb - ka) - (b - a))
            visible = _visible(pos_q, pos_k, window, chunk) if causal else None
            sd = scale if rows is None else scale[:, :, a:b]
            o, l = _attend(qd, kd, vd, sd, _and(visible, None if keys is None else keys[..., ka:kb]), **extra)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _and(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The intersection of two broadcastable visibility masks (None = everything visible)."""
    return b if a is None else a if b is None else a & b


def _repeat_kv(x: torch.Tensor, G: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*G, S, D): query head h reads KV head h // G."""
    return x if G == 1 else x.repeat_interleave(G, dim=1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     cache_seqlens: Optional[torch.Tensor] = None, softmax_scale=None,
                     num_splits: Optional[int] = None, return_lse: bool = False,
                     max_seqlen: Optional[int] = None, window: Optional[int] = None, chunk: Optional[int] = None,
                     sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                     key_mask: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                     k_new: Optional[torch.Tensor] = None, v_new: Optional[torch.Tensor] = None):
    """Reference of :func:`drope.kernels.decode_attention` (NoPE attention of a few queries to a cache).

    Args:
        q: (B, Hq, Sq, D), the Sq newest tokens. k_cache, v_cache: (B, Hkv, Smax, D).
        cache_seqlens: (B,) int32/int64 valid lengths including the Sq new tokens (None: all Smax).
            Query row i of batch b sits at position cache_seqlens[b] - Sq + i and sees keys 0..that.
        softmax_scale: None (D**-0.5), a float, or a (Sq,), (B, Sq), (Hq,) or (B, Hq, Sq) tensor.
        num_splits: accepted for signature parity; the reference does not split.
        return_lse: also return the natural-log log-sum-exp (B, Hq, Sq).
        max_seqlen: accepted (and range-checked) for signature parity; the kernel's split-count hint.
        window, chunk, sinks, softcap: as in :func:`attention`, positions as above.
        key_mask: optional (B, Smax) or, per query row, (B, Sq, Smax) bool / uint8 / int8: nonzero
            where the cache slot may be attended (left padding, holes, another document or chunk).
        block_table: optional (B, max_pages) int32 page indices; the caches are then paged,
            (num_pages, page_size, Hkv, D), and position p of batch row b lives in page
            ``block_table[b, p // page_size]``, row ``p % page_size`` (Smax = max_pages * page_size).
        k_new, v_new: optional (B, Hkv, Sq, D) keys and values of the Sq new tokens, written into the
            caches (in place) at positions ``cache_seqlens[b] - Sq + i`` before attending.

    Returns:
        out (B, Hq, Sq, D) in q's dtype (or ``(out, lse)``).

    Raises:
        ValueError: on any input outside the contract, naming the argument.
    """
    shape = check_decode(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                         num_splits=num_splits, kernel=False, max_seqlen=max_seqlen, window=window, chunk=chunk,
                         sinks=sinks, softcap=softcap, key_mask=key_mask, block_table=block_table, k_new=k_new,
                         v_new=v_new)
    B, SQ, SMAX, G = shape.B, shape.SQ, shape.SK, shape.G
    ct = _compute_dtype(q.dtype)
    const, rows = split_scale(softmax_scale, shape, q.device, ct)
    scale = const if rows is None else rows[..., None]
    if cache_seqlens is None:
        lens = torch.full((B,), SMAX, device=q.device, dtype=torch.int64)
    else:
        lens = cache_seqlens.to(device=q.device, dtype=torch.int64)
    if k_new is not None:
        write_new_tokens(k_cache, v_cache, k_new, v_new, lens, block_table)
    k_cache, v_cache = logical_cache(k_cache, block_table), logical_cache(v_cache, block_table)
    kf, vf = _repeat_kv(k_cache.to(ct), G), _repeat_kv(v_cache.to(ct), G)
    pos = lens[:, None] - SQ + torch.arange(SQ, device=q.device)[None, :]  # (B, Sq)
    visible = _visible(pos, torch.arange(SMAX, device=q.device), window, chunk)  # (B, Sq, Smax)
    if key_mask is not None:
        visible = visible & (key_mask != 0 if key_mask.dim() == 3 else (key_mask != 0)[:, None, :])
    out, lse = _attend(q.to(ct), kf, vf, scale, visible[:, None],
                       sinks=None if sinks is None else sinks.to(ct), softcap=softcap)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def logical_cache(cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, Hkv, Smax, D) view of a cache: itself, or a paged (num_pages, page_size, Hkv, D) cache gathered
    through ``block_table`` (B, max_pages) (a copy; Smax = max_pages * page_size)."""
    if block_table is None:
        return cache
    B, P = block_table.shape
    pages = cache[block_table.long()]  # (B, P, page_size, Hkv, D)
    return pages.reshape(B, P * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def write_new_tokens(k_cache, v_cache, k_new, v_new, lens: torch.Tensor, block_table: Optional[torch.Tensor]) -> None:
    """Write (B, Hkv, Sq, D) new keys / values at positions ``lens[b] - Sq + i`` of each batch row, in place."""
    B, _, SQ, _ = k_new.shape
    pos = lens[:, None] - SQ + torch.arange(SQ, device=lens.device)[None, :]  # (B, Sq)
    b = torch.arange(B, device=lens.device)[:, None].expand(B, SQ)
    if block_table is None:
        k_cache[b, :, pos] = k_new.transpose(1, 2)
        v_cache[b, :, pos] = v_new.transpose(1, 2)
    else:
        page_size = k_cache.shape[1]
        page = block_table.long()[b, pos // page_size]
        k_cache[page, pos % page_size] = k_new.transpose(1, 2)
        v_cache[page, pos % page_size] = v_new.transpose(1, 2)


def packed_from_pages(cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """(1, Hkv, total_k, D) packed keys (or values) of the documents whose first Lk_d positions live in the pages
    of row d of ``block_table`` (a copy)."""
    rows = logical_cache(cache, block_table)  # (N, Hkv, max_pages * page_size, D)
    bounds = cu_seqlens_k.tolist()
    return torch.cat([rows[d, :, :b - a] for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], dim=1)[None]
