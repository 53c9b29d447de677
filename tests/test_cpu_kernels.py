"""The operators' PyTorch kernels for CPU tensors (drope.kernels.cpu), what CPU users run without Triton's
interpreter: every feature against the float64 reference, forward, LSE and every gradient, through the public
functions (``ops.cpu_backend`` forced to "torch" here; in this test process Triton's interpreter is on)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from drope import flash_attn, kernels, reference
from drope.kernels import ops
from drope.kernels.cpu import attention as cpu_attention
from helpers import assert_rows_close, lowp_attention, rel_err
from test_paged import paged_cache, paged_documents


@pytest.fixture(autouse=True)
def torch_cpu_kernels(monkeypatch):
    monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def features(name, B, HQ, HKV, SQ, SK, D):
    g = _g(1)
    return {
        "plain": {},
        "bottom-right": {},
        "noncausal": dict(causal=False),
        "rope-norms-rows": dict(rope=reference.rope_tables(SK, D), q_norm_weight=0.5 + torch.rand(HQ, D, generator=g),
                                k_norm_weight=0.5 + torch.rand(D, generator=g),
                                softmax_scale=0.1 + 0.2 * torch.rand(B, SQ, generator=g)),
        "head-scale-window-sinks": dict(softmax_scale=0.1 + 0.2 * torch.rand(HQ, generator=g), window=7,
                                        sinks=torch.randn(HQ, generator=g)),
        "chunk": dict(chunk=5),
        "softcap-rows-window": dict(softcap=3.0, softmax_scale=0.1 + 0.2 * torch.rand(B, HQ, SQ, generator=g),
                                    window=9, sinks=torch.randn(HQ, generator=g)),
        "key-mask": dict(key_mask=torch.rand(B, SK, generator=g) > 0.3),
        "key-mask-noncausal": dict(causal=False, key_mask=torch.rand(B, SK, generator=g) > 0.3),
        # more rows than a masked block (BLOCK = 512): bands, block edges, chunk edges inside blocks
        "long-window": dict(window=300),
        "long-chunk-keymask-sinks": dict(chunk=200, key_mask=torch.rand(B, SK, generator=g) > 0.1,
                                         sinks=torch.randn(HQ, generator=g)),
    }[name]


CASES = [("plain", 2, 4, 2, 24, 24), ("bottom-right", 2, 4, 1, 9, 30), ("noncausal", 1, 4, 4, 20, 13),
         ("rope-norms-rows", 2, 4, 2, 24, 24), ("head-scale-window-sinks", 2, 4, 2, 17, 30), ("chunk", 1, 2, 1, 23, 23),
         ("softcap-rows-window", 2, 4, 2, 12, 20), ("key-mask", 2, 4, 2, 20, 26), ("key-mask-noncausal", 2, 2, 1, 7, 15),
         ("long-window", 1, 4, 2, 1100, 1100), ("long-chunk-keymask-sinks", 1, 2, 1, 700, 750)]


def _f64(kw):
    return {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                tuple(t.double() for t in v) if isinstance(v, tuple) else v) for n, v in kw.items()}


@pytest.mark.parametrize("heads", ["all-heads", "one-group", "one-head"])
@pytest.mark.parametrize("feature,B,HQ,HKV,SQ,SK", CASES, ids=[c[0] for c in CASES])
def test_attention_forward_lse_and_gradients(feature, B, HQ, HKV, SQ, SK, heads, monkeypatch):
    D = 16
    # the backward's chunks of query heads: all at once, one GQA group (its KV head), one query head
    n = {"all-heads": HQ, "one-group": HQ // HKV, "one-head": 1}[heads]
    monkeypatch.setattr(cpu_attention, "_BWD_CHUNK_ELEMS", n * B * SQ * 2 * D)
    g = _g(hash(feature) % 1000)
    q, k, v = (torch.randn(B, h, s, D, generator=g) for h, s in ((HQ, SQ), (HKV, SK), (HKV, SK)))
    kw = features(feature, B, HQ, HKV, SQ, SK, D)
    names = [n for n in ("q_norm_weight", "k_norm_weight", "sinks") if n in kw]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *(kw[n] for n in names))]
    out, lse = kernels.attention(*leaves[:3], return_lse=True, **{**kw, **dict(zip(names, leaves[3:]))})
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_lse = reference.attention(*leaves64[:3], return_lse=True,
                                       **{**_f64(kw), **dict(zip(names, leaves64[3:]))})
    assert rel_err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5
    dout, dlse = torch.randn_like(ref), torch.randn_like(ref_lse)
    got = torch.autograd.grad((out * dout).sum() + (torch.where(fin, lse, 0.0) * dlse).sum(), leaves)
    want = torch.autograd.grad((ref * dout).sum() + (torch.where(fin, ref_lse, 0.0) * dlse).sum(), leaves64)
    for name, a, b in zip(["q", "k", "v", *names], got, want):
        assert a.dtype == leaves[["q", "k", "v", *names].index(name)].dtype
        assert rel_err(a, b) < 1e-4, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature", ["plain", "bottom-right", "rope-norms-rows", "head-scale-window-sinks",
                                     "key-mask"])
def test_attention_low_precision_per_row_rule(feature, dtype):
    B, HQ, HKV, SQ, SK, D = 2, 4, 2, 40, 40 if feature != "bottom-right" else 70, 32
    g = _g(7)
    q, k, v = (torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((HQ, SQ), (HKV, SK), (HKV, SK)))
    kw = features(feature, B, HQ, HKV, SQ, SK, D)
    out = kernels.attention(q, k, v, **kw)
    ref = reference.attention(q.double(), k.double(), v.double(), **_f64(kw))
    low = lowp_attention(q, k, v, **kw)
    assert out.dtype == dtype
    assert_rows_close(out, ref, low, floor=2e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("SQ,SK", [(128, 128), (96, 160)], ids=["square", "bottom-right"])
def test_low_precision_gradients_within_flash_attention_bound(SQ, SK, dtype):
    """flash-attention's rule for gradients (its test suite's): max |grad - grad64| <= 2 max |grad_low - grad64| +
    1e-5 per tensor, grad_low the same computation in the 16-bit dtype. Keys seen by ~100 rows make |dv| ~ 10, where
    one bf16 ulp is 0.0625: a backward that rounds partial sums to bf16 (aten's own 16-bit CPU backward) fails it."""
    B, HQ, HKV, D = 4, 6, 2, 64
    g = _g(11)
    q, k, v = (torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((HQ, SQ), (HKV, SK), (HKV, SK)))
    dout = torch.randn(B, HQ, SQ, D, generator=g).to(dtype)
    grads = {}
    for name, fn, dt in (("kernel", kernels.attention, dtype), ("low", lowp_attention, dtype),
                         ("f64", reference.attention, torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        grads[name] = torch.autograd.grad(fn(*leaves, causal=True), leaves, dout.to(dt))
    for name, a, low, ref in zip("qkv", grads["kernel"], grads["low"], grads["f64"]):
        assert a.dtype == dtype
        err, base = (a.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-5, f"d{name}: {err:.3e} > 2 * {base:.3e}"


@pytest.mark.parametrize("varlen", [False, True], ids=["packed", "varlen"])
def test_packed_documents(varlen):
    D, HQ, HKV = 16, 4, 2
    g = _g(3)
    cq = torch.tensor([0, 7, 7, 20, 24], dtype=torch.int32)
    ck = torch.tensor([0, 9, 12, 25, 31], dtype=torch.int32) if varlen else None
    q = torch.randn(1, HQ, 24, D, generator=g)
    k, v = (torch.randn(1, HKV, 31 if varlen else 24, D, generator=g) for _ in range(2))
    kw = dict(cu_seqlens=cq, cu_seqlens_k=ck, window=6, q_norm_weight=0.5 + torch.rand(D, generator=g))
    if not varlen:
        kw["rope"] = reference.rope_tables(24, D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*leaves, **kw)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.attention(*leaves64, **_f64(kw))
    assert rel_err(out, ref) < 1e-5
    dout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * dout).sum(), leaves), torch.autograd.grad((ref * dout).sum(), leaves64)):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("feature", ["plain", "window-rows", "chunk-keymask-headscale-sinks", "noncausal-keymask",
                                     "qnorm-longwindow"])
def test_one_row_documents(feature):
    """A continuous-batching step: decode rows (documents of one query row, batched into one call) beside prefill
    chunks and an empty document, every feature, against the float64 reference."""
    D, HQ, HKV = 16, 4, 2
    g = _g(11)
    # (queries, keys) per document: one-row documents of 1..70 keys (32: a chunk edge) around two multi-row ones and an empty one
    docs = [(1, 37), (5, 12), (1, 1), (1, 70), (0, 0), (1, 32), (9, 40), (1, 23)]
    cq = torch.tensor([0] + [sum(d[0] for d in docs[:i + 1]) for i in range(len(docs))], dtype=torch.int32)
    ck = torch.tensor([0] + [sum(d[1] for d in docs[:i + 1]) for i in range(len(docs))], dtype=torch.int32)
    T, TK = int(cq[-1]), int(ck[-1])
    q = torch.randn(1, HQ, T, D, generator=g)
    k, v = (torch.randn(1, HKV, TK, D, generator=g) for _ in range(2))
    kw = {"plain": {},
          "window-rows": dict(window=10, softmax_scale=0.1 + 0.2 * torch.rand(1, T, generator=g)),
          "chunk-keymask-headscale-sinks": dict(chunk=16, key_mask=torch.rand(1, TK, generator=g) > 0.3,
                                                softmax_scale=0.1 + 0.2 * torch.rand(HQ, generator=g),
                                                sinks=torch.randn(HQ, generator=g)),
          "noncausal-keymask": dict(causal=False, key_mask=torch.rand(1, TK, generator=g) > 0.5),
          "qnorm-longwindow": dict(window=60, q_norm_weight=0.5 + torch.rand(D, generator=g))}[feature]
    with torch.no_grad():
        out, lse = kernels.attention(q, k, v, cu_seqlens=cq, cu_seqlens_k=ck, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), cu_seqlens=cq, cu_seqlens_k=ck,
                                       return_lse=True, **_f64(kw))
    assert rel_err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5
    assert (out.double()[~fin[..., None].expand_as(out)] == 0).all()


def test_paged_varlen_forward_and_a_bad_table_raises():
    q, k, v, kc, vc, table, cq, ck = paged_documents([(3, 40), (0, 0), (21, 21), (9, 70)], 16, 4, 2, 16, "cpu")
    with torch.no_grad():
        out = kernels.attention(q, kc, vc, cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=table, window=13)
    ref = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cq, cu_seqlens_k=ck, window=13)
    assert rel_err(out, ref) < 1e-5
    with torch.no_grad(), pytest.raises(ValueError, match="page index outside"):
        kernels.attention(q, kc, vc, cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=table - 100, check_values=False)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("feature", ["plain", "window-sinks-rows", "chunk-keymask-rows", "softcap"])
def test_decode(feature, paged):
    B, HQ, HKV, SQ, D, page, pages = 3, 8, 2, 3, 16, 16, 5
    kc, vc, table, k, v = paged_cache(B, HKV, pages, page, D, "cpu")
    g = _g(5)
    q = torch.randn(B, HQ, SQ, D, generator=g)
    lens = torch.tensor([80, SQ, 41], dtype=torch.int32)
    kw = {"plain": {}, "window-sinks-rows": dict(window=9, sinks=torch.randn(HQ, generator=g),
                                                 softmax_scale=0.1 + 0.2 * torch.rand(B, SQ, generator=g)),
          "chunk-keymask-rows": dict(chunk=16, key_mask=torch.rand(B, SQ, 80, generator=g) > 0.2,
                                     softmax_scale=0.1 + 0.2 * torch.rand(B, HQ, SQ, generator=g)),
          "softcap": dict(softcap=2.0)}[feature]
    caches = (kc, vc) if paged else (k, v)
    with torch.no_grad():
        out, lse = kernels.decode_attention(q, *caches, cache_seqlens=lens, block_table=table if paged else None,
                                            return_lse=True, **kw)
    ref, ref_lse = reference.decode_attention(q.double(), kc.double(), vc.double(), cache_seqlens=lens,
                                              block_table=table, return_lse=True, **_f64(kw))
    assert rel_err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5


@pytest.mark.parametrize("lengths", ["equal", "capacity"])
@pytest.mark.parametrize("SQ", [1, 3])
@pytest.mark.parametrize("feature", ["plain", "window-sinks-rows", "chunk-keymask-rows", "keymask-empty-rows",
                                     "keymask-live-window"])
def test_decode_equal_lengths(feature, SQ, lengths):
    """Every batch row at one length (a single sequence, a static cache's capacity): the one-problem path, every
    feature, rows with no visible key (zeros, LSE -inf) included."""
    B, HQ, HKV, D, smax = 2, 4, 2, 16, 50
    g = _g(7)
    q = torch.randn(B, HQ, SQ, D, generator=g)
    k, v = (torch.randn(B, HKV, smax, D, generator=g) for _ in range(2))
    L = 37 if lengths == "equal" else smax
    lens = torch.full((B,), L, dtype=torch.int32) if lengths == "equal" else None
    mask = torch.rand(B, smax, generator=g) > 0.3
    if feature == "keymask-empty-rows":
        mask[1] = False  # batch row 1 sees nothing
    kw = {"plain": {}, "window-sinks-rows": dict(window=5, sinks=torch.randn(HQ, generator=g),
                                                 softmax_scale=0.1 + 0.2 * torch.rand(B, SQ, generator=g)),
          "chunk-keymask-rows": dict(chunk=16, key_mask=mask, softmax_scale=0.1 + 0.2 * torch.rand(B, HQ, SQ,
                                                                                                generator=g)),
          "keymask-empty-rows": dict(key_mask=mask),
          # every slot live (a static cache's mask): the mask is dropped, the window still applies
          "keymask-live-window": dict(key_mask=torch.ones(B, smax, dtype=torch.bool), window=6)}[feature]
    with torch.no_grad():
        out, lse = kernels.decode_attention(q, k, v, cache_seqlens=lens, return_lse=True, **kw)
    ref, ref_lse = reference.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=lens,
                                              return_lse=True, **_f64(kw))
    assert rel_err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5
    if feature == "keymask-empty-rows":
        assert not fin[1].any() and (out[1] == 0).all()


def test_decode_append_and_bad_lengths_or_pages_give_nan_rows():
    B, HQ, HKV, SQ, D, page, pages = 3, 4, 2, 2, 16, 16, 4
    kc, vc, table, _, _ = paged_cache(B, HKV, pages, page, D, "cpu")
    q = torch.randn(B, HQ, SQ, D, generator=_g(6))
    k_new, v_new = torch.randn(B, HKV, SQ, D, generator=_g(7)), torch.randn(B, HKV, SQ, D, generator=_g(8))
    lens = torch.tensor([30, 64, 2], dtype=torch.int32)
    ref_k, ref_v = kc.double(), vc.double()
    ref = reference.decode_attention(q.double(), ref_k, ref_v, cache_seqlens=lens, block_table=table,
                                     k_new=k_new.double(), v_new=v_new.double())
    with torch.no_grad():
        out = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new, v_new=v_new)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(kc.double().nan_to_num(7.0), ref_k.nan_to_num(7.0))
    bad_table = table.clone()
    bad_table[0, 1] = 99
    with torch.no_grad():
        out = kernels.decode_attention(q, kc, vc, cache_seqlens=torch.tensor([30, 70, 5], dtype=torch.int32),
                                       block_table=bad_table, check_values=False)
    assert out[0].isnan().all() and out[1].isnan().all() and not out[2].isnan().any()


def test_qk_norm_rope_and_flash_attn_on_torch_kernels():
    x = torch.randn(2, 4, 10, 16, generator=_g(9)).requires_grad_()
    w = (0.5 + torch.rand(4, 16, generator=_g(10))).requires_grad_()
    rope = reference.rope_tables(20, 16)
    y = kernels.qk_norm_rope(x, w, rope, pos0=3)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.apply_rope(reference.rms_norm(x64, w64, 1e-6), rope[0][3:13].double(), rope[1][3:13].double())
    gy = torch.randn_like(y)
    assert rel_err(y, ref) < 1e-6
    for a, b in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(ref, (x64, w64), gy.double())):
        assert rel_err(a, b) < 1e-5
    q, kk, vv = (torch.randn(2, 12, h, 16, generator=_g(11)) for h in (4, 2, 2))
    out = flash_attn.flash_attn_func(q, kk, vv, causal=True, window_size=(5, 0))
    want = reference.attention(q.transpose(1, 2).double(), kk.transpose(1, 2).double(), vv.transpose(1, 2).double(),
                               window=6).transpose(1, 2)
    assert rel_err(out, want) < 1e-5


def test_compile_and_export_trace_the_cpu_kernels():
    q, k, v = (torch.randn(2, h, 16, 16, generator=_g(12)) for h in (4, 2, 2))
    w = 0.5 + torch.rand(16, generator=_g(13))

    def loss(q, k, v, w):
        out, lse = kernels.attention(q, k, v, q_norm_weight=w, window=5, return_lse=True)
        return out.square().sum() + lse.sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


def test_cpu_users_need_no_environment_variable(tmp_path):
    """A fresh process without TRITON_INTERPRET: drope.kernels and drope.flash_attn run on CPU tensors (the torch
    kernels), exact, and say which backend they use."""
    code = ("import torch; from drope import kernels, reference; from drope.kernels import ops\n"
            "q, k, v = (torch.randn(1, h, 64, 32) for h in (4, 2, 2))\n"
            "out = kernels.attention(q, k, v, window=20)\n"
            "ref = reference.attention(q.double(), k.double(), v.double(), window=20)\n"
            "print(ops.cpu_backend(), float((out.double() - ref).norm() / ref.norm()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    backend, err = r.stdout.split()
    assert backend == "torch" and float(err) < 1e-5 and not math.isnan(float(err))
