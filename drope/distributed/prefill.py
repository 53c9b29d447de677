"""Context-parallel attention over a sequence sharded along S: all-gather K/V, attend locally, reduce-scatter dK/dV.

Llama 3's and TransformerEngine's all-gather context parallelism, on drope's kernels. Each rank holds its rows of
q, k, v (:mod:`drope.distributed.layout`). The forward all-gathers K and V (one collective: both in one buffer,
sequence-major, so the gathered keys are a strided (B, Hkv, S, D) view), puts them in global order, and computes
each run of consecutive local query rows with one call of :func:`drope.kernels.attention`: a run of global rows
[a, b) under drope's bottom-right causal alignment is exactly ``attention(q_run, k[..., :b, :], v[..., :b, :])``,
so windows, chunks, soft-caps, sinks and per-row scales work unchanged (positions are relative to Sk). Without a
causal mask every local row sees every key: one call on the keys in the order they were gathered. Packed documents
(global ``cu_seqlens``, as ring-flash-attention's llama3 variant): a run becomes one varlen call over the documents
it meets, each with its rows in the run and its keys up to the run's end (the whole document without a causal mask).

The backward gathers K/V again instead of keeping them (memory: only local tensors are saved), calls the kernels'
backward operator ``drope::attention_bwd`` on each run (no recomputed forward), sums dK/dV over the runs in fp32 and
reduce-scatters them to their owners (one collective, fp32: W partial gradients are summed without W roundings).
The q-norm and k-norm weight and sink gradients are this rank's share: the sum over ranks is the full gradient
(the training loop's all-reduce over the context group makes it).

| operator | what | collectives |
|---|---|---|
| ``drope::cp_attention`` | forward: (out, lse) of the local rows | signature check (``check_ranks``), K/V all-gather |
| ``drope::cp_attention_bwd`` | dq, dk, dv, weight/sink shares | K/V all-gather, dK/dV reduce-scatter (if needed) |
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import kernels
from ..kernels.interface import autocast_inputs
from ..validation import AttentionShape, check_attention, split_scale
from .collectives import exchange, gather_rows, register_signature, scatter_rows, signature
from .layout import LAYOUTS, Group, check_layout, global_order, rank_major_order, resolve_group, segments

__all__ = ["attention"]

_FIELDS = ("B", "Hq", "Hkv", "rows of q", "rows of k", "rows of v", "D", "q dtype", "k dtype", "v dtype", "device",
           "layout", "causal", "window", "chunk", "softcap", "softmax_scale", "softmax_scale.shape[0]",
           "softmax_scale.shape[1]", "softmax_scale.shape[2]", "q_norm_weight.shape[0]", "q_norm_weight.shape[1]",
           "k_norm_weight.shape[0]", "k_norm_weight.shape[1]", "sinks.shape[0]", "norm_eps", "k/v require grad",
           "cu_seqlens.shape[0]", "cu_seqlens (checksum)")
register_signature("drope.distributed.attention", _FIELDS)


def dims(t, n: int) -> list:
    """The first ``n`` sizes of ``t`` padded with None (all None when ``t`` is not a tensor)."""
    shape = list(t.shape)[:n] if isinstance(t, Tensor) else []
    return shape + [None] * (n - len(shape))


def _check_local(q, k, v, *, world, layout, causal, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, window,
                 chunk, sinks, softcap, cu_seqlens) -> AttentionShape:
    check_layout(layout)
    shape = check_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, rope=None,
                            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps, window=window,
                            chunk=chunk, sinks=sinks, softcap=softcap, kernel=True)
    if shape.SK != shape.SQ:
        raise ValueError(f"k: q, k and v are this rank's rows of one sequence, so they hold the same number of rows; "
                         f"got {shape.SQ} rows of q and {shape.SK} of k/v")
    if shape.SQ == 0:
        raise ValueError("q: this rank holds no rows (S_local = 0)")
    if layout == "headtail" and shape.SQ % 2:
        raise ValueError(f"q: the head-tail layout needs S % 2W == 0 (two equal chunks per rank); this rank holds "
                         f"{shape.SQ} rows, an odd number")
    if cu_seqlens is not None:
        _check_documents(cu_seqlens, shape, world * shape.SQ, q)
    return shape


def _check_documents(cu_seqlens, shape: AttentionShape, S: int, q: Tensor) -> None:
    """Global boundaries of documents packed along the sequence: int32 (N+1,), 0 .. S, non-decreasing, B == 1."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype != torch.int32:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else \
            type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of N+1 global document boundaries, got {got}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if shape.B != 1:
        raise ValueError(f"cu_seqlens: packed documents live in one sequence (B == 1), got B={shape.B}")
    if torch.compiler.is_compiling():
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != S or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the global length S={S} (non-decreasing), got "
                         f"{bounds[:4]}{'...' if len(bounds) > 4 else ''}{bounds[-1:] if len(bounds) > 4 else ''}")


def _checksum(cu_seqlens) -> Optional[float]:
    """A position-weighted sum of the boundaries (eager only: it reads them): ranks given other documents differ."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or torch.compiler.is_compiling():
        return None
    return float(sum((i + 1) * int(b) for i, b in enumerate(cu_seqlens.tolist())) % 2**50)


def _signature(q, k, v, *, world, layout, causal, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, window,
               chunk, sinks, softcap, cu_seqlens) -> List[float]:
    """The fields every rank must agree on (valid or not: a rejected input still sends one)."""
    tensors = all(isinstance(t, Tensor) for t in (q, k, v))
    B, HQ, SQ, D = dims(q, 4)
    scale_kind = softmax_scale if not isinstance(softmax_scale, Tensor) else -2.0
    grad_kv = tensors and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    number = (int, float)
    return signature("drope.distributed.attention", [
        B, HQ, dims(k, 2)[1], SQ, dims(k, 3)[2], dims(v, 3)[2], D,
        *(t.dtype if isinstance(t, Tensor) else None for t in (q, k, v)), q.device if tensors else None,
        LAYOUTS.index(layout) if layout in LAYOUTS else None, bool(causal),
        *(x if isinstance(x, number) else None for x in (window, chunk, softcap)),
        scale_kind if isinstance(scale_kind, number) else None, *dims(softmax_scale, 3),
        *dims(q_norm_weight, 2), *dims(k_norm_weight, 2), dims(sinks, 1)[0],
        norm_eps if isinstance(norm_eps, number) else None, grad_kv, dims(cu_seqlens, 1)[0], _checksum(cu_seqlens)])


class _Call(NamedTuple):
    """One kernel call: local query rows [a, b) against the gathered keys [k0, k1); with documents, their boundaries
    within the call (int32 lists: the rows of each document, the keys of each document)."""

    a: int
    b: int
    k0: int
    k1: int
    cu_q: Optional[List[int]] = None
    cu_k: Optional[List[int]] = None


def _calls(group: Group, S_local: int, layout: str, causal: bool, bounds: Optional[List[int]]) -> List[_Call]:
    """The kernel calls of this rank: one per run of consecutive global rows [s, e), against keys [0, e) when causal
    (bottom-right alignment makes the run's rows the last of them). Without a causal mask and documents, one call of
    every local row against every key, in gathered order. With documents (global ``bounds``), each document d =
    [ds, de) meeting the run contributes its rows in the run and its keys [ds, min(e, de)) (causal) or [ds, de):
    consecutive documents' keys tile one slice, so the kernel's varlen path (``cu_seqlens_q`` / ``cu_seqlens_k``,
    each document's rows the last of its keys) takes the run in one call."""
    S = S_local * group.size
    if not causal and bounds is None:
        return [_Call(0, S_local, 0, S)]
    calls = []
    for a, b, s in segments(group.size, group.rank, S_local, layout):
        e = s + b - a
        if bounds is None:
            calls.append(_Call(a, b, 0, e))
            continue
        docs = [(ds, de) for ds, de in zip(bounds[:-1], bounds[1:]) if de > ds and ds < e and de > s]
        ends = [min(e, de) if causal else de for ds, de in docs]
        cu_q, cu_k = [0], [0]
        for (ds, de), end in zip(docs, ends):
            cu_q.append(cu_q[-1] + min(e, de) - max(s, ds))
            cu_k.append(cu_k[-1] + end - ds)
        calls.append(_Call(a, b, docs[0][0], ends[-1], cu_q, cu_k))
    return calls


def _boundaries(call: _Call, device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if call.cu_q is None:
        return None, None
    return (torch.tensor(call.cu_q, dtype=torch.int32, device=device),
            torch.tensor(call.cu_k, dtype=torch.int32, device=device))


def _gather_kv(k: Tensor, v: Tensor, group: Group, layout: str, causal: bool) -> Tuple[Tensor, Tensor]:
    """Every rank's K and V in one all-gather: (B, Hkv, S, D) strided views of one (S, 2, B, Hkv, D) buffer, in global
    order when causal (head-tail: one reordering copy; contiguous shards already are), else in rank order."""
    B, HKV, SL, D = k.shape
    send = k.new_empty((SL, 2, B, HKV, D))
    send[:, 0].copy_(k.permute(2, 0, 1, 3))
    send[:, 1].copy_(v.permute(2, 0, 1, 3))
    full = gather_rows(send, group.name, group.size)
    if causal:
        full = global_order(full, group.size, layout)
    return full[:, 0].permute(1, 2, 0, 3), full[:, 1].permute(1, 2, 0, 3)


def _rows(scale_rows: Optional[Tensor], a: int, b: int) -> Optional[Tensor]:
    return None if scale_rows is None else scale_rows[:, :, a:b]


@torch.library.custom_op("drope::cp_attention", mutates_args=())
def _cp_attention(q: Tensor, k: Tensor, v: Tensor, q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor],
                  sinks: Optional[Tensor], scale_rows: Optional[Tensor], cu_seqlens: Optional[Tensor], group_name: str,
                  world_size: int, rank: int, layout: str, causal: bool, scale: float, norm_eps: float,
                  window: Optional[int], chunk: Optional[int], softcap: Optional[float],
                  check: List[float]) -> Tuple[Tensor, Tensor]:
    group = Group(group_name, world_size, rank)
    if check:
        exchange(group, check, device=q.device)
    bounds = None if cu_seqlens is None else cu_seqlens.tolist()
    K, V = _gather_kv(k, v, group, layout, causal or bounds is not None)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    with torch.no_grad():
        for call in _calls(group, q.shape[2], layout, causal, bounds):
            a, b, k0, k1 = call[:4]
            rows = _rows(scale_rows, a, b)
            cu_q, cu_k = _boundaries(call, q.device)
            o, m = kernels.attention(q[:, :, a:b], K[:, :, k0:k1], V[:, :, k0:k1], causal=causal,
                                     softmax_scale=scale if rows is None else rows, q_norm_weight=q_norm_weight,
                                     k_norm_weight=k_norm_weight, norm_eps=norm_eps, window=window, chunk=chunk,
                                     sinks=sinks, softcap=softcap, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     return_lse=True)
            out[:, :, a:b] = o
            lse[:, :, a:b] = m
    return out, lse


@_cp_attention.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, sinks, scale_rows, cu_seqlens, group_name, world_size, rank, layout,
      causal, scale, norm_eps, window, chunk, softcap, check):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("drope::cp_attention_bwd", mutates_args=())
def _cp_attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor], sinks: Optional[Tensor],
                      scale_rows: Optional[Tensor], cu_seqlens: Optional[Tensor], group_name: str, world_size: int,
                      rank: int, layout: str, causal: bool, scale: float, norm_eps: float, window: Optional[int],
                      chunk: Optional[int], softcap: Optional[float], kv_grad: bool,
                      needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    group = Group(group_name, world_size, rank)
    need_q, need_qw, need_kw, need_sinks = needs
    bounds = None if cu_seqlens is None else cu_seqlens.tolist()
    ordered = causal or bounds is not None
    K, V = _gather_kv(k, v, group, layout, ordered)
    B, HKV, S, D = K.shape
    dq = q.new_empty(q.shape) if need_q else _empty(q)
    # dK and dV of every key, in the gathered buffer's (S, 2, B, Hkv, D) order
    dkv = torch.zeros((S, 2, B, HKV, D), dtype=torch.float32, device=q.device) if kv_grad else None
    dqw = dkw = dsinks = None
    for call in _calls(group, q.shape[2], layout, causal, bounds):
        a, b, k0, k1 = call[:4]
        cu_q, cu_k = _boundaries(call, q.device)
        gq, gk, gv, gqw, gkw, gs = torch.ops.drope.attention_bwd(
            dout[:, :, a:b], None if dlse is None else dlse[:, :, a:b], q[:, :, a:b], K[:, :, k0:k1], V[:, :, k0:k1],
            out[:, :, a:b], lse[:, :, a:b], q_norm_weight, k_norm_weight, sinks, _rows(scale_rows, a, b), None, None,
            cu_q, None, cu_k, causal, scale, norm_eps, window, chunk, softcap,
            [need_q, kv_grad, kv_grad, need_qw, need_kw, need_sinks])
        if need_q:
            dq[:, :, a:b] = gq
        if kv_grad:
            dkv[k0:k1, 0] += gk.permute(2, 0, 1, 3)
            dkv[k0:k1, 1] += gv.permute(2, 0, 1, 3)
        dqw = gqw if dqw is None else dqw + gqw
        dkw = gkw if dkw is None else dkw + gkw
        dsinks = gs if dsinks is None else dsinks + gs
    dk, dv = _empty(q), _empty(q)
    if kv_grad:
        mine = scatter_rows(rank_major_order(dkv, world_size, layout) if ordered else dkv, group_name, world_size)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dk.copy_(mine[:, 0].permute(1, 2, 0, 3))
        dv.copy_(mine[:, 1].permute(1, 2, 0, 3))
    return (dq, dk, dv, dqw if need_qw else _empty(q), dkw if need_kw else _empty(q),
            dsinks if need_sinks else _empty(q))


@_cp_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, q_norm_weight, k_norm_weight, sinks, scale_rows, cu_seqlens, group_name,
      world_size, rank, layout, causal, scale, norm_eps, window, chunk, softcap, kv_grad, needs):
    like = (q_norm_weight, k_norm_weight, sinks)
    return (q.new_empty(q.shape) if needs[0] else _empty(q), k.new_empty(k.shape) if kv_grad else _empty(q),
            v.new_empty(v.shape) if kv_grad else _empty(q),
            *(t.new_empty(t.shape) if need and t is not None else _empty(q) for t, need in zip(like, needs[1:])))


_N_INPUTS = 19


def _setup(ctx, inputs, output):
    q, k, v, qw, kw, sinks, rows, cu, *flags, check = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], qw, kw, sinks, rows, cu)
    ctx.flags = tuple(flags)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, qw, kw, sinks, rows, cu = ctx.saved_tensors
    n = ctx.needs_input_grad
    if dout is None:
        dout = torch.zeros_like(out)
    kv_grad = bool(n[1] or n[2])
    needs = [bool(n[0]), bool(n[3]) and qw is not None, bool(n[4]) and kw is not None, bool(n[5]) and sinks is not None]
    grads = torch.ops.drope.cp_attention_bwd(dout, dlse, q, k, v, out, lse, qw, kw, sinks, rows, cu, *ctx.flags,
                                             kv_grad, needs)
    return (*(g if need else None for g, need in zip(grads, (n[0], n[1], n[2], n[3], n[4], n[5]))),
            *([None] * (_N_INPUTS - 6)))


_cp_attention.register_autograd(_backward, setup_context=_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, layout: str = "headtail", causal: bool = True,
              softmax_scale=None, q_norm_weight: Optional[Tensor] = None, k_norm_weight: Optional[Tensor] = None,
              norm_eps: float = 1e-6, window: Optional[int] = None, chunk: Optional[int] = None,
              sinks: Optional[Tensor] = None, softcap: Optional[float] = None, return_lse: bool = False,
              cu_seqlens: Optional[Tensor] = None, check_ranks: bool = True):
    """This rank's rows of ``drope.kernels.attention`` on the full sequence, from this rank's rows of q, k, v.

    Every rank of ``group`` calls it at once with its shards (as :func:`drope.distributed.shard` cuts them) and the
    same options. Forward and backward equal the single-device kernel's rows: the gradients of the shards are the
    rows of the full gradients; those of ``q_norm_weight``, ``k_norm_weight`` and ``sinks`` are this rank's share
    (their sum over the ranks is the full gradient: all-reduce them over the context group, as data-parallel
    training does anyway). Each query row is computed on exactly one rank, so sinks count once per row.

    Args:
        q: (B, Hq, S_local, D), this rank's rows; k, v: (B, Hkv, S_local, D), the same rows. Any strides;
            fp16 / bf16 / fp32; GQA as in the kernel.
        group: the context-parallel process group (None: the default group), W ranks.
        layout: ``"headtail"`` (S = 2W chunks, rank r holds chunks r and 2W-1-r; balanced causal work) or
            ``"contiguous"`` (rank r holds [r*S/W, (r+1)*S/W)).
        causal, window, chunk, sinks, softcap, q_norm_weight, k_norm_weight, norm_eps: as in
            :func:`drope.kernels.attention`, in global positions (k-norm is applied to every gathered key).
        softmax_scale: None (D**-0.5), a float, or per-row / per-head multipliers *of the local rows*: (B, Hq or 1,
            S_local) fp32 (any form the kernel takes with Sq = S_local). The DroPE temperature depends on the global
            position: build it from :func:`drope.distributed.positions`.
        return_lse: also return the fp32 log-sum-exp of the local rows, (B, Hq, S_local) (differentiable).
        cu_seqlens: optional int32 (N+1,) *global* boundaries of documents packed along the sequence (B == 1; the
            same tensor on every rank): each document attends within itself, positions restarting at 0, as
            ``drope.kernels.attention(..., cu_seqlens=)`` on the full sequence. Each run of local rows becomes one
            varlen kernel call over the documents it meets. The boundaries are read on the host (a sync on a GPU).
        check_ranks: first all-gather a small signature of every rank's shapes, dtypes and options, so that ranks
            that disagree (or a rank whose input is invalid) raise on every rank instead of crashing or hanging in
            the K/V all-gather. On a GPU it costs one small collective and a host sync per call.

    Returns:
        out (B, Hq, S_local, D) in q's dtype, or ``(out, lse)``.

    Collectives per call: forward 1 signature all-gather (``check_ranks``) + 1 K/V all-gather (W x the local K and
    V bytes received); backward 1 K/V all-gather (the forward's gathered K/V are not kept: only local tensors are
    saved) + 1 dK/dV reduce-scatter in fp32 (when k or v requires grad). Under ``torch.compile`` the call is the
    operators ``drope::cp_attention`` / ``drope::cp_attention_bwd`` (the collectives run inside them).

    Raises:
        ValueError: no process group (``group``); input outside the kernel's contract; S_local odd under
            ``"headtail"``; ranks passing different shapes, dtypes or options (raised on every rank).
    """
    g = resolve_group(group)
    q, k, v = autocast_inputs(q, k, v)
    opts = dict(world=g.size, layout=layout, causal=causal, softmax_scale=softmax_scale, q_norm_weight=q_norm_weight,
                k_norm_weight=k_norm_weight, norm_eps=norm_eps, window=window, chunk=chunk, sinks=sinks,
                softcap=softcap, cu_seqlens=cu_seqlens)
    error, shape = None, None
    try:
        shape = _check_local(q, k, v, **opts)
    except ValueError as e:
        error = e
    sig = _signature(q, k, v, **opts) if check_ranks else []
    if error is not None:
        if torch.compiler.is_compiling() or not check_ranks:
            raise error
        exchange(g, sig, device=q.device if isinstance(q, Tensor) else None, local_error=error)
    const, rows = split_scale(softmax_scale, shape, q.device)
    out, lse = torch.ops.drope.cp_attention(
        q, k, v, q_norm_weight, k_norm_weight, sinks, None if rows is None else rows.detach(), cu_seqlens, g.name,
        g.size, g.rank, layout, causal, float(const), float(norm_eps), window, chunk,
        None if softcap is None else float(softcap), sig)
    return (out, lse) if return_lse else out
