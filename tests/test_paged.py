"""Paged KV caches (``block_table``) and the append of new tokens (``k_new`` / ``v_new``) in decode_attention,
against the float64 reference and against the same cache laid out contiguously."""

from __future__ import annotations

import pytest
import torch

from drope import kernels, reference
from helpers import poisoned_empty, rel_err

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


def options(feature, B, HQ, SQ, SMAX, device):
    f, kw = FEATURES[feature], {}
    for name in ("window", "chunk", "softcap"):
        if name in f:
            kw[name] = f[name]
    if f.get("sinks"):
        kw["sinks"] = torch.randn(HQ, device=device)
    if f.get("rows"):
        kw["softmax_scale"] = (0.5 + torch.rand(B, SQ, device=device)) * 0.2
    if f.get("key_mask"):
        kw["key_mask"] = torch.rand(B, SQ, SMAX, device=device) > 0.2
    return kw


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
