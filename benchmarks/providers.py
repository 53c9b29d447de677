"""The kernel providers, a registry: each one computes DroPE attention on the same random inputs, and
is checked against ``drope.reference`` computing what that provider claims to fuse.

- ``drope_triton``: ``drope.kernels`` with per-head QK-norm and the per-row ("position") temperature
  in the kernel (decode: the per-row scale only; a decode cache holds already normalised keys).
- ``unfused``: the same function as separate PyTorch ops (``drope.reference.rms_norm``, a multiply by
  the temperature), then SDPA with its default backend choice.
- ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: the bare attention core
  (inputs taken as already normalised, the temperature folded into the scalar ``scale``, the
  "length" mode), each SDPA backend forced.
- ``flex``: compiled FlexAttention, the per-row temperature as a ``score_mod`` (FlexDecoding for
  decode, which torch picks for a single query row).
- ``flash_attn``: the flash-attn package (bare core), when importable.

A provider is ``bind(case, shared) -> fwd(x)``, registered with :func:`provider`; it raises
:class:`ProviderSkip` with the reason when it cannot run the case.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from drope import reference

from .cases import NORM_EPS, TRAIN_LEN, Case, length_temperature, position_temperature
from .timing import l2_bytes, rotation_count, tensor_bytes


class ProviderSkip(Exception):
    """A provider cannot run a case; the message is the reason shown in the skip and the record."""


@dataclass(frozen=True)
class Provider:
    """``bind(case, shared) -> fwd(x)``; ``per_row``: it applies the per-row temperature (else the
    length one, a scalar scale); ``norms``: it applies the QK-norm (and takes its weights' gradients)."""

    name: str
    bind: Callable[[Case, Dict[str, Any]], Callable[[Dict[str, Any]], Any]]
    per_row: bool
    norms: bool = False


PROVIDERS: Dict[str, Provider] = {}


def provider(name: str, *, per_row: bool, norms: bool = False):
    """Register ``bind`` as the provider ``name`` (in the order the suite runs them)."""
    def register(bind):
        PROVIDERS[name] = Provider(name, bind, per_row, norms)
        return bind
    return register


@provider("drope_triton", per_row=True, norms=True)
def _drope_triton(case: Case, shared: Dict[str, Any]):
    from drope import kernels

    if case.is_decode:
        return lambda x: kernels.decode_attention(x["q"], x["k"], x["v"], softmax_scale=shared["scale_rows"])
    return lambda x: kernels.attention(x["q"], x["k"], x["v"], causal=True, softmax_scale=shared["scale_rows"],
                                       q_norm_weight=x["qw"], k_norm_weight=x["kw"], norm_eps=NORM_EPS)


@provider("unfused", per_row=True, norms=True)
def _unfused(case: Case, shared: Dict[str, Any]):
    gqa = {"enable_gqa": True} if case.G > 1 else {}
    scale = case.D ** -0.5
    if case.is_decode:
        beta = shared["beta"].to(case.torch_dtype)[:, None, None, None]
        return lambda x: F.scaled_dot_product_attention(x["q"] * beta, x["k"], x["v"], scale=scale, **gqa)
    beta = shared["beta"].to(case.torch_dtype)[:, None]

    def fwd(x):
        q = reference.rms_norm(x["q"], x["qw"], NORM_EPS) * beta
        k = reference.rms_norm(x["k"], x["kw"], NORM_EPS)
        return F.scaled_dot_product_attention(q, k, x["v"], is_causal=True, scale=scale, **gqa)
    return fwd


def math_fits(case: Case, free_bytes: Optional[int]) -> Optional[str]:
    """None when SDPA's math backend fits in memory, else the reason: it materialises (Sq, Sk) logits."""
    Sq = 1 if case.is_decode else case.S
    per = 4 * case.B * case.H * Sq * case.S  # float32 logits
    need = per * (6 if case.op == "prefill_fwd_bwd" else 3)
    if free_bytes is not None and need > 0.6 * free_bytes:
        return (f"sdpa_math would materialise ~{need / 2**30:.1f} GiB of (Sq x Sk) logits, "
                f"{free_bytes / 2**30:.1f} GiB free")
    return None


def _sdpa(case: Case, shared: Dict[str, Any], *, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "MATH" and torch.cuda.is_available():
        reason = math_fits(case, torch.cuda.mem_get_info()[0])
        if reason:
            raise ProviderSkip(reason)
    forced = getattr(SDPBackend, backend)
    gqa = {"enable_gqa": True} if case.G > 1 else {}

    def fwd(x):
        with sdpa_kernel(forced):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=not case.is_decode,
                                                  scale=shared["len_scale"], **gqa)
    return fwd


for _name, _backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION"),
                        ("sdpa_efficient", "EFFICIENT_ATTENTION"), ("sdpa_math", "MATH")):
    provider(_name, per_row=False)(functools.partial(_sdpa, backend=_backend))


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # torch < 2.5
        raise ProviderSkip(f"FlexAttention is not available in torch {torch.__version__}: {e}")
    if not torch.cuda.is_available():
        return flex_attention
    import torch._dynamo as dynamo

    # every benchmark shape is a new specialisation; keep them all compiled
    config = dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, 256)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 1024)
    return torch.compile(flex_attention, dynamic=False)


@provider("flex", per_row=True)
def _flex(case: Case, shared: Dict[str, Any]):
    flex = _compiled_flex()
    beta = shared["beta"]
    block_mask = None
    if case.is_decode:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score * beta[b]
    else:
        from torch.nn.attention.flex_attention import create_block_mask

        def score_mod(score, b, h, q_idx, kv_idx):
            return score * beta[q_idx]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        block_mask = create_block_mask(causal, None, None, case.S, case.S, device=beta.device)
    return lambda x: flex(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask,
                          scale=case.D ** -0.5, enable_gqa=case.G > 1)


@provider("flash_attn", per_row=False)
def _flash_attn(case: Case, shared: Dict[str, Any]):
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except Exception as e:  # ImportError, or a build that does not load
        raise ProviderSkip(f"flash-attn is not installed/importable ({type(e).__name__}: {e})")
    fn = flash_attn_with_kvcache if case.is_decode else flash_attn_func

    def fwd(x):
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))  # flash-attn takes (B, S, H, D)
        return fn(q, k, v, softmax_scale=shared["len_scale"], causal=True).transpose(1, 2)
    return fwd


KERNEL_PROVIDERS = tuple(PROVIDERS)


def make_inputs(case: Case, device, *, seed: int, requires_grad: bool = False) -> Dict[str, Any]:
    """Fresh random inputs of a kernel case (never zeros): q, k, v, norm weights, temperatures."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    Sq = 1 if case.is_decode else case.S

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    x = {"q": randn(case.B, case.H, Sq, case.D), "k": randn(case.B, case.Hkv, case.S, case.D),
         "v": randn(case.B, case.Hkv, case.S, case.D),
         "qw": 1 + 0.1 * randn(case.D), "kw": 1 + 0.1 * randn(case.D)}
    if requires_grad:
        for name in ("q", "k", "v", "qw", "kw"):
            x[name].requires_grad_(True)
        x["grad_out"] = randn(case.B, case.H, Sq, case.D)
    return x


def shared_inputs(case: Case, device, *, train_len: int = TRAIN_LEN) -> Dict[str, Any]:
    """Inputs that do not rotate: temperatures (deterministic in the shape) for a model trained at ``train_len``."""
    base = case.D ** -0.5
    if case.is_decode:
        beta = length_temperature(case.S, train_len=train_len)
        rows = torch.full((case.B, 1), beta * base, device=device, dtype=torch.float32)
        return {"beta": torch.full((case.B,), beta, device=device), "beta_rows": rows,
                "scale_rows": rows, "len_scale": beta * base}
    beta = position_temperature(case.S, device, train_len=train_len)
    return {"beta": beta, "scale_rows": beta * base,
            "len_scale": length_temperature(case.S, train_len=train_len) * base}


def reference_of(case: Case, shared: Dict[str, Any], prov: Provider) -> Callable[[Dict[str, Any]], torch.Tensor]:
    """``drope.reference`` in float32 computing what ``prov`` claims: its temperature, its QK-norm."""
    scale = shared["scale_rows"] if prov.per_row else shared["len_scale"]

    def ref(x):
        q, k, v = (x[n].float() for n in ("q", "k", "v"))
        if case.is_decode:
            return reference.decode_attention(q, k, v, softmax_scale=scale)
        norms = {}
        if prov.norms:
            norms = {"q_norm_weight": x["qw"].float(), "k_norm_weight": x["kw"].float(), "norm_eps": NORM_EPS}
        return reference.attention(q, k, v, causal=True, softmax_scale=scale, **norms)
    return ref


@dataclass
class Prepared:
    """A provider bound to a case: ``call(x)`` is timed; ``output(x)`` and ``reference(x)`` check it."""

    call: Callable[[Dict[str, Any]], Any]
    output: Callable[[Dict[str, Any]], torch.Tensor]
    reference: Callable[[Dict[str, Any]], torch.Tensor]
    wrt: Sequence[str] = ()


def prepare_attention(case: Case, name: str, shared: Dict[str, Any]) -> Prepared:
    """Bind provider ``name`` to a prefill or decode case. Raises ProviderSkip with the reason if it cannot run."""
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(KERNEL_PROVIDERS)}, got {name!r}")
    prov = PROVIDERS[name]
    fwd = prov.bind(case, shared)
    ref = reference_of(case, shared, prov)
    if case.op != "prefill_fwd_bwd":
        return Prepared(call=fwd, output=fwd, reference=ref)
    wrt = ("q", "k", "v") + (("qw", "kw") if prov.norms else ())

    def call(x):
        return torch.autograd.grad(fwd(x), [x[n] for n in wrt], x["grad_out"])
    return Prepared(call=call, output=fwd, reference=ref, wrt=wrt)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives NaN (which fails every ``<=``)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def checkable(case: Case, *, limit_bytes: int = 2**31) -> bool:
    """Whether the float32 reference (full logits, repeated K/V) is cheap enough to check this case."""
    Sq = 1 if case.is_decode else case.S
    return (4 * case.B * case.H * Sq * case.S <= limit_bytes
            and 4 * case.B * case.H * case.S * case.D <= limit_bytes)


def build_attention(case: Case, provider: str, device="cuda", *, train_len: int = TRAIN_LEN,
                    max_sets: int = 32) -> Dict[str, Any]:
    """Inputs (rotated copies), the bound provider and its reference check for a kernel case."""
    shared = shared_inputs(case, device, train_len=train_len)
    prepared = prepare_attention(case, provider, shared)
    backward = case.op == "prefill_fwd_bwd"
    x0 = make_inputs(case, device, seed=0, requires_grad=backward)
    n = 1
    if torch.device(device).type == "cuda":
        n = rotation_count(tensor_bytes(x0), l2_bytes(), cap=max_sets)
    sets = [x0] + [make_inputs(case, device, seed=i, requires_grad=backward) for i in range(1, n)]
    check = None
    if checkable(case):
        def check():
            """Worst relative error of the output (and, with backward, of every gradient) vs the reference."""
            x = sets[0]
            with torch.no_grad():
                errs = [rel_err(prepared.output(x), prepared.reference(x))]
            if prepared.wrt:
                got = prepared.call(x)
                want = torch.autograd.grad(prepared.reference(x), [x[n] for n in prepared.wrt], x["grad_out"].float())
                errs += [rel_err(a, b) for a, b in zip(got, want)]
            return float("nan") if any(math.isnan(e) for e in errs) else max(errs)
    return {"call": prepared.call, "sets": sets, "check": check, "prepared": prepared,
            "extra": {"G": case.G, "causal": not case.is_decode}}


def run_cpu_smoke(benchmark, case: Case, provider: str) -> None:
    """Time ``provider`` on the tiny ``case`` on the CPU (kernels in Triton's interpreter), checked first.

    So the suite runs something on any machine; on a GPU the full-size cases time the same paths.
    """
    if torch.cuda.is_available():
        pytest.skip(f"CPU smoke case: on a GPU the {case.op} cases time these paths at full size")
    try:
        bound = build_attention(case, provider, "cpu", train_len=16)
    except ProviderSkip as e:
        pytest.skip(f"{provider}: {e}")
    rel = bound["check"]()
    assert rel <= 1e-4, f"{provider} smoke result differs from drope.reference: rel err {rel:.3e}"
    benchmark.extra_info.update(op=f"{case.op}_smoke", provider=provider, rel_err=rel)
    benchmark.pedantic(bound["call"], args=(bound["sets"][0],), rounds=2, warmup_rounds=0)


def sdpa_refusal(exc: BaseException, caught: Sequence[warnings.WarningMessage]) -> str:
    """A one-line reason from SDPA's 'No available kernel' error and the warnings that explain it."""
    why = [str(w.message).split("\n")[0] for w in caught if "kernel" in str(w.message).lower()
           or "support" in str(w.message).lower()]
    msg = f"backend refuses the shape: {str(exc).splitlines()[0]}"
    if why:
        msg += " (" + "; ".join(dict.fromkeys(why)) + ")"
    return msg[:400]
