"""Prefill attention, forward and forward+backward: every provider on every shape, bf16, causal.

B*S = 16k tokens (B = 1 at S = 32k), D 64 (Hq 32) and 128 (Hq 16), GQA 1 and 4. TFLOP/s from
``4*B*H*S*S*D / 2`` (x2.5 with backward). A CPU smoke case times the fused kernel in Triton's
interpreter at a tiny fp32 shape so that the suite runs something on any machine.
"""

import pytest

from benchmarks import cases, providers

PARAMS = cases.params(cases.prefill_cases(), providers.KERNEL_PROVIDERS)

SMOKE = cases.Case("prefill_fwd", 1, 4, 2, 64, 32, dtype="float32")


@pytest.mark.parametrize("case,provider", PARAMS)
def test_prefill(benchmark, bench_session, case, provider):
    bench_session.run(benchmark, case, provider, lambda: providers.build_attention(case, provider))


@pytest.mark.quick
@pytest.mark.parametrize("smoke_provider", ["drope_triton", "unfused"])
def test_prefill_smoke_cpu(benchmark, smoke_provider):
    providers.run_cpu_smoke(benchmark, SMOKE, smoke_provider)
