"""Argument checks shared by the kernels and the reference.

Every check raises ``ValueError`` naming the argument and what is accepted, so the kernels and
``drope.reference`` reject exactly the same inputs. Pure PyTorch: no Triton, no transformers.
"""

from __future__ import annotations

from numbers import Real
from typing import NamedTuple, Optional, Tuple

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# any multiple of 8 up to 256: the kernels pad D to a power of two with masked loads, no copies
KERNEL_HEAD_DIMS = tuple(range(8, 257, 8))
# softmax_scale entries and softcap above this overflow fp32 logits for ordinary inputs (|q.k| of a
# few hundred already reaches 1e38 at scale 1e36); a one-hot softmax needs nothing near it
MAX_MULTIPLIER = 1e6
# window and chunk sizes are int32 in the kernels
MAX_SPAN = 2**31 - 1
KEY_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8)


class DeviceError(ValueError, RuntimeError):
    """A kernel was called on tensors of a device it has no kernel for (drope's run on CUDA and CPU tensors)."""


class AttentionShape(NamedTuple):
    """Sizes of one call (a tuple: built on every call, so built cheaply)."""

    B: int
    HQ: int
    HKV: int
    SQ: int
    SK: int
    D: int

    @property
    def G(self) -> int:
        return self.HQ // self.HKV


def compiling() -> bool:
    """Whether the call is being traced by torch.compile / torch.export (no tensor values exist then)."""
    return torch.compiler.is_compiling()


def host_values(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be checked without a device sync: a CPU tensor, outside tracing."""
    return t.device.type == "cpu" and not compiling()


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_shape(t)}")


def _check_same_device(ref: torch.Tensor, **tensors) -> None:
    dev = ref.device
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but q is on {dev}; all tensors must share one device")


def check_qkv(q, k, v, *, kernel: bool) -> AttentionShape:
    """Shapes, dtypes and devices of q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D)."""
    for name, t, layout in (("q", q, "(B, Hq, Sq, D)"), ("k", k, "(B, Hkv, Sk, D)"), ("v", v, "(B, Hkv, Sk, D)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _check_tensor(name, t, 4, layout)
    qs, ks = q.shape, k.shape
    B, HQ, SQ, D = qs
    if ks != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Sk, D), got k {_shape(k)} and v {_shape(v)}")
    _, HKV, SK, DK = ks
    if ks[0] != B:
        raise ValueError(f"k/v batch size {ks[0]} does not match q's batch size {B}")
    if DK != D:
        raise ValueError(f"k/v head dim {DK} does not match q's head dim {D}; D must be the same for q, k, v")
    if HKV == 0 or HQ % HKV != 0:
        raise ValueError(f"the number of query heads Hq={HQ} must be a multiple of the number of key/value heads Hkv={HKV}")
    if D < 1:
        raise ValueError(f"head dim D must be at least 1, got q of shape {_shape(q)}")
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if kernel:
        if dt not in KERNEL_DTYPES:
            raise ValueError(f"q/k/v dtype {q.dtype} is not supported; accepted: float16, bfloat16, float32")
        if D > 256 or D % 8:
            raise ValueError(f"head dim D={D} is not supported; accepted: a multiple of 8 from 8 to 256")
    elif not dt.is_floating_point:
        raise ValueError(f"q/k/v must be floating point, got {q.dtype}")
    dev = q.device
    if k.device != dev or v.device != dev:
        _check_same_device(q, k=k, v=v)
    return AttentionShape(B, HQ, HKV, SQ, SK, D)


def check_norm_weight(name: str, w, heads: int, D: int, q: torch.Tensor) -> None:
    if w is None:
        return
    if not isinstance(w, torch.Tensor) or tuple(w.shape) not in ((D,), (heads, D)):
        got = _shape(w) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must have shape ({D},) or ({heads}, {D}), got {got}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {w.dtype}")
    _check_same_device(q, **{name: w})


def check_rope(rope, SK: int, D: int, q: torch.Tensor) -> None:
    if rope is None:
        return
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise ValueError("rope must be None or a pair (cos, sin) of tensors of shape (Sk, D/2)")
    for name, t in zip(("rope cos", "rope sin"), rope):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] * 2 != D:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} table must have shape (Sk, D/2) = ({SK}, {D // 2}) or longer, got {got}")
        if t.shape[0] < SK:
            raise ValueError(f"{name} table has {t.shape[0]} rows, shorter than Sk={SK}; it must cover positions 0..Sk-1")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} table must be floating point, got {t.dtype}")
        _check_same_device(q, **{name: t})


def check_scale(softmax_scale, B: int, HQ: int, SQ: int, q: torch.Tensor, *, rows_name: str = "Sq",
                values: bool = True) -> None:
    """None, a float, or a tensor of shape (Sq,), (B, Sq), (Hq,) or (B, Hq, Sq) (1s broadcast in 3-D).

    A 1-D tensor whose length is both Sq and Hq is read as (Sq,): pass (1, Hq, 1) for per-head.
    Every multiplier lies in [0, MAX_MULTIPLIER]: floats always, tensor entries where that costs no
    device sync (CPU tensors outside torch.compile); on a GPU an entry outside gives NaN rows.
    """
    if softmax_scale is None:
        return
    accepted = f"({rows_name},), (B, {rows_name}), (Hq,) or (B, Hq, {rows_name}) = ({SQ},), ({B}, {SQ}), ({HQ},) or ({B}, {HQ}, {SQ})"
    bound = f"in [0, {MAX_MULTIPLIER:g}] (larger ones overflow the fp32 logits)"
    if isinstance(softmax_scale, torch.Tensor):
        shp = tuple(softmax_scale.shape)
        ok = shp in ((SQ,), (B, SQ), (HQ,)) or (
            len(shp) == 3 and shp[0] in (1, B) and shp[1] in (1, HQ) and shp[2] in (1, SQ))
        if not ok:
            raise ValueError(f"softmax_scale tensor must have shape {accepted}, got {_shape(softmax_scale)}")
        if not softmax_scale.dtype.is_floating_point:
            raise ValueError(f"softmax_scale tensor must be floating point, got {softmax_scale.dtype}")
        _check_same_device(q, softmax_scale=softmax_scale)
        if values and host_values(softmax_scale) and softmax_scale.numel():
            t = softmax_scale.detach()
            if not bool(((t >= 0) & (t <= MAX_MULTIPLIER)).all()):
                bad = t[~((t >= 0) & (t <= MAX_MULTIPLIER))].flatten()[0].item()
                raise ValueError(f"softmax_scale tensor must hold finite multipliers {bound}; got an entry {bad!r}")
        return
    if type(softmax_scale) is not float and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, Real)):
        raise ValueError(f"softmax_scale must be None, a float, or a tensor of shape {accepted}; "
                         f"got {type(softmax_scale).__name__}")
    if not 0 <= softmax_scale <= MAX_MULTIPLIER:
        raise ValueError(f"softmax_scale must be a finite multiplier {bound}; got {softmax_scale!r}")


def check_features(*, causal: bool, window, chunk, sinks, softcap, HQ: int, q: torch.Tensor,
                   values: bool = True) -> None:
    """Sliding window, chunked attention, attention sinks and logit soft-capping (None = off)."""
    for name, value in (("window", window), ("chunk", chunk)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SPAN:
            raise ValueError(f"{name} must be None or an int in [1, 2**31 - 1] (a number of positions), got {value!r}")
        if not causal:
            raise ValueError(f"{name}={value} needs causal=True: it restricts the causal mask "
                             "(key j visible to position p only if j <= p)")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, Real)
                                or not 0 < softcap <= MAX_MULTIPLIER):
        raise ValueError(f"softcap must be None or a float in (0, {MAX_MULTIPLIER:g}] (a larger cap does nothing "
                         f"but overflow fp32), got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (HQ,):
            got = _shape(sinks) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
            raise ValueError(f"sinks must be a ({HQ},) tensor (one logit per query head), got {got}")
        if not sinks.dtype.is_floating_point:
            raise ValueError(f"sinks must be floating point, got {sinks.dtype}")
        _check_same_device(q, sinks=sinks)
        if values and host_values(sinks) and bool(torch.isnan(sinks.detach()).any()):
            raise ValueError("sinks must not hold NaN (a sink of -inf is no sink, +inf takes all the weight)")


def check_key_mask(key_mask, shape: "AttentionShape", q: torch.Tensor, *, per_row: bool = False) -> None:
    """(B, Sk) bool / uint8 / int8, nonzero where a key slot may be attended; (B, Sq, Sk) too with ``per_row``."""
    if key_mask is None:
        return
    B, SQ, SK = shape.B, shape.SQ, shape.SK
    shapes = ((B, SK), (B, SQ, SK)) if per_row else ((B, SK),)
    if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) not in shapes:
        got = _shape(key_mask) if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        accepted = " or ".join(str(s) for s in shapes)
        raise ValueError(f"key_mask must be a {accepted} tensor (nonzero = the key slot may be attended), got {got}")
    if key_mask.dtype not in KEY_MASK_DTYPES:
        raise ValueError(f"key_mask must be bool, uint8 or int8, got {key_mask.dtype}")
    _check_same_device(q, key_mask=key_mask)


def _boundaries(name: str, cu, total: int, q: torch.Tensor, values: bool) -> Optional[list]:
    """One boundary tensor: int32 (N+1,), 0 = c[0] <= ... <= c[N] = total; its values (None when unchecked)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of N+1 document boundaries (N >= 1)")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 (int64 accepted), got {cu.dtype}")
    _check_same_device(q, **{name: cu})
    if not values or compiling():
        return None
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0, got {c[0]}")
    if any(b < a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {c}")
    if total is not None and c[-1] != total:
        raise ValueError(f"{name} must end at the total packed length {total}, got {c[-1]}")
    return c


def query_boundaries(cu_seqlens, cu_seqlens_q):
    """The query boundaries, given as ``cu_seqlens`` or under flash-attention's name ``cu_seqlens_q`` (not both)."""
    if cu_seqlens_q is None:
        return cu_seqlens
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens and cu_seqlens_q are the same argument (the query boundaries): pass one")
    return cu_seqlens_q


def check_cu_seqlens(cu_seqlens, shape: AttentionShape, q: torch.Tensor, *, values: bool = True,
                     cu_seqlens_k=None, rope=None, paged_capacity: Optional[int] = None) -> int:
    """Packed-sequence boundaries: int32 (N+1,), 0 = c[0] <= c[1] <= ... <= c[N] = total. Returns N.

    Empty documents (repeated boundaries) are allowed, so a caller may pad ``cu_seqlens`` to a fixed
    size. With ``cu_seqlens_k`` the queries and keys are packed separately (document d's queries are
    the last ``Lq_d <= Lk_d`` positions of its keys). The values are read on the host (one small copy,
    a device sync for GPU tensors) unless ``values`` is False or torch.compile is tracing the call.
    """
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_k needs cu_seqlens, the boundaries of the packed queries")
    if shape.B != 1:
        raise ValueError(f"with cu_seqlens, q/k/v must be packed as (1, H, total, D); got batch size {shape.B}")
    if cu_seqlens_k is None and shape.SQ != shape.SK:
        raise ValueError(f"with cu_seqlens alone, q and k must hold the same packed tokens; got Sq={shape.SQ}, "
                         f"Sk={shape.SK} (pass cu_seqlens_k for keys packed apart from the queries)")
    c = _boundaries("cu_seqlens", cu_seqlens, shape.SQ, q, values)
    if cu_seqlens_k is None:
        return cu_seqlens.numel() - 1
    if rope is not None:
        raise ValueError("rope is not supported with cu_seqlens_k: rotate q and k first (drope.kernels.qk_norm_rope "
                         "with each document's positions), or pack queries and keys together")
    ck = _boundaries("cu_seqlens_k", cu_seqlens_k, shape.SK if paged_capacity is None else None, q, values)
    if cu_seqlens_k.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_seqlens_k must hold as many boundaries as cu_seqlens ({cu_seqlens.numel()}), got "
                         f"{cu_seqlens_k.numel()}")
    if c is not None and ck is not None:
        for d, (a, b, ka, kb) in enumerate(zip(c[:-1], c[1:], ck[:-1], ck[1:])):
            if b - a > kb - ka:
                raise ValueError(f"cu_seqlens_k: document {d} has {b - a} queries but only {kb - ka} keys; each "
                                 "document's queries are the last of its keys (Lq <= Lk)")
            if paged_capacity is not None and kb - ka > paged_capacity:
                raise ValueError(f"cu_seqlens_k: document {d} has {kb - ka} keys, more than its block_table row holds "
                                 f"(max_pages x page_size = {paged_capacity})")
    return cu_seqlens.numel() - 1


def check_attention(q, k, v, *, causal, softmax_scale, rope, q_norm_weight, k_norm_weight, norm_eps, cu_seqlens=None,
                    window=None, chunk=None, sinks=None, softcap=None, key_mask=None, kernel: bool,
                    values: bool = True, cu_seqlens_k=None, block_table=None) -> AttentionShape:
    """Every check of the ``attention`` contract; returns the problem's sizes. ``values=False`` skips the checks of
    tensor values (a trusted caller: the HF layer builds its scales and boundaries itself).

    With ``block_table`` k and v are paged caches read through it, one row per document (varlen only); SK is then
    the capacity of all the rows, an upper bound of the keys."""
    capacity = None
    if block_table is not None:
        if cu_seqlens is None or cu_seqlens_k is None:
            raise ValueError("block_table needs cu_seqlens (or cu_seqlens_q) and cu_seqlens_k: the paged keys are "
                             "read per document, its key length from cu_seqlens_k")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of N+1 document boundaries (N >= 1)")
        if key_mask is not None:
            raise ValueError("key_mask is not supported with block_table (the paged keys have no packed index)")
        if k_norm_weight is not None:
            raise ValueError("k_norm_weight is not supported with block_table: normalise keys before caching them")
        shape = check_paged(q, k, v, block_table, kernel=kernel, values=values, rows=cu_seqlens.numel() - 1,
                            names=("k", "v"))
        capacity = shape.SK
        shape = shape._replace(SK=(cu_seqlens.numel() - 1) * capacity)
    else:
        shape = check_qkv(q, k, v, kernel=kernel)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and shape.SQ > shape.SK and cu_seqlens_k is None:  # packed apart: checked per document
        raise ValueError(
            f"causal attention needs Sq <= Sk (queries are the last Sq of the Sk positions), got Sq={shape.SQ} > Sk={shape.SK}"
        )
    if rope is not None and shape.D % 2:
        raise ValueError(f"rope needs an even head dim, got D={shape.D}")
    check_rope(rope, shape.SK, shape.D, q)
    if rope is not None and shape.SQ > shape.SK:
        raise ValueError(
            f"rope needs Sq <= Sk: query row i sits at position Sk - Sq + i, negative for Sq={shape.SQ} > Sk={shape.SK}"
        )
    check_norm_weight("q_norm_weight", q_norm_weight, shape.HQ, shape.D, q)
    check_norm_weight("k_norm_weight", k_norm_weight, shape.HKV, shape.D, q)
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, Real) or not 0 <= norm_eps < float("inf"):
        raise ValueError(f"norm_eps must be a finite float >= 0, got {norm_eps!r}")
    check_scale(softmax_scale, shape.B, shape.HQ, shape.SQ, q, values=values)
    check_features(causal=causal, window=window, chunk=chunk, sinks=sinks, softcap=softcap, HQ=shape.HQ, q=q,
                   values=values)
    check_key_mask(key_mask, shape, q)
    if cu_seqlens is not None or cu_seqlens_k is not None:
        check_cu_seqlens(cu_seqlens, shape, q, values=values, cu_seqlens_k=cu_seqlens_k, rope=rope,
                         paged_capacity=capacity)
    return shape


def split_scale(softmax_scale, shape: AttentionShape, device,
                dtype: torch.dtype = torch.float32) -> Tuple[float, Optional[torch.Tensor]]:
    """Split ``softmax_scale`` into a constant and an optional (B, Hq, Sq) tensor of ``dtype``.

    The tensor is a broadcast (stride-0) view wherever the caller's tensor has fewer dims: (Sq,),
    (B, Sq), (Hq,) and 3-D forms with 1s are never copied when already of ``dtype``.
    """
    B, HQ, SQ = shape.B, shape.HQ, shape.SQ
    if softmax_scale is None:
        return shape.D ** -0.5, None
    if not isinstance(softmax_scale, torch.Tensor):
        return float(softmax_scale), None
    t = softmax_scale.to(device=device, dtype=dtype)
    if t.dim() == 1:
        t = t[None, None, :] if t.shape[0] == SQ else t[None, :, None]
    elif t.dim() == 2:
        t = t[:, None, :]
    return 1.0, t.expand(B, HQ, SQ)


def check_paged(q, k_cache, v_cache, block_table, *, kernel: bool, values: bool = True, rows: Optional[int] = None,
                names=("k_cache", "v_cache")) -> AttentionShape:
    """A paged KV cache: k_cache/v_cache (num_pages, page_size, Hkv, D), page_size a multiple of 16, and
    ``block_table`` (rows, max_pages) int32 page indices (rows: the batch size B, or the number of documents).
    Returns sizes with SK = max_pages * page_size (the capacity of one row). Page indices are range-checked where
    that costs no device sync."""
    _check_tensor("q", q, 4, "(B, Hq, Sq, D)")
    for name, t in zip(names, (k_cache, v_cache)):
        _check_tensor(name, t, 4, "(num_pages, page_size, Hkv, D) with block_table")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {_shape(k_cache)} and "
                         f"{_shape(v_cache)}")
    rows = q.shape[0] if rows is None else rows
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != rows:
        got = _shape(block_table) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise ValueError(f"block_table must be a ({rows}, max_pages) int32 tensor of page indices, got {got}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 (int64 accepted), got {block_table.dtype}")
    _check_same_device(q, block_table=block_table)
    pages, page_size, HKV, D = k_cache.shape
    if page_size < 16 or page_size % 16:
        raise ValueError(f"the page size ({names[0]}.shape[1]) must be a positive multiple of 16, got {page_size}")
    # the logical cache of each batch row, as the contiguous layout's checks see it
    logical = k_cache.new_empty((1, 1, 1, 1)).expand(q.shape[0], HKV, block_table.shape[1] * page_size, D)
    shape = check_qkv(q, logical, logical, kernel=kernel)
    if values and host_values(block_table) and block_table.numel() and pages:
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= pages:
            raise ValueError(f"block_table holds page index {lo if lo < 0 else hi}, outside [0, {pages}) "
                             f"({names[0]} has {pages} pages)")
    elif values and host_values(block_table) and block_table.numel() and not pages:
        raise ValueError(f"block_table indexes pages but {names[0]} has none")
    return shape


def check_decode(q, k_cache, v_cache, *, cache_seqlens, softmax_scale, num_splits, kernel: bool,
                 max_seqlen=None, window=None, chunk=None, sinks=None, softcap=None, key_mask=None,
                 values: bool = True, block_table=None, k_new=None, v_new=None) -> AttentionShape:
    """Every check of the ``decode_attention`` contract; returns sizes with SK = Smax (cache capacity).

    Lengths in ``cache_seqlens`` are range-checked only when they live on the CPU (no device sync) and
    torch.compile is not tracing. ``max_seqlen`` (a host-side hint of the longest length) must lie in
    [Sq, Smax]. With ``block_table`` the caches are paged (:func:`check_paged`); ``k_new`` / ``v_new``
    (B, Hkv, Sq, D) are written into the cache at each row's last Sq positions before attending.
    """
    if block_table is not None:
        shape = check_paged(q, k_cache, v_cache, block_table, kernel=kernel, values=values)
    else:
        for name, t, layout in (("q", q, "(B, Hq, Sq, D)"), ("k_cache", k_cache, "(B, Hkv, Smax, D)"),
                                ("v_cache", v_cache, "(B, Hkv, Smax, D)")):
            _check_tensor(name, t, 4, layout)
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache and v_cache must have the same shape, got {_shape(k_cache)} and "
                             f"{_shape(v_cache)}")
        shape = check_qkv(q, k_cache, v_cache, kernel=kernel)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together: pass both (the new tokens' keys and values) or neither")
    if k_new is not None:
        want = (shape.B, shape.HKV, shape.SQ, shape.D)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B, Hkv, Sq, D) = {want}, one entry per new query row, got {got}")
            if t.dtype != k_cache.dtype:
                raise ValueError(f"{name} must have the cache's dtype {k_cache.dtype}, got {t.dtype}")
            _check_same_device(q, **{name: t})
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or tuple(cache_seqlens.shape) != (shape.B,):
            got = _shape(cache_seqlens) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
            raise ValueError(f"cache_seqlens must be a ({shape.B},) tensor of valid lengths, got {got}")
        if cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
        _check_same_device(q, cache_seqlens=cache_seqlens)
        if values and host_values(cache_seqlens) and shape.B:
            lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
            if lo < shape.SQ:
                raise ValueError(f"cache_seqlens holds a length {lo} < Sq={shape.SQ}; each length includes the Sq new tokens")
            if hi > shape.SK:
                raise ValueError(f"cache_seqlens holds a length {hi} > Smax={shape.SK}, the cache capacity")
    elif shape.SQ > shape.SK:
        raise ValueError(f"q has Sq={shape.SQ} rows but the cache holds only Smax={shape.SK} positions")
    check_scale(softmax_scale, shape.B, shape.HQ, shape.SQ, q, values=values)
    check_features(causal=True, window=window, chunk=chunk, sinks=sinks, softcap=softcap, HQ=shape.HQ, q=q,
                   values=values)
    check_key_mask(key_mask, shape, q, per_row=True)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or not shape.SQ <= max_seqlen <= shape.SK):
        raise ValueError(f"max_seqlen must be None or an int in [Sq, Smax] = [{shape.SQ}, {shape.SK}] "
                         f"(the longest cache_seqlens entry, known on the host), got {max_seqlen!r}")
    return shape
