"""Context parallelism simulated on one GPU (:mod:`benchmarks.context_parallel`): every rank's local work timed one
rank after the other, no communication (what the collectives move is :mod:`drope.distributed.balance`'s arithmetic;
``scripts/context_parallel_bench.py`` times real ranks under torchrun).

- ``cp_prefill``: bf16 causal forward with per-head QK-norm and the per-row temperature, Hq 8, Hkv 2, D 128, B 1,
  S 128k..1M; providers ``single`` (one GPU, the whole sequence) and ``<layout>-W<W>`` for head-tail and contiguous
  shards over W = 2, 4, 8 ranks. Each row records the step (the busiest rank, per repetition), every rank's median,
  the measured balance (busiest / mean) beside the one predicted from the kernel's tile counts, the efficiency
  (single / (W x step)), TFLOP/s per GPU, and memory: the gathered K/V buffer (what the all-gather adds) and the
  peak a rank's step allocates on top of its inputs.
- ``cp_decode``: one new token against a cache of S slots sharded contiguously over W ranks (each rank's split-KV
  kernel with ``return_lse``, then the log-sum-exp merge of the W states), against one decode over the whole
  cache. Step = busiest rank + merge (+ an all-gather of W x B x Hq x (D+1) fp32 values, not simulated).

Results are checked against the single-device call (prefill up to 256k positions: the check costs two full passes).
Repetitions: 5 per rank up to 256k positions, 3 beyond (a rank's step at 1M takes about a second).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from benchmarks import cases, timing
from benchmarks.context_parallel import build_decode, build_prefill, summary, time_calls
from drope.distributed.balance import balance

PREFILL_PROVIDERS = ["single"] + [f"{layout}-W{W}" for W in cases.CP_WORLDS for layout in ("headtail", "contiguous")]
DECODE_PROVIDERS = ["single"] + [f"sharded-W{W}" for W in cases.CP_WORLDS]
_SINGLE = {}


def _params(case_list, providers):
    return [pytest.param(c, p, id=f"{c.id}-{p}", marks=[pytest.mark.gpu] + ([pytest.mark.quick] if c.quick else []))
            for c in case_list for p in providers]


def _single_ms(case, bound, reps: int) -> float:
    if case not in _SINGLE:
        _SINGLE[case] = statistics.median(time_calls(bound["single"], reps=reps, device="cuda"))
    return _SINGLE[case]


@pytest.mark.parametrize("case,provider", _params(cases.cp_prefill_cases(), PREFILL_PROVIDERS))
def test_cp_prefill(benchmark, bench_session, case, provider):
    bench_session.check_budget(case, provider)
    reps = 5 if case.S <= 262144 else 3
    layout, W = (None, 1) if provider == "single" else (provider.split("-W")[0], int(provider.split("-W")[1]))
    torch.cuda.empty_cache()
    try:
        bound = build_prefill(case, layout, W if layout else 0)
        if layout is None:
            times = time_calls(bound["single"], reps=reps, device="cuda")
            _SINGLE[case] = statistics.median(times)
            bench_session.add(benchmark, case, provider, times, peak_mem_mb=None, W=1, balance=1.0,
                              tiles_balance=1.0, efficiency=1.0, tflops_per_gpu=cases.case_flops(case) / (
                                  _SINGLE[case] * 1e-3) / 1e12)
            return
        if case.S <= 262144:
            rel = bound["check"]()
            if not rel <= 2e-2:
                bench_session.fail(case, provider, f"ranks' rows differ from one device's: rel err {rel:.3e}")
        rank_ms = [time_calls(step, reps=reps, device="cuda") for step in bound["ranks"]]
        stats = summary(rank_ms, _single_ms(case, bound, reps))
        busiest = max(range(W), key=lambda r: stats["rank_ms"][r])
        peak = timing.peak_extra_mb(lambda _: bound["ranks"][busiest](), None)
    except torch.cuda.OutOfMemoryError as e:
        bench_session.skip(case, provider, f"OOM: {str(e).splitlines()[0][:300]}")
    step = statistics.median(stats["step_ms"])
    bench_session.add(benchmark, case, provider, stats["step_ms"], peak_mem_mb=round(peak, 2), W=W, layout=layout,
                      rank_ms=stats["rank_ms"], balance=stats["balance"], efficiency=stats["efficiency"],
                      tiles_balance=balance(case.S, W, layout), single_ms=stats["single_ms"],
                      tflops_per_gpu=cases.case_flops(case) / W / (step * 1e-3) / 1e12,
                      gathered_kv_mb=bound["gathered_bytes"] / 2**20)


@pytest.mark.parametrize("case,provider", _params(cases.cp_decode_cases(), DECODE_PROVIDERS))
def test_cp_decode(benchmark, bench_session, case, provider):
    bench_session.check_budget(case, provider)
    W = 1 if provider == "single" else int(provider.split("-W")[1])
    torch.cuda.empty_cache()
    try:
        bound = build_decode(case, 0 if W == 1 else W)
        single = timing.cuda_time(lambda _: bound["single"](), [None])
        if W == 1:
            bench_session.add(benchmark, case, provider, single, peak_mem_mb=None, W=1, efficiency=1.0)
            return
        rel = bound["check"]()
        if not rel <= 2e-2:
            bench_session.fail(case, provider, f"merged shards differ from one decode: rel err {rel:.3e}")
        rank_ms = [timing.cuda_time(lambda _, s=step: s(), [None]) for step in bound["ranks"]]
        states = [step() for step in bound["ranks"]]
        merge = timing.cuda_time(lambda _: bound["merge"](states), [None])
    except torch.cuda.OutOfMemoryError as e:
        bench_session.skip(case, provider, f"OOM: {str(e).splitlines()[0][:300]}")
    busiest = max(rank_ms, key=statistics.median)
    merge_ms = statistics.median(merge)
    step = [t + merge_ms for t in busiest]
    bench_session.add(benchmark, case, provider, step, peak_mem_mb=None, W=W,
                      rank_ms=[round(statistics.median(t), 5) for t in rank_ms], merge_ms=merge_ms,
                      single_ms=statistics.median(single),
                      efficiency=statistics.median(single) / (W * statistics.median(step)))


SMOKE = [cases.Case("cp_prefill", 1, 2, 1, 256, 32, dtype="float32"),
         cases.Case("cp_decode", 2, 4, 2, 256, 32, dtype="float32")]


@pytest.mark.quick
@pytest.mark.parametrize("provider", ["headtail-W2", "contiguous-W4", "sharded-W2", "sharded-W4"])
def test_cp_smoke_cpu(benchmark, provider):
    """The same builders on the CPU (kernels in Triton's interpreter): the ranks' rows / the merged shards equal one
    device's call."""
    if torch.cuda.is_available():
        pytest.skip("CPU smoke case: on a GPU the cp cases time these paths at full size")
    W = int(provider.split("-W")[1])
    if provider.startswith("sharded"):
        bound = build_decode(SMOKE[1], W, "cpu")
        states = [step() for step in bound["ranks"]]
        call = lambda: bound["merge"](states)  # noqa: E731
    else:
        bound = build_prefill(SMOKE[0], provider.split("-W")[0], W, "cpu")
        call = bound["ranks"][0]
    rel = bound["check"]()
    assert rel <= 1e-5, f"{provider}: rel err {rel:.3e} against one device"
    benchmark.extra_info.update(op=f"cp_{'decode' if provider.startswith('sharded') else 'prefill'}_smoke",
                                provider=provider, rel_err=rel)
    benchmark.pedantic(call, rounds=1, warmup_rounds=0)
