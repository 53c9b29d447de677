"""Shared pieces of the benchmark suite: shapes, FLOP/byte formulas, providers, timer, ceilings, record.

Every provider computes DroPE attention on the same random bf16 inputs; what each one fuses differs:

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

The timer follows ``triton.testing.do_bench``: CUDA events around every repetition after a warm-up,
an L2-sized buffer zeroed between repetitions (it also lets the host run ahead of the GPU), inputs
rotated among enough copies to exceed twice the L2 size, the median reported.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

ENV_QUICK = "DROPE_BENCH_QUICK"
ENV_OPS = "DROPE_BENCH_OPS"
ENV_PROVIDERS = "DROPE_BENCH_PROVIDERS"
ENV_BUDGET = "DROPE_BENCH_BUDGET_S"
ENV_RESULTS = "DROPE_BENCH_RESULTS_DIR"
ENV_REP_MS = "DROPE_BENCH_REP_MS"

# SmolLM-360M's DroPE temperature fit (paper) and its pretraining context.
TEMP_COEF = 0.103
TRAIN_LEN = 2048
NORM_EPS = 1e-6

OPS = ("prefill_fwd", "prefill_fwd_bwd", "decode", "model_prefill", "model_decode")
KERNEL_PROVIDERS = ("drope_triton", "unfused", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math",
                    "flex", "flash_attn")
SDPA_PROVIDERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
MODEL_PROVIDERS = ("drope_triton", "sdpa", "eager")

PREFILL_TOKENS = 16 * 1024
PREFILL_SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768)
PREFILL_MODEL_DIM = 2048  # Hq = 2048 / D: 32 heads at D=64, 16 at D=128
DECODE_CACHE_LENS = (4096, 8192, 16384, 32768, 65536, 131072)
DECODE_BATCHES = (1, 4, 16)
DECODE_HEADS = (32, 8, 128)  # Hq, Hkv, D
MODEL_PREFILL_LENS = (1024, 4096, 16384)
MODEL_DECODE_LENS = (4096, 16384, 65536)

SMOLLM_360M = dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                   head_dim=64, intermediate_size=2560, vocab_size=49152)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class ProviderSkip(Exception):
    """A provider cannot run a case; the message is the reason shown in the skip and the record."""


@dataclass(frozen=True)
class Case:
    """One benchmark shape. For decode ops ``S`` is the cache length (one new query row)."""

    op: str
    B: int
    H: int
    Hkv: int
    S: int
    D: int
    dtype: str = "bfloat16"
    quick: bool = field(default=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.op}-B{self.B}-H{self.H}-Hkv{self.Hkv}-S{self.S}-D{self.D}-{_DTYPE_SHORT[self.dtype]}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    @property
    def is_decode(self) -> bool:
        return self.op in ("decode", "model_decode")


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, *, causal: bool, backward: bool = False) -> float:
    """FLOPs of attention as the field counts them: ``4*B*H*Sq*Sk*D``, halved for causal, x2.5 for fwd+bwd.

    Args:
        B, H, Sq, Sk, D: batch, query heads, query rows, key rows, head dim.
        causal: halve the count (the masked half is skipped).
        backward: count forward plus backward (2.5 times the forward).

    Returns:
        The FLOP count as a float.
    """
    flops = 4.0 * B * H * Sq * Sk * D
    if causal:
        flops /= 2
    if backward:
        flops *= 2.5
    return flops


def decode_kv_bytes(B: int, Hkv: int, S: int, D: int, elem_bytes: int) -> int:
    """Bytes of K and V a decode step must read: ``2 * B * Hkv * S * D * elem_bytes``."""
    return 2 * B * Hkv * S * D * elem_bytes


def case_flops(case: Case) -> Optional[float]:
    """Attention FLOPs of a prefill case (Sq = Sk = S, causal), None for the other ops."""
    if case.op == "prefill_fwd":
        return attention_flops(case.B, case.H, case.S, case.S, case.D, causal=True)
    if case.op == "prefill_fwd_bwd":
        return attention_flops(case.B, case.H, case.S, case.S, case.D, causal=True, backward=True)
    return None


def case_bytes(case: Case) -> Optional[int]:
    """K/V bytes read by a decode case, None for the other ops."""
    if case.op == "decode":
        return decode_kv_bytes(case.B, case.Hkv, case.S, case.D, torch.empty((), dtype=case.torch_dtype).element_size())
    return None


def prefill_cases() -> List[Case]:
    """Prefill shapes: bf16 causal, D 64/128 (Hq = 2048/D), GQA 1/4, B*S = 16k (B >= 1) for S 1k..32k."""
    cases = []
    for op in ("prefill_fwd", "prefill_fwd_bwd"):
        for D in (64, 128):
            H = PREFILL_MODEL_DIM // D
            for G in (1, 4):
                for S in PREFILL_SEQLENS:
                    B = max(1, PREFILL_TOKENS // S)
                    if op == "prefill_fwd":
                        quick = (D, G) in ((128, 4), (64, 1)) and S in (1024, 4096, 16384)
                    else:
                        quick = (D, G) == (128, 4) and S in (1024, 8192)
                    cases.append(Case(op, B, H, H // G, S, D, quick=quick))
    return cases


def decode_cases() -> List[Case]:
    """Decode shapes: Hq 32, Hkv 8, D 128, bf16, cache 4k..128k, batch 1/4/16, one new token."""
    H, HKV, D = DECODE_HEADS
    return [Case("decode", B, H, HKV, S, D, quick=B in (1, 16) and S in (4096, 32768, 131072))
            for B in DECODE_BATCHES for S in DECODE_CACHE_LENS]


def model_cases() -> List[Case]:
    """SmolLM-360M-shaped DroPE model: prefill of S tokens, decode of one token on an S-token cache."""
    c = SMOLLM_360M
    H, HKV, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    return ([Case("model_prefill", 1, H, HKV, S, D, quick=S == 4096) for S in MODEL_PREFILL_LENS]
            + [Case("model_decode", 1, H, HKV, S, D, quick=S == 16384) for S in MODEL_DECODE_LENS])


def position_temperature(S: int, device=None, *, coef: float = TEMP_COEF, train_len: int = TRAIN_LEN) -> torch.Tensor:
    """DroPE "position" temperature of rows 0..S-1: ``1 + c*ln((p+1)/L)`` where ``p+1 > L``, else 1 (float32)."""
    p1 = torch.arange(1, S + 1, device=device, dtype=torch.float64)
    beta = torch.where(p1 > train_len, 1 + coef * torch.log(p1 / train_len), torch.ones_like(p1))
    return beta.float()


def length_temperature(L: int, *, coef: float = TEMP_COEF, train_len: int = TRAIN_LEN) -> float:
    """DroPE "length" temperature: ``1 + c*ln(L/L_train)`` when ``L > L_train``, else 1."""
    return 1.0 + coef * math.log(L / train_len) if L > train_len else 1.0


def selected(names_env: str, name: str) -> bool:
    """Whether ``name`` is in the comma list of environment variable ``names_env`` (unset: all)."""
    value = os.environ.get(names_env, "").strip()
    return not value or name in {v.strip() for v in value.split(",") if v.strip()}


# ---------------------------------------------------------------------------------------------
# Inputs and providers


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


@dataclass
class Prepared:
    """A provider bound to a case: ``call(x)`` is timed; ``output(x)`` and ``reference(x)`` check it."""

    call: Callable[[Dict[str, Any]], Any]
    output: Callable[[Dict[str, Any]], torch.Tensor]
    reference: Callable[[Dict[str, Any]], torch.Tensor]
    wrt: Sequence[str] = ()


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
    import pytest

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


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[name]


_COMPILED_FLEX = None


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            raise ProviderSkip(f"FlexAttention is not available in torch {torch.__version__}: {e}")
        import torch._dynamo

        # every benchmark shape is a new specialisation; keep them all compiled
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 1024)
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _COMPILED_FLEX


def _import_flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except Exception as e:  # ImportError, or a build that does not load
        raise ProviderSkip(f"flash-attn is not installed/importable ({type(e).__name__}: {e})")
    return flash_attn_func, flash_attn_with_kvcache


def _import_kernel(name: str):
    try:
        import drope.kernels as kernels
    except Exception as e:
        raise ProviderSkip(f"drope.kernels does not import: {type(e).__name__}: {e}")
    fn = getattr(kernels, name, None)
    if fn is None:
        raise ProviderSkip(f"drope.kernels.{name} is not available yet")
    return fn


def math_fits(case: Case, free_bytes: Optional[int]) -> Optional[str]:
    """None when SDPA's math backend fits in memory, else the reason: it materialises (Sq, Sk) logits."""
    Sq = 1 if case.is_decode else case.S
    per = 4 * case.B * case.H * Sq * case.S  # float32 logits
    need = per * (6 if case.op == "prefill_fwd_bwd" else 3)
    if free_bytes is not None and need > 0.6 * free_bytes:
        return (f"sdpa_math would materialise ~{need / 2**30:.1f} GiB of (Sq x Sk) logits, "
                f"{free_bytes / 2**30:.1f} GiB free")
    return None


def prepare_attention(case: Case, provider: str, shared: Dict[str, Any]) -> Prepared:
    """Bind ``provider`` to a prefill or decode case. Raises ProviderSkip with the reason if it cannot run."""
    from drope import reference
    import torch.nn.functional as F

    decode = case.op == "decode"
    backward = case.op == "prefill_fwd_bwd"
    gqa = {"enable_gqa": True} if case.G > 1 else {}
    D = case.D

    def ref_fused(x):  # QK-norm + per-row temperature
        f = lambda t: t.float()  # noqa: E731
        if decode:
            return reference.decode_attention(f(x["q"]), f(x["k"]), f(x["v"]), softmax_scale=shared["scale_rows"])
        return reference.attention(f(x["q"]), f(x["k"]), f(x["v"]), causal=True, softmax_scale=shared["scale_rows"],
                                   q_norm_weight=f(x["qw"]), k_norm_weight=f(x["kw"]), norm_eps=NORM_EPS)

    def ref_core(x):  # attention core, per-row temperature (same values as the length one in decode)
        f = lambda t: t.float()  # noqa: E731
        if decode:
            return reference.decode_attention(f(x["q"]), f(x["k"]), f(x["v"]), softmax_scale=shared["len_scale"])
        return reference.attention(f(x["q"]), f(x["k"]), f(x["v"]), causal=True, softmax_scale=shared["scale_rows"])

    def ref_core_len(x):
        f = lambda t: t.float()  # noqa: E731
        if decode:
            return reference.decode_attention(f(x["q"]), f(x["k"]), f(x["v"]), softmax_scale=shared["len_scale"])
        return reference.attention(f(x["q"]), f(x["k"]), f(x["v"]), causal=True, softmax_scale=shared["len_scale"])

    if provider == "drope_triton":
        if decode:
            kern = _import_kernel("decode_attention")
            fwd = lambda x: kern(x["q"], x["k"], x["v"], softmax_scale=shared["scale_rows"])  # noqa: E731
        else:
            kern = _import_kernel("attention")
            fwd = lambda x: kern(x["q"], x["k"], x["v"], causal=True, softmax_scale=shared["scale_rows"],  # noqa: E731
                                 q_norm_weight=x["qw"], k_norm_weight=x["kw"], norm_eps=NORM_EPS)
        ref = ref_fused
    elif provider == "unfused":
        if decode:
            beta = shared["beta"].to(case.torch_dtype)[:, None, None, None]
            fwd = lambda x: F.scaled_dot_product_attention(x["q"] * beta, x["k"], x["v"], scale=D ** -0.5,  # noqa: E731
                                                           **gqa)
        else:
            beta = shared["beta"].to(case.torch_dtype)[:, None]

            def fwd(x):
                q = reference.rms_norm(x["q"], x["qw"], NORM_EPS) * beta
                k = reference.rms_norm(x["k"], x["kw"], NORM_EPS)
                return F.scaled_dot_product_attention(q, k, x["v"], is_causal=True, scale=D ** -0.5, **gqa)
        ref = ref_fused
    elif provider in SDPA_PROVIDERS:
        if provider == "sdpa_math" and torch.cuda.is_available():
            reason = math_fits(case, torch.cuda.mem_get_info()[0])
            if reason:
                raise ProviderSkip(reason)
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(provider)

        def fwd(x):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=not decode,
                                                      scale=shared["len_scale"], **gqa)
        ref = ref_core_len
    elif provider == "flex":
        flex = _compiled_flex()
        beta = shared["beta"]
        if decode:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score * beta[b]
            block_mask = None
        else:
            from torch.nn.attention.flex_attention import create_block_mask

            def score_mod(score, b, h, q_idx, kv_idx):
                return score * beta[q_idx]

            def causal(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            block_mask = create_block_mask(causal, None, None, case.S, case.S, device=beta.device)
        fwd = lambda x: flex(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask,  # noqa: E731
                             scale=D ** -0.5, enable_gqa=case.G > 1)
        ref = ref_core
    elif provider == "flash_attn":
        flash_attn_func, flash_attn_with_kvcache = _import_flash_attn()
        if decode:
            fwd = lambda x: flash_attn_with_kvcache(  # noqa: E731
                x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2),
                softmax_scale=shared["len_scale"], causal=True).transpose(1, 2)
        else:
            fwd = lambda x: flash_attn_func(  # noqa: E731
                x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2),
                softmax_scale=shared["len_scale"], causal=True).transpose(1, 2)
        ref = ref_core_len
    else:
        raise ValueError(f"provider must be one of {', '.join(KERNEL_PROVIDERS)}, got {provider!r}")

    wrt = ("q", "k", "v") + (("qw", "kw") if provider in ("drope_triton", "unfused") else ())
    if backward:
        def call(x):
            return torch.autograd.grad(fwd(x), [x[n] for n in wrt], x["grad_out"])
    else:
        call = fwd
    return Prepared(call=call, output=fwd, reference=ref, wrt=wrt if backward else ())


def build_model(config_kwargs: Dict[str, Any], device, dtype: torch.dtype, *, seed: int = 0):
    """A Llama-family causal LM of the given sizes with random weights, turned into a DroPE model.

    ``drope.to_drope(model, qk_norm="head", temperature=position mode, c=0.103, L_train=2048)``.
    Raises ProviderSkip when ``drope.to_drope`` is not importable.
    """
    import drope

    to_drope = getattr(drope, "to_drope", None)
    if to_drope is None:
        raise ProviderSkip("drope.to_drope is not available (DroPE model conversion not importable)")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config_kwargs, max_position_embeddings=max(MODEL_DECODE_LENS + MODEL_PREFILL_LENS),
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    temperature = {"mode": "position", "coef": TEMP_COEF, "train_length": TRAIN_LEN}
    model = to_drope(model, qk_norm="head", temperature=temperature)
    return model.to(device=device, dtype=dtype).eval()


def eager_fits(case: Case, free_bytes: Optional[int]) -> Optional[str]:
    """None when HF's eager attention fits, else the reason: it materialises (S x S) weights per layer."""
    Sq = 1 if case.is_decode else case.S
    need = case.B * case.H * Sq * case.S * (2 + 4 + 2)
    if free_bytes is not None and need > 0.5 * free_bytes:
        return (f"eager attention would materialise ~{need / 2**30:.1f} GiB of (S x S) weights per layer, "
                f"{free_bytes / 2**30:.1f} GiB free")
    return None


def build_model_case(model, case: Case, provider: str, *, seed: int = 0) -> Dict[str, Any]:
    """Bind a model op (prefill of S tokens / one decode step on S-1 cached ones) to an attention implementation."""
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(MODEL_PROVIDERS)}, got {provider!r}")
    device = next(model.parameters()).device
    if provider == "eager" and device.type == "cuda":
        reason = eager_fits(case, torch.cuda.mem_get_info()[0])
        if reason:
            raise ProviderSkip(reason)
    try:
        model.set_attn_implementation(provider)
    except Exception as e:  # transformers raises ValueError/ImportError for an implementation it cannot use
        raise ProviderSkip(f"attn_implementation={provider!r} refused: {type(e).__name__}: {str(e)[:200]}")
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (case.B, case.S), generator=g, device=device)
    extra = {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
    if case.op == "model_prefill":
        def call(x):
            with torch.inference_mode():
                return model(input_ids=x, use_cache=False, logits_to_keep=1).logits
        return {"call": call, "sets": [ids], "check": None, "extra": extra}
    if case.op != "model_decode":
        raise ValueError(f"case.op must be model_prefill or model_decode, got {case.op!r}")
    # the cache is filled through SDPA (eager could not hold 64k x 64k weights); the timed step uses provider
    model.set_attn_implementation("sdpa")
    from drope.hf import cache_argument

    name = cache_argument(model)
    with torch.inference_mode():
        cache = getattr(model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1), name)
    model.set_attn_implementation(provider)
    keep = case.S - 1

    def call(x):
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=True, logits_to_keep=1, **{name: cache}).logits
        extra_tokens = cache.get_seq_length() - keep
        if extra_tokens > 0:  # a negative crop removes tokens in every transformers 4.4x-5.x
            cache.crop(-extra_tokens)
        return logits
    return {"call": call, "sets": [ids[:, -1:]], "check": None, "extra": extra, "cache": cache, "prefix": ids[:, :-1]}


def sdpa_refusal(exc: BaseException, caught: Sequence[warnings.WarningMessage]) -> str:
    """A one-line reason from SDPA's 'No available kernel' error and the warnings that explain it."""
    why = [str(w.message).split("\n")[0] for w in caught if "kernel" in str(w.message).lower()
           or "support" in str(w.message).lower()]
    msg = f"backend refuses the shape: {str(exc).splitlines()[0]}"
    if why:
        msg += " (" + "; ".join(dict.fromkeys(why)) + ")"
    return msg[:400]


# ---------------------------------------------------------------------------------------------
# Timing and ceilings


def l2_bytes(device=None) -> int:
    """L2 cache size of the CUDA device (50 MiB when torch does not report it)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_count(bytes_per_set: int, l2: int, *, cap: int = 32) -> int:
    """How many input copies to rotate so that the sets together exceed twice the L2 size."""
    if bytes_per_set <= 0:
        return 1
    return int(min(cap, max(1, math.ceil(2 * l2 / bytes_per_set))))


def tensor_bytes(x: Dict[str, Any]) -> int:
    """Total bytes of the tensors in an input dict."""
    return sum(t.numel() * t.element_size() for t in x.values() if isinstance(t, torch.Tensor))


_FLUSH = None


def _flush_buffer() -> torch.Tensor:
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(2 * l2_bytes() // 4, dtype=torch.int32, device="cuda")
    return _FLUSH


def cuda_time(fn: Callable[[Any], Any], sets: Sequence[Any], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 10, max_reps: int = 2000) -> List[float]:
    """Milliseconds of each repetition of ``fn(sets[i % len(sets)])``, timed with CUDA events.

    Warm-up first (compilation, autotuning, handle creation stay out), then about ``rep_ms`` of
    repetitions, each preceded by zeroing an L2-sized buffer (outside the events).
    """
    flush = _flush_buffer()
    fn(sets[0])
    torch.cuda.synchronize()
    est_start, est_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est_start.record()
    for i in range(5):
        flush.zero_()
        fn(sets[i % len(sets)])
    est_end.record()
    torch.cuda.synchronize()
    est = max(est_start.elapsed_time(est_end) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = int(min(max_reps, max(min_reps, rep_ms / est)))
    for i in range(n_warm):
        fn(sets[i % len(sets)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        fn(sets[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def host_time(fn: Callable[[Any], Any], sets: Sequence[Any], *, reps: int = 3) -> List[float]:
    """Milliseconds per repetition by the host clock (CPU smoke runs; no device to synchronise)."""
    fn(sets[0])
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(sets[i % len(sets)])
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_extra_mb(fn: Callable[[Any], Any], x: Any) -> float:
    """MiB the call allocates on top of what is live before it (outputs, workspace, saved tensors)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def measure_ceilings(*, copy_mib: int = 1024, mm: int = 8192) -> Dict[str, float]:
    """The device's measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    n = copy_mib * 2**20 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_time(lambda _: dst.copy_(src), [None], rep_ms=200))
    copy_gbps = 2 * n * 2 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(cuda_time(lambda _: torch.mm(a, b), [None], rep_ms=300))
    matmul_tflops = 2 * mm ** 3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": round(copy_gbps, 2), "matmul_tflops": round(matmul_tflops, 2),
            "copy_bytes": 2 * n * 2, "matmul_shape": [mm, mm, mm]}


def metrics(case: Case, ms: float, ceilings: Optional[Dict[str, float]] = None) -> Dict[str, Optional[float]]:
    """TFLOP/s (prefill), GB/s and tokens/s (decode), fraction of the copy bandwidth, from a median time."""
    out: Dict[str, Optional[float]] = {"tflops": None, "gbps": None}
    flops, nbytes = case_flops(case), case_bytes(case)
    if flops is not None:
        out["tflops"] = flops / (ms * 1e-3) / 1e12
    if nbytes is not None:
        out["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if ceilings and ceilings.get("copy_gbps"):
            out["frac_copy_bw"] = out["gbps"] / ceilings["copy_gbps"]
    if case.is_decode:
        out["tokens_per_s"] = case.B / (ms * 1e-3)
        out["cache_len"] = case.S
    elif case.op == "model_prefill":
        out["tokens_per_s"] = case.B * case.S / (ms * 1e-3)
    return out


def result_entry(case: Case, provider: str, times_ms: Sequence[float], *, peak_mem_mb: Optional[float],
                 ceilings: Optional[Dict[str, float]] = None, **extra) -> Dict[str, Any]:
    """One ``results`` entry of the record from the repetition times of a case."""
    ms = statistics.median(times_ms)
    entry = {"op": case.op, "provider": provider, "B": case.B, "H": case.H, "Hkv": case.Hkv, "S": case.S,
             "D": case.D, "dtype": case.dtype, "ms": ms}
    entry.update(metrics(case, ms, ceilings))
    entry["peak_mem_mb"] = peak_mem_mb
    entry["reps"] = len(times_ms)
    entry["ms_min"] = min(times_ms)
    entry["ms_iqr"] = _iqr(times_ms)
    entry.update(extra)
    return entry


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


# ---------------------------------------------------------------------------------------------
# Record


RESULT_KEYS = {"op": str, "provider": str, "B": int, "H": int, "Hkv": int, "S": int, "D": int, "dtype": str,
               "ms": float, "tflops": (float, type(None)), "gbps": (float, type(None)),
               "peak_mem_mb": (float, type(None))}


def validate_record(record: Dict[str, Any]) -> None:
    """Check a record against the schema of issue 6.

    Raises:
        ValueError: naming the first key that is missing or of the wrong type.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    for key in ("device", "torch", "triton", "git_sha"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"record[{key!r}] must be a str, got {record.get(key)!r}")
    ceil = record.get("ceilings")
    if not isinstance(ceil, dict):
        raise ValueError("record['ceilings'] must be a dict with copy_gbps and matmul_tflops")
    for key in ("copy_gbps", "matmul_tflops"):
        if not isinstance(ceil.get(key), (int, float)) or isinstance(ceil.get(key), bool):
            raise ValueError(f"record['ceilings'][{key!r}] must be a number, got {ceil.get(key)!r}")
    results = record.get("results")
    if not isinstance(results, list):
        raise ValueError("record['results'] must be a list")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"record['results'][{i}] must be a dict")
        for key, typ in RESULT_KEYS.items():
            if key not in r:
                raise ValueError(f"record['results'][{i}] lacks {key!r}")
            v = r[key]
            ok = isinstance(v, typ) and not isinstance(v, bool)
            if typ is float or (isinstance(typ, tuple) and float in typ):
                ok = ok or (isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise ValueError(f"record['results'][{i}][{key!r}] has the wrong type: {v!r}")


def git_sha(short: bool = True) -> str:
    """The checkout's HEAD commit ("unknown" outside git), with "+dirty" when tracked files changed.

    ``DROPE_GIT_SHA`` in the environment overrides it (for copies of the tree without ``.git``).
    """
    if os.environ.get("DROPE_GIT_SHA"):  # a copy of the tree without .git (device machines)
        return os.environ["DROPE_GIT_SHA"]
    args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        sha = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty and sha else "")


def slug(text: str) -> str:
    """A file-name-safe lower-case slug: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def record_path(record: Dict[str, Any], results_dir: Optional[Path] = None) -> Path:
    """``<results_dir>/<device>-<date>-<sha>.json`` for a record (date from its ``created_utc``)."""
    results_dir = Path(results_dir or os.environ.get(ENV_RESULTS) or RESULTS_DIR)
    stamp = _dt.datetime.strptime(record["created_utc"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%d-%H%M%S")
    return results_dir / f"{slug(record['device'])}-{stamp}-{slug(record['git_sha'])}.json"


def new_record(device: str, ceilings: Dict[str, float], *, quick: bool = False) -> Dict[str, Any]:
    """An empty record carrying the environment: device, versions, git sha, ceilings, time."""
    import triton

    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "git_sha": git_sha(), "ceilings": dict(ceilings),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(), "quick": bool(quick),
            "results": [], "skipped": [], "failed": []}


def write_record(record: Dict[str, Any], results_dir: Optional[Path] = None) -> Path:
    """Validate and write a record as JSON; returns its path."""
    validate_record(record)
    path = record_path(record, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path
