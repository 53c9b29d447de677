"""Where the first (or last) attended key of a decode row falls at every offset within a key tile and a page.

Each batch row of one call starts its visible keys at a different offset modulo the key tile (a window, a chunk or
a key mask: left padding, trailing unwritten slots), so one call covers every alignment. Compared with the float64
reference (flash-attention's per-row rule in fp16) and with the same keys in a contiguous cache. Pages of 64 rows
and more take the one-page-a-tile TMA path (one page lookup per key tile), which reads the wrong page if a tile
does not start at a multiple of the tile size.
"""

from __future__ import annotations

import pytest
import torch

from drope import kernels, reference
from drope.kernels.decode import decode_block_n
from helpers import assert_rows_close, lowp_attention, rel_err
from test_paged import paged_cache

pytestmark = pytest.mark.interpreter

HQ, HKV, SQ = 2, 1, 2


def lowp_decode(q, k, v, lens, **kw):
    """``lowp_attention`` per batch row over its live keys: the fp16 baseline of the per-row rule."""
    key_mask = kw.pop("key_mask", None)
    outs = []
    for b, L in enumerate(lens.tolist()):
        km = None if key_mask is None else key_mask[b:b + 1, :L]
        outs.append(lowp_attention(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], key_mask=km, **kw))
    return torch.cat(outs, 0)


def offsets_case(feature: str, BN: int, device):
    """(lens, kwargs): batch row o's first visible key at o * (BN + 1) + c, so at offset o + c within a tile and at
    offsets spread over a page; each row also has at least one key tile that every query row sees whole (the
    unmasked path, where a tile must not straddle two pages)."""
    o = torch.arange(BN)
    if feature == "window":
        W = 3 * BN - 3
        lens = o * (BN + 1) + 2 + W + SQ - 1  # the window of query row 0 starts at o * (BN + 1) + 2
        return lens, dict(window=W)
    if feature == "chunk":
        # chunks of BN + 1 keys; the new rows end chunk o, which starts at o * (BN + 1)
        C = BN + 1
        return (o + 1) * C, dict(chunk=C)
    # key mask: attendable slots [a, e) (left padding before, unwritten or masked slots after on odd rows)
    a = o * (BN + 1) + 1
    lens = a + 2 * BN + 7
    e = torch.where(o % 2 == 0, lens, lens - 5)
    slots = torch.arange(int(lens.max()))
    mask = (slots[None, :] >= a[:, None]) & (slots[None, :] < e[:, None])
    return lens, dict(key_mask=mask.to(device))


# Pages of 16 rows are smaller than a tile (a lookup per key); 64 and more hold whole tiles (the TMA path). Tiles are
# 64 keys at D <= 128, 32 at D = 256. Every page size and head dim appears; one or two splits (split starts); the
# contiguous twin where marked (an interpreter program costs ~70 ms: 64 batch rows, ~5 s a call).
CASES = [("window", 16, 128, 1, False), ("window", 64, 64, 2, True), ("window", 128, 256, 1, True),
         ("window", 256, 128, 1, False), ("window", 64, 256, 2, False),
         ("chunk", 64, 64, 2, False), ("chunk", 256, 256, 1, True),
         ("key-mask", 64, 128, 2, False), ("key-mask", 128, 256, 1, True), ("key-mask", 16, 64, 1, False)]


@pytest.mark.parametrize("feature,page,D,splits,twin", CASES,
                         ids=[f"{f}-page{p}-D{d}-{s}split" + ("-twin" if t else "") for f, p, d, s, t in CASES])
def test_decode_every_tile_offset(feature, page, D, splits, twin, device):
    BN = decode_block_n(D)
    lens, kw = offsets_case(feature, BN, device)
    B = lens.numel()
    max_pages = -(-int(lens.max()) // page)
    kc, vc, table, k, v = paged_cache(B, HKV, max_pages, page, D, device, dtype=torch.float16, seed=D + page)
    lens = lens.to(torch.int32).to(device)
    smax = max_pages * page
    if "key_mask" in kw:
        kw["key_mask"] = torch.nn.functional.pad(kw["key_mask"], (0, smax - kw["key_mask"].shape[1]))
    dead = (torch.arange(smax, device=device)[None, :] >= lens[:, None])[:, None, :, None]
    k, v = k.masked_fill(dead, float("nan")), v.masked_fill(dead, float("nan"))
    q = torch.randn(B, HQ, SQ, D, device=device).half()
    out = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, num_splits=splits, **kw)
    ref = reference.decode_attention(q.double(), k.double().nan_to_num(), v.double().nan_to_num(),
                                     cache_seqlens=lens, **kw)
    low = lowp_decode(q, k.nan_to_num(), v.nan_to_num(), lens, **kw)
    assert not out.isnan().any()
    assert_rows_close(out, ref, low, floor=1e-3, what=f"paged {feature}")
    if twin:
        flat = kernels.decode_attention(q, k, v, cache_seqlens=lens, num_splits=splits, **kw)
        assert not flat.isnan().any()
        assert_rows_close(flat, ref, low, floor=1e-3, what=f"contiguous {feature}")
        assert rel_err(out, flat) < 1e-3


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_length_past_capacity_gives_nan_rows(paged, device):
    """A device-side length outside [0, Smax] (unchecked: reading it would sync) gives NaN rows for that batch row,
    never a clamped, plausible answer; the other rows are exact."""
    B, D, page, max_pages = 3, 32, 64, 2
    kc, vc, table, k, v = paged_cache(B, HKV, max_pages, page, D, device)
    lens = torch.tensor([200, 70, -1], dtype=torch.int32, device=device)
    q = torch.randn(B, HQ, SQ, D, device=device)
    for splits in (1, 2):
        if paged:
            out = kernels.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, num_splits=splits,
                                           check_values=False)
        else:
            out = kernels.decode_attention(q, k, v, cache_seqlens=lens, num_splits=splits, check_values=False)
        assert out[0].isnan().all() and out[2].isnan().all()
        ref = reference.decode_attention(q[1:2].double(), k[1:2].double(), v[1:2].double(), cache_seqlens=lens[1:2])
        assert rel_err(out[1:2], ref) < 1e-5


@pytest.mark.parametrize("page", [64, 128], ids=["page64", "page128"])
@pytest.mark.parametrize("feature", ["window", "chunk"])
def test_paged_varlen_forward_window_offsets(page, feature, device):
    """The paged varlen forward (the audit of its tile path): key blocks are aligned to each document's first key,
    so a window or chunk starting at any offset leaves the page-sized blocks every row sees (one lookup, a TMA load)
    inside one page. Documents of 64 query rows (one 64-row program each) whose windows start at offsets spread
    over a tile."""
    from test_paged import paged_documents

    docs = [(64, 64 + 200 + 37 * i) for i in range(8)]  # first visible key 200 + 37 i - W + 1 into each document
    HQ_, HKV_, D = 2, 1, 32
    q, k, v, kc, vc, table, cq, ck = paged_documents(docs, page, HQ_, HKV_, D, device, seed=page)
    kw = dict(window=131) if feature == "window" else dict(chunk=157)
    ref = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cq, cu_seqlens_k=ck, **kw)
    with torch.no_grad():
        out = kernels.attention(q, kc, vc, cu_seqlens_q=cq, cu_seqlens_k=ck, block_table=table, **kw)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5
