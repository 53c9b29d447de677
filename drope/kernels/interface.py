"""The public kernel functions: validate, shape the arguments, call the operators (:mod:`drope.kernels.ops`).

Validation reads shapes, dtypes and devices on the host; tensor *values* (a softmax scale's sign, the
boundaries of ``cu_seqlens``, ``cache_seqlens``' range) are checked only where that costs no device sync
(CPU tensors) and never while torch.compile traces the call. Under ``torch.compile(fullgraph=True)`` and
``torch.export`` each call is one operator node; nothing here breaks the graph.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_attention, check_decode, check_norm_weight, check_qkv, check_rope, query_boundaries, \
    split_scale
from . import ops
from .decode import num_splits_for, prefer_fused

__all__ = ["attention", "attention_with_cache", "decode_attention", "qk_norm_rope", "run_attention", "run_decode"]


def autocast_inputs(q, k, v):
    """Under ``torch.autocast`` the attention runs in the autocast dtype, like a matmul."""
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, v)):
        return q, k, v
    dev = q.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return q, k, v
    dtype = torch.get_autocast_dtype(dev)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _tables(rope):
    return (None, None) if rope is None else (rope[0].detach(), rope[1].detach())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, softmax_scale=None,
              rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, q_norm_weight: Optional[torch.Tensor] = None,
              k_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6,
              cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False, window: Optional[int] = None,
              chunk: Optional[int] = None, sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
              key_mask: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              cu_seqlens_q: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
              check_values: bool = True):
    """Fused attention with QK-norm, RoPE, per-row/per-head softmax scale, GQA, windows, chunks, sinks.

    Semantics are exactly :func:`drope.reference.attention`'s (docs/design.md, "Contract:
    drope.kernels.attention"): per head, ``q, k <- rms_norm`` (if a weight is given), then RoPE
    (if ``rope``), logits ``(q_i . k_j) * scale_i`` (soft-capped if ``softcap``), the causal /
    window / chunk / key mask, softmax (with the sink logit in the denominator), ``@ v``.

    Args:
        q: (B, Hq, Sq, D) queries; any strides (e.g. a (B, S, H, D) tensor transposed).
        k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv).
            fp16, bf16 or fp32 (one dtype for q, k, v); D any multiple of 8 up to 256.
        causal: key j is visible to query row i iff ``j <= Sk - Sq + i`` (needs Sq <= Sk).
        softmax_scale: None (``D**-0.5``), a float in [0, 1e6], or a tensor of such multipliers of
            shape (Sq,), (B, Sq) (per row, e.g. DroPE's temperature times ``D**-0.5``), (Hq,) or
            (B, Hq, Sq) (per head and row; 3-D shapes with 1s broadcast). A 1-D tensor whose
            length is both Sq and Hq is read as (Sq,).
        rope: optional ``(cos, sin)`` angle tables of shape (>= Sk, D/2) for positions 0..Sk-1;
            query row i sits at position Sk - Sq + i; rotate-half (HF Llama) convention.
        q_norm_weight, k_norm_weight: optional per-head RMSNorm weights, (D,) or (H, D).
        norm_eps: RMSNorm epsilon.
        cu_seqlens: optional int32 (N+1,) non-decreasing boundaries of documents packed along S
            (B == 1, Sq == Sk); each document attends within itself, positions restart at 0; empty
            documents (repeated boundaries) are allowed, so the tensor may be padded to a fixed size.
        return_lse: also return the natural-log log-sum-exp of the scaled logits.
        window: sliding window (causal only): key j visible to position p iff p - window < j <= p.
        chunk: chunked attention (causal only): visible iff j <= p and j // chunk == p // chunk.
        sinks: (Hq,) logits, one per query head, added to the softmax denominator only (GPT-OSS).
        softcap: logits become ``softcap * tanh(s / softcap)`` after the scale (Gemma 2).
        key_mask: optional (B, Sk) bool / uint8 / int8, nonzero where key slot j may be attended
            (padding in any pattern); positions are unchanged. Blocks between a row's first and last
            attendable key run unmasked when the row has no holes.
        cu_seqlens_k: optional int32 (N+1,) boundaries of the keys when they are packed apart from the
            queries (flash-attention's varlen with ``cu_seqlens_q != cu_seqlens_k``: chunked prefill, a
            prefill and decodes in one batch). Needs ``cu_seqlens`` for the queries; q (1, Hq, total_q, D),
            k/v (1, Hkv, total_k, D). Document d's query row i sits at position ``Lk_d - Lq_d + i`` of its
            keys (bottom-right causal per document); each document needs Lq_d <= Lk_d (checked with the
            other boundary values; unchecked, causal rows at negative positions output zeros). Not with ``rope``.
        cu_seqlens_q: flash-attention's name for ``cu_seqlens`` (pass one of the two).
        block_table: optional (N, max_pages) int32 page indices, one row per document (needs ``cu_seqlens_k``):
            k and v are then paged caches (num_pages, page_size, Hkv, D), page_size a multiple of 16, and
            document d's Lk_d keys are its positions 0..Lk_d-1, position p in page ``block_table[d, p // page_size]``
            (chunked prefill and decodes over a paged cache, in one call). Inference only; not with
            ``key_mask`` or ``k_norm_weight`` (normalise keys before caching them). Page indices are checked
            like ``cu_seqlens``; on the device an index outside the cache gives NaN rows, never a read outside it.
        check_values: check tensor values (scale range, sinks, ``cu_seqlens`` order) where that costs no device
            sync (CPU tensors; ``cu_seqlens`` on any device, outside torch.compile); False skips them for a
            caller that builds those tensors itself (the HF layer). Shapes, dtypes and devices are always checked.

    Returns:
        out (B, Hq, Sq, D) in q's dtype (rows with no visible key are zeros), or ``(out, lse)``
        with lse float32 (B, Hq, Sq), -inf on rows with no visible key (the sink when given).

    Autograd: differentiable in q, k, v, both norm weights and the sinks (and through the
    returned lse); not in ``softmax_scale``, the rope tables or the key mask. The backward
    (``drope.kernels.attention_bwd``) is deterministic and recomputes the probabilities from the
    saved LSE (O(S) extra memory). Gradients come back in the dtype of their input. Under
    ``torch.autocast`` q, k, v are cast to the autocast dtype (norm weights are not). Under
    ``torch.compile`` / ``torch.export`` the call is the operator ``drope::attention_fwd``.

    Raises:
        ValueError: any input outside the contract (the message names the argument).
        drope.validation.DeviceError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    q, k, v = autocast_inputs(q, k, v)
    cu_seqlens = query_boundaries(cu_seqlens, cu_seqlens_q)
    shape = check_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, rope=rope,
                            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                            cu_seqlens=cu_seqlens, window=window, chunk=chunk, sinks=sinks, softcap=softcap,
                            key_mask=key_mask, kernel=True, values=check_values, cu_seqlens_k=cu_seqlens_k,
                            block_table=block_table)
    if block_table is not None and _needs_grad(q, k, v, q_norm_weight, sinks):
        raise ValueError("attention with block_table (a paged KV cache) is inference-only: an input requires grad; "
                         "call it under torch.no_grad(), or pack the keys (cu_seqlens_k) for a differentiable pass")
    const, rows = split_scale(softmax_scale, shape, q.device)
    return run_attention(q, k, v, const, rows, causal=causal, rope=rope, q_norm_weight=q_norm_weight,
                         k_norm_weight=k_norm_weight, norm_eps=norm_eps, cu_seqlens=cu_seqlens, return_lse=return_lse,
                         window=window, chunk=chunk, sinks=sinks, softcap=softcap, key_mask=key_mask,
                         cu_seqlens_k=cu_seqlens_k, block_table=block_table)


def run_attention(q, k, v, const: float, rows: Optional[torch.Tensor], *, causal: bool = True, rope=None,
                  q_norm_weight=None, k_norm_weight=None, norm_eps: float = 1e-6, cu_seqlens=None,
                  return_lse: bool = False, window=None, chunk=None, sinks=None, softcap=None, key_mask=None,
                  cu_seqlens_k=None, block_table=None):
    """:func:`attention` on arguments already checked: ``const`` the constant logit multiplier, ``rows`` None or
    a (B, Hq, Sq) float32 view of per-row / per-head multipliers (:func:`drope.validation.split_scale`)."""
    needs_grad = _needs_grad(q, k, v, q_norm_weight, k_norm_weight, sinks)
    # a traced graph (export) may be run later with inputs that require grad: keep the LSE the backward needs
    lse_too = return_lse or needs_grad or torch.compiler.is_compiling()
    cos, sin = _tables(rope)
    out, lse = ops.attention_fwd(
        q=q, k=k, v=v, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, sinks=sinks,
        scale_rows=None if rows is None else rows.detach(), rope_cos=cos, rope_sin=sin, cu_seqlens=cu_seqlens,
        key_mask=key_mask, cu_seqlens_k=cu_seqlens_k, block_table=block_table, causal=causal, scale=float(const),
        norm_eps=float(norm_eps), window=window, chunk=chunk, softcap=None if softcap is None else float(softcap),
        return_lse=lse_too, needs_grad=needs_grad)
    return (out, lse) if return_lse else out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     cache_seqlens: Optional[torch.Tensor] = None, softmax_scale=None,
                     num_splits: Optional[int] = None, return_lse: bool = False,
                     max_seqlen: Optional[int] = None, window: Optional[int] = None, chunk: Optional[int] = None,
                     sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                     key_mask: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                     k_new: Optional[torch.Tensor] = None, v_new: Optional[torch.Tensor] = None,
                     check_values: bool = True):
    """NoPE attention of a few new query rows against a long KV cache, split over the keys (flash-decoding).

    Query row ``i`` of batch ``b`` sits at position ``cache_seqlens[b] - Sq + i`` and sees keys
    ``0 .. that position`` (causal among the new rows). Query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Inference only: no backward.

    Args:
        q: (B, Hq, Sq, D), the Sq newest tokens (1 for decode; any Sq works, tens for chunked prefill
            or speculative steps). fp16, bf16 or fp32; D any multiple of 8 up to 256. Any strides.
        k_cache, v_cache: (B, Hkv, Smax, D), same dtype as q, Hq % Hkv == 0. Any strides (e.g. a view
            of a (B, Smax, Hkv, D) buffer); positions at or past a row's live length are never read.
        cache_seqlens: (B,) int32 (int64 accepted) live lengths *including* the Sq new tokens, on q's
            device; None means every row holds Smax. Each must lie in [Sq, Smax]; checked on the host
            only when the tensor lives on the CPU (no device sync). On the device a length outside
            [0, Smax] gives NaN outputs and LSE for its batch row (never a clamped answer); a length in
            [0, Sq) leaves the rows at negative positions seeing nothing: zeros, LSE -inf.
        softmax_scale: None (D**-0.5), a float in [0, 1e6], or a tensor of such multipliers of shape
            (Sq,), (B, Sq), (Hq,) or (B, Hq, Sq) (DroPE temperature on top of D**-0.5 goes in here).
        num_splits: None picks it with :func:`choose_num_splits` from the capacity Smax (or
            ``max_seqlen``) and the device's SM count, never from ``cache_seqlens``' values, so a
            captured CUDA graph replays for any lengths; an int forces it (capped at one split per
            key tile of the capacity, beyond which extra splits would be empty). Results agree for
            every split count.
        return_lse: also return the natural-log log-sum-exp of the scaled logits, (B, Hq, Sq) fp32.
        max_seqlen: optional host-side int, an upper bound of ``cache_seqlens``, used only to pick the
            split count. Results never depend on it; a wrong hint only costs speed.
        window: sliding window: key j visible to the row at position p iff p - window < j <= p;
            splits then cover only the keys some row can see.
        chunk: chunked attention: visible iff j <= p and j // chunk == p // chunk.
        sinks: (Hq,) logits, one per query head, added to the softmax denominator only.
        softcap: logits become ``softcap * tanh(s / softcap)`` after the scale.
        key_mask: optional (B, Smax), or one row per query (B, Sq, Smax), bool / uint8 / int8: nonzero
            where a cache slot may be attended (left padding, holes, another document or chunk).
        block_table: optional (B, max_pages) int32 page indices: the caches are then paged, (num_pages,
            page_size, Hkv, D) with page_size a multiple of 16, and position p of batch row b is row
            ``p % page_size`` of page ``block_table[b, p // page_size]`` (Smax = max_pages * page_size). Same
            results as the contiguous cache. Entries are range-checked on the host for CPU tensors; on the
            device an index outside the cache is never dereferenced and gives NaN rows.
        k_new, v_new: optional (B, Hkv, Sq, D) keys and values of the Sq new tokens, written into the caches
            (contiguous or paged, in place) at positions ``cache_seqlens[b] - Sq + i`` before attending, in the
            same call (the operator ``drope::kv_append``, then ``drope::decode``).
        check_values: as in :func:`attention` (``cache_seqlens``' range, the scale, the sinks, the block table).

    Returns:
        out (B, Hq, Sq, D) in q's dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        ValueError: on input outside the contract (shapes, dtypes, lengths, scale, num_splits,
            max_seqlen, key_mask), naming the argument; also when an input requires grad with grad
            enabled.
        DeviceError: CPU tensors without ``TRITON_INTERPRET=1`` (a ``ValueError`` subclass).
    """
    shape = check_decode(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                         num_splits=num_splits, kernel=True, max_seqlen=max_seqlen, window=window, chunk=chunk,
                         sinks=sinks, softcap=softcap, key_mask=key_mask, values=check_values, block_table=block_table,
                         k_new=k_new, v_new=v_new)
    if _needs_grad(q, k_cache, v_cache, sinks, k_new, v_new):
        raise ValueError("decode_attention is inference-only (no backward): q/k_cache/v_cache/sinks/k_new/v_new "
                         "require grad; call it under torch.no_grad() or use drope.kernels.attention for a "
                         "differentiable pass")
    if num_splits is None:
        num_splits = num_splits_for(shape, q.device, max_seqlen=max_seqlen, window=window, chunk=chunk)
    const, rows = split_scale(softmax_scale, shape, q.device, torch.float32)
    return run_decode(q, k_cache, v_cache, const, rows, num_splits, cache_seqlens=cache_seqlens, return_lse=return_lse,
                      window=window, chunk=chunk, sinks=sinks, softcap=softcap, key_mask=key_mask,
                      block_table=block_table, k_new=k_new, v_new=v_new)


def run_decode(q, k_cache, v_cache, const: float, rows: Optional[torch.Tensor], num_splits: int, *,
               cache_seqlens=None, return_lse: bool = False, window=None, chunk=None, sinks=None, softcap=None,
               key_mask=None, block_table=None, k_new=None, v_new=None):
    """:func:`decode_attention` on arguments already checked (``const`` / ``rows`` as in :func:`run_attention`,
    ``num_splits`` resolved: :func:`drope.kernels.decode.num_splits_for`)."""
    if k_new is not None:
        ops.kv_append(k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new, cache_seqlens=cache_seqlens,
                      block_table=block_table)
    out, lse = ops.decode(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, scale_rows=rows,
                          sinks=sinks, key_mask=key_mask, scale=float(const), num_splits=num_splits, window=window,
                          chunk=chunk, softcap=None if softcap is None else float(softcap), block_table=block_table)
    return (out, lse) if return_lse else out


def attention_with_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                         cache_seqlens: Optional[torch.Tensor] = None, softmax_scale=None,
                         q_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6,
                         window: Optional[int] = None, chunk: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
                         softcap: Optional[float] = None, key_mask: Optional[torch.Tensor] = None,
                         return_lse: bool = False, check_values: bool = True):
    """Sq new query rows against a KV cache of Smax slots: the kernels pick the fused forward or the split-KV one.

    Semantics are :func:`decode_attention`'s (query row i of batch b at position ``cache_seqlens[b] - Sq + i``,
    keys ``0 .. that position``, windows, chunks, sinks, soft-cap, key masks of (B, Smax) or (B, Sq, Smax)), plus a
    per-head query RMSNorm (``q_norm_weight``, (D,) or (Hq, D)) and a backward. The choice reads shapes and the
    autograd state only, never tensor values:

    - a gradient: the fused forward (differentiable). With ``cache_seqlens`` the rows of each batch row are packed
      as one document of its live keys (eager only: the packing needs the lengths on the host, a sync on a GPU;
      under torch.compile it raises). A per-row key mask has no backward and is refused;
    - no gradient, ``cache_seqlens=None`` (every slot live), a (B, Smax) or no key mask, and
      :func:`drope.kernels.decode.prefer_fused` (the compiled kernels' instruction counts): the fused forward;
    - otherwise the split-KV kernel (the query norm first, :func:`qk_norm_rope`).

    Returns:
        out (B, Hq, Sq, D) in q's dtype, or ``(out, lse)`` with ``return_lse``.

    Raises:
        ValueError: input outside :func:`decode_attention`'s contract (naming the argument), a ``q_norm_weight`` of
            the wrong shape, a per-row key mask with a gradient, or lengths under torch.compile with a gradient.
    """
    shape = check_decode(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                         num_splits=None, kernel=True, window=window, chunk=chunk, sinks=sinks, softcap=softcap,
                         key_mask=key_mask, values=check_values)
    check_norm_weight("q_norm_weight", q_norm_weight, shape.HQ, shape.D, q)
    kw = dict(window=window, chunk=chunk, sinks=sinks, softcap=softcap, return_lse=return_lse)
    grad = _needs_grad(q, k_cache, v_cache, q_norm_weight, sinks)
    if grad and key_mask is not None and key_mask.dim() == 3:
        raise ValueError("attention_with_cache: a per-row key_mask (B, Sq, Smax) has no backward; pass a (B, Smax) "
                         "key mask, or call it without grad")
    if grad and cache_seqlens is not None:
        return _packed_rows(q, k_cache, v_cache, cache_seqlens, shape, softmax_scale, q_norm_weight, norm_eps,
                            key_mask, kw)
    const, rows = split_scale(softmax_scale, shape, q.device)
    if grad or (cache_seqlens is None and (key_mask is None or key_mask.dim() == 2)
                and prefer_fused(shape.G, shape.SQ)):
        return run_attention(q, k_cache, v_cache, const, rows, q_norm_weight=q_norm_weight, norm_eps=norm_eps,
                             key_mask=key_mask, **kw)
    if q_norm_weight is not None:
        q = qk_norm_rope(q, q_norm_weight, eps=norm_eps)
    splits = num_splits_for(shape, q.device, window=window, chunk=chunk)
    return run_decode(q, k_cache, v_cache, const, rows, splits, cache_seqlens=cache_seqlens, key_mask=key_mask,
                      **kw)


def _packed_rows(q, k_cache, v_cache, cache_seqlens, shape, softmax_scale, q_norm_weight, norm_eps, key_mask, kw):
    """The differentiable path with ragged lengths: batch row b's Sq queries and its live keys as document b of one
    packed row (the fused forward's ``cu_seqlens`` / ``cu_seqlens_k``); the lengths are read on the host."""
    if torch.compiler.is_compiling():
        raise ValueError("attention_with_cache: a gradient with cache_seqlens (a StaticCache or padding) needs the "
                         "lengths on the host, and under torch.compile the live length is a device value; pass "
                         "cache_seqlens=None (every slot live) with a (B, Smax) key_mask, or run eagerly")
    B, HQ, SQ, D = q.shape
    lens = [int(n) for n in cache_seqlens.tolist()]
    dev = q.device
    cu_q = torch.arange(0, (B + 1) * SQ, SQ, dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
    keys = [torch.cat([t[b, :, :n] for b, n in enumerate(lens)], 1)[None] for t in (k_cache, v_cache)]
    km = None if key_mask is None else torch.cat([key_mask[b, :n] for b, n in enumerate(lens)])[None]
    scale = softmax_scale
    if isinstance(softmax_scale, torch.Tensor):
        const, rows = split_scale(softmax_scale, shape, dev)
        scale = (rows * const).transpose(0, 1).reshape(1, HQ, B * SQ)
    out = attention(q.transpose(0, 1).reshape(1, HQ, B * SQ, D), *keys, softmax_scale=scale,
                    q_norm_weight=q_norm_weight, norm_eps=norm_eps, key_mask=km, cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                    check_values=False, **kw)
    if kw["return_lse"]:
        out, lse = out
        return out.view(HQ, B, SQ, D).transpose(0, 1), lse.view(HQ, B, SQ).transpose(0, 1)
    return out.view(HQ, B, SQ, D).transpose(0, 1)


def qk_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *, pos0: int = 0,
                 eps: float = 1e-6) -> torch.Tensor:
    """The attention kernels' QK prologue alone: ``rope(rms_norm(x) * weight)`` per head, one O(S*D) pass.

    Args:
        x: (B, H, S, D) queries or keys, fp16 / bf16 / fp32, any strides.
        weight: optional RMSNorm weight, (D,) or (H, D); None skips the norm.
        rope: optional ``(cos, sin)`` tables of shape (>= pos0 + S, D/2); row s sits at position pos0 + s.
        pos0: position of row 0.
        eps: RMSNorm epsilon.

    Returns:
        A new contiguous (B, H, S, D) tensor in x's dtype, differentiable in x and the weight
        (the operator ``drope::qk_norm_rope`` under torch.compile).

    Raises:
        ValueError: bad shapes, dtypes or devices, a table shorter than pos0 + S, a negative pos0.
    """
    shape = check_qkv(x, x, x, kernel=True)
    if isinstance(pos0, bool) or not isinstance(pos0, int) or pos0 < 0:
        raise ValueError(f"pos0 must be an int >= 0, got {pos0!r}")
    check_rope(rope, pos0 + shape.SQ, shape.D, x)
    check_norm_weight("weight", weight, shape.HQ, shape.D, x)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if rope is not None and shape.D % 2:
        raise ValueError(f"rope needs an even head dim, got D={shape.D}")
    cos, sin = _tables(rope)
    return ops.qk_norm_rope(x=x, weight=weight, rope_cos=cos, rope_sin=sin, pos0=pos0, eps=float(eps),
                            needs_grad=_needs_grad(x, weight))
