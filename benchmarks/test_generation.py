"""Generation throughput (tokens/s) for a batch of mixed-length prompts on a DroPE model: transformers' continuous
batching on ``sdpa`` and ``paged|eager`` against one left-padded ``generate`` on ``drope_triton`` and on ``sdpa``
(:mod:`benchmarks.generation`).

GPU: the SmolLM-360M-shaped DroPE model of ``test_model.py`` (bf16), 16 prompts of 512..8192 tokens (S is the
longest), 128 new tokens each; wall time of the whole batch, median of 3 rounds after a first call (continuous
batching keeps its manager between calls, as a server does; ``first_ms`` is the first call, manager built). Each result
records how many requests equal their prompt's greedy tokens generated alone (``agree``; bf16 batching may move a
near tie) and fails when a request comes back short. CPU: a tiny model through the same code, every request equal to
greedy alone (kernels in Triton's interpreter); ``scripts/generation_throughput.py`` gives the CPU figure of README.
"""

import pytest
import torch

from benchmarks import cases, generation, models

LENGTHS = [512 + i * (8192 - 512) // 15 for i in range(16)]
NEW_TOKENS = 128
CASE = cases.Case("model_generate_batch", len(LENGTHS), cases.SMOLLM_360M["num_attention_heads"],
                  cases.SMOLLM_360M["num_key_value_heads"], max(LENGTHS), cases.SMOLLM_360M["head_dim"])
_STATE = {}


def _state():
    if "model" not in _STATE:
        model = models.build_model(cases.SMOLLM_360M, "cuda", torch.bfloat16)
        prompts = generation.mixed_prompts(LENGTHS, model.config.vocab_size)
        model.set_attn_implementation("sdpa")
        _STATE.update(model=model, prompts=prompts, want=generation.greedy_alone(model, prompts, NEW_TOKENS))
    return _STATE


@pytest.mark.gpu
@pytest.mark.parametrize("case,provider", [(CASE, p) for p in generation.GENERATION_PROVIDERS],
                         ids=[f"{CASE.id}-{p}" for p in generation.GENERATION_PROVIDERS])
def test_generation_throughput(benchmark, bench_session, case, provider):
    bench_session.check_budget(case, provider)
    s = _state()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        stats = generation.measure(s["model"], s["prompts"], provider, NEW_TOKENS, rounds=3, want=s["want"])
    except torch.cuda.OutOfMemoryError as e:
        bench_session.skip(case, provider, f"OOM: {str(e).splitlines()[0][:300]}")
    except RuntimeError as e:
        bench_session.fail(case, provider, f"raised: {str(e).splitlines()[0][:300]}")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    bench_session.add(benchmark, case, provider, stats["times_ms"], peak_mem_mb=round(peak, 2),
                      tokens_per_s=stats["tokens_per_s"], first_ms=stats["first_ms"], agree=stats["agree"],
                      new_tokens=NEW_TOKENS, timer="wall clock, whole batch")


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=128)


@pytest.mark.quick
@pytest.mark.parametrize("provider", generation.GENERATION_PROVIDERS)
def test_generation_throughput_smoke_cpu(benchmark, provider):
    """The same code on the CPU: every request equal to its prompt's greedy tokens alone."""
    if torch.cuda.is_available():
        pytest.skip("CPU smoke case: on a GPU the generation case times these paths at full size")
    model = models.build_model(TINY, "cpu", torch.float32)
    prompts = generation.mixed_prompts([5, 17, 9, 30], TINY["vocab_size"])
    want = generation.greedy_alone(model, prompts, 6)
    stats = generation.measure(model, prompts, provider, 6, rounds=1, want=want)
    assert stats["tokens"] == want, f"{provider}: {stats['tokens']} != greedy alone {want}"
    benchmark.extra_info.update(op="model_generate_batch_smoke", provider=provider,
                                tokens_per_s=round(stats["tokens_per_s"], 1))
    cb = provider in generation.CB_PROVIDERS
    try:
        benchmark.pedantic(generation.generate, args=(model, prompts, provider, 6), kwargs={"keep_manager": cb},
                           rounds=1, warmup_rounds=1 if cb else 0)
    finally:
        if cb:
            model.destroy_cached_continuous_batching_manager()
