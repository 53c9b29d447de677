"""The oracle itself, checked against an independent row-by-row float64 implementation and SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from drope import reference
from helpers import rel_err


def naive_attention(q, k, v, causal, scale_rows, cos, sin, wq, wk, eps):
    """Row by row, head by head, exactly docs/design.md's five steps in float64."""
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    G = HQ // HKV
    out = torch.zeros(B, HQ, SQ, D, dtype=torch.float64)

    def norm(x, w):
        return x / torch.sqrt((x * x).mean() + eps) * w

    def rot(x, p):
        h = D // 2
        c, s = cos[p], sin[p]
        return torch.cat([x[:h] * c - x[h:] * s, x[h:] * c + x[:h] * s])

    for b in range(B):
        for h in range(HQ):
            kh = h // G
            for i in range(SQ):
                qi = q[b, h, i]
                if wq is not None:
                    qi = norm(qi, wq if wq.dim() == 1 else wq[h])
                if cos is not None:
                    qi = rot(qi, SK - SQ + i)
                logits, vals = [], []
                for j in range(SK):
                    if causal and j > SK - SQ + i:
                        continue
                    kj = k[b, kh, j]
                    if wk is not None:
                        kj = norm(kj, wk if wk.dim() == 1 else wk[kh])
                    if cos is not None:
                        kj = rot(kj, j)
                    logits.append((qi @ kj) * scale_rows[b, i])
                    vals.append(v[b, kh, j])
                if logits:
                    p = torch.softmax(torch.stack(logits), 0)
                    out[b, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


CASES = [
    # B, HQ, HKV, SQ, SK, D, causal, rope, norm, scale
    (1, 2, 2, 5, 5, 8, True, False, None, None),
    (2, 4, 2, 3, 7, 8, True, True, "shared", "rows"),
    (1, 4, 1, 6, 6, 16, False, True, "per_head", "float"),
    (2, 2, 1, 1, 9, 8, True, False, "per_head", "batch_rows"),
]


@pytest.mark.parametrize("B,HQ,HKV,SQ,SK,D,causal,rope,norm,scale", CASES,
                         ids=lambda c: str(c))
def test_reference_matches_naive(B, HQ, HKV, SQ, SK, D, causal, rope, norm, scale):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(B, HQ, SQ, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, HKV, SK, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, HKV, SK, D, dtype=torch.float64, generator=g)
    cos = sin = None
    if rope:
        cos, sin = reference.rope_tables(SK + 3, D, dtype=torch.float64)
    wq = wk = None
    if norm == "shared":
        wq, wk = torch.rand(D, dtype=torch.float64) + 0.5, torch.rand(D, dtype=torch.float64) + 0.5
    elif norm == "per_head":
        wq, wk = torch.rand(HQ, D, dtype=torch.float64) + 0.5, torch.rand(HKV, D, dtype=torch.float64) + 0.5
    softmax_scale, rows = None, torch.full((B, SQ), D ** -0.5, dtype=torch.float64)
    if scale == "float":
        softmax_scale = 0.3
        rows = torch.full((B, SQ), 0.3, dtype=torch.float64)
    elif scale == "rows":
        softmax_scale = torch.rand(SQ, dtype=torch.float64) + 0.1
        rows = softmax_scale[None].expand(B, SQ)
    elif scale == "batch_rows":
        softmax_scale = torch.rand(B, SQ, dtype=torch.float64) + 0.1
        rows = softmax_scale
    out = reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                              rope=None if cos is None else (cos, sin), q_norm_weight=wq, k_norm_weight=wk,
                              norm_eps=1e-6)
    ref = naive_attention(q, k, v, causal, rows, cos, sin, wq, wk, 1e-6)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


def test_reference_matches_sdpa_with_gqa():
    q = torch.randn(2, 8, 33, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 33, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 33, 16, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert rel_err(reference.attention(q, k, v), ref) < 1e-12


def test_lse_and_empty_rows():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    _, lse = reference.attention(q, k, v, return_lse=True)
    logits = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    mask = torch.arange(6)[None, :] <= (2 + torch.arange(4))[:, None]
    want = torch.logsumexp(logits.masked_fill(~mask, -math.inf), -1)
    assert torch.allclose(lse, want)
    # no keys at all: zeros (never NaN) and lse -inf, gradients finite
    q.requires_grad_()
    out, lse = reference.attention(q, k[:, :, :0], v[:, :, :0], causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_packed_equals_separate_documents():
    bounds = [0, 5, 6, 13]
    q = torch.randn(1, 4, 13, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 13, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 13, 8, dtype=torch.float64)
    cos, sin = reference.rope_tables(13, 8, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64)
    out = reference.attention(q, k, v, rope=(cos, sin), q_norm_weight=w, k_norm_weight=w,
                              cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    for a, b in zip(bounds[:-1], bounds[1:]):
        alone = reference.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], rope=(cos, sin),
                                    q_norm_weight=w, k_norm_weight=w)
        assert rel_err(out[:, :, a:b], alone) < 1e-12


def test_decode_reference_matches_prefill_rows():
    B, HQ, HKV, S, D = 3, 4, 2, 11, 8
    q = torch.randn(B, HQ, S, D, dtype=torch.float64)
    k = torch.randn(B, HKV, S, D, dtype=torch.float64)
    v = torch.randn(B, HKV, S, D, dtype=torch.float64)
    lens = torch.tensor([11, 4, 7], dtype=torch.int32)
    for b in range(B):
        n = int(lens[b])
        full = reference.attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        dec = reference.decode_attention(q[:, :, n - 2:n], k, v, cache_seqlens=torch.full((B,), n, dtype=torch.int32))
        assert rel_err(dec[b:b + 1], full[:, :, n - 2:n]) < 1e-12
    out = reference.decode_attention(q[:, :, :1], k, v, cache_seqlens=lens)
    assert out.shape == (B, HQ, 1, D)


BAD = [
    (dict(q=torch.randn(2, 4, 8)), "q must be 4-D"),
    (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of"),
    (dict(k=torch.randn(1, 2, 8, 8), v=torch.randn(1, 2, 8, 8)), "head dim"),
    (dict(q=torch.randn(1, 4, 9, 16)), "causal"),
    (dict(rope=(torch.randn(7, 8), torch.randn(7, 8))), "shorter than Sk"),
    (dict(rope=(torch.randn(8, 16), torch.randn(8, 16))), "rope cos"),
    (dict(q_norm_weight=torch.randn(3, 16)), "q_norm_weight"),
    (dict(k_norm_weight=torch.randn(4, 16)), "k_norm_weight"),
    (dict(softmax_scale=torch.randn(7)), "softmax_scale"),
    (dict(softmax_scale="x"), "softmax_scale"),
    (dict(v=torch.randn(1, 2, 8, 16, dtype=torch.float64)), "dtype"),
    (dict(cu_seqlens=torch.tensor([1, 8], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 8], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 7], dtype=torch.int32)), "end at"),
]


@pytest.mark.parametrize("override,match", BAD, ids=[m for _, m in BAD])
def test_reference_rejects_bad_input(override, match):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update(override)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        reference.attention(q, k, v, **args)


def naive_features(q, k, v, scale, window, chunk, sinks, softcap):
    """Row by row in float64: causal bottom-right, window, chunk, soft-cap, sink in the denominator.

    ``scale`` (B, Hq, Sq) per head and row.
    """
    B, HQ, SQ, D = q.shape
    SK = k.shape[2]
    G = HQ // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((B, HQ, SQ), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            for i in range(SQ):
                p = SK - SQ + i
                js = [j for j in range(SK) if j <= p and (window is None or j > p - window)
                      and (chunk is None or j // chunk == p // chunk)]
                s = torch.stack([(q[b, h, i] @ k[b, h // G, j]) * scale[b, h, i] for j in js]) if js else \
                    torch.zeros(0, dtype=torch.float64)
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                denom_terms = torch.cat([s, sinks[h:h + 1]]) if sinks is not None else s
                if denom_terms.numel() == 0:
                    continue
                lse[b, h, i] = torch.logsumexp(denom_terms, 0)
                if js:
                    w = torch.exp(s - lse[b, h, i])
                    out[b, h, i] = (w[:, None] * v[b, h // G, js]).sum(0)
    return out, lse


@pytest.mark.parametrize("window,chunk,sinks,softcap,scale", [
    (3, None, False, None, "heads"), (None, 4, False, None, "head_rows"), (None, None, True, None, None),
    (None, None, False, 2.0, "rows"), (5, 4, True, 3.0, "head_rows"), (1, None, True, None, "heads"),
], ids=["window", "chunk", "sinks", "softcap", "all", "window1-sinks"])
def test_reference_features_match_naive(window, chunk, sinks, softcap, scale):
    B, HQ, HKV, SQ, SK, D = 2, 4, 2, 7, 11, 8
    q = torch.randn(B, HQ, SQ, D, dtype=torch.float64)
    k = torch.randn(B, HKV, SK, D, dtype=torch.float64)
    v = torch.randn(B, HKV, SK, D, dtype=torch.float64)
    s = {None: None, "heads": torch.rand(HQ, dtype=torch.float64) + 0.1,
         "rows": torch.rand(SQ, dtype=torch.float64) + 0.1,
         "head_rows": torch.rand(B, HQ, SQ, dtype=torch.float64) + 0.1}[scale]
    full = {None: torch.full((B, HQ, SQ), D ** -0.5, dtype=torch.float64), "heads": None, "rows": None,
            "head_rows": s}[scale]
    if scale == "heads":
        full = s[None, :, None].expand(B, HQ, SQ)
    elif scale == "rows":
        full = s[None, None, :].expand(B, HQ, SQ)
    sink = torch.randn(HQ, dtype=torch.float64) if sinks else None
    out, lse = reference.attention(q, k, v, softmax_scale=s, window=window, chunk=chunk, sinks=sink, softcap=softcap,
                                   return_lse=True)
    ref, ref_lse = naive_features(q, k, v, full, window, chunk, sink, softcap)
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    # decode mirrors it: the last 3 rows against the cache
    dec, dec_lse = reference.decode_attention(q[:, :, -3:], k, v, softmax_scale=None if s is None else
                                              (s[:, :, -3:] if scale == "head_rows" else s[-3:] if scale == "rows"
                                               else s), window=window, chunk=chunk, sinks=sink, softcap=softcap,
                                              return_lse=True)
    assert rel_err(dec, ref[:, :, -3:]) < 1e-12 and rel_err(dec_lse, ref_lse[:, :, -3:]) < 1e-12


def test_reference_sink_gradient_matches_finite_differences():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: reference.attention(q, k, v, sinks=s, softcap=4.0, window=3), (sinks,))


def test_per_head_scale_equals_scaling_each_head():
    q = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    k = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    v = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    out = reference.attention(q, k, v, softmax_scale=s)
    for h in range(3):
        alone = reference.attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], softmax_scale=float(s[h]))
        assert rel_err(out[:, h:h + 1], alone) < 1e-12
    # a 1-D tensor as long as both Sq and Hq is read as per-row (documented precedence)
    q6 = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    rows = torch.rand(6, dtype=torch.float64) + 0.1
    assert rel_err(reference.attention(q6, k[:, :1].expand(1, 6, 6, 8), v[:, :1].expand(1, 6, 6, 8),
                                       softmax_scale=rows),
                   reference.attention(q6, k[:, :1].expand(1, 6, 6, 8), v[:, :1].expand(1, 6, 6, 8),
                                       softmax_scale=rows[None, None, :])) < 1e-12
