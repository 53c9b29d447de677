"""drope's kernels as PyTorch operators (namespace ``drope``): flat schemas, fake implementations, autograd.

Layering, as flash-attention's interface: a public function (:mod:`drope.kernels.interface`) validates and
shapes the arguments -> an operator with a flat schema (tensors, optional tensors, ints, floats, bools; no
Python objects) -> the launcher. ``torch.compile(fullgraph=True)`` and ``torch.export`` record each operator
as one node whose fake implementation gives output shapes and dtypes without running anything; autograd is
registered on the operator.

| operator | what | autograd |
|---|---|---|
| ``drope::attention_fwd`` | QK prologue + attention forward, (out, lse) | ``drope::attention_bwd`` |
| ``drope::attention_bwd`` | dq, dk, dv, d q_norm_weight, d k_norm_weight, d sinks | none (once differentiable) |
| ``drope::decode`` | split-KV decode, (out, lse) (contiguous or paged cache) | none (inference only) |
| ``drope::kv_append`` | writes new tokens' K/V into the caches, in place (mutates them) | none |
| ``drope::qk_norm_rope`` | ``rope(norm(x))``, the prologue alone | ``drope::qk_norm_rope_bwd`` |

In eager mode (plain tensors, nothing tracing) the public functions and the backward call the implementations
directly (through a ``torch.autograd.Function`` when a gradient is needed): the dispatcher costs 15-35 us a
call on this machine's CPU, which a 32-layer decode step would pay 32 times. Inside an operator nothing reads a device value: every decision comes from
shapes, dtypes, devices and None-ness. Gradients not asked for come back from ``attention_bwd`` as empty
(0,) tensors (a schema cannot return None).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .attention import Options, attention_forward
from .attention_bwd import attention_backward
from .decode import decode_launch
from .kv_append import append_kv
from .qk_transform import qk_epilogue, qk_prologue
from .toolkit import check_device, on_device, upcast

__all__ = ["attention_fwd", "decode", "kv_append", "qk_norm_rope"]


def _traced(t: Tensor) -> bool:
    """Whether a call sees tracing tensors (torch.compile, export, AOTAutograd's fake / functional tensors):
    then the operator, else the implementation itself (eager tensors, or meta ones recorded by the inspector)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _rope(cos: Optional[Tensor], sin: Optional[Tensor]):
    return None if cos is None else (cos, sin)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _options(causal, scale, rows, cos, sin, eps, cu, window, chunk, softcap, key_mask, cu_k, bt=None) -> Options:
    return Options(causal=causal, scale=scale, rows=rows, rope=_rope(cos, sin), norm_eps=eps, cu_seqlens=cu,
                   window=window, chunk=chunk, softcap=softcap, key_mask=key_mask, cu_seqlens_k=cu_k, block_table=bt)


def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor],
                   sinks: Optional[Tensor], scale_rows: Optional[Tensor], rope_cos: Optional[Tensor],
                   rope_sin: Optional[Tensor], cu_seqlens: Optional[Tensor], key_mask: Optional[Tensor],
                   cu_seqlens_k: Optional[Tensor], block_table: Optional[Tensor], causal: bool, scale: float,
                   norm_eps: float, window: Optional[int], chunk: Optional[int], softcap: Optional[float],
                   return_lse: bool) -> Tuple[Tensor, Tensor]:
    check_device(q, "attention")
    opt = _options(causal, scale, scale_rows, rope_cos, rope_sin, norm_eps, cu_seqlens, window, chunk, softcap,
                   key_mask, cu_seqlens_k, block_table)
    with on_device(q):
        out, lse = attention_forward(q, k, v, q_norm_weight, k_norm_weight, sinks, opt, return_lse=return_lse)
    return out, lse if lse is not None else _empty(q)


def _attention_fwd_fake(q, k, v, q_norm_weight, k_norm_weight, sinks, scale_rows, rope_cos, rope_sin, cu_seqlens,
                        key_mask, cu_seqlens_k, block_table, causal, scale, norm_eps, window, chunk, softcap,
                        return_lse):
    B, HQ, SQ, D = q.shape
    lse = q.new_empty((B, HQ, SQ) if return_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse


def _attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor], sinks: Optional[Tensor],
                   scale_rows: Optional[Tensor], rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], key_mask: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   causal: bool, scale: float, norm_eps: float, window: Optional[int], chunk: Optional[int],
                   softcap: Optional[float], needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opt = _options(causal, scale, scale_rows, rope_cos, rope_sin, norm_eps, cu_seqlens, window, chunk, softcap,
                   key_mask, cu_seqlens_k)
    with on_device(q):
        grads = attention_backward(dout, q, k, v, out, lse, q_norm_weight, k_norm_weight, sinks, opt, dlse=dlse,
                                   needs_grad=tuple(needs))
    return tuple(_empty(q) if g is None else g for g in grads)


def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, q_norm_weight, k_norm_weight, sinks, scale_rows, rope_cos,
                        rope_sin, cu_seqlens, key_mask, cu_seqlens_k, causal, scale, norm_eps, window, chunk, softcap,
                        needs):
    likes = (q, k, v, q_norm_weight, k_norm_weight, sinks)
    return tuple(t.new_empty(t.shape) if need and t is not None else _empty(q) for t, need in zip(likes, needs))


_FWD_INPUTS = 20


def _attention_setup(ctx, inputs, output):
    q, k, v, qw, kw, sinks, rows, cos, sin, cu, km, cu_k, bt, causal, scale, eps, window, chunk, softcap, _ = inputs
    if bt is not None:
        raise ValueError("drope::attention_fwd with a block_table (paged keys) has no backward: call it without grad")
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, qw, kw, sinks, rows, cos, sin, cu, km, cu_k)
    ctx.flags = (causal, scale, eps, window, chunk, softcap)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, qw, kw, sinks, rows, cos, sin, cu, km, cu_k = ctx.saved_tensors
    if lse.numel() == 0 and out.numel():
        raise RuntimeError("drope::attention_fwd was called with return_lse=False but its output is differentiated; "
                           "call it through drope.kernels.attention")
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    if dout is None:
        dout = torch.zeros_like(out)
    bwd = torch.ops.drope.attention_bwd if _traced(q) else _attention_bwd
    grads = bwd(dout, dlse, q, k, v, out, lse, qw, kw, sinks, rows, cos, sin, cu, km, cu_k, *ctx.flags, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), *([None] * (_FWD_INPUTS - 6)))


def _register(name: str, impl, fake, backward=None, setup_context=None, mutates=()):
    """``drope::<name>`` from ``impl`` (schema from its annotations), its fake and, given a backward, its
    autograd; returns the ``torch.autograd.Function`` eager calls use (the same context and backward)."""
    torch.library.custom_op(f"drope::{name}", impl, mutates_args=mutates)
    torch.library.register_fake(f"drope::{name}", fake)
    if backward is None:
        return None
    torch.library.register_autograd(f"drope::{name}", backward, setup_context=setup_context)
    return type(f"_{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(impl), "setup_context": staticmethod(setup_context), "backward": staticmethod(backward)})


_AttentionFunction = _register("attention_fwd", _attention_fwd, _attention_fwd_fake, _attention_backward,
                               _attention_setup)
_register("attention_bwd", _attention_bwd, _attention_bwd_fake)


def attention_fwd(*args, needs_grad: bool) -> Tuple[Tensor, Tensor]:
    """``drope::attention_fwd`` on the flat ``args``: the operator under torch.compile / export, else direct."""
    if _traced(args[0]):
        return torch.ops.drope.attention_fwd(*args)
    if needs_grad:
        return _AttentionFunction.apply(*args)
    return _attention_fwd(*args)


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Optional[Tensor], scale_rows: Optional[Tensor],
            sinks: Optional[Tensor], key_mask: Optional[Tensor], scale: float, num_splits: int, window: Optional[int],
            chunk: Optional[int], softcap: Optional[float], block_table: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    check_device(q, "decode_attention")
    with on_device(q):
        return decode_launch(q, k_cache, v_cache, cache_seqlens, scale, scale_rows, sinks, key_mask, num_splits,
                             window, chunk, softcap, block_table)


def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale_rows, sinks, key_mask, scale, num_splits, window, chunk,
                 softcap, block_table):
    B, HQ, SQ, D = q.shape
    return q.new_empty((B, HQ, SQ, D)), q.new_empty((B, HQ, SQ), dtype=torch.float32)


_register("decode", _decode, _decode_fake)


def decode(*args) -> Tuple[Tensor, Tensor]:
    """``drope::decode`` on the flat ``args``: the operator under torch.compile / export, else direct."""
    if _traced(args[0]):
        return torch.ops.drope.decode(*args)
    return _decode(*args)


def _kv_append(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Optional[Tensor],
               block_table: Optional[Tensor]) -> None:
    check_device(k_new, "decode_attention")
    with on_device(k_new):
        append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)


def _kv_append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    return None


_register("kv_append", _kv_append, _kv_append_fake, mutates=("k_cache", "v_cache"))


def kv_append(*args) -> None:
    """``drope::kv_append`` on the flat ``args`` (mutates the caches): the operator when traced, else direct."""
    if _traced(args[0]) or _traced(args[2]):
        return torch.ops.drope.kv_append(*args)
    return _kv_append(*args)


def _qk_norm_rope(x: Tensor, weight: Optional[Tensor], rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
                  pos0: int, eps: float) -> Tensor:
    check_device(x, "qk_norm_rope")
    rope = _rope(rope_cos, rope_sin)
    with on_device(x):
        if upcast(x.dtype):
            # the interpreter truncates fp32 -> bf16; torch rounds to nearest, as compiled kernels do
            return qk_prologue(x, weight, rope, None, pos0, eps, torch.float32).to(x.dtype)
        return qk_prologue(x, weight, rope, None, pos0, eps, x.dtype)


def _qk_norm_rope_fake(x, weight, rope_cos, rope_sin, pos0, eps):
    return x.new_empty(x.shape)


def _qk_norm_rope_bwd(gy: Tensor, x: Tensor, weight: Optional[Tensor], rope_cos: Optional[Tensor],
                      rope_sin: Optional[Tensor], pos0: int, eps: float, need_dx: bool,
                      need_dw: bool) -> Tuple[Tensor, Tensor]:
    with on_device(x):
        dx, dw = qk_epilogue(gy, x, weight, _rope(rope_cos, rope_sin), None, pos0, eps, need_dx, need_dw)
    return _empty(x) if dx is None else dx, _empty(x) if dw is None else dw


def _qk_norm_rope_bwd_fake(gy, x, weight, rope_cos, rope_sin, pos0, eps, need_dx, need_dw):
    return x.new_empty(x.shape) if need_dx else _empty(x), weight.new_empty(weight.shape) if need_dw else _empty(x)


def _qk_setup(ctx, inputs, output):
    x, weight, cos, sin, pos0, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.flags = (pos0, eps)


def _qk_backward(ctx, gy):
    x, weight, cos, sin = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None
    bwd = torch.ops.drope.qk_norm_rope_bwd if _traced(x) else _qk_norm_rope_bwd
    dx, dw = bwd(gy, x, weight, cos, sin, *ctx.flags, need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None, None, None, None, None


_QKFunction = _register("qk_norm_rope", _qk_norm_rope, _qk_norm_rope_fake, _qk_backward, _qk_setup)
_register("qk_norm_rope_bwd", _qk_norm_rope_bwd, _qk_norm_rope_bwd_fake)


def qk_norm_rope(*args, needs_grad: bool) -> Tensor:
    """``drope::qk_norm_rope`` on the flat ``args``: the operator under torch.compile / export, else direct."""
    if _traced(args[0]):
        return torch.ops.drope.qk_norm_rope(*args)
    if needs_grad:
        return _QKFunction.apply(*args)
    return _qk_norm_rope(*args)
