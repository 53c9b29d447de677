"""drope.flash_attn: flash-attention's functions, layouts and semantics on drope's kernels.

The oracle here is written from flash-attn's documented semantics (bottom-right causal; a query at position i sees
keys [i + Sk - Sq - left, i + Sk - Sq + right]; empty rows are zeros), in float64, independently of drope.reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from drope import flash_attn as fa
from helpers import cu_seqlens, rel_err

pytestmark = pytest.mark.interpreter


def oracle(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, softmax_scale=None):
    """flash-attn's attention in float64: q (B, Sq, H, D), k / v (B, Sk, Hkv, D) -> (out, lse (B, H, Sq))."""
    q, k, v = q.double(), k.double(), v.double()
    B, SQ, H, D = q.shape
    SK, HKV = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // HKV, 2), v.repeat_interleave(H // HKV, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * (softmax_scale if softmax_scale is not None else D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(SQ)[:, None] + (SK - SQ)
    j = torch.arange(SK)[None, :]
    left, right = window_size
    keep = torch.ones(SQ, SK, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def inputs(B, SQ, SK, H, HKV, D, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, SQ, H, D, generator=g).to(dtype), torch.randn(B, SK, HKV, D, generator=g).to(dtype),
            torch.randn(B, SK, HKV, D, generator=g).to(dtype))


CASES = {
    "full": dict(causal=False),
    "causal": dict(causal=True),
    "causal-window": dict(causal=True, window_size=(6, 0)),
    "causal-window-right-ignored": dict(causal=True, window_size=(6, 3)),
    "noncausal-left-only-right0": dict(causal=False, window_size=(9, 0)),
    "noncausal-right0": dict(causal=False, window_size=(-1, 0)),
    "softcap-scale": dict(causal=True, softcap=2.5, softmax_scale=0.3),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_flash_attn_func_matches_flash_semantics(case):
    kw = CASES[case]
    q, k, v = inputs(2, 19, 27, 4, 2, 32)
    ref, ref_lse = oracle(q, k, v, **{**kw, "window_size": (kw["window_size"][0], 0)
                                      if kw.get("causal") and "window_size" in kw else kw.get("window_size", (-1, -1))})
    out, lse, probs = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.shape == q.shape and out.is_contiguous() and probs is None
    assert rel_err(out, ref) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert lse.shape == (2, 4, 19) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5


def test_flash_attn_func_gradients():
    q, k, v = inputs(1, 16, 24, 4, 1, 16, seed=1)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = oracle(*leaves, causal=True, window_size=(5, 0))
    do = torch.randn_like(ref)
    want = torch.autograd.grad((ref * do).sum(), leaves)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fa.flash_attn_func(*ins, causal=True, window_size=(5, 0), deterministic=True)
    got = torch.autograd.grad((out.double() * do).sum(), ins)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 1e-4, f"d{name}"


def test_packed_forms_equal_the_unpacked_one():
    q, k, v = inputs(2, 12, 12, 4, 4, 16, seed=2)
    want = fa.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(fa.flash_attn_qkvpacked_func(torch.stack((q, k, v), 2), causal=True), want)
    assert torch.equal(fa.flash_attn_kvpacked_func(q, torch.stack((k, v), 2), causal=True), want)


def _varlen(lq, lk, H=4, HKV=2, D=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    cq, ck = cu_seqlens(list(zip(lq, lk, strict=True)))
    q = torch.randn(int(cq[-1]), H, D, generator=g)
    k, v = torch.randn(int(ck[-1]), HKV, D, generator=g), torch.randn(int(ck[-1]), HKV, D, generator=g)
    return q, k, v, cq, ck


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window_size=(7, 0)), dict(causal=False)],
                         ids=["causal", "window", "full"])
def test_varlen_matches_each_sequence(kw):
    lq, lk = [5, 1, 0, 12], [20, 9, 4, 12]
    q, k, v, cq, ck = _varlen(lq, lk)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), return_attn_probs=True, **kw)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    for d in range(len(lq)):
        a, b, ka, kb = int(cq[d]), int(cq[d + 1]), int(ck[d]), int(ck[d + 1])
        if a == b:
            continue
        ref, ref_lse = oracle(q[None, a:b], k[None, ka:kb], v[None, ka:kb], **kw)
        assert rel_err(out[a:b], ref[0]) < 1e-5, f"sequence {d}"
        assert (lse[:, a:b].double() - ref_lse[0]).abs().max() < 1e-5


def test_varlen_packed_forms_and_paged_keys():
    lq, lk = [3, 1, 8], [30, 17, 8]
    q, k, v, cq, ck = _varlen(lq, lk)
    want = fa.flash_attn_varlen_func(q, k, v, cq, ck, 8, 30, causal=True)
    got = fa.flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), 1), cq, ck, 8, 30, causal=True)
    assert torch.equal(got, want)
    same = fa.flash_attn_varlen_func(q[:, :2], q[:, :2], q[:, :2], cq, cq, 8, 8, causal=True)
    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(torch.stack((q[:, :2],) * 3, 1), cq, 8, causal=True), same)
    # the same keys in pages of 16 rows: sequence d on pages table[d]
    page, table = 16, torch.tensor([[4, 0], [2, 5], [1, 3]], dtype=torch.int32)
    kc, vc = torch.zeros(6, page, 2, 16), torch.zeros(6, page, 2, 16)
    for d in range(3):
        for p in range(0, lk[d], page):
            n = min(page, lk[d] - p)
            kc[table[d, p // page], :n] = k[int(ck[d]) + p:int(ck[d]) + p + n]
            vc[table[d, p // page], :n] = v[int(ck[d]) + p:int(ck[d]) + p + n]
    with torch.no_grad():
        paged = fa.flash_attn_varlen_func(q, kc, vc, cq, ck, 8, 30, causal=True, block_table=table)
    assert rel_err(paged, want) < 1e-6


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_with_kvcache_appends_and_attends(paged):
    B, SQ, H, HKV, D, smax, page = 3, 2, 4, 2, 16, 64, 16
    g = torch.Generator().manual_seed(4)
    cache_k, cache_v = torch.randn(B, smax, HKV, D, generator=g), torch.randn(B, smax, HKV, D, generator=g)
    q = torch.randn(B, SQ, H, D, generator=g)
    k_new, v_new = torch.randn(B, SQ, HKV, D, generator=g), torch.randn(B, SQ, HKV, D, generator=g)
    seqlens = torch.tensor([10, 0, 62], dtype=torch.int32)  # before the append
    kw = dict(causal=True, window_size=(20, 0), return_softmax_lse=True)
    if paged:
        table = torch.tensor([[7, 1, 2, 0], [3, 4, 5, 6], [8, 9, 10, 11]], dtype=torch.int32)
        kc, vc = torch.zeros(12, page, HKV, D), torch.zeros(12, page, HKV, D)
        for b in range(B):
            for p in range(4):
                kc[table[b, p]] = cache_k[b, p * page:(p + 1) * page]
                vc[table[b, p]] = cache_v[b, p * page:(p + 1) * page]
        out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table, **kw)
        logical_k = torch.stack([torch.cat([kc[table[b, p]] for p in range(4)]) for b in range(B)])
    else:
        kc, vc = cache_k.clone(), cache_v.clone()
        out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, **kw)
        logical_k = kc
    for b in range(B):
        L = int(seqlens[b])
        assert torch.equal(logical_k[b, L:L + SQ], k_new[b]), "k was written at cache_seqlens"
        assert torch.equal(logical_k[b, :L], cache_k[b, :L]), "nothing before it changed"
        keys = torch.cat((cache_k[b, :L], k_new[b]))[None]
        vals = torch.cat((cache_v[b, :L], v_new[b]))[None]
        ref, ref_lse = oracle(q[b:b + 1], keys, vals, causal=True, window_size=(20, 0))
        assert rel_err(out[b:b + 1], ref) < 1e-5 and (lse[b].double() - ref_lse[0]).abs().max() < 1e-5


def test_with_kvcache_without_append_int_lengths_leftpad_and_splits():
    B, H, HKV, D, smax = 2, 4, 1, 16, 40
    g = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(B, smax, HKV, D, generator=g), torch.randn(B, smax, HKV, D, generator=g)
    q = torch.randn(B, 1, H, D, generator=g)
    out = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=33, num_splits=3, causal=False)
    ref, _ = oracle(q, kc[:, :33], vc[:, :33])
    assert rel_err(out, ref) < 1e-5
    pad = torch.tensor([0, 5], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([33, 33], dtype=torch.int32),
                                     cache_leftpad=pad, causal=True)
    ref1, _ = oracle(q[1:], kc[1:, 5:33], vc[1:, 5:33])
    assert rel_err(out[:1], ref[:1]) < 1e-5 and rel_err(out[1:], ref1) < 1e-5


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: fa.flash_attn_func(q, k, v, dropout_p=0.1), "dropout_p must be 0.0"),
    (lambda q, k, v: fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(4)), "alibi_slopes is not supported"),
    (lambda q, k, v: fa.flash_attn_func(q, k, v, window_size=(4, 4)), "has a right side"),
    (lambda q, k, v: fa.flash_attn_func(q, k, v, window_size=(4,)), "window_size must be a pair"),
    (lambda q, k, v: fa.flash_attn_func(q, k, v, softcap=-1.0), "softcap must be a float >= 0"),
    (lambda q, k, v: fa.flash_attn_func(q[0], k, v), r"q must be \(batch, seqlen, nheads, headdim\)"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, rotary_cos=torch.ones(8, 8), rotary_sin=torch.ones(8, 8)),
     "rotary_cos / rotary_sin are not supported"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, cache_batch_idx=torch.tensor([1, 0])),
     "cache_batch_idx is not supported"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, k=k[:, :2]), "k and v go together"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, causal=False), "causal=False with several query rows"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q[:, :1], k, v, k[:, :1], v[:, :1]), "k / v need cache_seqlens"),
    (lambda q, k, v: fa.flash_attn_with_kvcache(q, k, v, num_splits=-1), "num_splits must be an int >= 0"),
    (lambda q, k, v: fa.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 6], dtype=torch.int32),
                                               torch.tensor([0, 9], dtype=torch.int32), 6.5, 9),
     "max_seqlen_q must be an int"),
], ids=["dropout", "alibi", "right-window", "window-shape", "softcap", "q-dims", "rotary", "batch-idx",
        "k-without-v", "noncausal-rows", "append-without-lengths", "splits", "max-seqlen"])
def test_unsupported_arguments_are_refused(call, match):
    q, k, v = inputs(2, 6, 9, 4, 2, 16)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


def test_one_import_changes(monkeypatch):
    """Code written against ``flash_attn`` runs on drope when the module is swapped (what users do with an import)."""
    import sys

    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    from flash_attn import flash_attn_func  # noqa: E402  (the user's line)

    q, k, v = inputs(1, 8, 8, 2, 2, 16)
    ref, _ = oracle(q, k, v, causal=True)
    assert rel_err(flash_attn_func(q, k, v, causal=True), ref) < 1e-5
