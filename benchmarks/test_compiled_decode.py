"""A compiled StaticCache decode step of a Llama-3.2-1B-shaped DroPE model: ``torch.compile(model,
mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), "drope_triton" against "sdpa", one token on a
cache of S - 1 tokens, bf16, batch 1 and 8 (what ``generate(cache_implementation="static")`` runs per token).

hidden 2048, 16 layers, 32 heads, 8 KV heads, head dim 64, intermediate 8192, vocab 32768 (smaller than
Llama's 128k: the LM head is not what is compared), converted with ``drope.to_drope(qk_norm="head",
temperature=position mode)``. Each repetition rewinds the cache's length to S - 1 before the step.
"""

import pytest
import torch

from benchmarks import cases, models

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, intermediate_size=8192, vocab_size=32768)
CASES = [cases.Case("model_decode_compiled", B, 32, 8, S, 64, quick=(B, S) == (1, 4096))
         for B in (1, 8) for S in (4096, 16384)]
PROVIDERS = ("drope_triton", "sdpa")
PARAMS = cases.params(CASES, PROVIDERS)
_MODEL = {}


def _model():
    if "model" not in _MODEL:
        _MODEL["model"] = models.build_model(LLAMA_1B, "cuda", torch.bfloat16)
    return _MODEL["model"]


def _build(case: cases.Case, provider: str):
    from transformers import StaticCache

    model = _model()
    model.set_attn_implementation(provider)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (case.B, case.S), generator=g, device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=case.S)
    keep = case.S - 1
    with torch.inference_mode():
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
    torch._dynamo.reset()
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    position = torch.full((case.B, 1), keep, device="cuda")

    def call(x):
        for layer in cache.layers:
            layer.cumulative_length.fill_(keep)
        with torch.inference_mode():
            return step(input_ids=x, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1).logits

    return {"call": call, "sets": [ids[:, -1:]], "check": None,
            "extra": {"layers": model.config.num_hidden_layers, "compiled": "reduce-overhead, fullgraph"}}


@pytest.mark.parametrize("case,provider", PARAMS)
def test_compiled_static_decode_step(benchmark, bench_session, case, provider):
    bench_session.run(benchmark, case, provider, lambda: _build(case, provider))
