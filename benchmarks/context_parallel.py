"""Context parallelism simulated on one device: each rank's local kernel work, run one rank after the other.

What a rank of ``drope.distributed.attention`` computes after its K/V all-gather is its runs of consecutive global
rows, each a :func:`drope.kernels.attention` call against the key prefix it needs, on the gathered (S, 2, B, Hkv, D)
buffer's strided K/V views (the layout the all-gather leaves). Timing every rank's calls on one GPU gives the step
time of W GPUs without their communication (the busiest rank's), the balance (busiest / mean) and the efficiency
against one GPU attending the whole sequence (single time / (W x busiest)). Decode: each rank's split-KV kernel on
its contiguous shard (``return_lse``) and the log-sum-exp merge of the W states, against one decode over the cache.

The inputs are DroPE's production call: per-head QK-norm weights in the kernel and the per-row "position"
temperature (SmolLM-360M's fit) by global position.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch

from benchmarks import cases
from benchmarks.providers import rel_err
from drope import kernels
from drope.distributed import merge_attention_states
from drope.distributed.balance import kv_bytes
from drope.distributed.layout import segments

__all__ = ["build_prefill", "build_decode", "time_calls"]


def time_calls(fn: Callable[[], Any], *, reps: int, device: str) -> List[float]:
    """Milliseconds of ``reps`` calls after one warm-up call: CUDA events on a GPU, wall clock on a CPU. Calls of
    tens of milliseconds to seconds (a rank's prefill at 128k-1M positions) need no L2 flush nor rotation."""
    fn()
    if device != "cuda":
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
        return out
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def _gathered(B: int, HKV: int, S: int, D: int, dtype, device, g):
    """K and V as the all-gather leaves them: (B, Hkv, S, D) strided views of one (S, 2, B, Hkv, D) buffer."""
    buf = torch.randn(S, 2, B, HKV, D, device=device, dtype=dtype, generator=g)
    return buf[:, 0].permute(1, 2, 0, 3), buf[:, 1].permute(1, 2, 0, 3)


def build_prefill(case: cases.Case, layout: str, W: int, device: str = "cuda") -> Dict[str, Any]:
    """``{"ranks": [step of rank r], "single": one-device call, "check": fn() -> rel err, "gathered_bytes"}``.

    ``layout`` None: no ranks (the single-device baseline alone)."""
    g = torch.Generator(device=device).manual_seed(0)
    B, H, HKV, S, D, dt = case.B, case.H, case.Hkv, case.S, case.D, case.torch_dtype
    q = torch.randn(B, H, S, D, device=device, dtype=dt, generator=g)
    K, V = _gathered(B, HKV, S, D, dt, device, g)
    qw = torch.rand(H, D, device=device, generator=g) + 0.5
    kw = torch.rand(HKV, D, device=device, generator=g) + 0.5
    scale = cases.position_temperature(S, device) * D ** -0.5  # (S,), by global position
    kw_all = dict(q_norm_weight=qw, k_norm_weight=kw, norm_eps=cases.NORM_EPS)

    def single():
        return kernels.attention(q, K, V, softmax_scale=scale, **kw_all)

    steps, plans = [], []
    for r in range(W if layout else 0):
        runs = segments(W, r, S // W, layout)
        local = torch.cat([q[:, :, s:s + b - a] for a, b, s in runs], 2)  # the rank's own rows, as dd.shard cuts them
        rows = torch.cat([scale[s:s + b - a] for a, b, s in runs])
        plans.append(runs)

        def step(local=local, rows=rows, runs=runs):
            return [kernels.attention(local[:, :, a:b], K[:, :, :s + b - a], V[:, :, :s + b - a],
                                      softmax_scale=rows[a:b], **kw_all) for a, b, s in runs]
        steps.append(step)

    def check() -> float:
        full = single()
        got = torch.empty_like(full)
        for step, runs in zip(steps, plans):
            for out, (a, b, s) in zip(step(), runs):
                got[:, :, s:s + b - a] = out
        return rel_err(got, full)

    return {"ranks": steps, "single": single, "check": check,
            "gathered_bytes": kv_bytes(S, B=B, Hkv=HKV, D=D, elem=q.element_size())}


def build_decode(case: cases.Case, W: int, device: str = "cuda") -> Dict[str, Any]:
    """``{"ranks": [rank r's kernel on its shard], "merge": fn(states), "single", "check"}``: W contiguous shards of
    an S-slot cache (every slot live), one new token per sequence."""
    g = torch.Generator(device=device).manual_seed(0)
    B, H, HKV, S, D, dt = case.B, case.H, case.Hkv, case.S, case.D, case.torch_dtype
    q = torch.randn(B, H, 1, D, device=device, dtype=dt, generator=g)
    k = torch.randn(B, HKV, S, D, device=device, dtype=dt, generator=g)
    v = torch.randn(B, HKV, S, D, device=device, dtype=dt, generator=g)
    n = S // max(W, 1)
    shards = [(k[:, :, r * n:(r + 1) * n].contiguous(), v[:, :, r * n:(r + 1) * n].contiguous()) for r in range(W)]
    lens = torch.full((B,), n, device=device, dtype=torch.int32)
    full_lens = torch.full((B,), S, device=device, dtype=torch.int32)

    def single():
        return kernels.decode_attention(q, k, v, cache_seqlens=full_lens, max_seqlen=S)

    steps = [(lambda kc=kc, vc=vc: kernels.decode_attention(q, kc, vc, cache_seqlens=lens, max_seqlen=n,
                                                           return_lse=True)) for kc, vc in shards]

    def merge(states):
        return merge_attention_states([o for o, _ in states], [m for _, m in states])

    def check() -> float:
        return rel_err(merge([step() for step in steps])[0], single())

    return {"ranks": steps, "merge": merge, "single": single, "check": check}


def summary(rank_ms: List[List[float]], single_ms: float) -> Dict[str, Any]:
    """Per-rank medians, the step (busiest rank, per repetition), balance and efficiency against one device."""
    med = [statistics.median(t) for t in rank_ms]
    W = len(med)
    return {"rank_ms": [round(m, 4) for m in med], "balance": max(med) / (sum(med) / W),
            "efficiency": single_ms / (W * max(med)), "single_ms": single_ms,
            "step_ms": [max(t[i] for t in rank_ms) for i in range(min(len(t) for t in rank_ms))]}
