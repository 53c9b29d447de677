"""flash-attention's Python interface on drope's kernels: code written for ``flash_attn`` runs by changing one import.

    from drope.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same tensor layouts as flash-attn ((batch, seqlen, nheads, headdim); packed (total, nheads, headdim); paged caches
(num_blocks, page_block_size, nheads_k, headdim)), argument names, defaults, results and return values, for everything
drope's kernels can express. Bad input raises :class:`FlashAttnInputError`, which is both a ``ValueError`` (drope's
class for bad input) and a ``RuntimeError`` (what flash-attn's checks raise), with a message in flash-attn's terms.

Mapping (flash-attn -> drope):

- ``window_size=(left, right)`` (a pair of ints, or of 0-d integer tensors as flash's own tests pass it): a query at
  position p sees keys ``[p - left, p + right]``; a side >= seqlen_k is unbounded (-1), as in flash-attn. With
  ``causal=True`` (or ``right == 0``) that is drope's causal ``window=left + 1``. A right side with ``causal=False``
  has no drope equivalent and is refused, except where every query is the last row of its keys (one query row, or
  ``max_seqlen_q == 1`` in varlen): no key lies right of it, so the right side is moot.
- Head dims that are not a multiple of 8 are zero-padded to one (as flash-attn does) and the output sliced back;
  ``softmax_scale=None`` is the *original* ``headdim ** -0.5``.
- ``causal=True`` with more queries than keys (in ``flash_attn_func``, per sequence in varlen, and a kvcache length
  below seqlen_q): the rows before the first key are zeros (softmax_lse -inf), as flash-attn's.
- ``softcap=0.0`` is off (drope: None). ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``.
- ``flash_attn_with_kvcache``: flash's ``cache_seqlens`` counts the keys *before* ``k`` / ``v`` are appended (drope's
  ``decode_attention`` counts them too: the lengths are added on the device, no sync); ``k`` / ``v`` may hold any
  number of new tokens; ``cache_leftpad`` becomes a key mask (any page size, paged caches too); ``num_splits=0`` is
  drope's automatic choice; a cache with more batch rows than q serves rows 0..batch-1.
- ``deterministic`` is accepted: drope's backward is always deterministic.

Values (lengths, boundaries, page indices, left pads) are checked where that costs no device sync (CPU tensors); on a
GPU a length past the cache, a bad page or a bad left pad gives NaN rows, never a plausible answer.

Not supported (:class:`FlashAttnInputError`): ``dropout_p > 0``, ``alibi_slopes``, rotary embedding inside
``flash_attn_with_kvcache`` (``rotary_cos`` / ``rotary_sin``: rotate first), ``cache_batch_idx``, and non-causal
attention of several query rows with a right-side window or against a kvcache (drope's decode is causal among the
new rows). A backward through a paged ``block_table`` raises (flash-attn has none either).
"""

from __future__ import annotations

import functools
import math
import operator
from numbers import Real
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .kernels import ops
from .kernels.interface import attention, decode_attention
from .validation import KERNEL_DTYPES, MAX_MULTIPLIER, _boundaries, host_values

__all__ = ["FlashAttnInputError", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_with_kvcache"]


class FlashAttnInputError(ValueError, RuntimeError):
    """Input outside what ``drope.flash_attn`` computes: a ``ValueError`` (drope's documented class for bad input)
    and a ``RuntimeError`` (what flash-attn's own checks raise), so code written for either catches it."""


def _flash_errors(fn):
    """Every refusal of ``fn`` as :class:`FlashAttnInputError` (the message unchanged)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlashAttnInputError:
            raise
        except ValueError as e:
            raise FlashAttnInputError(str(e)) from e

    return wrapper


def _int(name: str, value) -> int:
    """An int, or anything integer-valued with ``__index__`` (a 0-d integer tensor, a numpy int); never a bool."""
    if isinstance(value, bool):
        raise FlashAttnInputError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise FlashAttnInputError(f"{name} must be an int, got {value!r}") from None


def _window(window_size, causal: bool, seqlen_k: int, *, last_rows: bool = False) -> Tuple[bool, Optional[int]]:
    """(causal, window) in drope's terms for flash's ``window_size`` and ``causal``. ``last_rows``: every query is
    the last row of its keys (nothing lies to its right). Sides >= ``seqlen_k`` are unbounded, as in flash-attn."""
    if not isinstance(causal, bool):
        raise FlashAttnInputError(f"causal must be a bool, got {type(causal).__name__}")
    try:
        n = len(window_size)
    except TypeError:
        n = -1
    if n != 2 or isinstance(window_size, (str, bytes)):
        raise FlashAttnInputError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), got "
                                  f"{window_size!r}")
    left, right = (_int("window_size", w) for w in window_size)
    if left < -1 or right < -1:
        raise FlashAttnInputError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), got "
                                  f"{(left, right)}")
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    if not causal and left == -1 and right == -1:
        return False, None
    if causal or last_rows or right == 0:
        return True, (left + 1 if left >= 0 else None)
    raise FlashAttnInputError(
        f"window_size={(left, right)} with causal=False has a right side: drope's windows are causal (key j visible "
        "to position p iff p - window < j <= p); use causal=True or right=0")


def _common(dropout_p, alibi_slopes, softcap, softmax_scale) -> Optional[float]:
    """Refuse what drope lacks; flash's softcap (0.0 = off) as drope's (None = off)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or dropout_p != 0:
        raise FlashAttnInputError(f"dropout_p must be 0.0 (drope's kernels have no attention dropout), got "
                                  f"{dropout_p!r}")
    if alibi_slopes is not None:
        raise FlashAttnInputError("alibi_slopes is not supported by drope (no ALiBi bias); pass None")
    if isinstance(softcap, bool) or not isinstance(softcap, Real) or not 0 <= softcap <= MAX_MULTIPLIER:
        raise FlashAttnInputError(f"softcap must be a float in [0, {MAX_MULTIPLIER:g}] (0.0 = off), got {softcap!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, Real)
                                      or not 0 <= softmax_scale <= MAX_MULTIPLIER):
        raise FlashAttnInputError(f"softmax_scale must be None or a float in [0, {MAX_MULTIPLIER:g}], got "
                                  f"{softmax_scale!r}")
    return float(softcap) if softcap > 0 else None


def _dims(name: str, t, n: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != n:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise FlashAttnInputError(f"{name} must be {layout}, got {got}")


def _pad8(*ts: Optional[torch.Tensor]):
    """Zero-pad the head dim (last) up to a multiple of 8, as flash-attn does for such head dims."""
    return tuple(None if t is None else F.pad(t, [0, -t.shape[-1] % 8]) for t in ts)


def _scale(softmax_scale, headdim: int) -> float:
    return float(softmax_scale) if softmax_scale is not None else headdim ** -0.5


class _NoBackward(torch.autograd.Function):
    """The forward's output, whose backward raises: a paged KV cache has no backward (flash-attn's neither)."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("drope.flash_attn.flash_attn_varlen_func: no backward through a paged KV cache "
                           "(block_table); pack the keys (total_k, nheads_k, headdim) for a differentiable pass")


@_flash_errors
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_func``: q (batch, seqlen_q, nheads, headdim), k / v (batch, seqlen_k, nheads_k,
    headdim); returns out (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse, None)`` with
    ``return_attn_probs`` (lse (batch, nheads, seqlen_q)). Differentiable in q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _dims(name, t, 4, "(batch, seqlen, nheads, headdim)")
    cap = _common(dropout_p, alibi_slopes, softcap, softmax_scale)
    SQ, SK, D = q.shape[1], k.shape[1], q.shape[-1]
    causal, window = _window(window_size, causal, SK, last_rows=SQ == 1)
    scale = _scale(softmax_scale, D)
    qp, kp, vp = _pad8(q, k, v) if D % 8 else (q, k, v)
    # causal with more queries than keys: the first SQ - SK rows see no key (zeros), the others are a square problem
    skip = SQ - SK if causal and SQ > SK else 0
    out, lse = attention(qp[:, skip:].transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), causal=causal,
                         softmax_scale=scale, window=window, softcap=cap, return_lse=True)
    out = out.transpose(1, 2)
    if skip:
        out = torch.cat((out.new_zeros((q.shape[0], skip, *out.shape[2:])), out), 1)
        lse = torch.cat((lse.new_full((*lse.shape[:2], skip), -math.inf), lse), 2)
    out = out[..., :D] if D % 8 else out
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_qkvpacked_func``: qkv (batch, seqlen, 3, nheads, headdim)."""
    _dims("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise FlashAttnInputError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_kvpacked_func``: kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    _dims("kv", kv, 5, "(batch, seqlen, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise FlashAttnInputError(f"kv must be (batch, seqlen, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def _max_seqlen(name: str, value) -> int:
    value = _int(name, value)
    if value < 0:
        raise FlashAttnInputError(f"{name} must be an int >= 0 (the longest sequence, known on the host), got {value}")
    return value


def _check_varlen_values(q, cu_q, cu_k, total_q: int, total_k: Optional[int], max_q: int, max_k: int,
                         block_table, num_blocks: int, page: int) -> None:
    """Boundaries (and page indices) where they are on the CPU: 0 = c[0] <= ... <= c[N] = total, documents within
    max_seqlen_q / max_seqlen_k and within their block_table row. More queries than keys is allowed (flash-attn
    gives those rows zeros)."""
    c = _boundaries("cu_seqlens_q", cu_q, total_q, q, host_values(cu_q))
    ck = _boundaries("cu_seqlens_k", cu_k, total_k, q, host_values(cu_k))
    if cu_k.numel() != cu_q.numel():
        raise FlashAttnInputError(f"cu_seqlens_k must hold as many boundaries as cu_seqlens_q ({cu_q.numel()}), got "
                                  f"{cu_k.numel()}")
    if c is not None and max(b - a for a, b in zip(c[:-1], c[1:])) > max_q:
        raise FlashAttnInputError(f"max_seqlen_q={max_q} is below the longest query sequence in cu_seqlens_q")
    if ck is not None:
        longest = max(b - a for a, b in zip(ck[:-1], ck[1:]))
        if longest > max_k and block_table is None:
            raise FlashAttnInputError(f"max_seqlen_k={max_k} is below the longest key sequence in cu_seqlens_k")
        if block_table is not None and longest > block_table.shape[1] * page:
            raise FlashAttnInputError(
                f"cu_seqlens_k: a sequence of {longest} keys exceeds the capacity addressable by block_table "
                f"(max_num_blocks_per_seq * page_block_size = {block_table.shape[1] * page})")
    if block_table is not None and host_values(block_table) and block_table.numel():
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= num_blocks:
            raise FlashAttnInputError(f"block_table holds block index {lo if lo < 0 else hi}, outside [0, {num_blocks}) "
                                      f"(k has {num_blocks} blocks)")


@_flash_errors
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, s_aux=None):
    """``flash_attn.flash_attn_varlen_func``: q (total_q, nheads, headdim), k / v (total_k, nheads_k, headdim), or
    paged caches (num_blocks, page_block_size, nheads_k, headdim) with ``block_table`` (batch, max_blocks);
    cu_seqlens int32 (batch + 1,). Returns out (total_q, nheads, headdim), or ``(out, softmax_lse, None)`` (lse
    (nheads, total_q)). Differentiable in q, k, v without ``block_table``. ``max_seqlen_q == 1`` (decode rows) lets a
    non-causal window keep a right side (moot: each query is its sequence's last key). ``s_aux``: sinks, as
    :func:`flash_attn_with_kvcache`."""
    _dims("q", q, 3, "(total_q, nheads, headdim)")
    paged = block_table is not None
    layout = "(num_blocks, page_block_size, nheads_k, headdim) with block_table" if paged else \
        "(total_k, nheads_k, headdim)"
    for name, t in (("k", k), ("v", v)):
        _dims(name, t, 4 if paged else 3, layout)
    if paged:
        _dims("block_table", block_table, 2, "(batch, max_num_blocks_per_seq) int32")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _dims(name, t, 1, "a (batch + 1,) int32 tensor of sequence boundaries")
    max_q, max_k = _max_seqlen("max_seqlen_q", max_seqlen_q), _max_seqlen("max_seqlen_k", max_seqlen_k)
    cap = _common(dropout_p, alibi_slopes, softcap, softmax_scale)
    page = k.shape[1] if paged else 1
    _check_varlen_values(q, cu_seqlens_q, cu_seqlens_k, q.shape[0], None if paged else k.shape[0], max_q, max_k,
                         block_table, k.shape[0] if paged else 0, page)
    seqlen_k = block_table.shape[1] * page if paged else max(max_k, 1)
    causal, window = _window(window_size, causal, seqlen_k, last_rows=max_q == 1)
    D = q.shape[-1]
    scale = _scale(softmax_scale, D)
    if D % 8:
        q, k, v = _pad8(q, k, v)
    kk, vv = (k, v) if paged else (k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    with torch.set_grad_enabled(grad and not paged):
        out, lse = attention(q.transpose(0, 1)[None], kk, vv, causal=causal, softmax_scale=scale, window=window,
                             softcap=cap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                             block_table=block_table, sinks=s_aux, return_lse=True, check_values=False)
    out = out[0].transpose(0, 1)
    if paged and grad:
        out = _NoBackward.apply(out, q)
    out = out[..., :D] if out.shape[-1] != D else out
    return (out, lse[0], None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn.flash_attn_varlen_qkvpacked_func``: qkv (total, 3, nheads, headdim)."""
    _dims("qkv", qkv, 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise FlashAttnInputError(f"qkv must be (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_varlen_kvpacked_func``: kv (total_k, 2, nheads_k, headdim)."""
    _dims("kv", kv, 4, "(total_k, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise FlashAttnInputError(f"kv must be (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _cache_lengths(cache_seqlens, B: int, new: int, capacity: int, where: str, device) -> Optional[torch.Tensor]:
    """flash's ``cache_seqlens`` (the lengths before the append: an int or a (batch,) int32 tensor), checked in its
    terms where it costs no sync, as a (batch,) tensor (None: the whole cache is live)."""
    if cache_seqlens is None:
        return None
    limit = f"the capacity {where} = {capacity}"
    if not isinstance(cache_seqlens, torch.Tensor):
        n = _int("cache_seqlens", cache_seqlens)
        if not 0 <= n <= capacity - new:
            plus = f" + seqlen_new ({new})" if new else ""
            raise FlashAttnInputError(f"cache_seqlens={n}{plus} is outside [0, {limit}]")
        return torch.full((B,), n, dtype=torch.int32, device=device)
    if tuple(cache_seqlens.shape) != (B,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise FlashAttnInputError(f"cache_seqlens must be an int or a ({B},) int32 tensor (the cache lengths before the "
                                  f"append), got {tuple(cache_seqlens.shape)} {cache_seqlens.dtype}")
    if cache_seqlens.device != device:
        raise FlashAttnInputError(f"cache_seqlens is on {cache_seqlens.device} but q is on {device}")
    if host_values(cache_seqlens) and B:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0:
            raise FlashAttnInputError(f"cache_seqlens holds a negative length {lo}")
        if hi + new > capacity:
            plus = " + seqlen_new" if new else ""
            raise FlashAttnInputError(f"max(cache_seqlens){plus} (= {hi + new}) exceeds {limit}")
    return cache_seqlens


def _leftpad_mask(cache_leftpad, lens: Optional[torch.Tensor], B: int, smax: int, device):
    """flash's ``cache_leftpad`` (each row's keys start there) as a key mask, and the lengths with rows whose pad is
    outside [0, length] set to -1 (NaN rows: a bad pad on the device is loud; checked on the CPU)."""
    if not isinstance(cache_leftpad, torch.Tensor) or tuple(cache_leftpad.shape) != (B,) or \
            cache_leftpad.dtype not in (torch.int32, torch.int64):
        got = (tuple(cache_leftpad.shape), cache_leftpad.dtype) if isinstance(cache_leftpad, torch.Tensor) else \
            type(cache_leftpad).__name__
        raise FlashAttnInputError(f"cache_leftpad must be a ({B},) int32 tensor (where each row's keys start), got {got}")
    if cache_leftpad.device != device:
        raise FlashAttnInputError(f"cache_leftpad is on {cache_leftpad.device} but q is on {device}")
    full = lens if lens is not None else torch.full((B,), smax, dtype=torch.int32, device=device)
    if host_values(cache_leftpad) and host_values(full) and B:
        bad = (cache_leftpad < 0) | (cache_leftpad > full)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise FlashAttnInputError(f"cache_leftpad[{b}] = {int(cache_leftpad[b])} is outside [0, cache_seqlens[{b}] "
                                      f"= {int(full[b])}]")
    mask = torch.arange(smax, device=device)[None, :] >= cache_leftpad[:, None]
    bad = (cache_leftpad < 0) | (cache_leftpad > full)
    return mask, torch.where(bad, -1, full).to(full.dtype)


@_flash_errors
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False, s_aux=None):
    """``flash_attn.flash_attn_with_kvcache``: q (batch, seqlen_q, nheads, headdim) against k_cache / v_cache
    (batch_cache >= batch, seqlen_cache, nheads_k, headdim), or paged (num_blocks, page_block_size, nheads_k, headdim)
    with ``block_table`` (batch, max_blocks) (any page size that is a multiple of 16). ``k`` / ``v`` (batch,
    seqlen_new, nheads_k, headdim), when given, are written into the caches in place at ``cache_seqlens`` (the lengths
    before them) and attended in the same call. Returns out (batch, seqlen_q, nheads, headdim), or
    ``(out, softmax_lse)`` with ``return_softmax_lse``. Inference only."""
    _dims("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cache_layout = "(num_blocks, page_block_size, nheads_k, headdim) with block_table" if paged else \
        "(batch_cache, seqlen_cache, nheads_k, headdim)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _dims(name, t, 4, cache_layout)
    if rotary_cos is not None or rotary_sin is not None:
        raise FlashAttnInputError("rotary_cos / rotary_sin are not supported by drope.flash_attn.flash_attn_with_kvcache: "
                                  "rotate q and k first (drope.kernels.qk_norm_rope), then pass rotary_cos=None")
    if cache_batch_idx is not None:
        raise FlashAttnInputError("cache_batch_idx is not supported: index the caches yourself (row b of the batch "
                                  "reads row b of k_cache / v_cache, or its block_table row)")
    if (k is None) != (v is None):
        raise FlashAttnInputError("k and v go together: pass both (the new tokens' keys and values) or neither")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise FlashAttnInputError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    cap = _common(0.0, alibi_slopes, softcap, softmax_scale)
    B, SQ, H, D = q.shape
    HKV = k_cache.shape[2]
    # what the attention would refuse is refused before the append writes into the caches
    if not 1 <= D <= 256:
        raise FlashAttnInputError(f"headdim must be in [1, 256] (flash-attn's limit too), got {D}")
    if q.dtype not in KERNEL_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise FlashAttnInputError(f"q, k_cache and v_cache must share one dtype among float16, bfloat16, float32; got "
                                  f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if HKV == 0 or H % HKV:
        raise FlashAttnInputError(f"nheads ({H}) must be a multiple of nheads_k ({HKV})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("block_table", block_table)):
        if t is not None and t.device != q.device:
            raise FlashAttnInputError(f"{name} is on {t.device} but q is on {q.device}")
    if paged:
        _dims("block_table", block_table, 2, "(batch, max_num_blocks_per_seq) int32")
        if block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
            raise FlashAttnInputError(f"block_table must be a ({B}, max_num_blocks_per_seq) int32 tensor, got "
                                      f"{tuple(block_table.shape)} {block_table.dtype}")
        capacity, where = block_table.shape[1] * k_cache.shape[1], \
            "addressable by block_table (max_num_blocks_per_seq * page_block_size)"
        if host_values(block_table) and block_table.numel():
            lo, hi = int(block_table.min()), int(block_table.max())
            if lo < 0 or hi >= k_cache.shape[0]:
                raise FlashAttnInputError(f"block_table holds block index {lo if lo < 0 else hi}, outside "
                                          f"[0, {k_cache.shape[0]}) (k_cache has {k_cache.shape[0]} blocks)")
    else:
        if k_cache.shape[0] < B:
            raise FlashAttnInputError(f"k_cache has {k_cache.shape[0]} batch rows, fewer than q's batch {B}")
        k_cache, v_cache = k_cache[:B], v_cache[:B]
        capacity, where = k_cache.shape[1], "of k_cache (seqlen_cache)"
    if k_cache.shape != v_cache.shape:
        raise FlashAttnInputError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                                  f"{tuple(v_cache.shape)}")
    if k_cache.shape[-1] != D:
        raise FlashAttnInputError(f"k_cache must have headdim {D} (q's), got {k_cache.shape[-1]}")
    new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _dims(name, t, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (HKV, D):
            raise FlashAttnInputError(f"k / v must be (batch, seqlen_new, nheads_k, headdim) = ({B}, seqlen_new, {HKV}, "
                                      f"{D}), got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise FlashAttnInputError(f"k / v must have the cache's dtype {k_cache.dtype}, got {k.dtype}")
        if cache_seqlens is None:
            raise FlashAttnInputError("k / v need cache_seqlens: the position where each row's new tokens are written")
        new = k.shape[1]
    causal, window = _window(window_size, causal, capacity, last_rows=SQ == 1)
    if not causal and SQ > 1:
        raise FlashAttnInputError("causal=False with several query rows (seqlen_q > 1) is not supported: drope's "
                                  "decode is causal among the new rows (pass causal=True, or one row at a time)")
    lens = _cache_lengths(cache_seqlens, B, new, capacity, where, q.device)
    if lens is not None and new:
        lens = lens + new  # drope's lengths count the new tokens (a device op: no sync)
    key_mask = None
    if cache_leftpad is not None:
        key_mask, lens = _leftpad_mask(cache_leftpad, lens, B, capacity, q.device)
    kc = k_cache if paged else k_cache.transpose(1, 2)
    vc = v_cache if paged else v_cache.transpose(1, 2)
    k_new = None if k is None else k.transpose(1, 2)
    v_new = None if v is None else v.transpose(1, 2)
    scale = _scale(softmax_scale, D)
    if k is not None and (new != SQ or D % 8):
        # the append alone (any number of new tokens, any head dim), then attention without it
        with torch.no_grad():
            ops.kv_append(k_cache=kc, v_cache=vc, k_new=k_new, v_new=v_new, cache_seqlens=lens,
                          block_table=block_table)
        k_new = v_new = None
    if D % 8:
        q, kc, vc = _pad8(q, kc, vc)  # copies, as flash-attn's own padding
    with torch.no_grad():
        out, lse = decode_attention(q.transpose(1, 2), kc, vc, cache_seqlens=lens, softmax_scale=scale,
                                    num_splits=num_splits or None, return_lse=True, window=window, softcap=cap,
                                    key_mask=key_mask, block_table=block_table, k_new=k_new, v_new=v_new,
                                    sinks=s_aux, check_values=False)
    out = out.transpose(1, 2)[..., :D]
    return (out, lse) if return_softmax_lse else out
