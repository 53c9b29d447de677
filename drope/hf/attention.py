"""The ``"drope_triton"`` attention implementation for Hugging Face transformers.

``register()`` (run by ``import drope``, at once or when transformers is first imported) adds one entry to
transformers' ``AttentionInterface`` and one to ``AttentionMaskInterface``; ``from_pretrained(...,
attn_implementation="drope_triton")``, ``model.set_attn_implementation("drope_triton")`` and
``model.config.attn_implementation = "drope_triton"`` then route every attention layer here.

What the layer computes is what ``"eager"`` computes for the same model and call. It is built for the fast
path: no host synchronisation and no data-dependent Python for prefill (with or without padding) and for
decoding with a DynamicCache or a StaticCache, so ``torch.compile(fullgraph=True)`` traces a forward as one
graph, a static-cache decode step never recompiles, and a CUDA graph can capture it.

The mask function (:func:`drope_mask`), called once per forward and mask type, turns what the 2-D
``attention_mask`` and the cache say into one small device tensor, the **key-slot codes**: shape
(B, 1, 1, Sk) (4-D, so transformers hands it back unchanged, generate's precomputed masks included), one
code per key slot: ``>= 0`` attendable (its segment id), ``-1`` padding, ``-2`` past the live length of a
StaticCache. int8 codes mean one segment; int32 codes carry segments (packed documents found by
transformers, chunks not aligned with the slots) read from the mask function itself by evaluating it on
each slot's predecessor. ``None`` means every slot is a live, real token.

The attention function reads the window and chunk from the model (the ``sliding_window`` argument, the
config's ``layer_types``), not from the mask, and routes on shapes only:

- queries = every key slot (prefill): the fused kernel, with the codes as its ``key_mask``; segments become
  documents of one packed row (``cu_seqlens`` of fixed size, built on the device);
- fewer queries than key slots: the split-KV decode kernel, lengths and key mask from the codes (one key
  mask per query row with segments); without codes and more than :data:`DECODE_MAX_QUERIES` queries, the
  fused kernel bottom-right aligned; under autograd (decode has no backward) the fused kernel too.

GPT-OSS sinks (``s_aux``) and Gemma 2's ``softcap`` go to the kernels' ``sinks`` / ``softcap``. CUDA tensors
(and CPU tensors under ``TRITON_INTERPRET=1``) run :mod:`drope.kernels` (through :mod:`drope.hf.kernel_path`, which
skips the per-call argument checks of what this layer builds itself); other CPU tensors run
:mod:`drope.hf.sdpa_path`, an exact path on ``torch.nn.functional.scaled_dot_product_attention``. Ordinary
RoPE models work too (transformers applies their RoPE before the call).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional

import torch
from transformers.masking_utils import causal_mask_function, or_masks

from .. import reference
from ..validation import compiling, host_values, interpreter_enabled
from . import kernel_path, sdpa_path

__all__ = ["ATTN_IMPLEMENTATION", "DECODE_MAX_QUERIES", "drope_attention_forward", "drope_mask", "register"]

ATTN_IMPLEMENTATION = "drope_triton"
# Without key-slot codes, at most this many new queries against a longer cache go to the split-KV kernel.
DECODE_MAX_QUERIES = 16
_OTHERS = "attn_implementation='eager' or 'sdpa'"
PAD, DEAD = -1, -2

_warned = {"attentions": False}
# transformers' or_masks closures (a union of patterns: image tokens, prefixes), told apart by their code object:
# under torch.compile a mask function's closure cannot be read, its __code__ can
_OR_MASKS_CODE = or_masks(causal_mask_function).__code__


def _ops(device: torch.device):
    """The kernels (:mod:`drope.hf.kernel_path`) for CUDA, or CPU under the interpreter; else the exact SDPA path."""
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return kernel_path
    if device.type == "cpu":
        return sdpa_path
    raise ValueError(f"drope_triton runs on CUDA or CPU tensors, got {device}; use {_OTHERS}")


def _closure(fn: Callable) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def _read_pattern(mask_function: Optional[Callable], attention_mask) -> dict:
    """Eager: the parts of transformers' mask-function tree (and_masks of causal, sliding-window, chunked and
    packed-sequence functions, maybe under a packed-position remap); anything else raises."""
    found = {"causal": mask_function is None, "chunk": None, "packed": False}

    def walk(fn):
        name = getattr(fn, "__qualname__", type(fn).__name__)
        cells = _closure(fn)
        if name == "causal_mask_function":
            found["causal"] = True
        elif name.startswith("and_masks.") and "mask_functions" in cells:
            for inner in cells["mask_functions"]:
                walk(inner)
        elif name.startswith("sliding_window_overlay."):
            pass  # the window is read from the model (the sliding_window argument, layer_types)
        elif name.startswith("chunked_overlay.") and "chunk_size" in cells:
            found["chunk"] = int(cells["chunk_size"])
        elif name.startswith("padding_mask_function.") and "padding_mask" in cells:
            # older transformers fold the 2-D attention_mask into the tree as well
            pad = cells["padding_mask"]
            # the values are compared only where that reads no device (a CPU mask): transformers builds this
            # function from the call's own attention_mask
            if attention_mask is None or not (pad is attention_mask or (
                    pad.shape[0] == attention_mask.shape[0] and pad.shape[-1] >= attention_mask.shape[-1]
                    and (not host_values(pad)
                         or torch.equal(pad[:, :attention_mask.shape[-1]].bool(), attention_mask.bool())))):
                raise ValueError("drope_triton: the mask function carries a padding mask other than the call's "
                                 f"attention_mask; use {_OTHERS}")
        elif name.startswith("packed_sequence_mask_function."):
            found["packed"] = True
        elif name.startswith("remap_positions_for_packed_sequence.") and "mask_function" in cells:
            walk(cells["mask_function"])
        else:
            raise ValueError(
                f"drope_triton cannot express the attention mask pattern {name!r} (only causal, sliding-window, "
                f"chunked and packed-sequence masks); use {_OTHERS} or 'flex_attention' for this model")

    if mask_function is not None:
        walk(mask_function)
    if not found["causal"]:
        raise ValueError("drope_triton supports causal (decoder) attention only; the model asks for a non-causal "
                         f"mask. Use {_OTHERS}")
    return found


def _traced_pattern(mask_function: Optional[Callable], q_length: int, attention_mask, kwargs) -> dict:
    """Under torch.compile (closures cannot be read there): the pattern from what transformers passes along."""
    if (mask_function is not None and getattr(mask_function, "__code__", None) is _OR_MASKS_CODE) or kwargs.get(
            "use_vmap"):
        raise ValueError("drope_triton cannot express custom or_mask/and_mask overlays (image tokens, prefixes); "
                         f"use {_OTHERS} or 'flex_attention' for this model")
    if "allow_is_bidirectional_skip" in kwargs:
        raise ValueError(f"drope_triton supports causal (decoder) attention only; use {_OTHERS}")
    config = kwargs.get("config")
    local = kwargs.get("local_size")
    chunk = local if local is not None and local == getattr(config, "attention_chunk_size", None) else None
    # transformers asks for no is_causal skip when it adds packed sequences (always, while tracing without a
    # cache or a mask) or block-wise overlays; a one-token static-cache step asks the same and has no segments
    packed = kwargs.get("allow_is_causal_skip") is False and q_length > 1 and attention_mask is None
    return {"causal": True, "chunk": chunk, "packed": packed}


def _subdiagonal(mask_function: Callable, batch: int, kv_length: int, kv_offset: int, device) -> torch.Tensor:
    """(B, kv_length) bool: whether slot j - 1 is visible from slot j (as a query), slot 0 False. A False
    marks a segment start (a packed document, a chunk); transformers' mask functions are index functions."""
    j = torch.arange(kv_length, device=device)[None, :] + kv_offset
    b = torch.arange(batch, device=device)[:, None]
    seen = mask_function(b, torch.zeros((), dtype=torch.long, device=device), j, (j - 1).clamp_min(kv_offset))
    seen = torch.as_tensor(seen, device=device).expand(batch, kv_length).clone()
    seen[:, 0] = False
    return seen


def drope_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
               kv_offset=0, mask_function=None, attention_mask: Optional[torch.Tensor] = None,
               cache_position: Optional[torch.Tensor] = None, device=None, **kwargs) -> Optional[torch.Tensor]:
    """Mask function of ``"drope_triton"`` (the ``AttentionMaskInterface`` entry): the key-slot codes.

    Args:
        batch_size: B.
        q_length: number of new tokens (queries). Older transformers pass ``cache_position`` (the new
            tokens' cache slots) instead; both are accepted.
        kv_length: number of key slots the layer hands to attention (a StaticCache: its capacity).
        q_offset: absolute position of the first query (tokens already seen): an int, or a 0-d device
            tensor (a StaticCache), never read on the host.
        kv_offset: absolute position of the first key slot (non-zero for sliding-window caches).
        mask_function: transformers' pattern (causal, sliding window, chunked, packed sequences).
        attention_mask: the 2-D (B, tokens) padding mask of the model call, or None.
        cache_position: see ``q_length``.
        device: where to create tensors when there is no ``attention_mask``.
        **kwargs: what transformers passes along (``config``, ``local_size``, ``allow_is_causal_skip``, ...).

    Returns:
        None (every key slot live and real, one segment) or a (B, 1, 1, kv_length) int8 / int32 tensor of
        key-slot codes (module docstring).

    Raises:
        ValueError: neither ``q_length`` nor ``cache_position``; an ``attention_mask`` that is not 2-D,
            whose batch is not ``batch_size`` or that covers more tokens than the call has; a mask
            pattern the kernels cannot express.
    """
    if q_length is None:
        if cache_position is None:
            raise ValueError("drope_mask needs q_length (recent transformers) or cache_position (older releases)")
        q_length = int(cache_position.shape[0])
        q_offset = cache_position[0] if q_length else 0
    q_length, kv_offset = int(q_length), int(kv_offset)
    kv_length = q_length if kv_length is None else int(kv_length)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"drope_triton takes a 2-D (batch, tokens) attention_mask, got shape "
                             f"{tuple(attention_mask.shape)}; custom 4-D masks need {_OTHERS}")
        if attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has batch {attention_mask.shape[0]} but the inputs have batch "
                             f"{batch_size}")
        if not isinstance(q_offset, torch.Tensor) and attention_mask.shape[1] > max(q_offset + q_length,
                                                                                    kv_offset + kv_length):
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens but the call has "
                             f"{q_offset} cached + {q_length} new")
        device = attention_mask.device
    if compiling():
        pattern = _traced_pattern(mask_function, q_length, attention_mask, kwargs)
    else:
        pattern = _read_pattern(mask_function, attention_mask)
    chunk = pattern["chunk"]
    segments = pattern["packed"] or (chunk is not None and (attention_mask is not None or kv_offset % chunk != 0))
    static_live = isinstance(q_offset, int) and kv_offset + kv_length == q_offset + q_length
    if attention_mask is None and not segments and static_live:
        return None

    slots = torch.arange(kv_offset, kv_offset + kv_length, device=device)
    code = torch.zeros(batch_size, kv_length, dtype=torch.int8, device=device)
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        end = kv_offset + kv_length
        if real.shape[1] < end:
            # as transformers does: slots the 2-D mask does not cover are not attended
            real = torch.nn.functional.pad(real, (0, end - real.shape[1]), value=False)
        code = torch.where(real[:, kv_offset:end], code, PAD)
    if not static_live:
        code = torch.where(slots[None, :] < q_offset + q_length, code, DEAD)
    if segments:
        starts = ~_subdiagonal(mask_function, batch_size, kv_length, kv_offset, device)
        code = torch.where(code >= 0, starts.to(torch.int32).cumsum(1, dtype=torch.int32), code.to(torch.int32))
    return code.view(batch_size, 1, 1, kv_length)


class _PerForward:
    """One-entry memo of what a layer derives from a tensor every layer of a forward shares (the mask's codes,
    the temperature rows): computed by the first layer, reused by the others. Keyed on the tensor's identity
    and version (a weak reference: nothing kept alive); bypassed while torch.compile traces (the graph then
    holds the ops once, and CSE merges the layers' copies) and for inference-mode tensors (no version)."""

    def __init__(self):
        self.entry = None  # (weak reference, version, extra, value): one tuple, replaced whole (thread-safe reads)

    def get(self, t: torch.Tensor, extra, make):
        if compiling() or t.is_inference():  # an inference tensor has no version counter to see an in-place write
            return make()
        entry = self.entry
        if entry is not None and entry[0]() is t and entry[1] == t._version and entry[2] == extra:
            return entry[3]
        value = make()
        self.entry = (weakref.ref(t), t._version, extra, value)
        return value


_CODES, _ROWS = _PerForward(), _PerForward()


def _checked_mask(attention_mask, B: int, SK: int) -> Optional[torch.Tensor]:
    """:func:`drope_mask`'s (B, 1, 1, Sk) codes as given, or None; anything else raises."""
    if attention_mask is None:
        return None
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype in (torch.int8, torch.int32)
            and attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1)):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"drope_triton takes the masks of its own mask function (drope_mask), got {got}; custom 4-D "
                         f"masks need {_OTHERS}")
    if attention_mask.shape[0] != B or attention_mask.shape[3] != SK:
        raise ValueError(f"drope_triton mask was made for batch {attention_mask.shape[0]} and "
                         f"{attention_mask.shape[3]} key slots; the layer has batch {B} and {SK}")
    return attention_mask


def _scale_rows(row_scale: torch.Tensor, base: float, device, B: int, SQ: int) -> torch.Tensor:
    """The temperature multipliers times the base scale, as a (B, 1 or Hq, Sq) float32 view."""
    rows = row_scale.to(device=device, dtype=torch.float32) * base
    return (rows[:, None, :] if rows.dim() == 2 else rows).expand(B, -1, SQ)


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


def _documents(ops, q, k, v, rows, codes, kw):
    """Prefill with segments: the B rows as one packed row whose documents are the segments (rows never share
    one), ``cu_seqlens`` padded to B*S + 1 entries on the device (empty documents at the end), no host sync."""
    B, HQ, S, D = q.shape
    total = B * S
    seg = codes.to(torch.int64) + (torch.arange(B, device=q.device) * (S + 2))[:, None]
    starts = torch.ones(B, S, dtype=torch.bool, device=q.device)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = torch.arange(total, device=q.device)
    first = torch.where(starts.reshape(-1), idx, total).sort().values
    cu = torch.cat([first, first.new_full((1,), total)]).to(torch.int32)

    def flat(t):
        return t.transpose(1, 2).reshape(1, total, t.shape[1], D).transpose(1, 2)

    rp = None if rows is None else rows.transpose(0, 1).reshape(1, rows.shape[1], total)
    out = ops.attention(flat(q), flat(k), flat(v), causal=True, softmax_scale=rp, cu_seqlens=cu,
                        key_mask=(codes >= 0).reshape(1, total), **kw)
    return out.view(HQ, B, S, D).transpose(0, 1)


def _query_codes(codes: torch.Tensor, lengths: torch.Tensor, SQ: int) -> torch.Tensor:
    """(B, Sq) codes of the query slots: the last Sq live slots of each row."""
    slot = lengths[:, None] - SQ + torch.arange(SQ, device=codes.device)[None, :]
    return codes.gather(1, slot.clamp(0, codes.shape[1] - 1).to(torch.int64))


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
                         f"use {_OTHERS}")
    if kwargs.get("output_attentions") and not _warned["attentions"]:
        _warned["attentions"] = True
        warnings.warn(f"drope_triton does not return attention weights; use {_OTHERS} for them")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError(f"drope_triton supports causal attention only (the module has is_causal=False); use {_OTHERS}")
    query, key, value = _autocast(query, key, value)
    B, HQ, SQ, D = query.shape
    SK = key.shape[2]
    mask = _checked_mask(attention_mask, B, SK)
    segments = mask is not None and mask.dtype == torch.int32
    window, chunk = _layer_pattern(module, sliding_window)
    # the layer builds its scales, lengths and boundaries itself: no value checks (on a CPU they would read them)
    kw = {"q_norm_weight": drope_q_norm_weight, "norm_eps": float(drope_norm_eps), "check_values": False}
    if window is not None:
        kw["window"] = window
    if chunk is not None and not segments:
        kw["chunk"] = chunk  # with segments, the chunks are among them
    if s_aux is not None:
        kw["sinks"] = s_aux
    if softcap is not None:
        kw["softcap"] = float(softcap)
    base = float(D ** -0.5 if scaling is None else scaling)
    rows = None
    if drope_row_scale is not None:
        rows = _ROWS.get(drope_row_scale, (base, query.device, B, SQ), lambda: _scale_rows(drope_row_scale, base,
                                                                                            query.device, B, SQ))
    scale = base if rows is None else rows
    ops = _ops(query.device)

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        # DataCollatorWithFlattening(return_flash_attn_kwargs=True): the documents of cu_seq_lens are the
        # segments transformers found in position_ids (int32 codes); padding or a cache have no such form
        if B != 1 or SQ != SK or (mask is not None and not segments):
            raise ValueError(f"packed sequences (cu_seq_lens_q) need one flattened row without padding or cache; "
                             f"got batch {B}, Sq={SQ}, Sk={SK}, a {'padding ' if mask is not None else ''}mask")
        if chunk is not None:
            kw["chunk"] = chunk  # positions restart in every document, chunks with them
        cu = cu.to(device=query.device, dtype=torch.int32)
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and host_values(cu_k) and not torch.equal(cu_k.to(cu.device, torch.int32), cu):
            raise ValueError("drope_triton needs cu_seq_lens_k == cu_seq_lens_q (self-attention over packed documents)")
        out = ops.attention(query, key, value, causal=True, softmax_scale=scale, cu_seqlens=cu, **kw)
    elif SQ > SK:
        raise ValueError(f"drope_triton got {SQ} queries but only {SK} key slots")
    elif SQ == SK:
        if segments:
            out = _documents(ops, query, key, value, rows, mask[:, 0, 0], kw)
        else:
            km = None if mask is None else _CODES.get(mask, None, lambda: mask[:, 0, 0] >= 0)
            out = ops.attention(query, key, value, causal=True, softmax_scale=scale, key_mask=km, **kw)
    else:
        out = _against_cache(ops, query, key, value, scale, mask, segments, kw)
    return out.transpose(1, 2).contiguous(), None


def _against_cache(ops, q, k, v, scale, mask, segments, kw):
    """Sq < Sk new queries (the last Sq live slots) against a cache."""
    B, HQ, SQ, D = q.shape
    SK = k.shape[2]
    norm = {n: kw.pop(n) for n in ("q_norm_weight", "norm_eps")}
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, kw.get("sinks")))
    if mask is None:
        if grad or SQ > DECODE_MAX_QUERIES:
            return ops.attention(q, k, v, causal=True, softmax_scale=scale, **norm, **kw)
        return ops.decode_attention(_norm_rows(q, norm), k, v, softmax_scale=scale, **kw)
    codes, lengths, km = _CODES.get(mask, SQ, lambda: _lengths_and_keys(mask[:, 0, 0], SQ, segments))
    if grad:
        # decode has no backward: the fused kernel on the live slots, whose count the host must know
        if compiling():
            raise ValueError("drope_triton: gradients through a cached step with a StaticCache or padding are not "
                             "supported under torch.compile (the live length is a device value); use a DynamicCache "
                             "without padding, or run eagerly")
        L = int(lengths.max())
        return ops.attention(q, k[:, :, :L], v[:, :, :L], causal=True, softmax_scale=scale,
                             key_mask=codes[:, :L] >= 0, **norm, **kw)
    return ops.decode_attention(_norm_rows(q, norm), k, v, cache_seqlens=lengths, softmax_scale=scale,
                                key_mask=km, **kw)


def _lengths_and_keys(codes: torch.Tensor, SQ: int, segments: bool) -> tuple:
    """From the (B, Sk) codes: themselves, each row's live length, and the key mask (one per query row with
    segments)."""
    lengths = (codes >= PAD).sum(1, dtype=torch.int32)
    km = codes >= 0
    if segments:
        km = km[:, None, :] & (codes[:, None, :] == _query_codes(codes, lengths, SQ)[:, :, None])
    return codes, lengths, km


def _norm_rows(q: torch.Tensor, norm: dict) -> torch.Tensor:
    """Per-head query RMSNorm in fp32 (what the fused kernel does in its prologue), back in q's dtype."""
    w = norm["q_norm_weight"]
    return q if w is None else reference.rms_norm(q.float(), w, norm["norm_eps"]).to(q.dtype)


def _known_implementations() -> list:
    from transformers import AttentionInterface

    return ["eager", *AttentionInterface._global_mapping]


def _flash_unavailable(value: str) -> bool:
    """Whether ``value`` names a flash-attention release (``flash_attention_N``, ``paged|...`` too) whose package is
    not installed: transformers' own availability check, which ``set_attn_implementation`` runs."""
    import re

    import transformers.utils as tu

    m = re.fullmatch(r"(?:paged\|)?flash_attention_(\d+)", value)
    if m is None:
        return False
    available = getattr(tu, f"is_flash_attn_{m.group(1)}_available", None)
    return available is None or not available()


def _check_implementation(value) -> None:
    if isinstance(value, dict):
        for sub in value.values():
            _check_implementation(sub)
        return
    if value is None:
        raise ValueError("attn_implementation None is not resolved by the config (transformers' default depends on "
                         "the model: sdpa where it supports it, else eager); call model.set_attn_implementation(None), "
                         "or assign a name, e.g. config.attn_implementation = 'sdpa'")
    if isinstance(value, str) and _flash_unavailable(value):
        raise ValueError(f"attn_implementation {value!r}: its flash-attention package is not installed (transformers' "
                         "availability check); install it, or use 'sdpa' or 'drope_triton' "
                         "(model.set_attn_implementation(name) runs the same check)")
    known = _known_implementations()
    if value not in known:
        hub = " (a hub kernel is loaded by model.set_attn_implementation(...) or from_pretrained(...))" if (
            isinstance(value, str) and "/" in value) else ""
        raise ValueError(f"attn_implementation {value!r} is not a registered attention implementation{hub}; "
                         f"registered: {', '.join(known)}. Ways to switch: model.config.attn_implementation = name, "
                         "model.set_attn_implementation(name), from_pretrained(..., attn_implementation=name)")


def _get_attn_implementation(config):
    return config._attn_implementation


def _set_attn_implementation(config, value) -> None:
    _check_implementation(value)
    config._attn_implementation = value


def install_config_attribute() -> bool:
    """Make ``config.attn_implementation = name`` switch a model's attention, as it reads.

    transformers 5.x stores the implementation in ``config._attn_implementation`` (read by every attention
    layer and mask function on each forward) and takes ``attn_implementation=`` only in constructors and
    ``from_pretrained``; assigning ``config.attn_implementation`` created a plain attribute that nothing read.
    This adds a property on transformers' ``PreTrainedConfig`` that reads and writes ``_attn_implementation``
    (sub-configs follow, as they do for ``_attn_implementation``) and refuses unregistered names. Installed only
    when transformers defines no such attribute itself; returns whether it is installed.
    """
    from transformers import PretrainedConfig

    current = getattr(PretrainedConfig, "attn_implementation", None)
    if isinstance(current, property) and current.fget is _get_attn_implementation:
        return True
    if current is not None:
        return False
    PretrainedConfig.attn_implementation = property(
        _get_attn_implementation, _set_attn_implementation,
        doc="The attention implementation every layer dispatches to (``_attn_implementation``); assigning a "
            "registered name switches the model on its next forward (installed by drope).")
    return True


def register() -> None:
    """Register ``"drope_triton"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``, and
    make ``config.attn_implementation = name`` work (:func:`install_config_attribute`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, drope_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, drope_mask)
    install_config_attribute()
