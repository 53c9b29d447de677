"""What every kernel module shares: constants, dot precision, small jit helpers and the launch hook.

Flag names used by all kernels: ``HAS_<feature>`` for an optional input (None = off, a constexpr
False costs nothing), ``IS_CAUSAL``, ``PACKED``, ``DOT_PREC`` (``tl.dot`` input precision) and
``UPCAST`` (multiply in fp32: Triton's interpreter computes bf16 ``tl.dot`` wrongly).

Every launch goes through :func:`launch`, a plain ``kernel[grid](**args)``: the one name a tool can swap
(the compile inspector's ``drope.inspect.recording`` records launches that way, on ``meta`` tensors,
without a GPU). The kernels' only concession to it is :data:`RECORDING`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Dict, List, Optional

import torch
import triton
import triton.language as tl

from ..validation import DeviceError

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# jit functions may read only constexpr globals
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
# (major, minor) of the installed Triton: tile lists differ where an older compiler spills (3.6 on the GPU machines)
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])


def tf32_enabled() -> bool:
    """torch's TF32 switch for fp32 matmuls, through the newer ``fp32_precision`` API where torch has it.

    Reading the legacy ``allow_tf32`` raises once the new API has been used (torch >= 2.9; transformers uses it
    for ``TrainingArguments(tf32=True)``), so it is the last resort here.
    """
    m = torch.backends.cuda.matmul
    for flag in (getattr(m, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if flag not in (None, "none"):
            return flag == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows torch's TF32 switch (off by default: exact products)."""
    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """bf16 in Triton's interpreter multiplies fp32 copies of the (bf16-valued) operands."""
    return dtype == torch.bfloat16 and defined_interpreted()


def cdiv(a: int, b: int) -> int:
    """Ceil division on the host (``triton.cdiv`` is a constexpr function: microseconds a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), on the host."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def padded_dim(D: int) -> int:
    """The power-of-two block that holds a head dim (at least 16, the smallest ``tl.dot`` K)."""
    return max(16, next_pow2(D))


def strides(t: Optional[torch.Tensor], n: int) -> tuple:
    """``t.stride()``, or n zeros for an absent optional tensor."""
    return t.stride() if t is not None else (0,) * n


_STRIDE_NAMES: Dict[tuple, tuple] = {}


def named_strides(prefix: str, t: Optional[torch.Tensor], dims: str) -> Dict[str, int]:
    """``{"stride_<prefix><d>": ...}`` for each letter of ``dims``, zeros when ``t`` is None."""
    names = _STRIDE_NAMES.get((prefix, dims))
    if names is None:
        names = _STRIDE_NAMES[(prefix, dims)] = tuple(f"stride_{prefix}{d}" for d in dims)
    return dict(zip(names, strides(t, len(dims))))


@functools.lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_target(t: torch.Tensor) -> bool:
    """Whether launches on ``t`` can use TMA descriptors: Hopper or newer, the interpreter, or recording."""
    dev = t.device
    if dev.type == "meta":
        return is_recording()
    if defined_interpreted():
        return dev.type == "cpu"
    return dev.type == "cuda" and _hopper(dev.index if dev.index is not None else torch.cuda.current_device())


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether every (B, H, S, D) tensor can be read through [S, D] TMA descriptors.

    TMA needs a unit stride along D, 16-byte aligned bases and 16-byte multiples for the other
    strides; anything else (a sliced or odd-strided view) takes the pointer path, with the same results.
    """
    if not hasattr(tl, "make_tensor_descriptor") or not _tma_target(tensors[0]):
        return False
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    if tensors[0].device.type == "cuda":
        _ensure_allocator()
    return True


def paged_tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether paged (num_pages, page, Hkv, D) caches can be read as one [pages x page, D] TMA matrix per KV head:
    :func:`tma_ok`, pages back to back (page stride = page x row stride: a view that keeps some rows of larger
    pages is not) and row indices within int32."""
    return (tma_ok(k, v) and all(t.stride(0) == t.shape[1] * t.stride(1) for t in (k, v))
            and k.shape[0] * k.shape[1] < 2**31)


def tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's allocator for device-side TMA descriptors: ``size`` bytes on the current CUDA device (where
    Triton launches), from torch's caching allocator on the launch's ``stream`` (so the memory is not reused
    before that stream is done with it, and a CUDA graph capture takes it from its own pool)."""
    device = torch.device("cuda", torch.cuda.current_device())
    if stream is None or stream == torch.cuda.current_stream(device).cuda_stream:
        return torch.empty(size, dtype=torch.int8, device=device)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
        return torch.empty(size, dtype=torch.int8, device=device)


def on_device(t: torch.Tensor):
    """A context making ``t``'s GPU the current one (Triton launches there); a no-op when it already is."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def ensure_tma_allocator(t: torch.Tensor) -> None:
    """Give Triton an allocator for a launch on ``t`` that uses TMA (a CUDA tensor): Triton's allocator is a context
    variable, so a launch plan computed in one thread (:func:`cached_plan`) must still set it in another."""
    if t.device.type == "cuda":
        _ensure_allocator()


PLAN_CAPACITY = 1024


def cached_plan(plans: dict, key: tuple, build: Callable[[], tuple]) -> tuple:
    """The launch plan (a launcher's non-tensor arguments) stored in ``plans`` under ``key``, built by ``build()``
    the first time: a decode step or a forward asks the same question at every layer, and rebuilding ~60 keyword
    arguments is most of a launcher's host time. ``key`` must hold everything the plan reads (shapes, strides,
    dtypes, devices, None-ness, base alignment, flags, :func:`is_recording`); the store is emptied past
    :data:`PLAN_CAPACITY` entries."""
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= PLAN_CAPACITY:
            plans.clear()
        plan = plans[key] = build()
    return plan


def aligned16(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether every tensor's base is 16-byte aligned (what TMA needs beyond strides; part of a plan's key)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _ensure_allocator() -> None:
    """Device-side TMA descriptors live in a small global scratch: give Triton an allocator if none is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(tma_scratch)


@triton.jit
def mm(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; under UPCAST the operands are multiplied in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def operand(x, dtype, UPCAST: tl.constexpr):
    """An fp32 tile as a dot operand of ``dtype`` (kept fp32 under UPCAST: the interpreter truncates)."""
    if UPCAST:
        return x
    return x.to(dtype)


@triton.jit
def phases(lo, hi, f_lo, f_hi, B: tl.constexpr):
    """Split the block starts lo, lo + B, ... < hi into masked [lo, a), unmasked [a, b), masked [b, hi)."""
    n = tl.maximum(hi - lo + B - 1, 0) // B
    a = tl.minimum((tl.maximum(f_lo - lo, 0) + B - 1) // B, n)
    b = tl.maximum(a, tl.minimum(tl.maximum(f_hi - lo, 0) // B, n))
    return lo + a * B, lo + b * B, lo + n * B


@triton.jit
def exp2_rel(x, m):
    """``exp2(x - m)`` for a running max ``m >= x`` that may be infinite: exactly 1 where x == m (+-inf too)."""
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(x == m, 1.0, tl.math.exp2(x - m_sub))


@triton.jit
def with_sink(acc, b_l, b_m, b_sink):
    """The online softmax's state after one more logit ``b_sink`` (base 2) that joins the denominator only
    (a +inf sink takes all the weight: zeros out, as the reference)."""
    b_m_new = tl.maximum(b_m, b_sink)
    b_alpha = exp2_rel(b_m, b_m_new)
    b_l = b_l * b_alpha + tl.where(b_sink == float("-inf"), 0.0, exp2_rel(b_sink, b_m_new))
    return acc * b_alpha[:, None], b_l, b_m_new


@triton.jit
def key_bounds(KM, stride_ms, SK, BS: tl.constexpr):
    """First and one-past-last nonzero slot of a (Sk,) key mask, and whether every slot between them is nonzero.

    One pass over the mask row (Sk bytes, next to Sk * D * 4 bytes of K and V per program).
    """
    lo = SK + 0
    hi = SK * 0
    n = SK * 0
    for s0 in range(0, SK, BS):
        o = s0 + tl.arange(0, BS)
        m = tl.load(KM + o.to(tl.int64) * stride_ms, mask=o < SK, other=0) != 0
        lo = tl.minimum(lo, tl.min(tl.where(m, o, SK), 0))
        hi = tl.maximum(hi, tl.max(tl.where(m, o + 1, 0), 0))
        n += tl.sum(m.to(tl.int32), 0)
    return lo, hi, n == hi - lo


@triton.jit
def norm_pow2(b_amax):
    """A power of two c >= max|x| / 2 where max|x| > 1, else 1: ``x / c`` squares without overflow
    (``drope.reference.norm_pow2``; the approximate log2 may round c down by one power, still safe)."""
    return tl.math.exp2(tl.math.ceil(tl.math.log2(tl.maximum(b_amax, 1.0))))


@triton.jit
def tanh(x):
    """tanh through exp2 (exact at the ends: +-1 for |x| large, no inf/inf); below |x| = 1/4 its Taylor series to
    x^9 (the exp2 form cancels there: a soft-cap far above the logits lost most of their digits)."""
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, small, 1.0 - 2.0 / (1.0 + tl.math.exp2(x * (2.0 * LOG2E_C))))


# set by drope.inspect.recording() while it records launches instead of running them: meta tensors then
# stand for CUDA tensors (device checks pass, the compiled TMA path is taken)
RECORDING = False


def is_recording() -> bool:
    """Whether ``drope.inspect.recording()`` is recording launches (:data:`RECORDING`)."""
    return RECORDING


def compiled(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` launches compiled GPU kernels (CUDA, or meta while recording)."""
    return (t.device.type == "cuda" and not defined_interpreted()) or (t.device.type == "meta" and is_recording())


def check_device(t: torch.Tensor, op: str) -> None:
    """Where the Triton kernels run: CUDA tensors, CPU tensors in Triton's interpreter (drope's kernels defined under
    ``TRITON_INTERPRET=1``; otherwise CPU tensors take the PyTorch kernels of :mod:`drope.kernels.cpu`, never this
    one), and ``meta`` tensors while the inspector records."""
    dev = t.device.type
    if dev == "cuda" or (dev == "cpu" and defined_interpreted()) or (dev == "meta" and is_recording()):
        return
    raise DeviceError(f"drope.kernels.{op}'s Triton kernel runs on CUDA tensors (CPU tensors in Triton's "
                      f"interpreter, TRITON_INTERPRET=1), got {t.device}")


@functools.lru_cache(maxsize=1)
def defined_interpreted() -> bool:
    """Whether drope's jit functions were defined under Triton's interpreter (``TRITON_INTERPRET`` is read
    when a ``@triton.jit`` function is defined, i.e. at import, so the answer never changes)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(mm, InterpretedFunction)


def launch(kernel, grid, **args) -> None:
    """``kernel[grid](**args)``, with keyword arguments only (``drope.inspect.recording`` swaps this name)."""
    kernel[grid](**args)


def autotuned(fn: Callable, configs: List[triton.Config], key: List[str], keep: Callable) -> Any:
    """``triton.autotune`` over ``configs`` with ``keep(config, args) -> bool`` as the pruning rule."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [c for c in configs if keep(c, args)]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)
