"""Serving paths against their contiguous equivalents (GPU), with a CPU smoke run of each in the interpreter.

- ``varlen_prefill``: 8 documents, each a chunk of ``cases.VARLEN_CHUNK`` query rows at the end of its S keys,
  packed (``cu_seqlens_q`` / ``cu_seqlens_k``: provider ``varlen``), read from a paged cache (``varlen_paged``,
  pages of 64 rows) or batched as (B, H, Lq, D) against (B, Hkv, S, D) (``contiguous``). TFLOP/s counts the
  visible pairs of the bottom-right causal chunk.
- ``paged_decode``: one new token per sequence against an S-token cache, paged (``paged64``, ``paged16``: the page
  size in rows) or contiguous (``contiguous``). GB/s counts the K and V bytes read.

Each result is checked against the contiguous provider's output. Generation throughput of a batch of prompts, with
transformers' continuous batching, is ``test_generation.py``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases
from benchmarks.providers import rel_err
from drope import kernels

PARAMS = ([pytest.param(c, p, id=f"{c.id}-{p}", marks=[pytest.mark.gpu] + ([pytest.mark.quick] if c.quick else []))
           for c in cases.serving_cases() if c.op == "varlen_prefill" for p in ("contiguous", "varlen", "varlen_paged")]
          + [pytest.param(c, p, id=f"{c.id}-{p}", marks=[pytest.mark.gpu] + ([pytest.mark.quick] if c.quick else []))
             for c in cases.serving_cases() if c.op == "paged_decode" for p in ("contiguous", "paged64", "paged16")])


def _pages(k: torch.Tensor, page: int, seed: int = 0):
    """(B, Hkv, S, D) keys as shuffled pages (num_pages, page, Hkv, D) and a (B, S / page) block table."""
    B, HKV, S, D = k.shape
    n = S // page
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * n, generator=g).reshape(B, n).to(device=k.device, dtype=torch.int32)
    pages = torch.empty(B * n, page, HKV, D, device=k.device, dtype=k.dtype)
    pages[table.reshape(-1).long()] = k.reshape(B, HKV, n, page, D).permute(0, 2, 3, 1, 4).reshape(B * n, page, HKV, D)
    return pages, table


def build(case: cases.Case, provider: str, device: str = "cuda", *, chunk: int = cases.VARLEN_CHUNK):
    """``{"call", "sets", "check", "extra"}`` of one (case, provider), as ``BenchSession.run`` takes it."""
    dt = case.torch_dtype
    g = torch.Generator(device=device).manual_seed(0)
    B, H, HKV, S, D = case.B, case.H, case.Hkv, case.S, case.D
    k = torch.randn(B, HKV, S, D, device=device, dtype=dt, generator=g)
    v = torch.randn(B, HKV, S, D, device=device, dtype=dt, generator=g)
    if case.op == "varlen_prefill":
        lq = min(chunk, S)
        q = torch.randn(B, H, lq, D, device=device, dtype=dt, generator=g)

        def contiguous(x):
            return kernels.attention(x["q"], x["k"], x["v"])

        x = {"q": q, "k": k, "v": v}
        if provider != "contiguous":
            cu_q = torch.arange(B + 1, device=device, dtype=torch.int32) * lq
            cu_k = torch.arange(B + 1, device=device, dtype=torch.int32) * S
            x["q"] = q.transpose(0, 1).reshape(1, H, B * lq, D)
            if provider == "varlen":
                x["k"], x["v"] = (t.transpose(0, 1).reshape(1, HKV, B * S, D) for t in (k, v))
                kw = {}
            else:
                (x["k"], table), (x["v"], _) = _pages(k, 64), _pages(v, 64)
                kw = {"block_table": table}

            def call(x):
                return kernels.attention(x["q"], x["k"], x["v"], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, check_values=False,
                                         **kw)
        else:
            call = contiguous

        def check():
            got = call(x)
            if provider != "contiguous":
                got = got.reshape(H, B, lq, D).transpose(0, 1)
            return rel_err(got, contiguous({"q": q, "k": k, "v": v}))
    else:
        q = torch.randn(B, H, 1, D, device=device, dtype=dt, generator=g)
        lens = torch.full((B,), S, device=device, dtype=torch.int32)

        def contiguous(x):
            return kernels.decode_attention(x["q"], x["k"], x["v"], cache_seqlens=lens, max_seqlen=S)

        x = {"q": q, "k": k, "v": v}
        if provider == "contiguous":
            call = contiguous
        else:
            page = int(provider[len("paged"):])
            (x["k"], table), (x["v"], _) = _pages(k, page), _pages(v, page)

            def call(x):
                return kernels.decode_attention(x["q"], x["k"], x["v"], cache_seqlens=lens, block_table=table,
                                                max_seqlen=S, check_values=False)

        def check():
            return rel_err(call(x), contiguous({"q": q, "k": k, "v": v}))
    return {"call": torch.no_grad()(call), "sets": [x], "check": torch.no_grad()(check),
            "extra": {"G": case.G, "provider_note": provider}}


@pytest.mark.parametrize("case,provider", PARAMS)
def test_serving(benchmark, bench_session, case, provider):
    bench_session.run(benchmark, case, provider, lambda: build(case, provider))


SMOKE = [cases.Case("varlen_prefill", 2, 4, 2, 128, 32, dtype="float32"),
         cases.Case("paged_decode", 2, 4, 2, 128, 32, dtype="float32")]


@pytest.mark.quick
@pytest.mark.parametrize("case,provider", [(SMOKE[0], p) for p in ("contiguous", "varlen", "varlen_paged")]
                         + [(SMOKE[1], p) for p in ("contiguous", "paged64", "paged16")],
                         ids=lambda v: v if isinstance(v, str) else v.op)
def test_serving_smoke_cpu(benchmark, case, provider):
    """The same builders on the CPU (kernels in Triton's interpreter), checked against the contiguous path."""
    if torch.cuda.is_available():
        pytest.skip("CPU smoke case: on a GPU the serving cases time these paths at full size")
    bound = build(case, provider, "cpu", chunk=32)
    rel = bound["check"]()
    assert rel <= 1e-5, f"{provider}: rel err {rel:.3e} against the contiguous path"
    benchmark.extra_info.update(op=f"{case.op}_smoke", provider=provider, rel_err=rel)
    benchmark.pedantic(bound["call"], args=(bound["sets"][0],), rounds=2, warmup_rounds=0)
