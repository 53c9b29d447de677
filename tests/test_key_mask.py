"""``key_mask`` (padding in any pattern, unwritten cache slots) in the forward, the backward and decode,
against drope.reference in float64, with flash-attention's per-row rule next to the global bound."""

import pytest
import torch

from drope import reference
from drope.kernels import attention, decode_attention
from drope.kernels.attention import Options, attention_forward
from drope.validation import AttentionShape, split_scale
from helpers import assert_rows_close, lowp_attention, poisoned_empty, rel_err

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_TOL = {torch.float32: 5e-3, torch.float16: 3e-2}


def key_mask(kind: str, B: int, SK: int, device, gen: torch.Generator) -> torch.Tensor:
    """left: row b has b*Sk/(B+1) leading padding slots; holes: ~25 % random slots off; right: trailing
    padding; mixed: left, holes and (from the third row on) a row with no attendable key at all."""
    m = torch.ones(B, SK, dtype=torch.bool)
    for b in range(B):
        if kind == "left" or (kind == "mixed" and b == 0):
            m[b, : (b + 1) * SK // (B + 2)] = False
        elif kind == "right":
            m[b, SK - (b + 1) * SK // (B + 2):] = False
        elif kind == "holes" or (kind == "mixed" and b == 1):
            m[b] = torch.rand(SK, generator=gen) > 0.25
        elif kind == "mixed":
            m[b] = False
    return m.to(device)


FWD = [
    # B, Hq, Hkv, Sq, Sk, D, kind, dtype, extra keyword arguments, forced blocks
    (2, 4, 2, 63, 63, 32, "left", torch.float32, {}, None),
    (2, 4, 2, 40, 100, 64, "right", torch.float32, {}, None),
    (2, 4, 2, 77, 100, 64, "holes", torch.float32, {}, (16, 16)),
    (3, 4, 1, 40, 40, 32, "mixed", torch.float32, {"window": 9, "sinks": True}, None),
    (2, 2, 2, 50, 60, 64, "holes", torch.float16, {"rope": True, "norm": True, "scale": "head_rows"}, (16, 32)),
    (2, 2, 1, 30, 30, 16, "left", torch.float32, {"chunk": 8, "softcap": 3.0}, None),
    (2, 4, 2, 45, 45, 40, "holes", torch.bfloat16, {"scale": "rows"}, None),
    (1, 2, 2, 70, 70, 32, "holes", torch.float32, {"causal": False}, (32, 16)),
]


def fwd_inputs(B, HQ, HKV, SQ, SK, D, kind, dtype, extra, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, SQ, D, generator=g).to(device, dtype)
    k = torch.randn(B, HKV, SK, D, generator=g).to(device, dtype)
    v = torch.randn(B, HKV, SK, D, generator=g).to(device, dtype)
    kw = {"causal": extra.get("causal", True), "key_mask": key_mask(kind, B, SK, device, g)}
    for name in ("window", "chunk", "softcap"):
        if name in extra:
            kw[name] = extra[name]
    if extra.get("sinks"):
        kw["sinks"] = (torch.randn(HQ, generator=g) * 2).to(device)
    if extra.get("rope"):
        kw["rope"] = reference.rope_tables(SK, D, device=device)
    if extra.get("norm"):
        kw["q_norm_weight"] = (0.5 + torch.rand(HQ, D, generator=g)).to(device)
        kw["k_norm_weight"] = (0.5 + torch.rand(D, generator=g)).to(device)
    if extra.get("scale") == "rows":
        kw["softmax_scale"] = ((0.5 + torch.rand(B, SQ, generator=g)) * D ** -0.5).to(device)
    elif extra.get("scale") == "head_rows":
        kw["softmax_scale"] = ((0.5 + torch.rand(B, HQ, SQ, generator=g)) * D ** -0.5).to(device)
    return q, k, v, kw


def as64(kw):
    return {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else
                tuple(t.double() for t in x) if isinstance(x, tuple) else x) for n, x in kw.items()}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", FWD, ids=[f"B{c[0]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-{c[6]}-{str(c[7])[6:]}-"
                                           f"{'-'.join(c[8]) or 'plain'}" for c in FWD])
def test_forward_matches_reference(case, device):
    B, HQ, HKV, SQ, SK, D, kind, dtype, extra, blocks = case
    q, k, v, kw = fwd_inputs(*case[:-1], device, seed=SQ + SK)
    with poisoned_empty():
        if blocks is None:
            out, lse = attention(q, k, v, return_lse=True, **kw)
        else:
            shape = AttentionShape(B, HQ, HKV, SQ, SK, D)
            const, rows = split_scale(kw.get("softmax_scale"), shape, q.device)
            opt = Options(causal=kw["causal"], scale=const, rows=rows, rope=kw.get("rope"), norm_eps=1e-6,
                          cu_seqlens=None, window=kw.get("window"), chunk=kw.get("chunk"), softcap=kw.get("softcap"),
                          key_mask=kw["key_mask"])
            out, lse = attention_forward(q, k, v, kw.get("q_norm_weight"), kw.get("k_norm_weight"), kw.get("sinks"),
                                         opt, block_sizes=blocks)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **as64(kw))
    assert torch.isfinite(out).all(), "unwritten (NaN) output elements"
    assert rel_err(out, ref) < TOL[dtype]
    cpu = {n: (x.cpu() if isinstance(x, torch.Tensor) else tuple(t.cpu() for t in x) if isinstance(x, tuple) else x)
           for n, x in kw.items()}
    assert_rows_close(out.cpu(), ref.cpu(), lowp_attention(q.cpu(), k.cpu(), v.cpu(), **cpu), FLOOR[dtype])
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and rel_err(lse[seen], ref_lse[seen]) < TOL[dtype]
    if kind == "mixed":
        assert torch.equal(out[2], torch.zeros_like(out[2])), "a row with no attendable key outputs zeros"


@pytest.mark.interpreter
def test_all_attendable_mask_equals_no_mask(device):
    """A mask of ones is the unmasked call (the dense fast path), bit for bit."""
    q, k, v, kw = fwd_inputs(2, 4, 2, 50, 64, 32, "left", torch.float32, {"window": 20}, device, seed=3)
    kw["key_mask"] = torch.ones(2, 64, dtype=torch.uint8, device=device)
    assert torch.equal(attention(q, k, v, **kw), attention(q, k, v, window=20))


@pytest.mark.interpreter
def test_packed_documents_with_a_key_mask(device):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 60, 32, generator=g).to(device)
    k = torch.randn(1, 2, 60, 32, generator=g).to(device)
    v = torch.randn(1, 2, 60, 32, generator=g).to(device)
    cu = torch.tensor([0, 10, 10, 35, 60], dtype=torch.int32, device=device)  # an empty document too
    km = key_mask("holes", 1, 60, device, g)
    out = attention(q, k, v, cu_seqlens=cu, key_mask=km)
    ref = reference.attention(q.double(), k.double(), v.double(), cu_seqlens=cu, key_mask=km)
    assert rel_err(out, ref) < TOL[torch.float32]


BWD = [
    (2, 4, 2, 40, 40, 32, "left", torch.float32, {"norm": True, "scale": "rows"}),
    (2, 2, 1, 33, 50, 64, "holes", torch.float32, {"window": 12, "sinks": True, "softcap": 4.0}),
    (3, 4, 2, 30, 30, 32, "mixed", torch.float16, {"rope": True}),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", BWD, ids=[f"{c[6]}-{str(c[7])[6:]}-{'-'.join(c[8])}" for c in BWD])
def test_gradients_match_reference(case, device):
    dtype = case[7]
    q, k, v, kw = fwd_inputs(*case, device, seed=case[3] * 7)
    names = [n for n in ("q_norm_weight", "k_norm_weight", "sinks") if n in kw]
    leaves = [q, k, v] + [kw[n] for n in names]
    for t in leaves:
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64).to(device)
    out = attention(q, k, v, **kw)
    got = torch.autograd.grad((out.double() * do).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    kw64 = as64(kw)
    kw64.update(zip(names, leaves64[3:]))
    ref = reference.attention(*leaves64[:3], **kw64)
    want = torch.autograd.grad((ref * do).sum(), leaves64)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all() and rel_err(a, b) < GRAD_TOL[dtype], i


DECODE = [
    # B, Hq, Hkv, Sq, Smax, lengths, kind, per query row?, splits, extra
    (2, 4, 2, 1, 90, [90, 61], "left", False, 3, {}),
    (2, 8, 2, 3, 100, [100, 40], "holes", False, 1, {"window": 30, "sinks": True}),
    (3, 4, 1, 2, 64, [64, 33, 10], "mixed", False, 4, {}),
    (2, 4, 2, 4, 80, [80, 57], "holes", True, 2, {"softcap": 5.0}),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", DECODE, ids=[f"{c[6]}-Sq{c[3]}-{'rows' if c[7] else 'keys'}-s{c[8]}" for c in DECODE])
def test_decode_matches_reference(case, device):
    B, HQ, HKV, SQ, SMAX, lengths, kind, per_row, splits, extra = case
    g = torch.Generator().manual_seed(SMAX)
    q = torch.randn(B, HQ, SQ, 64, generator=g).to(device)
    k = torch.randn(B, HKV, SMAX, 64, generator=g).to(device)
    v = torch.randn(B, HKV, SMAX, 64, generator=g).to(device)
    km = key_mask(kind, B, SMAX, device, g)
    if per_row:
        km = km[:, None, :] & (torch.rand(B, SQ, SMAX, generator=g) > 0.2).to(device)
    kw = dict(cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=device), key_mask=km,
              **{n: x for n, x in extra.items() if n != "sinks"})
    if extra.get("sinks"):
        kw["sinks"] = torch.randn(HQ, generator=g).to(device)
    with poisoned_empty():
        out, lse = decode_attention(q, k, v, num_splits=splits, return_lse=True, **kw)
    ref, ref_lse = reference.decode_attention(q.double(), k.double(), v.double(), return_lse=True, **as64(kw))
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and rel_err(lse[seen], ref_lse[seen]) < TOL[torch.float32]
