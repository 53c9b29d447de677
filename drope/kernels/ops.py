"""drope's kernels as PyTorch operators (namespace ``drope``): flat named schemas, a kernel per device, fakes, autograd.

Layering, as flash-attention's interface: a public function (:mod:`drope.kernels.interface`) validates and
shapes the arguments -> an operator with a flat schema (tensors, optional tensors, ints, floats, bools; no
Python objects) -> the kernel of the tensors' device. ``torch.compile(fullgraph=True)`` and ``torch.export``
record each operator as one node whose fake implementation gives output shapes and dtypes without running
anything; autograd is registered on the operator.

| operator | what | autograd |
|---|---|---|
| ``drope::attention_fwd`` | QK prologue + attention forward, (out, lse) | ``drope::attention_bwd`` |
| ``drope::attention_bwd`` | dq, dk, dv, d q_norm_weight, d k_norm_weight, d sinks | none (once differentiable) |
| ``drope::decode`` | split-KV decode, (out, lse) (contiguous or paged cache) | none (inference only) |
| ``drope::kv_append`` | writes new tokens' K/V into the caches, in place (mutates them) | none |
| ``drope::qk_norm_rope`` | ``rope(norm(x))``, the prologue alone | ``drope::qk_norm_rope_bwd`` |

One operator, a kernel per device (``torch.library.register_kernel``): CUDA tensors run the Triton kernels; CPU
tensors run them in Triton's interpreter when drope's kernels were defined under it (``TRITON_INTERPRET=1`` set
before the import: :func:`cpu_backend` is the one answer), and otherwise the exact PyTorch kernels of
:mod:`drope.kernels.cpu`. Every kernel takes the operator's arguments by name; autograd binds the inputs to those
names (no positional counts).

In eager mode (plain tensors, nothing tracing) the public functions call the device's kernel directly (through a
``torch.autograd.Function`` when a gradient is needed): the dispatcher costs 15-35 us a call on this machine's
CPU, which a 32-layer decode step would pay 32 times. Inside an operator nothing reads a device value: every
decision comes from shapes, dtypes, devices and None-ness. Gradients not asked for come back from
``attention_bwd`` as empty (0,) tensors (a schema cannot return None).
"""

import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .attention import Options, attention_forward
from .attention_bwd import attention_backward
from .cpu import attention as cpu_attention, decode as cpu_decode, prologue as cpu_prologue
from .decode import decode_launch
from .kv_append import append_kv
from .qk_transform import qk_epilogue, qk_prologue
from .toolkit import check_device, defined_interpreted, on_device, upcast

__all__ = ["attention_fwd", "cpu_backend", "decode", "kv_append", "qk_norm_rope"]


def cpu_backend() -> str:
    """What runs drope's kernels on CPU tensors: ``"interpreter"`` (Triton's, when the kernels were defined under
    ``TRITON_INTERPRET=1``) or ``"torch"`` (the exact PyTorch kernels of :mod:`drope.kernels.cpu`)."""
    return "interpreter" if defined_interpreted() else "torch"


def _traced(t: Tensor) -> bool:
    """Whether a call sees tracing tensors (torch.compile, export, AOTAutograd's fake / functional tensors):
    then the operator, else the kernel itself (eager tensors, or meta ones recorded by the inspector)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _names(fn: Callable) -> Tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


# ---- kernels (Triton: CUDA, the interpreter, meta tensors while the inspector records) -----------------------------

def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor],
                   sinks: Optional[Tensor], scale_rows: Optional[Tensor], rope_cos: Optional[Tensor],
                   rope_sin: Optional[Tensor], cu_seqlens: Optional[Tensor], key_mask: Optional[Tensor],
                   cu_seqlens_k: Optional[Tensor], block_table: Optional[Tensor], causal: bool, scale: float,
                   norm_eps: float, window: Optional[int], chunk: Optional[int], softcap: Optional[float],
                   return_lse: bool) -> Tuple[Tensor, Tensor]:
    check_device(q, "attention")
    opt = Options(causal=causal, scale=scale, rows=scale_rows, rope=None if rope_cos is None else (rope_cos, rope_sin),
                  norm_eps=norm_eps, cu_seqlens=cu_seqlens, window=window, chunk=chunk, softcap=softcap,
                  key_mask=key_mask, cu_seqlens_k=cu_seqlens_k, block_table=block_table)
    with on_device(q):
        out, lse = attention_forward(q, k, v, q_norm_weight, k_norm_weight, sinks, opt, return_lse=return_lse)
    return out, lse if lse is not None else _empty(q)


def _attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor], sinks: Optional[Tensor],
                   scale_rows: Optional[Tensor], rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
                   cu_seqlens: Optional[Tensor], key_mask: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   causal: bool, scale: float, norm_eps: float, window: Optional[int], chunk: Optional[int],
                   softcap: Optional[float], needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opt = Options(causal=causal, scale=scale, rows=scale_rows, rope=None if rope_cos is None else (rope_cos, rope_sin),
                  norm_eps=norm_eps, cu_seqlens=cu_seqlens, window=window, chunk=chunk, softcap=softcap,
                  key_mask=key_mask, cu_seqlens_k=cu_seqlens_k)
    with on_device(q):
        grads = attention_backward(dout, q, k, v, out, lse, q_norm_weight, k_norm_weight, sinks, opt, dlse=dlse,
                                   needs_grad=tuple(needs))
    return tuple(_empty(q) if g is None else g for g in grads)


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Optional[Tensor], scale_rows: Optional[Tensor],
            sinks: Optional[Tensor], key_mask: Optional[Tensor], scale: float, num_splits: int, window: Optional[int],
            chunk: Optional[int], softcap: Optional[float], block_table: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    check_device(q, "decode_attention")
    with on_device(q):
        return decode_launch(q, k_cache, v_cache, cache_seqlens, scale, scale_rows, sinks, key_mask, num_splits,
                             window, chunk, softcap, block_table)


def _kv_append(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Optional[Tensor],
               block_table: Optional[Tensor]) -> None:
    check_device(k_new, "decode_attention")
    with on_device(k_new):
        append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)


def _qk_norm_rope(x: Tensor, weight: Optional[Tensor], rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
                  pos0: int, eps: float) -> Tensor:
    check_device(x, "qk_norm_rope")
    rope = None if rope_cos is None else (rope_cos, rope_sin)
    with on_device(x):
        if upcast(x.dtype):
            # the interpreter truncates fp32 -> bf16; torch rounds to nearest, as compiled kernels do
            return qk_prologue(x, weight, rope, None, pos0, eps, torch.float32).to(x.dtype)
        return qk_prologue(x, weight, rope, None, pos0, eps, x.dtype)


def _qk_norm_rope_bwd(gy: Tensor, x: Tensor, weight: Optional[Tensor], rope_cos: Optional[Tensor],
                      rope_sin: Optional[Tensor], pos0: int, eps: float, need_dx: bool,
                      need_dw: bool) -> Tuple[Tensor, Tensor]:
    with on_device(x):
        dx, dw = qk_epilogue(gy, x, weight, None if rope_cos is None else (rope_cos, rope_sin), None, pos0, eps,
                             need_dx, need_dw)
    return _empty(x) if dx is None else dx, _empty(x) if dw is None else dw


# ---- the same operators' PyTorch kernels for CPU tensors (drope.kernels.cpu), same names -------------------------

def _cpu_attention_fwd(**a) -> Tuple[Tensor, Tensor]:
    return cpu_attention.attention_forward(**_renamed(a))


def _cpu_attention_bwd(**a):
    grads = cpu_attention.attention_backward(**_renamed(a))
    return tuple(_empty(a["q"]) if g is None else g for g in grads)


def _renamed(a: Dict) -> Dict:
    a = dict(a)
    a["cu_seqlens_q"] = a.pop("cu_seqlens")
    return a


def _cpu_decode(**a) -> Tuple[Tensor, Tensor]:
    a.pop("num_splits")
    return cpu_decode.decode(**a)


def _cpu_qk_norm_rope_bwd(**a):
    dx, dw = cpu_prologue.qk_norm_rope_backward(**a)
    return _empty(a["x"]) if dx is None else dx, _empty(a["x"]) if dw is None else dw


# ---- fakes --------------------------------------------------------------------------------------------------------

def _attention_fwd_fake(q, k, v, q_norm_weight, k_norm_weight, sinks, scale_rows, rope_cos, rope_sin, cu_seqlens,
                        key_mask, cu_seqlens_k, block_table, causal, scale, norm_eps, window, chunk, softcap,
                        return_lse):
    B, HQ, SQ, D = q.shape
    lse = q.new_empty((B, HQ, SQ) if return_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse


def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, q_norm_weight, k_norm_weight, sinks, scale_rows, rope_cos,
                        rope_sin, cu_seqlens, key_mask, cu_seqlens_k, causal, scale, norm_eps, window, chunk, softcap,
                        needs):
    likes = (q, k, v, q_norm_weight, k_norm_weight, sinks)
    return tuple(t.new_empty(t.shape) if need and t is not None else _empty(q) for t, need in zip(likes, needs))


def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale_rows, sinks, key_mask, scale, num_splits, window, chunk,
                 softcap, block_table):
    B, HQ, SQ, D = q.shape
    return q.new_empty((B, HQ, SQ, D)), q.new_empty((B, HQ, SQ), dtype=torch.float32)


def _kv_append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    return None


def _qk_norm_rope_fake(x, weight, rope_cos, rope_sin, pos0, eps):
    return x.new_empty(x.shape)


def _qk_norm_rope_bwd_fake(gy, x, weight, rope_cos, rope_sin, pos0, eps, need_dx, need_dw):
    return x.new_empty(x.shape) if need_dx else _empty(x), weight.new_empty(weight.shape) if need_dw else _empty(x)


# ---- autograd, by name ---------------------------------------------------------------------------------------------

_FWD = _names(_attention_fwd)
_DIFFERENTIABLE = ("q", "k", "v", "q_norm_weight", "k_norm_weight", "sinks")
_SAVED = ("q", "k", "v", "q_norm_weight", "k_norm_weight", "sinks", "scale_rows", "rope_cos", "rope_sin",
          "cu_seqlens", "key_mask", "cu_seqlens_k")
_FLAGS = ("causal", "scale", "norm_eps", "window", "chunk", "softcap")


def _attention_setup(ctx, inputs, output):
    a = dict(zip(_FWD, inputs))
    if a["block_table"] is not None:
        raise ValueError("drope::attention_fwd with a block_table (paged keys) has no backward: call it without grad")
    out, lse = output
    ctx.save_for_backward(*(a[n] for n in _SAVED), out, lse)
    ctx.flags = {n: a[n] for n in _FLAGS}
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    *saved, out, lse = ctx.saved_tensors
    a = dict(zip(_SAVED, saved))
    if lse.numel() == 0 and out.numel():
        raise RuntimeError("drope::attention_fwd was called with return_lse=False but its output is differentiated; "
                           "call it through drope.kernels.attention")
    needs = [bool(ctx.needs_input_grad[_FWD.index(n)]) for n in _DIFFERENTIABLE]
    if dout is None:
        dout = torch.zeros_like(out)
    args = dict(dout=dout, dlse=dlse, out=out, lse=lse, needs=needs, **a, **ctx.flags)
    grads = torch.ops.drope.attention_bwd(**args) if _traced(a["q"]) else _kernel(_BWD, a["q"])(**args)
    by_name = {n: g if need else None for n, g, need in zip(_DIFFERENTIABLE, grads, needs)}
    return tuple(by_name.get(n) for n in _FWD)


def _qk_setup(ctx, inputs, output):
    x, weight, cos, sin, pos0, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.flags = dict(pos0=pos0, eps=eps)


def _qk_backward(ctx, gy):
    x, weight, cos, sin = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None
    args = dict(gy=gy, x=x, weight=weight, rope_cos=cos, rope_sin=sin, need_dx=need_dx, need_dw=need_dw, **ctx.flags)
    dx, dw = torch.ops.drope.qk_norm_rope_bwd(**args) if _traced(x) else _kernel(_QK_BWD, x)(**args)
    return dx if need_dx else None, dw if need_dw else None, None, None, None, None


# ---- registration ----------------------------------------------------------------------------------------------------

def _register(name: str, triton_kernel, cpu_kernel, fake, backward=None, setup_context=None, mutates=()):
    """``drope::<name>``: schema from ``triton_kernel``'s annotations, that kernel for CUDA, ``cpu_kernel`` (the
    interpreter or torch, :func:`cpu_backend`) for CPU, the fake and, given a backward, autograd. Returns the
    (name, kernels) entry eager calls dispatch with, and the ``torch.autograd.Function`` they use."""
    op = f"drope::{name}"
    torch.library.custom_op(op, triton_kernel, mutates_args=mutates, device_types="cuda")
    torch.library.register_kernel(op, "cpu", lambda *args: _kernel(entry, args[0])(*args))
    torch.library.register_fake(op, fake)
    entry = (_names(triton_kernel), triton_kernel, cpu_kernel)
    if backward is None:
        return entry, None
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    function = type(f"_{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: _kernel(entry, args[0])(*args)),
        "setup_context": staticmethod(setup_context), "backward": staticmethod(backward)})
    return entry, function


def _kernel(entry, t: Tensor) -> Callable:
    """The kernel of ``t``'s device for an operator ``entry``, callable with positional or named arguments."""
    names, triton_kernel, cpu_kernel = entry
    if t.device.type != "cpu" or cpu_backend() == "interpreter":
        return triton_kernel

    def cpu(*args, **kwargs):
        return cpu_kernel(**dict(zip(names, args)), **kwargs)
    return cpu


_FWD_ENTRY, _AttentionFunction = _register("attention_fwd", _attention_fwd, _cpu_attention_fwd, _attention_fwd_fake,
                                           _attention_backward, _attention_setup)
_BWD, _ = _register("attention_bwd", _attention_bwd, _cpu_attention_bwd, _attention_bwd_fake)
_DECODE, _ = _register("decode", _decode, _cpu_decode, _decode_fake)
_APPEND, _ = _register("kv_append", _kv_append, cpu_prologue.append_kv, _kv_append_fake,
                       mutates=("k_cache", "v_cache"))
_QK, _QKFunction = _register("qk_norm_rope", _qk_norm_rope, cpu_prologue.qk_norm_rope, _qk_norm_rope_fake,
                             _qk_backward, _qk_setup)
_QK_BWD, _ = _register("qk_norm_rope_bwd", _qk_norm_rope_bwd, _cpu_qk_norm_rope_bwd, _qk_norm_rope_bwd_fake)


def _positional(names: Tuple[str, ...], a: Dict) -> tuple:
    return tuple(a[n] for n in names)


def attention_fwd(*, needs_grad: bool, **a) -> Tuple[Tensor, Tensor]:
    """``drope::attention_fwd`` with named arguments: the operator under torch.compile / export, else the kernel of
    the tensors' device (through autograd when ``needs_grad``)."""
    if _traced(a["q"]):
        return torch.ops.drope.attention_fwd(**a)
    if needs_grad:
        return _AttentionFunction.apply(*_positional(_FWD, a))
    return _kernel(_FWD_ENTRY, a["q"])(**a)


def decode(**a) -> Tuple[Tensor, Tensor]:
    """``drope::decode`` with named arguments: the operator when traced, else the device's kernel."""
    if _traced(a["q"]):
        return torch.ops.drope.decode(**a)
    return _kernel(_DECODE, a["q"])(**a)


def kv_append(**a) -> None:
    """``drope::kv_append`` (mutates the caches) with named arguments: the operator when traced, else the kernel."""
    if _traced(a["k_cache"]) or _traced(a["k_new"]):
        return torch.ops.drope.kv_append(**a)
    return _kernel(_APPEND, a["k_new"])(**a)


def qk_norm_rope(*, needs_grad: bool, **a) -> Tensor:
    """``drope::qk_norm_rope`` with named arguments: the operator when traced, else the kernel."""
    if _traced(a["x"]):
        return torch.ops.drope.qk_norm_rope(**a)
    if needs_grad:
        return _QKFunction.apply(*_positional(_QK[0], a))
    return _kernel(_QK, a["x"])(**a)
