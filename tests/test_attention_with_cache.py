"""drope.kernels.attention_with_cache: Sq new rows against a cache, the kernels choosing fused or split-KV; the same
results whichever runs, with a query norm and a backward, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from drope import kernels, reference
from drope.kernels import decode as kdecode, interface
from helpers import rel_err

pytestmark = pytest.mark.interpreter


def _inputs(B, HQ, HKV, SQ, SMAX, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, SQ, D, generator=g)
    k, v = torch.randn(B, HKV, SMAX, D, generator=g), torch.randn(B, HKV, SMAX, D, generator=g)
    return q, k, v, g


def _ref(q, k, v, w, **kw):
    qn = q if w is None else reference.rms_norm(q.double(), w.double(), 1e-6)
    return reference.decode_attention(qn.double(), k.double(), v.double(), **{
        n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()})


@pytest.mark.parametrize("route", ["split", "fused"])
def test_no_grad_routes_agree_with_the_reference(route, monkeypatch):
    """Both kernels behind the one entry give the reference's rows (the choice forced each way)."""
    q, k, v, g = _inputs(2, 8, 2, 5, 40)
    w = 0.5 + torch.rand(8, 16, generator=g)
    kw = dict(window=17, sinks=torch.randn(8, generator=g), softmax_scale=0.1 + 0.2 * torch.rand(2, 5, generator=g),
              key_mask=torch.rand(2, 40, generator=g) > 0.2)
    monkeypatch.setattr(interface, "prefer_fused", lambda G, SQ: route == "fused")
    with torch.no_grad():
        out = kernels.attention_with_cache(q, k, v, q_norm_weight=w, **kw)
    assert rel_err(out, _ref(q, k, v, w, **kw)) < 1e-5


def test_lengths_and_per_row_masks_take_the_split_kernel(monkeypatch):
    calls = []
    real = interface.run_decode
    monkeypatch.setattr(interface, "run_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, g = _inputs(2, 4, 2, 60, 90)
    lens = torch.tensor([90, 71], dtype=torch.int32)
    with torch.no_grad():
        out = kernels.attention_with_cache(q, k, v, cache_seqlens=lens)
    assert calls == [1] and rel_err(out, _ref(q, k, v, None, cache_seqlens=lens)) < 1e-5


@pytest.mark.parametrize("lengths", [False, True], ids=["all-live", "ragged"])
def test_gradients(lengths):
    """With a gradient the fused forward runs (ragged lengths: one packed document per batch row)."""
    q, k, v, g = _inputs(3, 4, 2, 3, 30, seed=1)
    w = 0.5 + torch.rand(16, generator=g)
    kw = dict(window=11, softmax_scale=0.1 + 0.2 * torch.rand(3, 4, 3, generator=g),
              key_mask=torch.rand(3, 30, generator=g) > 0.2)
    if lengths:
        kw["cache_seqlens"] = torch.tensor([30, 7, 19], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out, lse = kernels.attention_with_cache(*leaves[:3], q_norm_weight=leaves[3], return_lse=True, **kw)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_lse = reference.decode_attention(reference.rms_norm(leaves64[0], leaves64[3], 1e-6), *leaves64[1:3],
                                              return_lse=True, **{n: (t.double() if isinstance(t, torch.Tensor)
                                                                      and t.is_floating_point() else t)
                                                                  for n, t in kw.items()})
    assert rel_err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5
    dout = torch.randn_like(ref)
    for name, a, b in zip("qkvw", torch.autograd.grad((out * dout).sum(), leaves),
                          torch.autograd.grad((ref * dout).sum(), leaves64)):
        assert rel_err(a, b) < 1e-4, f"d{name}"


def test_refusals():
    q, k, v, g = _inputs(2, 4, 2, 3, 20)
    with pytest.raises(ValueError, match="per-row key_mask .* has no backward"):
        kernels.attention_with_cache(q.requires_grad_(), k, v, key_mask=torch.ones(2, 3, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q_norm_weight must have shape \(16,\) or \(4, 16\)"):
        kernels.attention_with_cache(q.detach(), k, v, q_norm_weight=torch.ones(5))
    with pytest.raises(ValueError, match="cache_seqlens holds a length 2 < Sq=3"):
        kernels.attention_with_cache(q.detach(), k, v, cache_seqlens=torch.tensor([2, 20], dtype=torch.int32))


def test_the_crossover_follows_the_instruction_counts():
    """The recorded counts (decode.py) give the threshold the entry point uses: the split kernel for a decode step
    and a few speculative rows, the fused forward for a long chunk."""
    assert not kdecode.prefer_fused(4, 1) and not kdecode.prefer_fused(4, 16) and not kdecode.prefer_fused(8, 4)
    assert kdecode.prefer_fused(4, 512) and kdecode.prefer_fused(1, 64)
    for G in (1, 2, 4, 8):
        first = next(sq for sq in range(1, 512) if kdecode.prefer_fused(G, sq))
        assert {1: 17, 2: 33, 4: 49, 8: 57}[G] == first
