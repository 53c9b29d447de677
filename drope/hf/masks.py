"""The mask side of ``"drope_triton"``: the mask function that turns transformers' mask pattern and 2-D padding mask
into key-slot codes, the per-forward memo, and ``config.attn_implementation``.

The mask function (:func:`drope_mask`), called once per forward and mask type, turns what the 2-D
``attention_mask`` and the cache say into one small device tensor, the **key-slot codes**: shape
(B, 1, 1, Sk) (4-D, so transformers hands it back unchanged, generate's precomputed masks included), one
code per key slot: ``>= 0`` attendable (its segment id), ``-1`` padding, ``-2`` past the live length of a
StaticCache. int8 codes mean one segment; int32 codes carry segments (packed documents found by
transformers, chunks not aligned with the slots) read from the mask function itself by evaluating it on
each slot's predecessor. ``None`` means every slot is a live, real token.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from transformers.masking_utils import causal_mask_function, or_masks

from ..validation import compiling, host_values

__all__ = ["DEAD", "OTHERS", "PAD", "PerForward", "drope_mask", "install_config_attribute"]

OTHERS = "attn_implementation='eager' or 'sdpa'"
PAD, DEAD = -1, -2
# transformers' or_masks closures (a union of patterns: image tokens, prefixes), told apart by their code object:
# under torch.compile a mask function's closure cannot be read, its __code__ can
_OR_MASKS_CODE = or_masks(causal_mask_function).__code__


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
                                 f"attention_mask; use {OTHERS}")
        elif name.startswith("packed_sequence_mask_function."):
            found["packed"] = True
        elif name.startswith("remap_positions_for_packed_sequence.") and "mask_function" in cells:
            walk(cells["mask_function"])
        else:
            raise ValueError(
                f"drope_triton cannot express the attention mask pattern {name!r} (only causal, sliding-window, "
                f"chunked and packed-sequence masks); use {OTHERS} or 'flex_attention' for this model")

    if mask_function is not None:
        walk(mask_function)
    if not found["causal"]:
        raise ValueError("drope_triton supports causal (decoder) attention only; the model asks for a non-causal "
                         f"mask. Use {OTHERS}")
    return found


def _traced_pattern(mask_function: Optional[Callable], q_length: int, attention_mask, kwargs) -> dict:
    """Under torch.compile (closures cannot be read there): the pattern from what transformers passes along."""
    if (mask_function is not None and getattr(mask_function, "__code__", None) is _OR_MASKS_CODE) or kwargs.get(
            "use_vmap"):
        raise ValueError("drope_triton cannot express custom or_mask/and_mask overlays (image tokens, prefixes); "
                         f"use {OTHERS} or 'flex_attention' for this model")
    if "allow_is_bidirectional_skip" in kwargs:
        raise ValueError(f"drope_triton supports causal (decoder) attention only; use {OTHERS}")
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
                             f"{tuple(attention_mask.shape)}; custom 4-D masks need {OTHERS}")
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


class PerForward:
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


def _is_kernel_name(value: str) -> bool:
    """transformers' own test of a kernel-repository name (``org/repo[@rev][:fn]``, maybe ``paged|``-prefixed)."""
    from transformers.integrations.hub_kernels import is_kernel

    return is_kernel(value.split("|")[-1])


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
    if isinstance(value, str) and _is_kernel_name(value):
        return  # a kernel repository (drope.hf.continuous_batching_attention(), a Hub kernel): transformers loads it
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
