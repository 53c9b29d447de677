"""Decode attention: one new token per sequence against a NoPE KV cache of 4k..128k, batch 1/4/16.

Hq 32, Hkv 8, D 128, bf16. GB/s counts the K and V bytes read (``2*B*Hkv*S*D*2``); the record also
holds tokens/s and the fraction of the measured copy bandwidth. A CPU smoke case runs the split-KV
kernel in Triton's interpreter at a tiny fp32 shape.
"""

import pytest

from benchmarks import cases, providers

PARAMS = cases.params(cases.decode_cases(), providers.KERNEL_PROVIDERS)

SMOKE = cases.Case("decode", 2, 4, 2, 100, 32, dtype="float32")


@pytest.mark.parametrize("case,provider", PARAMS)
def test_decode(benchmark, bench_session, case, provider):
    bench_session.run(benchmark, case, provider, lambda: providers.build_attention(case, provider))


@pytest.mark.quick
@pytest.mark.parametrize("smoke_provider", ["drope_triton", "unfused"])
def test_decode_smoke_cpu(benchmark, smoke_provider):
    providers.run_cpu_smoke(benchmark, SMOKE, smoke_provider)
