"""The ``"drope_triton"`` attention implementation for Hugging Face transformers.

``register()`` (run on ``import drope``) adds one entry to transformers' ``AttentionInterface`` and
one to ``AttentionMaskInterface``; ``from_pretrained(..., attn_implementation="drope_triton")`` and
``model.set_attn_implementation("drope_triton")`` then route every attention layer here.

The mask function does not build an (Sq, Sk) mask. It returns None (every key slot is live and
real) or a contiguous (B, L) bool tensor: L = cached + new tokens (the live slots; a StaticCache
has more, which are never attended) and True where the token is real (not padding). The attention
function then picks the kernel:

- packed documents (``cu_seq_lens_q``/``cu_seq_lens_k`` from ``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)``, or ``position_ids`` restarting inside rows, no padding mask,
  no cached prefix): the fused kernel in its ``cu_seqlens`` mode (several rows are flattened into one);
- no padding: the fused kernel (prefill, causal bottom-right), or the split-KV decode kernel for a
  few new queries against the cache;
- padding without a cached prefix (prefill of a padded batch): the real tokens are unpadded into
  packed documents (``cu_seqlens``) and the result scattered back (padding rows are zeros);
- padding with a cache and a few new real queries (decoding a left-padded batch): the real keys of
  each row are gathered to the front and the decode kernel reads them with ``cache_seqlens``;
- anything else (a padded chunk after a cache): one fused call per row.

So a left-padded batch computes exactly what each prompt computes alone. CPU tensors go to the
kernels when Triton's interpreter is on (``TRITON_INTERPRET=1``), else to ``drope.reference`` with a
one-time warning. Ordinary RoPE models work too (transformers applies their RoPE before the call).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import reference
from ..validation import interpreter_enabled

__all__ = ["ATTN_IMPLEMENTATION", "DECODE_MAX_QUERIES", "drope_attention_forward", "drope_mask", "register"]

ATTN_IMPLEMENTATION = "drope_triton"
# At most this many new queries against a longer cache go to the split-KV decode kernel.
DECODE_MAX_QUERIES = 16

_warned = {"fallback": False, "attentions": False}


def _ops(device: torch.device):
    """The kernels module for CUDA (or CPU under the interpreter), else the reference with a warning."""
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        from .. import kernels

        return kernels
    if not _warned["fallback"]:
        _warned["fallback"] = True
        warnings.warn(
            f"drope_triton: tensors on {device} and Triton's interpreter is off (TRITON_INTERPRET unset); "
            "running the pure-PyTorch drope.reference instead of the Triton kernels (slow). Move the model to a "
            "CUDA GPU for the kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    return reference


def drope_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
               kv_offset=0, mask_function=None, attention_mask: Optional[torch.Tensor] = None,
               cache_position: Optional[torch.Tensor] = None, device=None, **kwargs) -> Optional[torch.Tensor]:
    """Mask function of ``"drope_triton"`` (the ``AttentionMaskInterface`` entry).

    Args:
        batch_size: B.
        q_length: number of new tokens (queries). Older transformers pass ``cache_position``
            (the new tokens' cache slots) instead; both are accepted.
        kv_length: number of key slots the layer hands to attention (a StaticCache: its capacity).
        q_offset: cache slot of the first query (tokens already cached).
        kv_offset: slot of the first key (non-zero only for sliding windows).
        mask_function: the causal pattern; ``"drope_triton"`` is causal by construction.
        attention_mask: the 2-D (B, cached + new) padding mask of the model call, or None.
        cache_position: see ``q_length``.
        device: where to create a mask when there is no ``attention_mask``.

    Returns:
        None when all ``kv_length`` slots are live real tokens, else a contiguous (B, L) bool tensor
        (L = live slots, True = real token) that the attention function reads.

    Raises:
        ValueError: neither ``q_length`` nor ``cache_position`` given.
    """
    if q_length is None:
        if cache_position is None:
            raise ValueError("drope_mask needs q_length (recent transformers) or cache_position (older releases)")
        q_length = int(cache_position.shape[0])
        q_offset = cache_position[0] if q_length else 0
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    live = q_offset + q_length - kv_offset
    if kv_length is None:
        kv_length = live
    if attention_mask is None:
        if live == kv_length:
            return None
        return torch.ones(batch_size, live, dtype=torch.bool, device=device)
    mask = attention_mask.to(torch.bool)
    end = kv_offset + live
    if mask.shape[-1] < end:
        # as transformers does: slots the 2-D mask does not cover are not attended
        mask = torch.nn.functional.pad(mask, (0, end - mask.shape[-1]), value=False)
    mask = mask[:, kv_offset:end].contiguous()
    all_real = bool(mask.all())
    if all_real and live == kv_length:
        return None
    mask._drope_plan = {"all_real": all_real}
    return mask


def _plan(mask: torch.Tensor) -> dict:
    plan = getattr(mask, "_drope_plan", None)
    if plan is None:
        plan = {"all_real": bool(mask.all())}
        mask._drope_plan = plan
    return plan


def _packed_from_positions(position_ids: Optional[torch.Tensor], B: int, S: int) -> Optional[torch.Tensor]:
    """cu_seqlens (int32) over the B*S flattened tokens when positions restart inside a row (packed
    documents), else None. Rows are documents' boundaries too."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != S or S < 2:
        return None
    pos = position_ids.expand(B, S)
    inner = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(inner.any()):
        return None
    starts = torch.ones(B, S, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = inner
    edges = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([edges, edges.new_full((1,), B * S)]).to(torch.int32)


def _norm_rows(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Per-head RMSNorm in fp32 (what the kernel does in its prologue), back in x's dtype."""
    if weight is None:
        return x
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _scatter_rows(n: int, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A (n, ...) tensor of zeros with rows ``idx`` taken from ``src`` (out of place, differentiable)."""
    out = src.new_zeros((n,) + tuple(src.shape[1:]))
    return out.index_copy(0, idx, src)


def _attention_padded(ops, q, k, v, valid, scale, w, eps):
    """Causal attention over the real tokens of each row; (B, Hq, Sq, D) with zeros on padding rows."""
    B, HQ, SQ, D = q.shape
    HKV = k.shape[1]
    L = valid.shape[1]
    plan = _plan(valid)
    rows = scale if isinstance(scale, torch.Tensor) else None
    if SQ == L:
        # prefill of a padded batch: unpad into packed documents, one per row with real tokens
        if "packed" not in plan:
            idx = torch.nonzero(valid.reshape(-1)).flatten()
            counts = valid.sum(1)
            counts = counts[counts > 0]
            cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=valid.device)
            cu[1:] = counts.cumsum(0)
            plan["packed"] = (idx, cu)
        idx, cu = plan["packed"]
        if idx.numel() == 0:
            return q.new_zeros(B, HQ, SQ, D)
        qp = q.transpose(1, 2).reshape(B * L, HQ, D)[idx].transpose(0, 1).unsqueeze(0)
        kp = k[:, :, :L].transpose(1, 2).reshape(B * L, HKV, D)[idx].transpose(0, 1).unsqueeze(0)
        vp = v[:, :, :L].transpose(1, 2).reshape(B * L, HKV, D)[idx].transpose(0, 1).unsqueeze(0)
        sp = scale if rows is None else rows.reshape(-1)[idx].unsqueeze(0)
        op = ops.attention(qp, kp, vp, causal=True, softmax_scale=sp, q_norm_weight=w, norm_eps=eps, cu_seqlens=cu)
        out = _scatter_rows(B * L, idx, op[0].transpose(0, 1))  # (B*L, Hq, D)
        return out.view(B, L, HQ, D).transpose(1, 2)
    if "queries_real" not in plan:
        plan["queries_real"] = {}
    if SQ not in plan["queries_real"]:
        plan["queries_real"][SQ] = bool(valid[:, L - SQ:].all())
    if SQ <= DECODE_MAX_QUERIES and plan["queries_real"][SQ]:
        # decoding a padded batch: each row's real keys to the front, read with cache_seqlens
        if "gather" not in plan:
            counts = valid.sum(1)
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
            plan["gather"] = (order[:, : int(counts.max())], counts.to(torch.int32))
        order, counts = plan["gather"]
        n = order.shape[1]
        kc = k.gather(2, order[:, None, :, None].expand(B, HKV, n, D))
        vc = v.gather(2, order[:, None, :, None].expand(B, HKV, n, D))
        return ops.decode_attention(_norm_rows(q, w, eps), kc, vc, cache_seqlens=counts, softmax_scale=scale,
                                    max_seqlen=n)
    outs = []
    for b in range(B):
        kv_idx = torch.nonzero(valid[b]).flatten()
        q_idx = torch.nonzero(valid[b, L - SQ:]).flatten()
        if q_idx.numel() == 0:
            outs.append(q.new_zeros(1, HQ, SQ, D))
            continue
        sb = scale if rows is None else rows[b:b + 1, q_idx]
        ob = ops.attention(q[b:b + 1, :, q_idx], k[b:b + 1, :, kv_idx], v[b:b + 1, :, kv_idx], causal=True,
                           softmax_scale=sb, q_norm_weight=w, norm_eps=eps)
        outs.append(q.new_zeros(1, HQ, SQ, D).index_copy(2, q_idx, ob))
    return torch.cat(outs, dim=0)


def drope_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                            drope_q_norm_weight: Optional[torch.Tensor] = None, drope_norm_eps: float = 1e-6,
                            drope_row_scale: Optional[torch.Tensor] = None, **kwargs):
    """Attention function of ``"drope_triton"`` (the ``AttentionInterface`` entry).

    Args:
        module: the calling attention module (reads ``is_causal`` and ``training``).
        query: (B, Hq, Sq, D), RoPE already applied by the model if it has RoPE.
        key, value: (B, Hkv, Sk, D), the cache's full buffers when a cache is used.
        attention_mask: what :func:`drope_mask` returned (None or a (B, L) bool tensor).
        dropout: must be 0 in training (the kernels have no attention dropout).
        scaling: the base softmax scale (None = D**-0.5).
        sliding_window, softcap: not supported (ValueError when set).
        is_causal: overrides ``module.is_causal``.
        drope_q_norm_weight: per-head query RMSNorm weight (D,) or (Hq, D) fused into the kernel
            (DroPE models with ``qk_norm_type="head"``); keys arrive normalised.
        drope_norm_eps: its epsilon.
        drope_row_scale: (B, Sq) temperature multipliers on top of ``scaling``.
        **kwargs: ``position_ids``, packed-batch ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/
            ``max_length_k``; others are ignored.

    Returns:
        ``(out, None)`` with ``out`` (B, Sq, Hq, D) in the query's dtype.

    Raises:
        ValueError: attention dropout in training, a sliding window or softcap, a 4-D or non-bool
            mask (not made by :func:`drope_mask`), a padding mask with non-causal attention, packed
            kwargs on a batch larger than one or with a mask.
    """
    if dropout and module.training:
        raise ValueError(f"drope_triton has no attention dropout; set config.attention_dropout=0 (got {dropout})")
    if sliding_window is not None:
        raise ValueError(f"drope_triton does not support sliding-window attention (got sliding_window={sliding_window})")
    if softcap is not None:
        raise ValueError(f"drope_triton does not support logit softcapping (got softcap={softcap})")
    if kwargs.get("output_attentions") and not _warned["attentions"]:
        _warned["attentions"] = True
        warnings.warn("drope_triton does not return attention weights; use attn_implementation='eager' for them")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
                                       or attention_mask.dtype != torch.bool):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"drope_triton takes the (B, L) bool masks of its own mask function, got {got}; custom 4-D masks need "
            "attn_implementation='sdpa' or 'eager'"
        )
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    # bf16 mixed-precision training: fp32 norm weights promote q/k to fp32 while v stays in the autocast
    # dtype; run the kernel in the autocast dtype, as autocast does for SDPA
    if torch.is_autocast_enabled(query.device.type):
        dt = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    B, HQ, SQ, D = query.shape
    SK = key.shape[2]
    ops = _ops(query.device)
    base = float(D ** -0.5 if scaling is None else scaling)
    scale = base
    if drope_row_scale is not None:
        scale = (drope_row_scale.to(device=query.device, dtype=torch.float32) * base).expand(B, SQ)
    w, eps = drope_q_norm_weight, float(drope_norm_eps)

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and attention_mask is None and SQ == SK and SQ > 1:
        cu = _packed_from_positions(kwargs.get("position_ids"), B, SQ)
        if cu is not None and B > 1:
            # rows of packed documents: one flattened row, documents never cross a row
            flat = [t.transpose(0, 1).reshape(t.shape[1], B * SQ, D)[None] for t in (query, key, value)]
            rows = scale.reshape(1, B * SQ) if isinstance(scale, torch.Tensor) else scale
            out = ops.attention(*flat, causal=causal, softmax_scale=rows, q_norm_weight=w, norm_eps=eps,
                                cu_seqlens=cu.to(query.device))
            return out[0].reshape(HQ, B, SQ, D).permute(1, 2, 0, 3).contiguous(), None
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if B != 1 or attention_mask is not None or SQ != SK:
            raise ValueError(
                f"packed sequences (cu_seq_lens_q) need one flattened row without padding mask or cache; got batch {B}, "
                f"Sq={SQ}, Sk={SK}, mask {'set' if attention_mask is not None else 'None'}"
            )
        cu = cu.to(device=query.device, dtype=torch.int32)
        if cu_k is not None and not torch.equal(cu_k.to(device=cu.device, dtype=torch.int32), cu):
            raise ValueError("drope_triton needs cu_seq_lens_k == cu_seq_lens_q (self-attention over packed documents)")
        out = ops.attention(query, key, value, causal=causal, softmax_scale=scale, q_norm_weight=w, norm_eps=eps,
                            cu_seqlens=cu)
        return out.transpose(1, 2).contiguous(), None

    L = SK if attention_mask is None else attention_mask.shape[1]
    if L > SK:
        raise ValueError(f"drope_triton mask covers {L} key slots but the layer has only {SK}")
    if attention_mask is None or _plan(attention_mask)["all_real"]:
        if causal and SQ < L and SQ <= DECODE_MAX_QUERIES:
            seqlens = None if L == SK else torch.full((B,), L, dtype=torch.int32, device=query.device)
            out = ops.decode_attention(_norm_rows(query, w, eps), key, value, cache_seqlens=seqlens,
                                       softmax_scale=scale, max_seqlen=L)
        else:
            out = ops.attention(query, key[:, :, :L], value[:, :, :L], causal=causal, softmax_scale=scale,
                                q_norm_weight=w, norm_eps=eps)
        return out.transpose(1, 2).contiguous(), None
    if not causal:
        raise ValueError("drope_triton supports padding masks with causal attention only")
    out = _attention_padded(ops, query, key, value, attention_mask, scale, w, eps)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"drope_triton"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, drope_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, drope_mask)
