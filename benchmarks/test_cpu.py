"""drope's PyTorch CPU kernels against ``scaled_dot_product_attention`` on the same causal problem: time and peak memory.

What CPU users run without Triton's interpreter (``drope.kernels.attention`` on CPU tensors). B 1, 8 query heads, 2 KV
heads, D 128, bf16, causal, S from 4k to 32k (1k in the quick set); the forward alone, and forward + backward (the
gradients of q, k, v). Time: alternating rounds of each (a busy machine slows both alike), the
median. Peak memory: each provider in a fresh process; the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) of one call above the resident set with the inputs allocated.

``pytest benchmarks/test_cpu.py --benchmark-only -s`` prints each row; README quotes them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

# quick: a 1k smoke of the same code (the CPU suite runs it); the figures come from 4k to 32k
SIZES = [pytest.param(1024, marks=pytest.mark.quick), 4096, 8192, 16384, 32768]
HQ, HKV, D = 8, 2, 128

_MEMORY = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
S, provider, backward = int(sys.argv[1]), sys.argv[2], sys.argv[4] == "1"
from drope import kernels
from drope.kernels import ops
assert ops.cpu_backend() == "torch"
g = torch.Generator().manual_seed(0)
q = torch.randn(1, %d, S, %d, generator=g).bfloat16().requires_grad_(backward)
k, v = (torch.randn(1, %d, S, %d, generator=g).bfloat16().requires_grad_(backward) for _ in range(2))
dout = torch.randn(q.shape, generator=g).bfloat16()
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
if provider == "drope":
    out = kernels.attention(q, k, v)
else:
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
if backward:
    grads = torch.autograd.grad(out, (q, k, v), dout)
print(json.dumps({"peak_bytes": rss("VmHWM:") - base}))
""" % (HQ, D, HKV, D)


def _peak(S: int, provider: str, threads: int, backward: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _MEMORY, str(S), provider, str(threads), str(int(backward))],
                       capture_output=True,
                       text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward-backward"])
@pytest.mark.parametrize("S", SIZES)
def test_cpu_kernels_against_sdpa(benchmark, monkeypatch, S, backward):
    from drope import kernels
    from drope.kernels import ops

    monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, S, D, generator=g).bfloat16().requires_grad_(backward)
    k, v = (torch.randn(1, HKV, S, D, generator=g).bfloat16().requires_grad_(backward) for _ in range(2))
    dout = torch.randn(q.shape, generator=g).bfloat16()

    def run(out):
        return (out, *torch.autograd.grad(out, (q, k, v), dout)) if backward else (out,)

    def drope():
        return run(kernels.attention(q, k, v))

    def sdpa():
        return run(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))

    for a, b in zip(drope(), sdpa(), strict=True):
        assert (a.float() - b.float()).abs().max() < 5e-2 * max(1.0, b.float().abs().max().item())
    rounds = 5 if S <= 8192 and not backward else 2
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((drope, ta), (sdpa, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    benchmark.pedantic(drope, rounds=1, iterations=1)
    mem = {p: _peak(S, p, threads, backward) for p in ("drope", "sdpa")}
    info = {"S": S, "backward": backward, "drope_s": statistics.median(ta), "sdpa_s": statistics.median(tb),
            "time_ratio": statistics.median(a / b for a, b in zip(ta, tb)), "drope_peak_mb": mem["drope"] / 2**20,
            "sdpa_peak_mb": mem["sdpa"] / 2**20, "memory_ratio": mem["drope"] / max(mem["sdpa"], 1),
            "threads": threads}
    benchmark.extra_info.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()})
    what = " forward+backward" if backward else ""
    print(f"\nS={S}{what}: drope {info['drope_s']:.2f} s, sdpa {info['sdpa_s']:.2f} s ({info['time_ratio']:.3f}x); "
          f"peak {info['drope_peak_mb']:.1f} MB vs {info['sdpa_peak_mb']:.1f} MB ({info['memory_ratio']:.3f}x)")
