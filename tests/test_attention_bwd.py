"""Backward of the fused attention: every gradient against autograd through the float64 reference.

The launcher tests feed ``attention_backward`` the reference's own output and LSE, so they check the
backward alone; the end-to-end tests go through ``drope.kernels.attention`` and autograd.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drope import kernels, reference
from drope.kernels.attention import Options
from drope.kernels.attention_bwd import attention_backward
from drope.validation import AttentionShape, split_scale
from helpers import Case, noncontiguous, poisoned_empty, rel_err

TOL = {torch.float32: 5e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
NAMES = ("dq", "dk", "dv", "d_q_norm_weight", "d_k_norm_weight")


def make_inputs(c: Case, device):
    """Fresh float64 leaves (q, k, v, wq, wk) and the non-differentiable (scale, rope)."""
    f64 = dict(device=device, dtype=torch.float64)
    q = torch.randn(c.B, c.HQ, c.SQ, c.D, **f64)
    k = torch.randn(c.B, c.HKV, c.SK, c.D, **f64)
    v = torch.randn(c.B, c.HKV, c.SK, c.D, **f64)
    wq = wk = None
    if c.norm_shapes() is not None:
        wq_shape, wk_shape = c.norm_shapes()
        wq, wk = 1 + 0.3 * torch.randn(wq_shape, **f64), 1 + 0.3 * torch.randn(wk_shape, **f64)
    scale = None
    if c.scale == "float":
        scale = 0.3 * c.D ** -0.5
    elif c.scale != "none":
        scale = (0.5 + torch.rand(c.scale_shape(), **f64)) * c.D ** -0.5
    rope = reference.rope_tables(c.SK + 5, c.D, device=device, dtype=torch.float32) if c.rope else None
    return (q, k, v, wq, wk), scale, rope


def reference_grads(leaves, scale, rope, do, *, causal, cu_seqlens=None, needs=(True,) * 5):
    """(out, lse, grads) of the float64 reference; grads None where not needed or absent."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(n) for x, n in zip(leaves, needs)]
    q, k, v, wq, wk = leaves
    rope64 = None if rope is None else tuple(t.double() for t in rope)
    out, lse = reference.attention(q, k, v, causal=causal, softmax_scale=scale, rope=rope64, q_norm_weight=wq,
                                   k_norm_weight=wk, cu_seqlens=cu_seqlens, return_lse=True)
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, do.double()))
    grads = [next(got) if x is not None and x.requires_grad else None for x in leaves]
    return out.detach(), lse.detach(), grads


def check_grads(got, ref, tol, expect=None):
    for name, g, r in zip(NAMES, got, ref):
        if r is None:
            assert g is None, f"{name} should be None"
            continue
        assert g is not None, f"{name} missing"
        assert g.shape == r.shape, f"{name} shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name} has NaN/inf (an unwritten element?)"
        if expect is not None:
            assert g.dtype == expect[name], f"{name} dtype {g.dtype}"
        err = rel_err(g, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def launcher_options(c: Case, scale, rope, cu_seqlens=None, **features) -> Options:
    shape = AttentionShape(c.B, c.HQ, c.HKV, c.SQ, c.SK, c.D)
    const, rows = split_scale(scale, shape, "cpu" if rope is None else rope[0].device, torch.float32)
    return Options(causal=c.causal, scale=const, rows=rows, rope=rope, norm_eps=1e-6, cu_seqlens=cu_seqlens,
                   window=features.get("window"), chunk=features.get("chunk"), softcap=features.get("softcap"))


def run_launcher(c: Case, device, *, cu_seqlens=None, needs=(True,) * 5, strided=False, **blocks):
    dtype = c.dtype
    leaves, scale, rope = make_inputs(c, device)
    do = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device, dtype=torch.float64)
    _, _, ref = reference_grads(leaves, scale, rope, do, causal=c.causal, cu_seqlens=cu_seqlens, needs=needs)
    q, k, v, wq, wk = [None if x is None else x.to(dtype) for x in leaves]
    if strided:
        q, k, v = noncontiguous(q), noncontiguous(k), noncontiguous(v)
    if wq is not None:
        wq, wk = wq.float(), wk.float()
    # the forward's o and lse, as the kernel would save them: from the same rounded inputs, fp32 math
    out, lse = reference.attention(q, k, v, causal=c.causal, softmax_scale=scale, rope=rope, q_norm_weight=wq,
                                   k_norm_weight=wk, cu_seqlens=cu_seqlens, return_lse=True)
    opt = launcher_options(c, scale, rope, cu_seqlens)
    if opt.rows is not None:
        opt = Options(**{**opt.__dict__, "rows": opt.rows.to(device)})
    with poisoned_empty():
        got = attention_backward(do.to(dtype), q, k, v, out, lse, wq, wk, None, opt, needs_grad=needs, **blocks)
    assert got[5] is None
    got = got[:5]
    expect = dict(dq=dtype, dk=dtype, dv=dtype, d_q_norm_weight=torch.float32, d_k_norm_weight=torch.float32)
    check_grads(got, ref, TOL[dtype], expect)


LAUNCHER_CASES = [
    Case(1, 2, 2, 63, 63, 64),
    Case(2, 4, 2, 77, 100, 64, rope=True, norm="head", scale="batch_rows"),
    Case(1, 4, 1, 1, 63, 64, rope=True, norm="shared", scale="rows"),
    Case(1, 8, 1, 33, 77, 64, norm="shared", scale="float", dtype=torch.float16),
    Case(1, 8, 8, 17, 40, 32, causal=False, rope=True),
    Case(1, 2, 1, 100, 100, 128, rope=True, norm="head", dtype=torch.float16),
    Case(1, 2, 1, 63, 70, 128, scale="batch_rows"),
    Case(2, 4, 4, 20, 45, 64, causal=False, norm="head", scale="rows", dtype=torch.float16),
    Case(1, 8, 2, 64, 64, 16, rope=True, norm="shared", dtype=torch.float16),
    # bf16 on CPU: the interpreter multiplies bf16-rounded operands in fp32 (its bf16 tl.dot is wrong)
    Case(1, 4, 2, 50, 64, 64, rope=True, norm="head", scale="batch_rows", dtype=torch.bfloat16),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", LAUNCHER_CASES, ids=lambda c: c.id)
def test_launcher_matches_reference(case, device):
    run_launcher(case, device)


@pytest.mark.interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_launcher_small_blocks_strided(causal, device):
    """Forced 16/32 blocks: many loop iterations, blocks straddling the diagonal and the ragged edge."""
    run_launcher(Case(1, 4, 2, 45, 77, 32, causal=causal, rope=True, norm="head", scale="batch_rows"), device,
                 strided=True, block_m=16, block_n=32)


@pytest.mark.interpreter
@pytest.mark.parametrize("needs", [
    (True, False, False, False, False), (False, True, False, False, False), (False, False, True, False, False),
    (False, False, False, True, False), (False, False, False, False, True), (True, False, True, False, True),
], ids=["q", "k", "v", "wq", "wk", "q-v-wk"])
def test_launcher_partial_needs(needs, device):
    run_launcher(Case(1, 4, 2, 30, 41, 32, rope=True, norm="head", scale="rows"), device, needs=needs)


PACKS = [[0, 5, 30, 31, 77], [0, 77], [0, 1, 2, 40, 77]]


@pytest.mark.interpreter
@pytest.mark.parametrize("bounds", PACKS, ids=["-".join(map(str, b)) for b in PACKS])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_launcher_packed(bounds, causal, device):
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    run_launcher(Case(1, 2, 1, 77, 77, 32, causal=causal, rope=True, norm="head", scale="rows"), device,
                 cu_seqlens=cu, block_m=16, block_n=32)


@pytest.mark.interpreter
@settings(max_examples=6, deadline=None)
@given(G=st.sampled_from([1, 2, 4]), HKV=st.integers(1, 2), SQ=st.integers(1, 40), extra=st.integers(0, 30),
       D=st.sampled_from([16, 32]), causal=st.booleans(), rope=st.booleans(),
       norm=st.sampled_from(["none", "shared", "head"]), scale=st.sampled_from(["none", "float", "rows", "batch_rows"]),
       B=st.integers(1, 2), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_launcher_property(G, HKV, SQ, extra, D, causal, rope, norm, scale, B, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = Case(B, G * HKV, HKV, SQ, SQ + extra, D, causal=causal, rope=rope, norm=norm, scale=scale, dtype=dtype)
    run_launcher(c, device, block_m=16, block_n=16)


@pytest.mark.interpreter
def test_launcher_deterministic(device):
    c = Case(1, 4, 2, 50, 70, 32, rope=True, norm="shared", scale="batch_rows")
    leaves, scale, rope = make_inputs(c, device)
    q, k, v, wq, wk = [x.float() for x in leaves]
    sinks = torch.randn(c.HQ, device=device)
    out, lse = reference.attention(q, k, v, softmax_scale=scale, rope=rope, q_norm_weight=wq, k_norm_weight=wk,
                                   sinks=sinks, window=9, return_lse=True)
    do = torch.randn_like(out)
    opt = launcher_options(c, scale, rope, window=9)
    first = attention_backward(do, q, k, v, out, lse, wq, wk, sinks, opt, block_m=32, block_n=32)
    second = attention_backward(do, q, k, v, out, lse, wq, wk, sinks, opt, block_m=32, block_n=32)
    for name, a, b in zip(NAMES + ("d_sinks",), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


@pytest.mark.gpu
@pytest.mark.parametrize("case", [replace(c, dtype=dtype) for dtype in (torch.bfloat16, torch.float16) for c in (
    Case(1, 8, 2, 2048, 2048, 128, rope=True, norm="head", scale="batch_rows"),
    Case(1, 4, 1, 8192, 8192, 128, norm="shared", scale="rows"),
    Case(2, 8, 1, 1000, 3000, 64, rope=True),
    Case(1, 4, 4, 777, 777, 256, causal=False, norm="head"),
)], ids=lambda c: c.id)
def test_launcher_gpu(case):
    run_launcher(case, "cuda")


def kernel_grads(c: Case, leaves, scale, rope, do, *, cu_seqlens=None, needs=(True,) * 5, strided=False,
                 use_lse=False):
    """Gradients through ``drope.kernels.attention`` + autograd; leaves cast to ``c.dtype`` (weights fp32)."""
    q, k, v, wq, wk = [None if x is None else x.detach().to(c.dtype if i < 3 else torch.float32)
                       for i, x in enumerate(leaves)]
    if strided:
        q, k, v = noncontiguous(q), noncontiguous(k), noncontiguous(v)
    ins = [None if x is None else x.requires_grad_(n) for x, n in zip((q, k, v, wq, wk), needs)]
    out, lse = kernels.attention(*ins[:3], causal=c.causal, softmax_scale=scale, rope=rope, q_norm_weight=ins[3],
                                 k_norm_weight=ins[4], cu_seqlens=cu_seqlens, return_lse=True)
    loss = (out.double() * do).sum()
    if use_lse:
        loss = loss + (lse.double() * do[..., 0]).sum()
    loss.backward()
    return out, lse, [None if x is None else x.grad for x in ins]


E2E_CASES = [
    Case(2, 4, 2, 63, 77, 64, rope=True, norm="head", scale="batch_rows"),
    Case(1, 8, 1, 40, 40, 64, norm="shared", scale="rows", dtype=torch.float16),
    Case(1, 4, 4, 1, 50, 128, causal=False, rope=True, scale="float"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: c.id)
def test_autograd_matches_reference(case, device):
    leaves, scale, rope = make_inputs(case, device)
    do = torch.randn(case.B, case.HQ, case.SQ, case.D, device=device, dtype=torch.float64)
    ref_out, _, ref = reference_grads(leaves, scale, rope, do, causal=case.causal)
    out, _, got = kernel_grads(case, leaves, scale, rope, do, strided=True)
    assert out.dtype == case.dtype and rel_err(out, ref_out) < TOL[case.dtype]
    check_grads(got, ref, TOL[case.dtype])


@pytest.mark.interpreter
def test_autograd_through_lse(device):
    """A loss that uses the returned LSE too: its gradient flows back (d lse / d s = p)."""
    c = Case(1, 4, 2, 30, 45, 32, rope=True, norm="head", scale="rows")
    leaves, scale, rope = make_inputs(c, device)
    do = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device, dtype=torch.float64)
    q, k, v, wq, wk = [x.detach().clone().requires_grad_() for x in leaves]
    out, lse = reference.attention(q, k, v, softmax_scale=scale, rope=tuple(t.double() for t in rope),
                                   q_norm_weight=wq, k_norm_weight=wk, return_lse=True)
    ((out * do).sum() + (lse * do[..., 0]).sum()).backward()
    ref = [x.grad for x in (q, k, v, wq, wk)]
    _, _, got = kernel_grads(c, leaves, scale, rope, do, use_lse=True)
    check_grads(got, ref, TOL[torch.float32])


@pytest.mark.interpreter
@pytest.mark.parametrize("needs", [
    (False, False, True, False, False), (True, True, False, False, False), (False, False, False, True, True),
], ids=["v-only", "q-k", "weights-only"])
def test_autograd_partial_requires_grad(needs, device):
    """Inputs that do not require grad get None (and their gradient is not computed)."""
    c = Case(1, 4, 2, 25, 25, 32, rope=True, norm="head")
    leaves, scale, rope = make_inputs(c, device)
    do = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device, dtype=torch.float64)
    _, _, ref = reference_grads(leaves, scale, rope, do, causal=True, needs=needs)
    _, _, got = kernel_grads(c, leaves, scale, rope, do, needs=needs)
    check_grads(got, ref, TOL[torch.float32])


@pytest.mark.interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_autograd_packed_equals_documents_alone(causal, device):
    """Packed documents (cu_seqlens) give each document's own outputs and gradients."""
    bounds = [0, 9, 10, 47, 64]
    c = Case(1, 2, 1, 64, 64, 32, causal=causal, rope=True, norm="head", scale="rows")
    leaves, scale, rope = make_inputs(c, device)
    do = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device, dtype=torch.float64)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    out, _, got = kernel_grads(c, leaves, scale, rope, do, cu_seqlens=cu)
    q, k, v, wq, wk = leaves
    dwq, dwk = torch.zeros_like(wq), torch.zeros_like(wk)
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        doc = Case(1, 2, 1, n, n, 32, causal=causal)
        parts = (q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], wq, wk)
        o_doc, _, g_doc = kernel_grads(doc, parts, scale[a:b], rope, do[:, :, a:b])
        # absolute slack: a one-token document has dq = dk = 0 up to rounding
        assert torch.allclose(out[:, :, a:b], o_doc, rtol=1e-4, atol=1e-5), f"document {a}:{b} output"
        for name, g, gd in zip(NAMES[:3], got[:3], g_doc[:3]):
            assert torch.allclose(g[:, :, a:b], gd, rtol=1e-4, atol=1e-5), f"document {a}:{b} {name}"
        dwq, dwk = dwq + g_doc[3].double(), dwk + g_doc[4].double()
    assert rel_err(got[3], dwq) < 1e-5 and rel_err(got[4], dwk) < 1e-5
    _, _, ref = reference_grads(leaves, scale, rope, do, causal=causal, cu_seqlens=cu)
    check_grads(got, ref, TOL[torch.float32])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_op(dtype, device):
    """Under autocast q, k, v run in the autocast dtype; grads return in each leaf's dtype (fp32 here)."""
    c = Case(1, 4, 2, 33, 40, 64, rope=True, norm="head", scale="batch_rows")
    leaves, scale, rope = make_inputs(c, device)
    do = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device, dtype=torch.float64)
    _, _, ref = reference_grads(leaves, scale, rope, do, causal=True)
    q, k, v, wq, wk = [x.detach().float().requires_grad_() for x in leaves]
    with torch.autocast(device_type=device, dtype=dtype):
        out = kernels.attention(q, k, v, softmax_scale=scale, rope=rope, q_norm_weight=wq, k_norm_weight=wk)
    assert out.dtype == dtype
    (out.double() * do).sum().backward()
    got = [x.grad for x in (q, k, v, wq, wk)]
    check_grads(got, ref, TOL[dtype], {n: torch.float32 for n in NAMES})


@pytest.mark.interpreter
def test_grad_unsupported_dtype(device):
    """float64 is not a kernel dtype (float16/bfloat16/float32 are): a ValueError names it."""
    q = torch.randn(1, 2, 8, 32, device=device, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="q/k/v dtype"):
        kernels.attention(q, q.detach(), q.detach())


@pytest.mark.interpreter
def test_grad_bad_cu_seqlens(device):
    q = torch.randn(1, 2, 10, 32, device=device, requires_grad=True)
    for bounds, match in (([1, 10], "start at 0"), ([0, 6, 4, 10], "non-decreasing"), ([0, 5, 9], "end at")):
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=match):
            kernels.attention(q, q, q, cu_seqlens=cu)


FEATURES = [
    Case(1, 4, 2, 60, 60, 32, window=9, blocks=(16, 16)),
    Case(2, 4, 2, 45, 70, 32, rope=True, norm="head", scale="batch_rows", window=20, sinks=True),
    Case(1, 4, 1, 70, 70, 32, scale="heads", chunk=16, blocks=(16, 32)),
    Case(1, 2, 2, 50, 50, 32, scale="head_rows", softcap=3.0, blocks=(16, 16)),
    Case(1, 4, 2, 40, 40, 32, causal=False, norm="shared", softcap=4.0, sinks=True),
    Case(1, 4, 2, 77, 77, 40, rope=True, norm="head", scale="head_rows", window=25, chunk=32, softcap=5.0, sinks=True,
         blocks=(16, 16)),
    Case(1, 2, 1, 33, 50, 80, rope=True, norm="shared", sinks=True),
    Case(1, 2, 1, 20, 20, 24, norm="head", window=6, blocks=(16, 16)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", FEATURES, ids=lambda c: c.id)
def test_feature_gradients(case, device):
    """Windows, chunks, soft-caps, sinks, per-head scales, padded head dims: every gradient, sinks' included.

    End to end through autograd, and through the launcher with forced small blocks where given.
    """
    check_features(case, device)


FEATURES_GPU = [
    Case(1, 8, 2, 2048, 2048, 128, rope=True, norm="head", scale="head_rows", window=500, sinks=True),
    Case(1, 8, 2, 2048, 2048, 64, chunk=512),
    Case(2, 4, 4, 1000, 1000, 96, scale="batch_rows", softcap=30.0, sinks=True, blocks=(64, 64)),
    Case(1, 4, 1, 1500, 1500, 80, rope=True, norm="shared", window=128, chunk=256, sinks=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FEATURES_GPU, ids=lambda c: c.id)
def test_feature_gradients_gpu(case):
    check_features(case, "cuda")


def check_features(c: Case, device):
    """Every gradient of ``c``'s features (fp32) against the float64 reference; with ``c.blocks``, the launcher too."""
    feats = dict(window=c.window, chunk=c.chunk, softcap=c.softcap)
    blocks = c.blocks
    leaves, scale, rope = make_inputs(c, device)
    sinks64 = torch.randn(c.HQ, device=device, dtype=torch.float64) if c.sinks else None
    do = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device, dtype=torch.float64)
    ref_leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (*leaves, sinks64)]
    rope64 = None if rope is None else tuple(t.double() for t in rope)
    ref_out, ref_lse = reference.attention(*ref_leaves[:3], causal=c.causal, softmax_scale=scale, rope=rope64,
                                           q_norm_weight=ref_leaves[3], k_norm_weight=ref_leaves[4],
                                           sinks=ref_leaves[5], return_lse=True, **feats)
    (ref_out * do).sum().backward()
    ref = [None if x is None else x.grad for x in ref_leaves]

    ins = [None if x is None else x.detach().float().requires_grad_() for x in (*leaves, sinks64)]
    with poisoned_empty():
        out = kernels.attention(*ins[:3], causal=c.causal, softmax_scale=scale, rope=rope, q_norm_weight=ins[3],
                                k_norm_weight=ins[4], sinks=ins[5], **feats)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    (out.double() * do).sum().backward()
    names = NAMES + ("d_sinks",)
    check_grads([None if x is None else x.grad for x in ins], ref, TOL[torch.float32])
    if c.sinks:
        assert rel_err(ins[5].grad, ref[5]) < TOL[torch.float32], "d_sinks"
    if blocks is not None:
        q, k, v, wq, wk, sinks = [None if x is None else x.detach().float() for x in (*leaves, sinks64)]
        opt = launcher_options(c, scale, rope, **feats)
        with poisoned_empty():
            got = attention_backward(do.float(), q, k, v, ref_out.float(), ref_lse.float(), wq, wk, sinks, opt,
                                     block_m=blocks[0], block_n=blocks[1])
        for name, g, r in zip(names, got, ref):
            if r is not None:
                assert torch.isfinite(g).all() and rel_err(g, r) < TOL[torch.float32], f"{name} (forced blocks)"


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(1, 8, 2, 4096, 4096, 128, rope=True, norm="head", scale="batch_rows", dtype=torch.bfloat16),
    Case(1, 4, 1, 8192, 8192, 128, norm="shared", dtype=torch.bfloat16),
    Case(2, 8, 8, 1000, 1500, 64, causal=False, rope=True, dtype=torch.bfloat16),
], ids=lambda c: c.id)
def test_autograd_gpu_bf16(case):
    leaves, scale, rope = make_inputs(case, "cuda")
    do = torch.randn(case.B, case.HQ, case.SQ, case.D, device="cuda", dtype=torch.float64)
    ref_out, _, ref = reference_grads(leaves, scale, rope, do, causal=case.causal)
    out, _, got = kernel_grads(case, leaves, scale, rope, do, strided=True)
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]
    check_grads(got, ref, TOL[torch.bfloat16])
