"""Varlen attention with queries and keys packed apart (``cu_seqlens`` + ``cu_seqlens_k``), forward and backward,
against the float64 reference: each document's queries are the last positions of its keys (chunked prefill, a
prefill and decodes in one batch)."""

from __future__ import annotations

import pytest
import torch

from drope import kernels, reference
from drope.kernels.attention import Options, attention_forward
from drope.kernels.attention_bwd import attention_backward
from drope.validation import check_attention, split_scale
from helpers import assert_rows_close, cu_seqlens, lowp_attention, poisoned_empty, rel_err

pytestmark = pytest.mark.interpreter

# (Lq, Lk) per document: empty documents, no queries, one decode row, a whole prefill, chunks of a prefill
DOCS = [(3, 40), (0, 0), (1, 1), (0, 7), (1, 29), (21, 21), (17, 53), (0, 0), (9, 9)]
FEATURES = {
    "causal": {},
    "full": dict(causal=False),
    "window": dict(window=13),
    "chunk": dict(chunk=16),
    "sinks-softcap": dict(sinks=True, softcap=3.0),
    "rows-norm": dict(rows=True, norm=True),
    "key-mask": dict(key_mask=True),
}


def make(docs, feature: dict, device, *, HQ=4, HKV=2, D=32, dtype=torch.float64):
    """Random packed q (1, Hq, total_q, D), k/v (1, Hkv, total_k, D) and the keyword arguments (float64)."""
    cq, ck = cu_seqlens(docs, device)
    TQ, TK = int(cq[-1]), int(ck[-1])
    f64 = dict(device=device, dtype=torch.float64)
    q, k, v = torch.randn(1, HQ, TQ, D, **f64), torch.randn(1, HKV, TK, D, **f64), torch.randn(1, HKV, TK, D, **f64)
    kw = dict(cu_seqlens=cq, cu_seqlens_k=ck, causal=feature.get("causal", True))
    for name in ("window", "chunk", "softcap"):
        if name in feature:
            kw[name] = feature[name]
    if feature.get("sinks"):
        kw["sinks"] = torch.randn(HQ, **f64)
    if feature.get("rows"):
        kw["softmax_scale"] = (0.5 + torch.rand(1, TQ, **f64)) * D ** -0.5
    if feature.get("norm"):
        kw["q_norm_weight"] = 1 + 0.3 * torch.randn(HQ, D, **f64)
        kw["k_norm_weight"] = 1 + 0.3 * torch.randn(HKV, D, **f64)
    if feature.get("key_mask"):
        kw["key_mask"] = torch.rand(1, TK, device=device) > 0.25
    return q, k, v, kw


def cast(kw, dtype):
    """Float tensors of ``kw`` in ``dtype`` for the kernel (norm weights, sinks and scales in fp32)."""
    out = {}
    for name, val in kw.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            val = val.float()
        out[name] = val
    return out


def launcher_options(q, k, v, kw) -> Options:
    shape = check_attention(q, k, v, causal=kw["causal"], softmax_scale=kw.get("softmax_scale"), rope=None,
                            q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, cu_seqlens=kw["cu_seqlens"],
                            cu_seqlens_k=kw["cu_seqlens_k"], kernel=True)
    const, rows = split_scale(kw.get("softmax_scale"), shape, q.device)
    return Options(causal=kw["causal"], scale=const, rows=rows, rope=None, norm_eps=1e-6, cu_seqlens=kw["cu_seqlens"],
                   cu_seqlens_k=kw["cu_seqlens_k"], window=kw.get("window"), chunk=kw.get("chunk"),
                   softcap=kw.get("softcap"), key_mask=kw.get("key_mask"))


@pytest.mark.parametrize("blocks", [None, (16, 16), (32, 16)], ids=["default", "16x16", "32x16"])
@pytest.mark.parametrize("feature", list(FEATURES), ids=list(FEATURES))
def test_forward_matches_reference(feature, blocks, device):
    q, k, v, kw = make(DOCS, FEATURES[feature], device)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    q32, k32, v32, kw32 = q.float(), k.float(), v.float(), cast(kw, torch.float32)
    with poisoned_empty():
        if blocks is None:
            out, lse = kernels.attention(q32, k32, v32, return_lse=True, **kw32)
        else:
            opt = launcher_options(q32, k32, v32, kw32)
            out, lse = attention_forward(q32, k32, v32, kw32.get("q_norm_weight"), kw32.get("k_norm_weight"),
                                         kw32.get("sinks"), opt, block_sizes=blocks)
    assert rel_err(out, ref) < 1e-4
    assert (out.double() - ref).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 1e-4


def test_documents_equal_their_contiguous_attention(device):
    """Each document equals a plain bottom-right causal call on its own queries and keys (Sq < Sk)."""
    q, k, v, kw = make(DOCS, {"window": 11}, device)
    q, k, v = q.float(), k.float(), v.float()
    out = kernels.attention(q, k, v, **cast(kw, torch.float32))
    cq, ck = (t.tolist() for t in cu_seqlens(DOCS, device))
    for d, (a, b, ka, kb) in enumerate(zip(cq[:-1], cq[1:], ck[:-1], ck[1:])):
        if b == a:
            continue
        alone = kernels.attention(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], window=11)
        assert torch.allclose(out[:, :, a:b], alone, rtol=1e-5, atol=1e-6), f"document {d}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_low_precision_rows(dtype, device):
    """flash-attention's rule per row at 16 bits, next to a global bound."""
    q, k, v, kw = make(DOCS, {"window": 21, "sinks": True}, device)
    ref = reference.attention(q, k, v, **kw)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    kwd = cast(kw, dtype)
    out = kernels.attention(qd, kd, vd, **kwd)
    low = lowp_attention(qd, kd, vd, **kwd)
    assert rel_err(out, ref) < 2e-2
    assert_rows_close(out, ref, low, floor=8e-3)


BWD_FEATURES = ["causal", "full", "window", "chunk", "sinks-softcap", "rows-norm", "key-mask"]


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["default", "16x16"])
@pytest.mark.parametrize("feature", BWD_FEATURES, ids=BWD_FEATURES)
def test_backward_matches_reference(feature, blocks, device):
    """Every gradient (q, k, v, the norm weights, the sinks) against autograd through the float64 reference."""
    q, k, v, kw = make(DOCS, FEATURES[feature], device)
    leaves = {"q": q, "k": k, "v": v}
    for name in ("q_norm_weight", "k_norm_weight", "sinks"):
        if name in kw:
            leaves[name] = kw[name]
    do = torch.randn_like(q)

    def grads(fn, dtype):
        ins = {n: t.detach().to(dtype).requires_grad_() for n, t in leaves.items()}
        other = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                 for n, t in kw.items() if n not in ins}
        out = fn(ins["q"], ins["k"], ins["v"], **other, **{n: t for n, t in ins.items() if n not in "qkv"})
        return out, dict(zip(ins, torch.autograd.grad((out.double() * do).sum(), list(ins.values()))))

    ref_out, ref = grads(reference.attention, torch.float64)
    if blocks is None:
        out, got = grads(kernels.attention, torch.float32)
    else:
        q32, k32, v32, kw32 = q.float(), k.float(), v.float(), cast(kw, torch.float32)
        opt = launcher_options(q32, k32, v32, kw32)
        o, lse = reference.attention(q32, k32, v32, return_lse=True, **kw32)
        with poisoned_empty():
            g = attention_backward(do.float(), q32, k32, v32, o, lse, kw32.get("q_norm_weight"),
                                   kw32.get("k_norm_weight"), kw32.get("sinks"), opt, block_m=blocks[0],
                                   block_n=blocks[1])
        out = o
        got = {n: t for n, t in zip(("q", "k", "v", "q_norm_weight", "k_norm_weight", "sinks"), g) if n in leaves}
    assert rel_err(out, ref_out) < 1e-4
    for name, r in ref.items():
        assert torch.isfinite(got[name]).all(), f"{name}: NaN/inf (an unwritten element?)"
        assert rel_err(got[name], r) < 5e-4, f"{name}: {rel_err(got[name], r):.2e}"


def test_cu_seqlens_k_alone_equals_cu_seqlens(device):
    """Queries and keys packed alike through cu_seqlens_k give the packed (cu_seqlens only) results."""
    docs = [(n, n) for n in (5, 0, 17, 30)]
    q, k, v, kw = make(docs, {"chunk": 8}, device, HQ=2, HKV=2)
    q, k, v = q.float(), k.float(), v.float()
    a = kernels.attention(q, k, v, cu_seqlens=kw["cu_seqlens"], chunk=8)
    b = kernels.attention(q, k, v, cu_seqlens=kw["cu_seqlens"], cu_seqlens_k=kw["cu_seqlens_k"], chunk=8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(cu_seqlens=None), "cu_seqlens_k needs cu_seqlens"),
    (dict(cu_seqlens_k=torch.tensor([0, 40], dtype=torch.int32)), "as many boundaries"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 40], dtype=torch.int32)), "document 0 has 3 queries but only 2 keys"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 40], dtype=torch.int32), causal=False), "document 0 has 3 queries"),
    (dict(cu_seqlens_k=torch.tensor([0, 40, 39], dtype=torch.int32)), "cu_seqlens_k must be non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 30, 41], dtype=torch.int32)), "cu_seqlens_k must end at .* 40"),
    (dict(cu_seqlens_k=torch.tensor([0, 30, 40.0])), "cu_seqlens_k must be int32"),
    (dict(rope=reference.rope_tables(64, 32)), "rope is not supported with cu_seqlens_k"),
], ids=["no-cu_seqlens", "count", "more-queries", "more-queries-full", "order", "end", "dtype", "rope"])
def test_bad_boundaries_are_refused(bad, match, device):
    q, k, v, kw = make([(3, 30), (2, 10)], {}, device)
    kw = {**kw, **{n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in bad.items()}}
    if "rope" in bad:
        kw["rope"] = tuple(t.to(device) for t in bad["rope"])
    for fn, args in ((kernels.attention, (q.float(), k.float(), v.float())), (reference.attention, (q, k, v))):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kw)


def test_more_queries_than_keys_in_total_names_the_document(device):
    """Fewer keys than queries in all (5 > 3): the per-document check names the document (not the totals)."""
    q, k, v, kw = make([(3, 30), (2, 10)], {}, device)
    k, v = k[:, :, :3], v[:, :, :3]
    kw = {**kw, "cu_seqlens_k": torch.tensor([0, 2, 3], dtype=torch.int32, device=device)}
    for fn, args in ((kernels.attention, (q.float(), k.float(), v.float())), (reference.attention, (q, k, v))):
        with pytest.raises(ValueError, match="document 0 has 3 queries but only 2 keys"):
            fn(*args, **kw)


def test_non_causal_documents_and_empty_keys(device):
    """Non-causal documents see all their keys; a document without keys (nor queries) is skipped cleanly."""
    docs = [(2, 5), (0, 0), (4, 9), (0, 3)]
    q, k, v, kw = make(docs, {"causal": False}, device)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
    out, lse = kernels.attention(q.float(), k.float(), v.float(), return_lse=True, **kw)
    assert rel_err(out, ref) < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


def test_flash_attention_names(device):
    """``cu_seqlens_q`` is flash-attention's name for ``cu_seqlens``; passing both is refused."""
    q, k, v, kw = make(DOCS, {}, device)
    q, k, v = q.float(), k.float(), v.float()
    cq, ck = kw["cu_seqlens"], kw["cu_seqlens_k"]
    want = kernels.attention(q, k, v, cu_seqlens=cq, cu_seqlens_k=ck)
    assert torch.equal(kernels.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck), want)
    assert rel_err(reference.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck), want) < 1e-5
    for fn in (kernels.attention, reference.attention):
        with pytest.raises(ValueError, match="cu_seqlens and cu_seqlens_q are the same argument"):
            fn(q, k, v, cu_seqlens=cq, cu_seqlens_q=cq, cu_seqlens_k=ck)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["causal", "window", "rows-norm", "key-mask"])
def test_gpu_long_documents_bf16(feature, device):
    """Compiled kernels, autotuned tiles, documents of thousands of keys: per-row rule, global bound, gradients."""
    docs = [(512, 4096), (1, 3000), (2048, 2048), (0, 5), (100, 700)]
    f = {**FEATURES[feature], **({"window": 1000} if feature == "window" else {})}
    q, k, v, kw = make(docs, f, device, HQ=8, HKV=2, D=128)
    leaves = [q, k, v]
    ref = reference.attention(*[t.requires_grad_() for t in leaves], **kw)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * do).sum(), leaves)
    ins = [t.detach().bfloat16().requires_grad_() for t in leaves]
    kwb = cast(kw, torch.bfloat16)
    out = kernels.attention(*ins, **kwb)
    low = lowp_attention(*[t.detach() for t in ins], **kwb)
    assert rel_err(out, ref) < 2e-2
    assert_rows_close(out, ref.detach(), low, floor=8e-3)
    got = torch.autograd.grad((out.double() * do).sum(), ins)
    for name, g, r in zip("qkv", got, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, r) < 6e-2, f"d{name}"
