"""Prefill attention, forward and forward+backward: every provider on every shape, bf16, causal.

B*S = 16k tokens (B = 1 at S = 32k), D 64 (Hq 32) and 128 (Hq 16), GQA 1 and 4. TFLOP/s from
``4*B*H*S*S*D / 2`` (x2.5 with backward). A CPU smoke case times the fused kernel in Triton's
interpreter at a tiny fp32 shape so that the suite runs something on any machine.
"""

import pytest
import torch

from benchmarks import common

PARAMS = [pytest.param(case, provider, id=f"{case.id}-{provider}",
                       marks=[pytest.mark.gpu] + ([pytest.mark.quick] if case.quick else []))
          for case in common.prefill_cases() for provider in common.KERNEL_PROVIDERS]

SMOKE = common.Case("prefill_fwd", 1, 4, 2, 64, 32, dtype="float32")


@pytest.mark.parametrize("case,provider", PARAMS)
def test_prefill(benchmark, bench_session, case, provider):
    bench_session.run(benchmark, case, provider, lambda: common.build_attention(case, provider))


@pytest.mark.quick
@pytest.mark.parametrize("smoke_provider", ["drope_triton", "unfused"])
def test_prefill_smoke_cpu(benchmark, smoke_provider):
    if torch.cuda.is_available():
        pytest.skip("CPU smoke case: on a GPU the prefill cases time these paths at full size")
    try:
        bound = common.build_attention(SMOKE, smoke_provider, "cpu", train_len=16)
    except common.ProviderSkip as e:
        pytest.skip(f"{smoke_provider}: {e}")
    rel = bound["check"]()
    assert rel <= 1e-4, f"{smoke_provider} smoke result differs from drope.reference: rel err {rel:.3e}"
    benchmark.extra_info.update(op="prefill_fwd_smoke", provider=smoke_provider, rel_err=rel)
    benchmark.pedantic(bound["call"], args=(bound["sets"][0],), rounds=2, warmup_rounds=0)
