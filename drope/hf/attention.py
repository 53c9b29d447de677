"""The ``"drope_triton"`` attention implementation for Hugging Face transformers: an adapter, not a dispatcher.

``register()`` (run by ``import drope``, at once or when transformers is first imported) adds one entry to
transformers' ``AttentionInterface`` and one to ``AttentionMaskInterface``; ``from_pretrained(...,
attn_implementation="drope_triton")``, ``model.set_attn_implementation("drope_triton")`` and
``model.config.attn_implementation = "drope_triton"`` then route every attention layer here.

What the layer computes is what ``"eager"`` computes for the same model and call. The mask function
(:func:`drope.hf.masks.drope_mask`, once per forward) gives key-slot codes; this function translates transformers'
arguments into drope's and makes one of two kernel calls, routed on shapes only:

- queries = key slots (prefill): :func:`drope.kernels.attention`, the codes as its ``key_mask``; segments (packed
  documents, unaligned chunks) become the documents of one packed row (``cu_seqlens`` of fixed size, built on the
  device), as do transformers' ``cu_seq_lens_q`` (``DataCollatorWithFlattening``);
- fewer queries than slots (a cache): :func:`drope.kernels.attention_with_cache`, the live lengths and key mask
  from the codes; the kernels choose the fused or the split-KV kernel.

The window and chunk come from the model (the ``sliding_window`` argument, the config's ``layer_types``), sinks
(``s_aux``) and ``softcap`` are passed through, a DroPE layer's query norm and temperature rows too. The kernels run
on every device they support (CUDA; CPU: Triton's interpreter or drope's exact PyTorch kernels). Nothing here reads a
device value on the host, so ``torch.compile(fullgraph=True)`` traces a forward as one graph and a static-cache
decode step never recompiles.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import kernels
from ..validation import host_values
from .masks import OTHERS, PAD, PerForward, drope_mask, install_config_attribute

__all__ = ["ATTN_IMPLEMENTATION", "drope_attention_forward", "drope_mask", "register"]

ATTN_IMPLEMENTATION = "drope_triton"

_warned = {"attentions": False}
# what the layers of one forward share, derived once: the key mask / lengths of the codes, the temperature rows
_CODES, _ROWS = PerForward(), PerForward()


def _checked_mask(attention_mask, B: int, SK: int) -> Optional[torch.Tensor]:
    """:func:`drope_mask`'s (B, 1, 1, Sk) codes as given, or None; anything else raises."""
    if attention_mask is None:
        return None
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype in (torch.int8, torch.int32)
            and attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1)):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"drope_triton takes the masks of its own mask function (drope_mask), got {got}; custom 4-D "
                         f"masks need {OTHERS}")
    if attention_mask.shape[0] != B or attention_mask.shape[3] != SK:
        raise ValueError(f"drope_triton mask was made for batch {attention_mask.shape[0]} and "
                         f"{attention_mask.shape[3]} key slots; the layer has batch {B} and {SK}")
    return attention_mask


def _layer_pattern(module, sliding_window) -> tuple:
    """(window, chunk) of the calling layer: the sliding_window argument when the model passes one; else the
    config's layer_types ("sliding_attention" / "chunked_attention"); else, for models whose every layer
    slides (Mistral, PhiMoE, Starcoder2: no layer_types), the config's sliding_window."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    kind = layer_types[idx] if layer_types is not None and idx is not None and idx < len(layer_types) else None
    window = sliding_window
    if window is None and (kind == "sliding_attention" or (
            layer_types is None and getattr(config, "use_sliding_window", True))):
        window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None) if kind == "chunked_attention" else None
    return (None if window is None else int(window)), (None if chunk is None else int(chunk))


def _segments_as_documents(codes: torch.Tensor, S: int) -> torch.Tensor:
    """(B*S + 1,) int32 ``cu_seqlens`` of the batch's rows flattened into one, each segment a document (rows never
    share one), padded with empty documents to a fixed size: built on the device, no host sync."""
    B = codes.shape[0]
    total = B * S
    seg = codes.to(torch.int64) + (torch.arange(B, device=codes.device) * (S + 2))[:, None]
    starts = torch.ones(B, S, dtype=torch.bool, device=codes.device)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = torch.arange(total, device=codes.device)
    first = torch.where(starts.reshape(-1), idx, total).sort().values
    return torch.cat([first, first.new_full((1,), total)]).to(torch.int32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (1, H, B*S, D): the batch's rows as one packed row."""
    B, H, S, D = t.shape
    return t.transpose(1, 2).reshape(1, B * S, H, D).transpose(1, 2)


def _cache_view(codes: torch.Tensor, SQ: int, segments: bool) -> tuple:
    """From the (B, Sk) codes: each row's live length (real and padding slots: the new rows are its last SQ) and the
    key mask (attendable slots; one per query row with segments: a row sees only its own segment)."""
    lengths = (codes >= PAD).sum(1, dtype=torch.int32)
    km = codes >= 0
    if segments:
        slot = lengths[:, None] - SQ + torch.arange(SQ, device=codes.device)[None, :]
        own = codes.gather(1, slot.clamp(0, codes.shape[1] - 1).to(torch.int64))  # (B, Sq) the rows' segments
        km = km[:, None, :] & (codes[:, None, :] == own[:, :, None])
    return lengths, km


def _autocast(query, key, value):
    """bf16 mixed-precision training: fp32 norm weights promote q/k to fp32 while v stays in the autocast
    dtype; run attention in the autocast dtype, as autocast does for SDPA."""
    if torch.is_autocast_enabled(query.device.type):
        dt = torch.get_autocast_dtype(query.device.type)
        return query.to(dt), key.to(dt), value.to(dt)
    return query, key, value


def drope_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                            s_aux: Optional[torch.Tensor] = None,
                            drope_q_norm_weight: Optional[torch.Tensor] = None, drope_norm_eps: float = 1e-6,
                            drope_row_scale: Optional[torch.Tensor] = None, **kwargs):
    """Attention function of ``"drope_triton"`` (the ``AttentionInterface`` entry).

    Args:
        module: the calling attention module (reads ``is_causal``, ``training``, ``config``, ``layer_idx``).
        query: (B, Hq, Sq, D), RoPE already applied by the model if it has RoPE.
        key, value: (B, Hkv, Sk, D), the cache's buffers when a cache is used.
        attention_mask: what :func:`drope_mask` returned (None or key-slot codes), or None for a direct call.
        dropout: must be 0 in training (the kernels have no attention dropout).
        scaling: the base softmax scale (None = D**-0.5).
        sliding_window: the layer's window (``p - W < j <= p`` in key slots); None reads the config.
        softcap: logit soft-capping ``c * tanh(s / c)`` (Gemma 2).
        is_causal: overrides ``module.is_causal``.
        s_aux: attention sinks (Hq,), one logit per head added to the softmax denominator (GPT-OSS).
        drope_q_norm_weight: per-head query RMSNorm weight (D,) or (Hq, D) fused into the kernel
            (DroPE models with ``qk_norm_type="head"``); keys arrive normalised.
        drope_norm_eps: its epsilon.
        drope_row_scale: (B, Sq) temperature multipliers on top of ``scaling``, or (B, Hq, Sq) with a
            per-head temperature.
        **kwargs: packed-batch ``cu_seq_lens_q``/``cu_seq_lens_k``; others are ignored.

    Returns:
        ``(out, None)`` with ``out`` (B, Sq, Hq, D) in the query's dtype; query rows that see no key are zeros.

    Raises:
        ValueError: attention dropout in training; a mask not made by :func:`drope_mask` or made for another
            batch or key length; non-causal attention; packed kwargs on a batch larger than one or with a
            mask; gradients through a StaticCache step under torch.compile.
    """
    if dropout and module.training:
        raise ValueError(f"drope_triton has no attention dropout; set config.attention_dropout=0 (got {dropout}) or "
                         f"use {OTHERS}")
    if kwargs.get("output_attentions") and not _warned["attentions"]:
        _warned["attentions"] = True
        warnings.warn(f"drope_triton does not return attention weights; use {OTHERS} for them")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError(f"drope_triton supports causal attention only (the module has is_causal=False); use {OTHERS}")
    query, key, value = _autocast(query, key, value)
    B, HQ, SQ, D = query.shape
    SK = key.shape[2]
    mask = _checked_mask(attention_mask, B, SK)
    segments = mask is not None and mask.dtype == torch.int32
    window, chunk = _layer_pattern(module, sliding_window)
    base = float(D ** -0.5 if scaling is None else scaling)
    scale = base
    if drope_row_scale is not None:
        # (B, Sq) or (B, Hq, Sq) multipliers times the base scale, (B, 1 or Hq, Sq): once per forward
        scale = _ROWS.get(drope_row_scale, base, lambda: (
            drope_row_scale.to(torch.float32) * base).view(B, -1, SQ).expand(B, -1, SQ))
    # the layer builds its scales, lengths and boundaries itself: no value checks (on a CPU they would read them)
    kw = dict(softmax_scale=scale, q_norm_weight=drope_q_norm_weight, norm_eps=float(drope_norm_eps), window=window,
              chunk=None if segments else chunk, sinks=s_aux, softcap=None if softcap is None else float(softcap),
              check_values=False)
    cu = kwargs.get("cu_seq_lens_q")
    if SQ > SK:
        raise ValueError(f"drope_triton got {SQ} queries but only {SK} key slots")
    if SQ < SK:
        if cu is not None:
            raise ValueError(f"packed sequences (cu_seq_lens_q) need one flattened row without a cache; got Sq={SQ}, "
                             f"Sk={SK}")
        lengths, km = (None, None) if mask is None else _CODES.get(mask, SQ, lambda: _cache_view(mask[:, 0, 0], SQ,
                                                                                                  segments))
        out = kernels.attention_with_cache(query, key, value, cache_seqlens=lengths, key_mask=km, **kw)
        return out.transpose(1, 2).contiguous(), None
    q, k, v, docs = query, key, value, {}
    if cu is not None:
        # DataCollatorWithFlattening(return_flash_attn_kwargs=True): the documents of cu_seq_lens are the segments
        # transformers found in position_ids (int32 codes); padding has no such form
        if B != 1 or (mask is not None and not segments):
            raise ValueError(f"packed sequences (cu_seq_lens_q) need one flattened row without padding; got batch {B}"
                             f"{' and a padding mask' if mask is not None else ''}")
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and host_values(cu_k) and not torch.equal(cu_k.to(cu.device, torch.int32),
                                                                      cu.to(torch.int32)):
            raise ValueError("drope_triton needs cu_seq_lens_k == cu_seq_lens_q (self-attention over packed documents)")
        docs = dict(cu_seqlens=cu.to(device=query.device, dtype=torch.int32))
        kw["chunk"] = chunk  # positions restart in every document, chunks with them
    elif segments:
        codes = mask[:, 0, 0]
        q, k, v = _flat(query), _flat(key), _flat(value)
        docs = dict(cu_seqlens=_segments_as_documents(codes, SQ), key_mask=(codes >= 0).reshape(1, B * SQ))
        if isinstance(scale, torch.Tensor):
            kw["softmax_scale"] = scale.transpose(0, 1).reshape(1, scale.shape[1], B * SQ)
    elif mask is not None:
        docs = dict(key_mask=_CODES.get(mask, None, lambda: mask[:, 0, 0] >= 0))
    out = kernels.attention(q, k, v, causal=True, **kw, **docs)
    if segments and cu is None:
        out = out.view(HQ, B, SQ, D).transpose(0, 1)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"drope_triton"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``, and
    make ``config.attn_implementation = name`` work (:func:`install_config_attribute`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, drope_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, drope_mask)
    install_config_attribute()



