"""The fused-vs-split choice of ``drope.kernels.attention_with_cache``, timed: Sq new rows against a cache.

GPU: for Sq in 1..512 (B 1, 32 query heads, 8 KV heads, D 128, bf16, caches of 8k and 32k live slots) the split-KV
kernel and the fused forward, each forced (``interface.prefer_fused``), median of CUDA-event repetitions; each row
records both times, which one ``decode.prefer_fused`` (the compiled instruction counts) picks, and whether that was
the faster one. CPU: a smoke case of the same code (the kernels in Triton's interpreter), both routes equal.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from drope import kernels
from drope.kernels import decode, interface

ROWS = [1, 4, 16, 32, 48, 64, 96, 128, 256, 512]
CACHES = [8192, 32768]
HQ, HKV, D = 32, 8, 128


def _forced(monkeypatch, fused: bool):
    monkeypatch.setattr(interface, "prefer_fused", lambda G, SQ: fused)


@pytest.mark.parametrize("SK", CACHES, ids=[f"S{s}" for s in CACHES])
@pytest.mark.parametrize("SQ", ROWS, ids=[f"Sq{s}" for s in ROWS])
def test_crossover_gpu(benchmark, monkeypatch, SQ, SK):
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs a CUDA device (the CPU smoke case runs instead)")
    from benchmarks.timing import cuda_time

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, SQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, HKV, SK, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    times = {}
    with torch.no_grad():
        for name, fused in (("split", False), ("fused", True)):
            _forced(monkeypatch, fused)
            times[name] = statistics.median(cuda_time(lambda x: kernels.attention_with_cache(*x), [(q, k, v)]))
        monkeypatch.undo()
        benchmark.pedantic(kernels.attention_with_cache, args=(q, k, v), rounds=3, warmup_rounds=1)
    picked = "fused" if decode.prefer_fused(HQ // HKV, SQ) else "split"
    benchmark.extra_info.update(op="crossover", SQ=SQ, SK=SK, split_ms=round(times["split"], 4),
                                fused_ms=round(times["fused"], 4), picked=picked,
                                picked_fastest=times[picked] <= min(times.values()) * 1.02)


@pytest.mark.quick
def test_crossover_smoke_cpu(benchmark, monkeypatch):
    """Both routes of the same call agree (the CPU runs the kernels in Triton's interpreter)."""
    if torch.cuda.is_available():
        pytest.skip("CPU smoke case: on a GPU the crossover cases time both routes")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 32, generator=g)
    k, v = (torch.randn(1, 2, 90, 32, generator=g) for _ in range(2))
    outs = []
    with torch.no_grad():
        for fused in (False, True):
            _forced(monkeypatch, fused)
            outs.append(kernels.attention_with_cache(q, k, v))
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    benchmark.extra_info.update(op="crossover_smoke")
    with torch.no_grad():
        benchmark.pedantic(kernels.attention_with_cache, args=(q, k, v), rounds=1)
