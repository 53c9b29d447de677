"""Paged KV caches (``block_table``) and the append of new tokens (``k_new`` / ``v_new``) in decode_attention,
against the float64 reference and against the same cache laid out contiguously."""

from __future__ import annotations

import pytest
import torch

from drope import kernels, reference
from helpers import assert_rows_close, cu_seqlens, lowp_attention, poisoned_empty, rel_err

pytestmark = pytest.mark.interpreter

FEATURES = {
    "plain": {},
    "window": dict(window=20),
    "chunk": dict(chunk=32),
    "sinks-softcap": dict(sinks=True, softcap=4.0),
    "rows": dict(rows=True),
    "key-mask-rows": dict(key_mask=True),
}


def paged_cache(B, HKV, max_pages, page, D, device, *, dtype=torch.float32, spare=3, seed=0):
    """Caches of ``max_pages * B + spare`` shuffled pages (NaN-filled: only live slots may be read), a block table
    giving each batch row its own pages in a random order, and the contiguous (B, Hkv, Smax, D) twins."""
    g = torch.Generator().manual_seed(seed)
    num_pages = B * max_pages + spare
    perm = torch.randperm(num_pages, generator=g)[:B * max_pages].reshape(B, max_pages).to(torch.int32)
    kc = torch.full((num_pages, page, HKV, D), float("nan"), dtype=dtype)
    vc = torch.full((num_pages, page, HKV, D), float("nan"), dtype=dtype)
    k = torch.randn(B, HKV, max_pages * page, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, max_pages * page, D, generator=g).to(dtype)
    for b in range(B):
        for j in range(max_pages):
            kc[perm[b, j]] = k[b, :, j * page:(j + 1) * page].transpose(0, 1)
            vc[perm[b, j]] = v[b, :, j * page:(j + 1) * page].transpose(0, 1)
    return kc.to(device), vc.to(device), perm.to(device), k.to(device), v.to(device)


def feature_kwargs(f: dict, HQ: int, rows: tuple, scale: float, device, *, D: int = 0, key_mask_shape=None) -> dict:
    """Keyword arguments of a feature dict: window / chunk / softcap as given, random sinks, a per-row scale of
    shape ``rows``, a q-norm weight (H, D), a random key mask of ``key_mask_shape``."""
    kw = {name: f[name] for name in ("causal", "window", "chunk", "softcap") if name in f}
    if f.get("sinks"):
        kw["sinks"] = torch.randn(HQ, device=device)
    if f.get("rows"):
        kw["softmax_scale"] = (0.5 + torch.rand(*rows, device=device)) * scale
    if f.get("qnorm"):
        kw["q_norm_weight"] = 0.5 + torch.rand(HQ, D, device=device)
    if f.get("key_mask"):
        kw["key_mask"] = torch.rand(*key_mask_shape, device=device) > 0.2
    return kw


def options(feature, B, HQ, SQ, SMAX, device):
    return feature_kwargs(FEATURES[feature], HQ, (B, SQ), 0.2, device, key_mask_shape=(B, SQ, SMAX))


def f64(kw):
    return {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}


@pytest.mark.parametrize("splits", [1, 3], ids=["1split", "3splits"])
# 16 and 32: a key tile spans pages (per-row lookups); 64: one page per tile (one lookup, a TMA load)
@pytest.mark.parametrize("page", [16, 32, 64], ids=["page16", "page32", "page64"])
@pytest.mark.parametrize("feature", list(FEATURES), ids=list(FEATURES))
def test_paged_decode_matches_reference_and_contiguous(feature, page, splits, device):
    B, HQ, HKV, SQ, D, max_pages = 3, 8, 2, 4, 32, 5
    SMAX = max_pages * page
    kc, vc, table, k, v = paged_cache(B, HKV, max_pages, page, D, device)
    lens = torch.tensor([SMAX, SQ, SMAX - page - 3], dtype=torch.int32, device=device)
    # contiguous twins with NaN past each row's live length, as the paged cache's unwritten rows
    dead = (torch.arange(SMAX, device=device)[None, :] >= lens[:, None])[:, None, :, None]
    k, v = k.masked_fill(dead, float("nan")), v.masked_fill(dead, float("nan"))
    q = torch.randn(B, HQ, SQ, D, device=device)
    kw = options(feature, B, HQ, SQ, SMAX, device)
    with poisoned_empty():
        out, lse = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, num_splits=splits,
                                            return_lse=True, **kw)
    flat, flat_lse = kernels.decode_attention(q, k, v, cache_seqlens=lens, num_splits=splits, return_lse=True, **kw)
    ref, ref_lse = reference.decode_attention(q.double(), kc.double(), vc.double(), cache_seqlens=lens,
                                              block_table=table, return_lse=True, **f64(kw))
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5 and rel_err(out, flat) < 1e-6
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-5


def test_paged_decode_bf16(device):
    B, HQ, HKV, SQ, D, page, max_pages = 2, 8, 1, 1, 64, 16, 7
    kc, vc, table, k, v = paged_cache(B, HKV, max_pages, page, D, device, dtype=torch.bfloat16)
    lens = torch.tensor([100, 37], dtype=torch.int32, device=device)
    q = torch.randn(B, HQ, SQ, D, device=device, dtype=torch.bfloat16)
    out = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), cache_seqlens=lens, block_table=table)
    assert rel_err(out, ref) < 8e-3


@pytest.mark.parametrize("paged,page", [(False, 16), (True, 16), (True, 64)], ids=["contiguous", "paged16", "paged64"])
def test_append_writes_then_attends(paged, page, device):
    """k_new / v_new land at positions cache_seqlens - Sq + i (nothing else changes), then attention sees them."""
    B, HQ, HKV, SQ, D, max_pages = 3, 4, 2, 3, 32, 4
    SMAX = page * max_pages
    kc, vc, table, k, v = paged_cache(B, HKV, max_pages, page, D, device)
    if not paged:
        kc, vc, table = k.clone(), v.clone(), None
    lens = torch.tensor([SMAX, SQ, 29], dtype=torch.int32, device=device)
    q = torch.randn(B, HQ, SQ, D, device=device)
    k_new, v_new = torch.randn(B, HKV, SQ, D, device=device), torch.randn(B, HKV, SQ, D, device=device)
    ref_k, ref_v = kc.double(), vc.double()
    ref = reference.decode_attention(q.double(), ref_k, ref_v, cache_seqlens=lens, block_table=table,
                                     k_new=k_new.double(), v_new=v_new.double(), window=9)
    before_k = kc.clone()
    out = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new, v_new=v_new,
                                   window=9)
    assert rel_err(out, ref) < 1e-5
    # the caches now hold exactly what the reference wrote (NaN where nothing was ever written)
    assert torch.equal(kc.double().nan_to_num(7.0), ref_k.nan_to_num(7.0))
    assert torch.equal(vc.double().nan_to_num(7.0), ref_v.nan_to_num(7.0))
    logical = reference.logical_cache(kc, table)
    for b in range(B):
        L = int(lens[b])
        assert torch.equal(logical[b, :, L - SQ:L], k_new[b])
    changed = (kc != before_k) & ~(kc.isnan() & before_k.isnan())
    assert int(changed.any(-1).sum()) == B * SQ * HKV, "only the new rows were written"


def test_append_compiles_and_mutates_the_cache(device):
    """Under torch.compile (fullgraph) the append is the mutating operator drope::kv_append: same caches, same out."""
    B, HQ, HKV, SQ, D, page, max_pages = 2, 4, 2, 1, 16, 16, 3
    kc, vc, table, _, _ = paged_cache(B, HKV, max_pages, page, D, device)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=device)
    q = torch.randn(B, HQ, SQ, D, device=device)
    k_new, v_new = torch.randn(B, HKV, SQ, D, device=device), torch.randn(B, HKV, SQ, D, device=device)

    def step(q, kc, vc, k_new, v_new):
        return kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new, v_new=v_new,
                                        num_splits=2)

    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        want = step(q, kc, vc, k_new, v_new)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, k_new, v_new)
    assert torch.equal(got, want)
    assert torch.equal(kc2.nan_to_num(7.0), kc.nan_to_num(7.0)) and torch.equal(vc2.nan_to_num(7.0), vc.nan_to_num(7.0))


@pytest.mark.parametrize("page", [16, 64], ids=["rows", "tiles"])
def test_bad_page_on_the_device_gives_nan_rows(page, device):
    """An unchecked page index outside the cache is never dereferenced: the rows that read it are NaN, others exact."""
    B, HQ, HKV, D, max_pages = 2, 2, 1, 16, 3
    kc, vc, table, _, _ = paged_cache(B, HKV, max_pages, page, D, device)
    table = table.clone()
    table[0, 1] = 10_000
    lens = torch.tensor([page + 9, page + 9], dtype=torch.int32, device=device)
    q = torch.randn(B, HQ, 1, D, device=device)
    out = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, check_values=False)
    assert out[0].isnan().all()
    good = table.clone()
    good[0, 1] = 0
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), cache_seqlens=lens, block_table=good)
    assert rel_err(out[1], ref[1]) < 1e-5


def _bad(device):
    B, HKV, D, page, max_pages = 2, 1, 16, 16, 3
    kc, vc, table, _, _ = paged_cache(B, HKV, max_pages, page, D, device, spare=0)
    q = torch.randn(B, 2, 1, D, device=device)
    return q, kc, vc, table


@pytest.mark.parametrize("change,match", [
    (lambda q, kc, vc, t: dict(k_cache=kc[:, :8], v_cache=vc[:, :8]), "page size .* multiple of 16"),
    (lambda q, kc, vc, t: dict(block_table=t[:1]), r"block_table must be a \(2, max_pages\)"),
    (lambda q, kc, vc, t: dict(block_table=t.float()), "block_table must be int32"),
    (lambda q, kc, vc, t: dict(block_table=t + 6), "page index 11, outside"),
    (lambda q, kc, vc, t: dict(block_table=t - 10), "page index -"),
    (lambda q, kc, vc, t: dict(k_cache=kc[..., :8]), "k_cache and v_cache must have the same shape"),
    (lambda q, kc, vc, t: dict(k_new=torch.zeros(2, 1, 1, 16)), "k_new and v_new go together"),
    (lambda q, kc, vc, t: dict(k_new=torch.zeros(2, 1, 2, 16), v_new=torch.zeros(2, 1, 2, 16)),
     r"k_new must be \(B, Hkv, Sq, D\)"),
    (lambda q, kc, vc, t: dict(k_new=torch.zeros(2, 1, 1, 16, dtype=torch.float64),
                               v_new=torch.zeros(2, 1, 1, 16, dtype=torch.float64)), "k_new must have the cache's dtype"),
], ids=["page-size", "table-rows", "table-dtype", "index-high", "index-low", "cache-shapes", "k-without-v",
        "new-shape", "new-dtype"])
def test_bad_paged_input_is_refused(change, match, device):
    q, kc, vc, table = _bad(device)
    args = dict(k_cache=kc, v_cache=vc, block_table=table, cache_seqlens=torch.tensor([20, 30], dtype=torch.int32))
    args.update({n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in change(q, kc, vc, table).items()})
    args["cache_seqlens"] = args["cache_seqlens"].to(device)
    with pytest.raises(ValueError, match=match):
        kernels.decode_attention(q, **args)
    if device == "cpu":
        with pytest.raises(ValueError, match=match):
            reference.decode_attention(q, **args)


# ---- varlen attention over a paged cache: chunked prefill and decodes in one call --------------------------------

DOCS = [(3, 40), (0, 0), (1, 1), (1, 29), (21, 21), (17, 53), (0, 5), (9, 9)]  # (Lq, Lk) per document
# long documents: programs whose rows are all one document's, so key blocks every row sees (page-sized ones: one
# lookup and a TMA load) are taken
LONG_DOCS = [(70, 200), (3, 40), (0, 0), (33, 33), (9, 70)]
VARLEN = {
    "causal": {},
    "full": dict(causal=False),
    "window": dict(window=13),
    "chunk": dict(chunk=16),
    "sinks-softcap": dict(sinks=True, softcap=3.0),
    "rows-qnorm": dict(rows=True, qnorm=True),
}


def paged_documents(docs, page, HQ, HKV, D, device, seed=0):
    """Packed q and keys/values, the same keys in shuffled pages (NaN elsewhere) with a block table, boundaries."""
    g = torch.Generator().manual_seed(seed)
    cq, ck = cu_seqlens(docs)
    TQ, TK = int(cq[-1]), int(ck[-1])
    q = torch.randn(1, HQ, TQ, D, generator=g)
    k, v = torch.randn(1, HKV, TK, D, generator=g), torch.randn(1, HKV, TK, D, generator=g)
    max_pages = max(1, max(-(-b // page) for _, b in docs))
    num_pages = len(docs) * max_pages + 2
    perm = torch.randperm(num_pages, generator=g)[:len(docs) * max_pages].reshape(len(docs), max_pages)
    kc = torch.full((num_pages, page, HKV, D), float("nan"))
    vc = torch.full((num_pages, page, HKV, D), float("nan"))
    for d, (_, lk) in enumerate(docs):
        for p in range(0, lk, page):
            n = min(page, lk - p)
            a = int(ck[d]) + p
            kc[perm[d, p // page], :n] = k[0, :, a:a + n].transpose(0, 1)
            vc[perm[d, p // page], :n] = v[0, :, a:a + n].transpose(0, 1)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(kc), to(vc), to(perm.to(torch.int32)), to(cq), to(ck)


def varlen_options(feature, HQ, D, TQ, device):
    return {"causal": True, **feature_kwargs(VARLEN[feature], HQ, (1, TQ), D ** -0.5, device, D=D)}


@pytest.mark.parametrize("docs", ["mixed", "long"])
@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["default", "16x16"])
@pytest.mark.parametrize("page", [16, 64], ids=["page16", "page64"])
@pytest.mark.parametrize("feature", list(VARLEN), ids=list(VARLEN))
def test_paged_varlen_forward_matches_reference_and_packed(feature, page, blocks, docs, device):
    from drope.kernels.attention import Options, attention_forward
    from drope.validation import check_attention, split_scale

    HQ, HKV, D = 4, 2, 32
    q, k, v, kc, vc, table, cq, ck = paged_documents(DOCS if docs == "mixed" else LONG_DOCS, page, HQ, HKV, D, device)
    kw = varlen_options(feature, HQ, D, q.shape[2], device)
    ref, ref_lse = reference.attention(q.double(), kc.double(), vc.double(), cu_seqlens_q=cq, cu_seqlens_k=ck,
                                       block_table=table, return_lse=True, **f64(kw))
    packed = kernels.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **kw)
    with torch.no_grad(), poisoned_empty():
        if blocks is None:
            out, lse = kernels.attention(q, kc, vc, cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=table,
                                         return_lse=True, **kw)
        else:
            shape = check_attention(q, kc, vc, causal=kw["causal"], softmax_scale=kw.get("softmax_scale"), rope=None,
                                    q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, cu_seqlens=cq,
                                    cu_seqlens_k=ck, block_table=table, kernel=True)
            const, rows = split_scale(kw.get("softmax_scale"), shape, q.device)
            opt = Options(causal=kw["causal"], scale=const, rows=rows, rope=None, norm_eps=1e-6, cu_seqlens=cq,
                          cu_seqlens_k=ck, block_table=table, window=kw.get("window"), chunk=kw.get("chunk"),
                          softcap=kw.get("softcap"))
            out, lse = attention_forward(q, kc, vc, kw.get("q_norm_weight"), None, kw.get("sinks"), opt,
                                         block_sizes=blocks)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5 and rel_err(out, packed) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-4


def _rows_of_larger_pages(cache: torch.Tensor) -> torch.Tensor:
    """The same pages as a view into a pool of twice-as-long pages (NaN beyond): page stride != page x row stride."""
    big = torch.full((cache.shape[0], 2 * cache.shape[1], *cache.shape[2:]), float("nan"), dtype=cache.dtype,
                     device=cache.device)
    big[:, :cache.shape[1]] = cache
    return big[:, :cache.shape[1]]


@pytest.mark.parametrize("page", [64, 16], ids=["tiles", "rows"])
def test_pool_view_with_a_longer_page_stride(page, device):
    """A paged cache that is a view keeping the first rows of larger pages reads the right rows (the one-page-a-tile
    TMA path indexes the pool as pages x page rows, so it must not take such a view)."""
    B, HQ, HKV, D, max_pages = 2, 4, 2, 32, 3
    kc, vc, table, _, _ = paged_cache(B, HKV, max_pages, page, D, device)
    kv, vv = _rows_of_larger_pages(kc), _rows_of_larger_pages(vc)
    assert kv.stride(0) != kv.shape[1] * kv.stride(1)
    q = torch.randn(B, HQ, 1, D, device=device)
    lens = torch.tensor([2 * page + page // 2, page + 5], dtype=torch.int32, device=device)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), cache_seqlens=lens, block_table=table)
    out = kernels.decode_attention(q, kv, vv, cache_seqlens=lens, block_table=table)
    assert rel_err(out, ref) < 1e-5
    docs = [(min(70, 2 * page), 3 * page - 5), (9, 40)]
    q, k, v, kc, vc, table, cq, ck = paged_documents(docs, page, HQ, HKV, D, device)
    ref = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cq, cu_seqlens_k=ck)
    with torch.no_grad():
        out = kernels.attention(q, _rows_of_larger_pages(kc), _rows_of_larger_pages(vc), cu_seqlens_q=cq,
                                cu_seqlens_k=ck, block_table=table)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("page", [64, 16], ids=["tiles", "rows"])
def test_gpu_paged_varlen_bf16(page, device):
    """Compiled kernels, autotuned tiles, documents of thousands of keys in bf16 pages: the float64 reference with
    flash-attention's per-row rule, and the packed keys' output."""
    docs = [(512, 4096), (1, 3000), (0, 5), (100, 700), (1024, 1024)]
    HQ, HKV, D = 8, 2, 128
    q, k, v, kc, vc, table, cq, ck = paged_documents(docs, page, HQ, HKV, D, device)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, window=2000)
    ref = reference.attention(q.double(), k.double(), v.double(), **kw)
    qb, kb, vb, kcb, vcb = (t.bfloat16() for t in (q, k, v, kc, vc))
    out = kernels.attention(qb, kcb, vcb, block_table=table, **kw)
    low = lowp_attention(qb, kb, vb, cu_seqlens=cq, cu_seqlens_k=ck, window=2000)
    assert rel_err(out, ref) < 2e-2
    assert_rows_close(out, ref, low, floor=8e-3)
    assert rel_err(out, kernels.attention(qb, kb, vb, **kw)) < 1e-2


@pytest.mark.parametrize("page,docs", [(16, DOCS), (64, [(70, 200), (3, 40), (9, 9)])], ids=["rows", "tiles"])
def test_paged_varlen_bad_page_gives_nan_rows_of_its_document(page, docs, device):
    """rows: pages smaller than a key block (a lookup per key); tiles: page-sized blocks seen by every row of a
    program (one lookup, a TMA load)."""
    HQ, HKV, D = 2, 1, 16
    q, k, v, kc, vc, table, cq, ck = paged_documents(docs, page, HQ, HKV, D, device)
    table = table.clone()
    bad_doc = 5 if page == 16 else 0
    table[bad_doc, 1] = -3  # a document that reads its second page in every query row
    with torch.no_grad():
        out = kernels.attention(q, kc, vc, cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=table, check_values=False)
    good = kernels.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
    a, b = int(cq[bad_doc]), int(cq[bad_doc + 1])
    assert out[:, :, a:b].isnan().all()
    assert torch.allclose(out[:, :, :a], good[:, :, :a], atol=1e-5) and torch.allclose(out[:, :, b:], good[:, :, b:],
                                                                                        atol=1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(block_table="rows"), r"block_table must be a \(8, max_pages\)"),
    (dict(cu_seqlens_k=None), "block_table needs cu_seqlens"),
    (dict(key_mask=True), "key_mask is not supported with block_table"),
    (dict(k_norm_weight=True), "k_norm_weight is not supported with block_table"),
    (dict(grad=True), "inference-only"),
    (dict(capacity=True), "more than its block_table row holds"),
], ids=["table-rows", "no-cu_seqlens_k", "key-mask", "k-norm", "grad", "capacity"])
def test_paged_varlen_refusals(change, match, device):
    HQ, HKV, D, page = 2, 1, 16, 16
    q, k, v, kc, vc, table, cq, ck = paged_documents(DOCS, page, HQ, HKV, D, device)
    kw = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=table)
    if "block_table" in change:
        kw["block_table"] = table[:-1]
    if "cu_seqlens_k" in change:
        kw["cu_seqlens_k"] = None
    if "key_mask" in change:
        kw["key_mask"] = torch.ones(1, int(ck[-1]), dtype=torch.bool, device=device)
    if "k_norm_weight" in change:
        kw["k_norm_weight"] = torch.ones(D, device=device)
    if "grad" in change:
        q = q.clone().requires_grad_()
    if "capacity" in change:
        kw["block_table"] = table[:, :2]  # 2 pages of 16 rows: document 5 has 53 keys
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, kc, vc, **kw)


@pytest.mark.parametrize("page,docs", [(16, DOCS), (64, [(70, 200), (3, 40), (9, 9)])], ids=["rows", "tiles"])
def test_paged_varlen_keys_past_the_table_give_nan_rows(page, docs, device):
    """A document with more keys than its block_table row holds (unchecked on a GPU: check_values=False here): the
    rows that would read past the table are NaN, never keys read as zeros; the other documents are exact."""
    HQ, HKV, D = 2, 1, 16
    q, k, v, kc, vc, table, cq, ck = paged_documents(docs, page, HQ, HKV, D, device)
    longest = max(lk for _, lk in docs)
    cut = table[:, :-(-longest // page) - 1]  # one page short of the longest document
    d_long = max(range(len(docs)), key=lambda d: docs[d][1])
    with torch.no_grad():
        out = kernels.attention(q, kc, vc, cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=cut, check_values=False)
    good = kernels.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
    a, b = int(cq[d_long]), int(cq[d_long + 1])
    cap = cut.shape[1] * page
    lq, lk = docs[d_long]
    # query row i of the long document sees keys 0 .. lk - lq + i: those past the capacity are NaN rows
    reads_past = torch.arange(lq, device=device) + (lk - lq) >= cap
    assert out[:, :, a:b][:, :, reads_past].isnan().all()
    assert not out[:, :, a:b][:, :, ~reads_past].isnan().any()
    others = torch.ones(q.shape[2], dtype=torch.bool, device=device)
    others[a:b] = False
    others[a:b][~reads_past] = True
    assert torch.allclose(out[:, :, others], good[:, :, others], atol=1e-5)
