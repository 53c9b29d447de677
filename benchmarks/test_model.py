"""Whole-model prefill and decode of a SmolLM-360M-shaped DroPE model with random weights.

hidden 960, 32 layers, 15 heads, 5 KV heads, head dim 64, intermediate 2560, vocab 49152, bf16,
converted with ``drope.to_drope(model, qk_norm="head", temperature=position mode)``. Providers are
Hugging Face attention implementations: ``drope_triton`` (the fused kernels), ``sdpa`` (norm and
temperature as separate ops around SDPA) and ``eager`` where its (S x S) weights fit. Prefill
returns the last token's logits only; decode times one token on a cache of S-1 tokens (the cache
is cropped back after each step, so every repetition sees the same length).
"""

import pytest
import torch

from benchmarks import cases, models

PARAMS = cases.params(cases.model_cases(), models.MODEL_PROVIDERS)

_MODEL = {}


def _model():
    if "model" not in _MODEL:
        _MODEL["model"] = models.build_model(cases.SMOLLM_360M, "cuda", torch.bfloat16)
    return _MODEL["model"]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_model(benchmark, bench_session, case, provider):
    bench_session.run(benchmark, case, provider, lambda: models.build_model_case(_model(), case, provider))
