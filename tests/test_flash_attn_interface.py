"""drope.flash_attn: flash-attention's functions, layouts and semantics on drope's kernels.

The oracle here is written from flash-attn's documented semantics (bottom-right causal; a query at position i sees
keys [i + Sk - Sq - left, i + Sk - Sq + right]; empty rows are zeros), in float64, independently of drope.reference.
"""

from __future__ import annotations

import pytest
import torch

from drope import flash_attn as fa
from drope.kernels import ops
from helpers import cu_seqlens, flash_oracle as oracle, rel_err

pytestmark = pytest.mark.interpreter


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


def func_against_oracle(q, k, v, **kw):
    """flash_attn_func against the oracle: output and every gradient; returns (out, lse, the oracle's lse)."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = oracle(*leaves, **kw)
    do = torch.randn_like(ref)
    want = torch.autograd.grad((ref * do).sum(), leaves)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = fa.flash_attn_func(*ins, return_attn_probs=True, **kw)
    assert out.shape == q.shape and rel_err(out, ref) < 1e-5
    for name, a, b in zip("qkv", torch.autograd.grad((out.double() * do).sum(), ins), want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-4, f"d{name}"
    return out, lse, ref_lse


def test_flash_attn_func_gradients():
    func_against_oracle(*inputs(1, 16, 24, 4, 1, 16, seed=1), causal=True, window_size=(5, 0))


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


def in_pages(k, v, ck, lk, table, *, pages: int, page: int = 16):
    """Packed keys / values (total_k, Hkv, D) copied into pages of ``page`` rows: sequence d on pages table[d]."""
    kc, vc = torch.zeros(pages, page, *k.shape[1:]), torch.zeros(pages, page, *v.shape[1:])
    for d in range(len(lk)):
        for p in range(0, lk[d], page):
            n = min(page, lk[d] - p)
            kc[table[d, p // page], :n] = k[int(ck[d]) + p:int(ck[d]) + p + n]
            vc[table[d, p // page], :n] = v[int(ck[d]) + p:int(ck[d]) + p + n]
    return kc, vc


def test_varlen_packed_forms_and_paged_keys():
    lq, lk = [3, 1, 8], [30, 17, 8]
    q, k, v, cq, ck = _varlen(lq, lk)
    want = fa.flash_attn_varlen_func(q, k, v, cq, ck, 8, 30, causal=True)
    got = fa.flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), 1), cq, ck, 8, 30, causal=True)
    assert torch.equal(got, want)
    same = fa.flash_attn_varlen_func(q[:, :2], q[:, :2], q[:, :2], cq, cq, 8, 8, causal=True)
    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(torch.stack((q[:, :2],) * 3, 1), cq, 8, causal=True), same)
    # the same keys in pages of 16 rows: sequence d on pages table[d]
    table = torch.tensor([[4, 0], [2, 5], [1, 3]], dtype=torch.int32)
    kc, vc = in_pages(k, v, ck, lk, table, pages=6)
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
    (lambda q, k, v: fa.flash_attn_func(q, k, v, softcap=-1.0), r"softcap must be a float in \[0"),
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
    with pytest.raises(fa.FlashAttnInputError, match=match) as info:
        call(q, k, v)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_one_import_changes(monkeypatch):
    """Code written against ``flash_attn`` runs on drope when the module is swapped (what users do with an import)."""
    import sys

    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    from flash_attn import flash_attn_func  # noqa: E402  (the user's line)

    q, k, v = inputs(1, 8, 8, 2, 2, 16)
    ref, _ = oracle(q, k, v, causal=True)
    assert rel_err(flash_attn_func(q, k, v, causal=True), ref) < 1e-5


# ---- where flash-attn computes what drope's contract refuses: drope.flash_attn gives flash-attn's result -------------


@pytest.mark.parametrize("window_size", [torch.tensor([5, 0]), (torch.tensor(5), torch.tensor(0)), [5, 0]],
                         ids=["tensor", "tensor-pair", "list"])
def test_window_size_as_flash_tests_pass_it(window_size):
    q, k, v = inputs(1, 9, 14, 2, 1, 16, seed=11)
    ref, _ = oracle(q, k, v, causal=True, window_size=(5, 0))
    assert rel_err(fa.flash_attn_func(q, k, v, causal=True, window_size=window_size), ref) < 1e-5


@pytest.mark.parametrize("D", [20, 59], ids=["D20", "D59"])
def test_head_dims_not_a_multiple_of_8_are_padded(D):
    """flash-attn pads such head dims with zeros and slices the output; the default scale is the original D**-0.5."""
    q, k, v = inputs(2, 11, 17, 4, 2, D, seed=D)
    _, lse, ref_lse = func_against_oracle(q, k, v, causal=True, window_size=(6, 0))
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    # varlen and the kvcache (with an append) at the same head dim
    qv, kv_, vv, cq, ck = _varlen([4, 7], [9, 7], D=D)
    out = fa.flash_attn_varlen_func(qv, kv_, vv, cq, ck, 7, 9, causal=True)
    for d in range(2):
        a, b, ka, kb = int(cq[d]), int(cq[d + 1]), int(ck[d]), int(ck[d + 1])
        assert rel_err(out[a:b], oracle(qv[None, a:b], kv_[None, ka:kb], vv[None, ka:kb], causal=True)[0][0]) < 1e-5
    kc, vc = torch.zeros(2, 32, 2, D), torch.zeros(2, 32, 2, D)
    kc[:, :10], vc[:, :10] = k[:, :10], v[:, :10]
    lens = torch.tensor([10, 6], dtype=torch.int32)
    step = fa.flash_attn_with_kvcache(q[:, :2], kc, vc, k[:, 10:12], v[:, 10:12], cache_seqlens=lens, causal=True)
    for b in range(2):
        L = int(lens[b])
        assert torch.equal(kc[b, L:L + 2], k[b, 10:12]), "the new keys were written into the caller's cache"
        keys, vals = torch.cat((k[b:b + 1, :L], k[b:b + 1, 10:12]), 1), torch.cat((v[b:b + 1, :L], v[b:b + 1, 10:12]), 1)
        assert rel_err(step[b:b + 1], oracle(q[b:b + 1, :2], keys, vals, causal=True)[0]) < 1e-5


def test_causal_with_more_queries_than_keys_gives_zero_rows():
    """flash-attn's bottom-right causal mask with seqlen_q > seqlen_k: the first rows see no key and are zeros."""
    out, lse, ref_lse = func_against_oracle(*inputs(2, 13, 5, 4, 2, 16, seed=12), causal=True, window_size=(3, 0))
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8])) and torch.isneginf(lse[:, :, :8]).all()
    assert (lse[:, :, 8:].double() - ref_lse[:, :, 8:]).abs().max() < 1e-5


# varlen with sequences of more queries than keys: in some sequences only, in the totals too (flash-attn's own
# tests draw such lengths), a sequence with no key at all; forward and backward
@pytest.mark.parametrize("lq,lk,window", [([6, 3], [4, 9], (-1, -1)), ([7, 3, 2, 5], [2, 0, 3, 1], (-1, -1)),
                                          ([7, 3, 2, 5], [2, 0, 3, 1], (1, 0)), ([9], [4], (2, 0))],
                         ids=["some-sequences", "totals", "totals-window", "one-sequence-window"])
@pytest.mark.parametrize("backend", ["interpreter", "torch"])
def test_varlen_causal_with_more_queries_than_keys_gives_zero_rows(lq, lk, window, backend, monkeypatch):
    if backend == "torch":  # the CPU kernels a user without TRITON_INTERPRET runs
        monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")
    qv, kv_, vv, cq, ck = _varlen(lq, lk, seed=13)
    ins = [t.clone().requires_grad_() for t in (qv, kv_, vv)]
    out, lse, _ = fa.flash_attn_varlen_func(*ins, cq, ck, max(lq), max(lk), causal=True, window_size=window,
                                            return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), ins)
    for d in range(len(lq)):
        a, b, ka, kb = int(cq[d]), int(cq[d + 1]), int(ck[d]), int(ck[d + 1])
        empty = max(lq[d] - lk[d], 0)
        assert torch.equal(out[a:a + empty], torch.zeros_like(out[a:a + empty]))
        assert torch.isneginf(lse[:, a:a + empty]).all() and torch.isfinite(lse[:, a + empty:b]).all()
        lv = [t.double().requires_grad_() for t in (qv[None, a:b], kv_[None, ka:kb], vv[None, ka:kb])]
        ref, _ = oracle(*lv, causal=True, window_size=window)
        assert rel_err(out[a:b], ref[0]) < 1e-5
        gq, gk, gv = torch.autograd.grad((ref[0] * dout[a:b].double()).sum(), lv)
        assert rel_err(grads[0][a:b], gq[0]) < 1e-4 and rel_err(grads[1][ka:kb], gk[0]) < 1e-4
        assert rel_err(grads[2][ka:kb], gv[0]) < 1e-4


def test_kvcache_lengths_below_seqlen_q_and_more_new_tokens_than_queries():
    B, H, HKV, D, smax = 2, 4, 2, 16, 24
    g = torch.Generator().manual_seed(14)
    kc, vc = torch.randn(B, smax, HKV, D, generator=g), torch.randn(B, smax, HKV, D, generator=g)
    q = torch.randn(B, 4, H, D, generator=g)
    # lengths 2 and 9 for 4 query rows: row 0 of batch 0 sits before the first key (zeros)
    lens = torch.tensor([2, 9], dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, return_softmax_lse=True)
    for b in range(B):
        L = int(lens[b])
        ref, ref_lse = oracle(q[b:b + 1], kc[b:b + 1, :L], vc[b:b + 1, :L], causal=True)
        assert rel_err(out[b:b + 1], ref) < 1e-5
        fin = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isfinite(lse[b]), fin) and (lse[b].double()[fin] - ref_lse[0][fin]).abs().max() < 1e-5
    # three new tokens appended for one query row (seqlen_new != seqlen_q)
    k_new, v_new = torch.randn(B, 3, HKV, D, generator=g), torch.randn(B, 3, HKV, D, generator=g)
    kc2, vc2 = kc.clone(), vc.clone()
    step = fa.flash_attn_with_kvcache(q[:, -1:], kc2, vc2, k_new, v_new, cache_seqlens=lens, causal=True)
    for b in range(B):
        L = int(lens[b])
        assert torch.equal(kc2[b, L:L + 3], k_new[b]) and torch.equal(kc2[b, :L], kc[b, :L])
        ref, _ = oracle(q[b:b + 1, -1:], kc2[b:b + 1, :L + 3], vc2[b:b + 1, :L + 3], causal=True)
        assert rel_err(step[b:b + 1], ref) < 1e-5


def test_single_row_right_window_and_a_larger_cache_batch():
    """A right window side is moot for a query that is the last of its keys: flash computes it, so does drope."""
    q, k, v = inputs(2, 1, 30, 4, 2, 16, seed=15)
    ref, _ = oracle(q, k, v, window_size=(7, 5))
    assert rel_err(fa.flash_attn_func(q, k, v, window_size=(7, 5)), ref) < 1e-5
    qv, kv_, vv, cq, ck = _varlen([1, 1, 0], [12, 30, 3], seed=16)
    out = fa.flash_attn_varlen_func(qv, kv_, vv, cq, ck, 1, 30, window_size=(4, 9))
    for d in range(2):
        a, b, ka, kb = int(cq[d]), int(cq[d + 1]), int(ck[d]), int(ck[d + 1])
        assert rel_err(out[a:b], oracle(qv[None, a:b], kv_[None, ka:kb], vv[None, ka:kb], window_size=(4, 9))[0][0]) \
            < 1e-5
    # a cache of 5 batch rows serves a batch of 2 (rows 0 and 1)
    kc, vc = torch.randn(5, 30, 2, 16), torch.randn(5, 30, 2, 16)
    out = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=20)
    assert rel_err(out, oracle(q, kc[:2, :20], vc[:2, :20])[0]) < 1e-5


def test_paged_varlen_forward_with_grad_enabled_runs_and_its_backward_raises():
    lq, lk = [3, 2], [20, 9]
    q, k, v, cq, ck = _varlen(lq, lk, seed=17)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    kc, vc = in_pages(k, v, ck, lk, table, pages=4)
    qg = q.clone().requires_grad_()
    out = fa.flash_attn_varlen_func(qg, kc, vc, cq, ck, 3, 20, causal=True, block_table=table)
    assert rel_err(out, fa.flash_attn_varlen_func(q, k, v, cq, ck, 3, 20, causal=True)) < 1e-6
    with pytest.raises(RuntimeError, match="no backward through a paged KV cache"):
        out.sum().backward()


def _pages(B=2, page=16, pages=3, D=16):
    g = torch.Generator().manual_seed(18)
    kc, vc = torch.randn(B * pages, page, 2, D, generator=g), torch.randn(B * pages, page, 2, D, generator=g)
    table = torch.arange(B * pages, dtype=torch.int32).reshape(B, pages)
    return torch.randn(B, 1, 4, D, generator=g), kc, vc, table


@pytest.mark.parametrize("call,match", [
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, cache_seqlens=torch.tensor(
        [40, 49], dtype=torch.int32)), r"max\(cache_seqlens\) \(= 49\) exceeds the capacity addressable by block_table"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, kc[:2, :1], vc[:2, :1], block_table=t,
                                                     cache_seqlens=torch.tensor([48, 3], dtype=torch.int32)),
     r"max\(cache_seqlens\) \+ seqlen_new \(= 49\)"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, cache_seqlens=2 ** 40),
     r"cache_seqlens=1099511627776 is outside \[0, the capacity"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t[0], cache_seqlens=3),
     r"block_table must be \(batch, max_num_blocks_per_seq\)"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t + 4, cache_seqlens=3),
     r"block_table holds block index 9, outside \[0, 6\)"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, cache_seqlens=30,
                                                     cache_leftpad=torch.tensor([2.5, 0.0])), "cache_leftpad must be"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, cache_seqlens=30,
                                                     cache_leftpad=torch.tensor([-5, 0], dtype=torch.int32)),
     r"cache_leftpad\[0\] = -5 is outside \[0, cache_seqlens\[0\] = 30\]"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, cache_seqlens=30, cache_leftpad=[1, 2]),
     "cache_leftpad must be"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, cache_seqlens=-1),
     r"cache_seqlens=-1 is outside"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, block_table=t, softcap=float("nan")),
     "softcap must be a float"),
    (lambda q, kc, vc, t: fa.flash_attn_func(q, q, q, softcap=float("nan")), "softcap must be a float"),
    (lambda q, kc, vc, t: fa.flash_attn_func(q, q, q, window_size=torch.tensor([1.5, 0.0])), "window_size must"),
    (lambda q, kc, vc, t: fa.flash_attn_with_kvcache(q, kc, vc, kc[:2, :1, :1], vc[:2, :1, :1], block_table=t,
                                                     cache_seqlens=3), r"k / v must be \(batch, seqlen_new, nheads_k"),
], ids=["capacity", "capacity-append", "huge-int-length", "table-1d", "table-index", "leftpad-float",
        "leftpad-negative", "leftpad-list", "negative-int-length", "softcap-nan-kvcache", "softcap-nan", "window-float",
        "new-shape"])
def test_kvcache_refusals_in_flash_terms(call, match):
    """What flash-attn raises a RuntimeError for is a FlashAttnInputError (a RuntimeError and a ValueError) whose
    message quotes the caller's own names and values (lengths before the append, flash's layouts)."""
    q, kc, vc, table = _pages()
    with pytest.raises(RuntimeError, match=match) as info:
        call(q, kc, vc, table)
    assert isinstance(info.value, ValueError)


def test_readme_migration_example_runs():
    """README's flash-attn migration example, run as written (the code block of its flash-attn section)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### flash-attn's interface"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from drope.flash_attn import" in code
    exec(compile(code, "README.md (flash-attn example)", "exec"), {})
