"""The ``"drope_triton"`` attention implementation for Hugging Face transformers.

``register()`` (run by ``import drope``, at once or when transformers is first imported) adds one entry to transformers' ``AttentionInterface`` and
one to ``AttentionMaskInterface``; ``from_pretrained(..., attn_implementation="drope_triton")`` and
``model.set_attn_implementation("drope_triton")`` then route every attention layer here.

What the layer computes is what ``"eager"`` computes for the same model and call. The mask function
(:func:`drope_mask`) does not build an (Sq, Sk) mask: it reads the pattern transformers asks for from
its ``mask_function`` (causal, sliding window, chunked, packed sequences; anything else raises) and
returns a :class:`DropeMask`: the live key slots, the padding of the 2-D ``attention_mask`` over them,
the window, and the segments (chunks, packed documents) a query may not look out of. The attention
function then picks the kernel:

- prefill (no cached prefix in the live slots): one fused call; padding, packed documents and chunks
  become documents of real tokens (``cu_seqlens``), the result scattered back (padding rows are zeros);
- a few new queries against a longer cache: the split-KV decode kernel (a padded batch: each row's real
  keys gathered to the front, read with ``cache_seqlens``); more queries: the fused kernel, bottom-right
  aligned, or one call per row when some new tokens are padding; chunks: one call per chunk the new
  queries fall in, against the keys from that chunk's start;
- ``cu_seq_lens_q``/``cu_seq_lens_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``):
  documents as flash-attention reads them.

Windows (``p - W < j <= p``, in cache slots as transformers counts them), GPT-OSS sinks (``s_aux``) and
Gemma 2's ``softcap`` go to the kernels' ``window`` / ``sinks`` / ``softcap``; chunks that start at
multiples of the chunk size in the key slots (no padding) go to their ``chunk``, others become the
documents / per-chunk calls above. A window over a row whose real tokens are not one contiguous run
(padding in the middle) has no kernel form and raises.

CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run :mod:`drope.kernels`; other CPU tensors
run :mod:`drope.hf.sdpa_path`, an exact path on ``torch.nn.functional.scaled_dot_product_attention``.
Ordinary RoPE models work too (transformers applies their RoPE before the call).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import reference
from ..validation import interpreter_enabled
from . import sdpa_path
from .temperature import segment_ids

__all__ = ["ATTN_IMPLEMENTATION", "DECODE_MAX_QUERIES", "DropeMask", "drope_attention_forward", "drope_mask",
           "register"]

ATTN_IMPLEMENTATION = "drope_triton"
# At most this many new queries against a longer cache go to the split-KV decode kernel.
DECODE_MAX_QUERIES = 16
_OTHERS = "attn_implementation='eager' or 'sdpa'"

_warned = {"attentions": False}


def _ops(device: torch.device):
    """The kernels module for CUDA (or CPU under the interpreter), else the exact SDPA path."""
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        from .. import kernels

        return kernels
    if device.type == "cpu":
        return sdpa_path
    raise ValueError(f"drope_triton runs on CUDA or CPU tensors, got {device}; use {_OTHERS}")


@dataclass
class DropeMask:
    """What :func:`drope_mask` hands to the attention function (in place of a 4-D mask).

    Attributes:
        batch: B of the call.
        live: L, the key slots holding tokens (a StaticCache has more, never attended).
        valid: (B, L) bool, True where the slot is a real token; None when all are.
        window: sliding window W (key j visible to query slot p iff p - W < j <= p), None = none.
        segments: (B, L) int64, non-decreasing along each row; a query sees only keys of its own
            segment (chunks of chunked attention, packed documents); None = one segment.
        chunk: the chunk size behind ``segments``, if any.
        chunk_aligned: whether key slot j's chunk is ``j // chunk`` in every row (no left padding, no
            packed positions, the cache's first slot at a chunk boundary), so the kernels' ``chunk``
            expresses it directly.
        packed: whether ``segments`` holds packed documents (transformers found them in position_ids).
        pattern: the mask pattern in words, for error messages.
    """

    batch: int
    live: int
    valid: Optional[torch.Tensor] = None
    window: Optional[int] = None
    segments: Optional[torch.Tensor] = None
    chunk: Optional[int] = None
    chunk_aligned: bool = False
    packed: bool = False
    pattern: str = "causal"
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    # generate() precomputes the masks of a compileable (static) cache and hands them back to the model, whose
    # mask creation treats them as 2-D padding masks: these let it pass one through to drope_mask unchanged
    ndim = 2

    @property
    def shape(self):
        return (self.batch, self.live)

    def to(self, *args, **kwargs) -> "DropeMask":
        return self

    def contiguous_rows(self) -> bool:
        """Whether each row's real tokens form one run of slots (left or right padding only)."""
        if "contiguous" not in self._memo:
            v = self.valid
            idx = torch.arange(v.shape[1], device=v.device)
            count = v.sum(1)
            first = torch.where(v, idx, v.shape[1]).amin(1)
            last = torch.where(v, idx, -1).amax(1)
            self._memo["contiguous"] = bool(((count == 0) | (last - first + 1 == count)).all())
        return self._memo["contiguous"]


def _closure(fn: Callable) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def _read_pattern(mask_function: Optional[Callable]) -> dict:
    """The parts of transformers' mask-function tree (masking_utils): and_masks of causal, sliding-window,
    chunked and packed-sequence functions, maybe under a packed-position remap. Unknown parts raise."""
    found = {"causal": False, "window": None, "chunk": None, "left_padding": None, "packed": None, "positions": None,
             "padding": []}
    if mask_function is None:
        found["causal"] = True
        return found

    def walk(fn):
        name = getattr(fn, "__qualname__", type(fn).__name__)
        cells = _closure(fn)
        if name == "causal_mask_function":
            found["causal"] = True
        elif name.startswith("and_masks.") and "mask_functions" in cells:
            for inner in cells["mask_functions"]:
                walk(inner)
        elif name.startswith("sliding_window_overlay.") and "sliding_window" in cells:
            found["window"] = int(cells["sliding_window"])
        elif name.startswith("chunked_overlay.") and "chunk_size" in cells:
            found["chunk"] = int(cells["chunk_size"])
            found["left_padding"] = cells.get("left_padding")
        elif name.startswith("padding_mask_function.") and "padding_mask" in cells:
            # older transformers fold the 2-D attention_mask into the tree as well
            found["padding"].append(cells["padding_mask"])
        elif name.startswith("packed_sequence_mask_function.") and "packed_sequence_mask" in cells:
            found["packed"] = cells["packed_sequence_mask"]
        elif name.startswith("remap_positions_for_packed_sequence.") and "position_ids" in cells:
            found["positions"] = cells["position_ids"]
            walk(cells["mask_function"])
        else:
            raise ValueError(
                f"drope_triton cannot express the attention mask pattern {name!r} (only causal, sliding-window, "
                f"chunked and packed-sequence masks); use {_OTHERS} or 'flex_attention' for this model")

    walk(mask_function)
    if not found["causal"]:
        raise ValueError("drope_triton supports causal (decoder) attention only; the model asks for a non-causal "
                         f"mask. Use {_OTHERS}")
    return found


def drope_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
               kv_offset=0, mask_function=None, attention_mask: Optional[torch.Tensor] = None,
               cache_position: Optional[torch.Tensor] = None, device=None, **kwargs) -> DropeMask:
    """Mask function of ``"drope_triton"`` (the ``AttentionMaskInterface`` entry).

    Args:
        batch_size: B.
        q_length: number of new tokens (queries). Older transformers pass ``cache_position``
            (the new tokens' cache slots) instead; both are accepted.
        kv_length: number of key slots the layer hands to attention (a StaticCache: its capacity).
        q_offset: absolute position of the first query (tokens already seen).
        kv_offset: absolute position of the first key slot (non-zero for sliding-window caches).
        mask_function: transformers' pattern (causal, sliding window, chunked, packed sequences).
        attention_mask: the 2-D (B, cached + new) padding mask of the model call, or None.
        cache_position: see ``q_length``.
        device: where to create tensors when there is no ``attention_mask``.

    Returns:
        A :class:`DropeMask`.

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
    q_offset, kv_offset, q_length = int(q_offset), int(kv_offset), int(q_length)
    live = q_offset + q_length - kv_offset
    pattern = _read_pattern(mask_function)
    if isinstance(attention_mask, DropeMask):
        # made by this function already (generate's precomputed masks): it must describe this very call
        made = attention_mask
        if (made.batch, made.live, made.window, made.chunk) != (batch_size, live, pattern["window"], pattern["chunk"]):
            raise ValueError(f"drope_triton got back a mask made for batch {made.batch}, {made.live} key slots, "
                             f"{made.pattern}; this call has batch {batch_size}, {live} key slots")
        return made
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"drope_triton takes a 2-D (batch, tokens) attention_mask, got shape "
                             f"{tuple(attention_mask.shape)}; custom 4-D masks need {_OTHERS}")
        if attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has batch {attention_mask.shape[0]} but the inputs have batch "
                             f"{batch_size}")
        if attention_mask.shape[1] > q_offset + q_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens but the call has "
                             f"{q_offset} cached + {q_length} new")
        device = attention_mask.device
    for padding in pattern["padding"]:
        if attention_mask is None or not (padding is attention_mask or (
                padding.shape == attention_mask.shape and torch.equal(padding.bool(), attention_mask.bool()))):
            raise ValueError("drope_triton: the mask function carries a padding mask other than the call's "
                             f"attention_mask; use {_OTHERS}")
    end = kv_offset + live
    valid = None
    if attention_mask is not None:
        padding = attention_mask.to(torch.bool)
        if padding.shape[-1] < end:
            # as transformers does: slots the 2-D mask does not cover are not attended
            padding = torch.nn.functional.pad(padding, (0, end - padding.shape[-1]), value=False)
        valid = padding[:, kv_offset:end].contiguous()
        if bool(valid.all()):
            valid = None
    window = pattern["window"]
    words = []
    if window is not None:
        words.append(f"sliding_window={window}")
    segments, chunk, packed = None, pattern["chunk"], pattern["packed"] is not None
    slots = torch.arange(kv_offset, end, device=device)
    if packed:
        if pattern["packed"].shape[-1] != live:
            raise ValueError(f"packed-sequence ids cover {pattern['packed'].shape[-1]} tokens, the call has {live}")
        words.append("packed sequences")
    if chunk is not None:
        words.append(f"attention_chunk_size={chunk}")
        if pattern["positions"] is not None:
            where = pattern["positions"].to(device).expand(batch_size, -1)
        else:
            lp = pattern["left_padding"]
            lp = torch.zeros(batch_size, dtype=torch.long, device=device) if lp is None else lp.to(device)
            where = slots[None, :] - lp[:, None]
        chunk_ids = torch.div(where, chunk, rounding_mode="floor")
        aligned = pattern["positions"] is None and kv_offset % chunk == 0 and (
            pattern["left_padding"] is None or not bool(pattern["left_padding"].any()))
    if packed or chunk is not None:
        ids = [t for t in ((pattern["packed"].to(device).expand(batch_size, -1) if packed else None),
                           (chunk_ids.expand(batch_size, -1) if chunk is not None else None)) if t is not None]
        change = torch.zeros(batch_size, live, dtype=torch.bool, device=device)
        for t in ids:
            change[:, 1:] |= t[:, 1:] != t[:, :-1]
        segments = change.long().cumsum(1)
        if not bool(change.any()):
            segments = None
    return DropeMask(batch=batch_size, live=live, valid=valid, window=window, segments=segments, chunk=chunk,
                     chunk_aligned=chunk is not None and aligned, packed=packed, pattern=", ".join(words) or "causal")


def _packed_from_positions(position_ids: Optional[torch.Tensor], B: int, S: int) -> Optional[torch.Tensor]:
    """Packed-document ids (B, S) when positions restart inside a row (transformers' rule:
    ``find_packed_sequence_indices``), else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != S or S < 2:
        return None
    seg = segment_ids(position_ids.expand(B, S))
    return seg if bool(seg[:, -1].any()) else None


def _norm_rows(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Per-head RMSNorm in fp32 (what the kernel does in its prologue), back in x's dtype."""
    if weight is None:
        return x
    return reference.rms_norm(x.float(), weight, eps).to(x.dtype)


class _Call:
    """One layer call's fixed arguments: the ops module, the base scale, the fused query norm, and the
    features (window, sinks, softcap) passed on only when set; per-row scales come with each call."""

    def __init__(self, ops, scale, w, eps, features):
        self.ops, self.scale, self.w, self.eps, self.features = ops, scale, w, eps, features

    def scale_for(self, rows: Optional[torch.Tensor]):
        return self.scale if rows is None else rows

    def attention(self, q, k, v, rows, cu=None):
        kw = dict(self.features)
        if cu is not None:
            kw["cu_seqlens"] = cu
        return self.ops.attention(q, k, v, causal=True, softmax_scale=self.scale_for(rows), q_norm_weight=self.w,
                                  norm_eps=self.eps, **kw)

    def decode(self, q, k, v, rows, seqlens, n):
        return self.ops.decode_attention(_norm_rows(q, self.w, self.eps), k, v, cache_seqlens=seqlens,
                                         softmax_scale=self.scale_for(rows), max_seqlen=n, **self.features)


def _prefill_documents(call, q, k, v, rows, valid, segments):
    """Sq == L: real tokens grouped into documents (row, segment), one packed call, scattered back."""
    B, HQ, L, D = q.shape
    HKV = k.shape[1]
    keep = torch.ones(B, L, dtype=torch.bool, device=q.device) if valid is None else valid
    idx = torch.nonzero(keep.reshape(-1)).flatten()
    if idx.numel() == 0:
        return q.new_zeros(B, HQ, L, D)
    row = torch.arange(B, device=q.device)[:, None].expand(B, L)
    seg = torch.zeros(B, L, dtype=torch.long, device=q.device) if segments is None else segments
    doc = (row * (L + 1) + seg).reshape(-1)[idx]
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[1:] = doc[1:] != doc[:-1]
    edges = torch.nonzero(starts).flatten()
    cu = torch.cat([edges, edges.new_full((1,), idx.numel())]).to(torch.int32)

    def flat(t, H):
        return t[:, :, :L].transpose(1, 2).reshape(B * L, H, D)[idx].transpose(0, 1).unsqueeze(0)

    rp = None if rows is None else rows.transpose(1, 2).reshape(B * L, -1)[idx].transpose(0, 1).unsqueeze(0)
    op = call.attention(flat(q, HQ), flat(k, HKV), flat(v, HKV), rp, cu=cu)
    out = op.new_zeros((B * L, HQ, D)).index_copy(0, idx, op[0].transpose(0, 1))
    return out.view(B, L, HQ, D).transpose(1, 2)


def _against_cache(call, q, k, v, rows, valid, L):
    """Sq < L new queries (the last Sq live slots) against L live keys, one segment."""
    B, HQ, SQ, D = q.shape
    HKV = k.shape[1]
    # the split-KV decode kernel has no backward: a cached step under autograd takes the attention kernel
    decode = SQ <= DECODE_MAX_QUERIES and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if valid is None:
        if decode:
            seqlens = None if L == k.shape[2] else torch.full((B,), L, dtype=torch.int32, device=q.device)
            return call.decode(q, k, v, rows, seqlens, L)
        return call.attention(q, k[:, :, :L], v[:, :, :L], rows)
    if decode and bool(valid[:, L - SQ:].all()):
        # decoding a padded batch: each row's real keys to the front, read with cache_seqlens
        counts = valid.sum(1)
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, : int(counts.max())]
        n = order.shape[1]
        kc = k.gather(2, order[:, None, :, None].expand(B, HKV, n, D))
        vc = v.gather(2, order[:, None, :, None].expand(B, HKV, n, D))
        return call.decode(q, kc, vc, rows, counts.to(torch.int32), n)
    outs = []
    for b in range(B):
        kv_idx = torch.nonzero(valid[b]).flatten()
        q_idx = torch.nonzero(valid[b, L - SQ:]).flatten()
        ob = q.new_zeros(1, HQ, SQ, D)
        if q_idx.numel():
            rb = None if rows is None else rows[b:b + 1, :, q_idx]
            part = call.attention(q[b:b + 1, :, q_idx], k[b:b + 1, :, kv_idx], v[b:b + 1, :, kv_idx], rb)
            ob = ob.index_copy(2, q_idx, part)
        outs.append(ob)
    return torch.cat(outs, dim=0)


def _chunks_against_cache(call, q, k, v, rows, valid, L, segments):
    """Sq < L with segments (chunked layers while decoding): each group of new queries of one segment
    against the keys from its segment's first slot."""
    B, HQ, SQ, D = q.shape
    same = bool((segments == segments[:1]).all())
    groups = [(slice(0, B), segments[0])] if same else [(slice(b, b + 1), segments[b]) for b in range(B)]
    outs = []
    for rs, seg in groups:
        qseg = seg[L - SQ:]
        parts = []
        for c in torch.unique_consecutive(qseg).tolist():
            qa = int((qseg < c).sum())
            qe = int((qseg <= c).sum())
            ks = int((seg < c).sum())
            ke = L - SQ + qe
            vb = None if valid is None else valid[rs, ks:ke]
            rb = None if rows is None else rows[rs, :, qa:qe]
            args = (call, q[rs, :, qa:qe], k[rs, :, ks:ke], v[rs, :, ks:ke], rb)
            if qe - qa == ke - ks:
                parts.append(_prefill_documents(*args, None if vb is None or bool(vb.all()) else vb, None))
            else:
                parts.append(_against_cache(*args, None if vb is None or bool(vb.all()) else vb, ke - ks))
        outs.append(torch.cat(parts, dim=2))
    return torch.cat(outs, dim=0)


def _autocast(query, key, value):
    """bf16 mixed-precision training: fp32 norm weights promote q/k to fp32 while v stays in the autocast
    dtype; run attention in the autocast dtype, as autocast does for SDPA."""
    if torch.is_autocast_enabled(query.device.type):
        dt = torch.get_autocast_dtype(query.device.type)
        return query.to(dt), key.to(dt), value.to(dt)
    return query, key, value


def drope_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[DropeMask], dropout: float = 0.0,
                            scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                            s_aux: Optional[torch.Tensor] = None,
                            drope_q_norm_weight: Optional[torch.Tensor] = None, drope_norm_eps: float = 1e-6,
                            drope_row_scale: Optional[torch.Tensor] = None, **kwargs):
    """Attention function of ``"drope_triton"`` (the ``AttentionInterface`` entry).

    Args:
        module: the calling attention module (reads ``is_causal`` and ``training``).
        query: (B, Hq, Sq, D), RoPE already applied by the model if it has RoPE.
        key, value: (B, Hkv, Sk, D), the cache's buffers when a cache is used.
        attention_mask: what :func:`drope_mask` returned, or None (a direct call: plain causal).
        dropout: must be 0 in training (the kernels have no attention dropout).
        scaling: the base softmax scale (None = D**-0.5).
        sliding_window: the window when no mask came through :func:`drope_mask` (with one, the mask's
            pattern is what eager computes, so it rules).
        softcap: logit soft-capping ``c * tanh(s / c)`` (Gemma 2).
        is_causal: overrides ``module.is_causal``.
        s_aux: attention sinks (Hq,), one logit per head added to the softmax denominator (GPT-OSS).
        drope_q_norm_weight: per-head query RMSNorm weight (D,) or (Hq, D) fused into the kernel
            (DroPE models with ``qk_norm_type="head"``); keys arrive normalised.
        drope_norm_eps: its epsilon.
        drope_row_scale: (B, Sq) temperature multipliers on top of ``scaling``, or (B, Hq, Sq) with a
            per-head temperature.
        **kwargs: ``position_ids``, packed-batch ``cu_seq_lens_q``/``cu_seq_lens_k``; others are ignored.

    Returns:
        ``(out, None)`` with ``out`` (B, Sq, Hq, D) in the query's dtype; padding query rows are zeros.

    Raises:
        ValueError: attention dropout in training; a mask not made by :func:`drope_mask` or made for
            another batch; non-causal attention; a window over rows with padding between real tokens;
            packed kwargs on a batch larger than one, with padding, a cache or chunked attention.
    """
    if dropout and module.training:
        raise ValueError(f"drope_triton has no attention dropout; set config.attention_dropout=0 (got {dropout}) or "
                         f"use {_OTHERS}")
    if kwargs.get("output_attentions") and not _warned["attentions"]:
        _warned["attentions"] = True
        warnings.warn(f"drope_triton does not return attention weights; use {_OTHERS} for them")
    if attention_mask is not None and not isinstance(attention_mask, DropeMask):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"drope_triton takes the masks of its own mask function (drope_mask), got {got}; custom 4-D "
                         f"masks need {_OTHERS}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if not causal:
        raise ValueError(f"drope_triton supports causal attention only (the module has is_causal=False); use {_OTHERS}")
    query, key, value = _autocast(query, key, value)
    B, HQ, SQ, D = query.shape
    SK = key.shape[2]
    mask = attention_mask
    if mask is not None and mask.batch != B:
        raise ValueError(f"drope_triton mask was made for batch {mask.batch}, the layer has batch {B}")
    base = float(D ** -0.5 if scaling is None else scaling)
    rows = None
    if drope_row_scale is not None:
        # (B, 1, Sq), or (B, Hq, Sq) with per-head temperatures: every slice below indexes the last dim
        rows = drope_row_scale.to(device=query.device, dtype=torch.float32) * base
        rows = (rows[:, None, :] if rows.dim() == 2 else rows).expand(B, -1, SQ)
    window = mask.window if mask is not None else (None if sliding_window is None else int(sliding_window))
    features = {}
    if window is not None:
        features["window"] = window
    if s_aux is not None:
        features["sinks"] = s_aux
    if softcap is not None:
        features["softcap"] = float(softcap)
    call = _Call(_ops(query.device), base, drope_q_norm_weight, float(drope_norm_eps), features)

    L = SK if mask is None else mask.live
    if L > SK:
        raise ValueError(f"drope_triton mask covers {L} key slots but the layer has only {SK}")
    valid = None if mask is None else mask.valid
    segments = None if mask is None else mask.segments
    if segments is not None and mask.chunk_aligned and not mask.packed and valid is None:
        # chunks that start at slot multiples of the chunk size: the kernels' own chunk argument
        features["chunk"] = mask.chunk
        segments = None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if B != 1 or valid is not None or SQ != L or (mask is not None and mask.chunk is not None):
            raise ValueError(
                f"packed sequences (cu_seq_lens_q) need one flattened row without padding, cache or chunked attention; "
                f"got batch {B}, Sq={SQ}, live keys {L}, mask {'none' if mask is None else mask.pattern}")
        cu = cu.to(device=query.device, dtype=torch.int32)
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k.to(device=cu.device, dtype=torch.int32), cu):
            raise ValueError("drope_triton needs cu_seq_lens_k == cu_seq_lens_q (self-attention over packed documents)")
        out = call.attention(query, key[:, :, :L], value[:, :, :L], rows, cu=cu)
        return out.transpose(1, 2).contiguous(), None
    if mask is None and SQ == SK:
        # a direct call (no mask function ran): transformers' packed-sequence rule on position_ids
        segments = _packed_from_positions(kwargs.get("position_ids"), B, SQ)
    if window is not None and valid is not None and not mask.contiguous_rows():
        raise ValueError(f"drope_triton: sliding_window={window} over rows whose real tokens are not contiguous "
                         f"(padding between tokens) has no kernel form; use {_OTHERS}")
    if SQ == L:
        if valid is None and segments is None:
            out = call.attention(query, key[:, :, :L], value[:, :, :L], rows)
        else:
            out = _prefill_documents(call, query, key, value, rows, valid, segments)
    elif SQ > L:
        raise ValueError(f"drope_triton got {SQ} queries but only {L} live key slots")
    elif segments is not None:
        out = _chunks_against_cache(call, query, key, value, rows, valid, L, segments)
    else:
        out = _against_cache(call, query, key, value, rows, valid, L)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"drope_triton"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, drope_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, drope_mask)
