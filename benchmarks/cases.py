"""What the suite measures: the shapes of every op, their FLOP and byte counts, and the DroPE
temperature the benchmark model uses (SmolLM-360M's fit from the paper, ``drope.hf.temperature``'s formula).

``DROPE_BENCH_OPS`` / ``DROPE_BENCH_PROVIDERS`` (comma lists) select ops and providers; see :func:`selected`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import pytest
import torch

from drope.hf.temperature import temperature_scale

ENV_OPS = "DROPE_BENCH_OPS"
ENV_PROVIDERS = "DROPE_BENCH_PROVIDERS"

# SmolLM-360M's DroPE temperature fit (paper) and its pretraining context.
TEMP_COEF = 0.103
TRAIN_LEN = 2048
NORM_EPS = 1e-6

OPS = ("prefill_fwd", "prefill_fwd_bwd", "decode", "model_prefill", "model_decode", "model_decode_compiled",
       "varlen_prefill", "paged_decode", "model_generate_batch", "cp_prefill", "cp_decode")
# serving: queries of each document in a varlen prefill (a chunk of a long prompt against its cache)
VARLEN_CHUNK = 512

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
        return self.op in ("decode", "model_decode", "model_decode_compiled", "paged_decode", "cp_decode")


def params(cases: Sequence[Case], providers: Sequence[str]) -> list:
    """pytest parameters ``(case, provider)`` with ids ``<case.id>-<provider>``, marked gpu (and quick)."""
    return [pytest.param(case, provider, id=f"{case.id}-{provider}",
                         marks=[pytest.mark.gpu] + ([pytest.mark.quick] if case.quick else []))
            for case in cases for provider in providers]


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
    """Attention FLOPs of a prefill case (Sq = Sk = S, causal), None for the other ops. A context-parallel case counts
    the whole sequence (its TFLOP/s are the W devices' together)."""
    if case.op in ("prefill_fwd", "cp_prefill"):
        return attention_flops(case.B, case.H, case.S, case.S, case.D, causal=True)
    if case.op == "prefill_fwd_bwd":
        return attention_flops(case.B, case.H, case.S, case.S, case.D, causal=True, backward=True)
    if case.op == "varlen_prefill":
        # VARLEN_CHUNK bottom-right causal rows per document against S keys: S*Lq - Lq*(Lq-1)/2 visible pairs
        lq = min(VARLEN_CHUNK, case.S)
        return 4.0 * case.B * case.H * case.D * (case.S * lq - lq * (lq - 1) / 2)
    return None


def case_bytes(case: Case) -> Optional[int]:
    """K/V bytes read by a decode case, None for the other ops (a context-parallel case: all shards together)."""
    if case.op in ("decode", "paged_decode", "cp_decode"):
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


def serving_cases() -> List[Case]:
    """Serving shapes (Hq 32, Hkv 8, D 128, bf16): a varlen prefill of 8 documents, each a VARLEN_CHUNK-row chunk
    against S keys, and decode over paged caches of S tokens, batch 1/16."""
    H, HKV, D = DECODE_HEADS
    return ([Case("varlen_prefill", 8, H, HKV, S, D, quick=S == 16384) for S in (4096, 16384, 32768)]
            + [Case("paged_decode", B, H, HKV, S, D, quick=(B, S) == (16, 32768))
               for B in (1, 16) for S in (32768, 131072)])


# context parallelism simulated on one GPU: a quarter of a Llama 3 8B layer's heads (the balance, the efficiency and the
# bytes per head do not depend on the head count; one full pass at 1M positions takes seconds), ranks 2..8
CP_PREFILL_HEADS = (8, 2, 128)  # Hq, Hkv, D
CP_SEQLENS = (131072, 262144, 524288, 1048576)
CP_WORLDS = (2, 4, 8)


def cp_prefill_cases() -> List[Case]:
    """Context-parallel prefill: bf16 causal, Hq 8, Hkv 2, D 128, B 1, S 128k..1M (quick: 128k and 256k)."""
    H, HKV, D = CP_PREFILL_HEADS
    return [Case("cp_prefill", 1, H, HKV, S, D, quick=S <= 262144) for S in CP_SEQLENS]


def cp_decode_cases() -> List[Case]:
    """Decode over a cache sharded by rank: Hq 32, Hkv 8, D 128, bf16; (B, S) = (1, 128k), (16, 128k), (1, 1M)."""
    H, HKV, D = DECODE_HEADS
    return [Case("cp_decode", B, H, HKV, S, D, quick=S == 131072) for B, S in ((1, 131072), (16, 131072), (1, 1048576))]


def temperature(mode: str, *, coef: float = TEMP_COEF, train_len: int = TRAIN_LEN) -> dict:
    """The benchmark model's temperature setting (the ``drope_temperature`` config dict)."""
    return {"mode": mode, "coef": coef, "train_length": train_len}


def position_temperature(S: int, device=None, *, coef: float = TEMP_COEF, train_len: int = TRAIN_LEN) -> torch.Tensor:
    """DroPE "position" temperature of rows 0..S-1 (float32): ``1 + c*ln((p+1)/L)`` where ``p+1 > L``, else 1."""
    return temperature_scale(temperature("position", coef=coef, train_len=train_len), torch.arange(S, device=device))


def length_temperature(L: int, *, coef: float = TEMP_COEF, train_len: int = TRAIN_LEN) -> float:
    """DroPE "length" temperature: ``1 + c*ln(L/L_train)`` when ``L > L_train``, else 1."""
    return temperature_scale(temperature("length", coef=coef, train_len=train_len), total_length=L)


def selected(names_env: str, name: str) -> bool:
    """Whether ``name`` is in the comma list of environment variable ``names_env`` (unset: all)."""
    value = os.environ.get(names_env, "").strip()
    return not value or name in {v.strip() for v in value.split(",") if v.strip()}
