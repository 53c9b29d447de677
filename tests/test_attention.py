"""drope.kernels.attention (forward) against drope.reference.attention run in float64."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from drope import reference
from drope.kernels import attention
from drope.kernels.attention import Options, attention_forward
from drope.validation import DeviceError, check_attention, split_scale
from helpers import Case, assert_rows_close, lowp_attention, noncontiguous, poisoned_empty, rel_err

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# per-row floor of flash-attention's rule (absolute, outputs are O(1))
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_inputs(c: Case, device, packed_len=None):
    """Fresh random q, k, v and keyword arguments for ``attention`` (kernel dtype) plus their float64 twins."""
    q = torch.randn(c.B, c.HQ, c.SQ, c.D, device=device).to(c.dtype)
    k = torch.randn(c.B, c.HKV, c.SK, c.D, device=device).to(c.dtype)
    v = torch.randn(c.B, c.HKV, c.SK, c.D, device=device).to(c.dtype)
    if c.layout == "bshd":
        q, k, v = noncontiguous(q), noncontiguous(k), noncontiguous(v)
    kw = {"causal": c.causal}
    if c.rope:
        # longer than Sk, random angles: also checks the table is indexed by position, not by row
        ang = torch.rand(c.SK + 7, c.D // 2, device=device, dtype=torch.float64) * 6.3
        kw["rope"] = (ang.cos().float(), ang.sin().float())
    if c.norm_shapes() is not None:
        wq_shape, wk_shape = c.norm_shapes()
        kw["q_norm_weight"] = torch.rand(wq_shape, device=device) + 0.5
        kw["k_norm_weight"] = torch.rand(wk_shape, device=device) + 0.5
    if c.scale == "float":
        kw["softmax_scale"] = 0.37
    elif c.scale != "none":
        kw["softmax_scale"] = (torch.rand(c.scale_shape(), device=device) + 0.5) * c.D ** -0.5
    for name in ("window", "chunk", "softcap"):
        if getattr(c, name) is not None:
            kw[name] = getattr(c, name)
    if c.sinks:
        kw["sinks"] = torch.randn(c.HQ, device=device) * 2
    kw64 = {}
    for name, val in kw.items():
        if isinstance(val, torch.Tensor):
            val = val.double()
        elif isinstance(val, tuple):
            val = tuple(t.double() for t in val)
        kw64[name] = val
    return (q, k, v, kw), (q.double(), k.double(), v.double(), kw64)


def options(q, k, v, kw) -> Options:
    """The launcher's options for the public keyword arguments ``kw``."""
    shape = check_attention(q, k, v, causal=kw["causal"], softmax_scale=kw.get("softmax_scale"), rope=kw.get("rope"),
                            q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6, kernel=True)
    const, rows = split_scale(kw.get("softmax_scale"), shape, q.device)
    return Options(causal=kw["causal"], scale=const, rows=rows, rope=kw.get("rope"), norm_eps=1e-6,
                   cu_seqlens=kw.get("cu_seqlens"), window=kw.get("window"), chunk=kw.get("chunk"),
                   softcap=kw.get("softcap"))


def run_kernel(q, k, v, kw, blocks):
    """The public function, or the launcher with forced blocks; every allocation NaN-poisoned."""
    with poisoned_empty():
        if blocks is None:
            return attention(q, k, v, return_lse=True, **kw)
        return attention_forward(q, k, v, kw.get("q_norm_weight"), kw.get("k_norm_weight"), kw.get("sinks"),
                                  options(q, k, v, kw), block_sizes=blocks)


def check_case(c: Case, device):
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(c, device)
    out, lse = run_kernel(q, k, v, kw, c.blocks)
    ref, ref_lse = reference.attention(q64, k64, v64, return_lse=True, **kw64)
    assert out.shape == ref.shape and out.dtype == c.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    err = rel_err(out, ref)
    assert err < TOL[c.dtype], f"output rel err {err:.2e} >= {TOL[c.dtype]}"
    kw_cpu = {n: (x.cpu() if isinstance(x, torch.Tensor) else tuple(t.cpu() for t in x) if isinstance(x, tuple) else x)
              for n, x in kw.items()}
    assert_rows_close(out.cpu(), ref.cpu(), lowp_attention(q.cpu(), k.cpu(), v.cpu(), **kw_cpu), FLOOR[c.dtype])
    assert lse.shape == (c.B, c.HQ, c.SQ) and lse.dtype == torch.float32 and lse.is_contiguous()
    lse_err = rel_err(lse, ref_lse)
    assert lse_err < TOL[c.dtype], f"lse rel err {lse_err:.2e}"


INTERPRETER_CASES = [
    Case(1, 2, 2, 1, 1, 64),
    Case(2, 8, 2, 63, 63, 64, rope=True, norm="shared", scale="rows"),
    Case(1, 4, 1, 77, 77, 64, rope=True, dtype=torch.float16),
    Case(1, 8, 1, 100, 129, 64, norm="head", scale="batch_rows"),
    Case(2, 2, 1, 1, 100, 64, rope=True, scale="float"),
    Case(1, 2, 2, 129, 129, 64, rope=True, norm="head", layout="bshd", dtype=torch.float16),
    Case(2, 4, 4, 63, 100, 32, rope=True, norm="shared", layout="bshd"),
    Case(1, 4, 2, 63, 100, 64, causal=False, scale="rows"),
    Case(1, 2, 1, 100, 40, 64, causal=False, norm="head", dtype=torch.float16),
    Case(1, 4, 1, 77, 77, 16, rope=True, norm="head", scale="batch_rows"),
    Case(1, 2, 2, 33, 40, 32, norm="shared"),
    Case(1, 2, 1, 40, 65, 128, rope=True, norm="head", scale="rows"),
    Case(1, 2, 2, 63, 63, 128, layout="bshd", dtype=torch.float16),
    Case(1, 2, 1, 20, 33, 256, rope=True, norm="shared"),
    Case(1, 8, 8, 63, 63, 64, rope=True, layout="bshd", scale="batch_rows"),
    # bf16: the interpreter's bf16 tl.dot is broken, so there the kernel upcasts the (bf16-rounded) operands
    Case(1, 4, 1, 63, 77, 64, rope=True, norm="head", scale="rows", dtype=torch.bfloat16),
    Case(1, 2, 2, 40, 40, 32, causal=False, layout="bshd", dtype=torch.bfloat16, blocks=(16, 16)),
    # a forced small-block launch (NaN-poisoned output): many diagonal and off-diagonal blocks
    Case(1, 2, 1, 77, 100, 64, rope=True, norm="head", scale="rows", blocks=(16, 16)),
    Case(1, 4, 1, 63, 63, 32, causal=False, rope=True, layout="bshd", blocks=(16, 32)),
    Case(1, 2, 2, 100, 129, 64, dtype=torch.float16, blocks=(32, 16)),
    # head dims that are multiples of 8 but not powers of two: padded blocks, masked lanes
    Case(1, 4, 2, 45, 45, 40, rope=True, norm="head", scale="rows"),
    Case(1, 2, 1, 33, 50, 80, rope=True, norm="shared", dtype=torch.float16, layout="bshd"),
    Case(1, 2, 2, 20, 20, 96, causal=False, dtype=torch.bfloat16),
    Case(1, 2, 1, 17, 30, 24, norm="head", blocks=(16, 16)),
    Case(1, 2, 1, 9, 9, 8),
    # per-head temperatures
    Case(2, 4, 2, 33, 40, 32, scale="heads"),
    Case(2, 4, 1, 33, 33, 64, rope=True, norm="head", scale="head_rows", dtype=torch.float16),
    # sliding windows, chunks, sinks, softcap (and together), including small forced blocks
    Case(1, 4, 2, 100, 100, 32, window=1),
    Case(1, 4, 2, 100, 130, 32, window=17, rope=True, norm="head", scale="rows"),
    Case(1, 2, 1, 77, 77, 64, window=40, blocks=(16, 16), dtype=torch.float16),
    Case(1, 4, 2, 100, 100, 32, chunk=16),
    Case(1, 2, 2, 63, 90, 32, chunk=25, blocks=(16, 32), scale="head_rows"),
    Case(2, 4, 2, 50, 50, 32, sinks=True),
    Case(1, 4, 1, 1, 40, 64, sinks=True, window=8, dtype=torch.bfloat16),
    Case(1, 2, 2, 70, 70, 32, softcap=2.0, scale="rows"),
    Case(1, 4, 2, 90, 90, 40, window=30, chunk=32, sinks=True, softcap=5.0, rope=True, norm="head",
         scale="head_rows", blocks=(16, 16)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("c", INTERPRETER_CASES, ids=lambda c: c.id)
def test_matches_reference(c, device):
    check_case(c, device)


PACKED = [
    # bounds, causal, blocks
    ([0, 5, 6, 13], True, None),
    ([0, 40, 41, 77, 100], True, (16, 16)),
    ([0, 17, 50, 63], False, (16, 16)),
    ([0, 1, 2, 3, 70], True, None),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("bounds,causal,blocks", PACKED,
                         ids=[f"docs{'_'.join(map(str, b))}-{'causal' if c else 'full'}-{'blocks' if bl else 'default'}"
                              for b, c, bl in PACKED])
def test_packed_documents(bounds, causal, blocks, device):
    S = bounds[-1]
    c = Case(1, 2, 1, S, S, 32, causal=causal, rope=True, norm="head", scale="rows", layout="bshd", blocks=blocks)
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(c, device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    out, lse = run_kernel(q, k, v, {**kw, "cu_seqlens": cu}, blocks)
    ref, ref_lse = reference.attention(q64, k64, v64, cu_seqlens=cu, return_lse=True, **kw64)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[c.dtype] and rel_err(lse, ref_lse) < TOL[c.dtype]
    # each document alone gives the same rows (positions restart at 0, per-row scales follow the rows)
    rows = kw["softmax_scale"]
    for a, b in zip(bounds[:-1], bounds[1:]):
        alone = attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **{**kw, "softmax_scale": rows[a:b]})
        assert rel_err(out[:, :, a:b], alone) < TOL[c.dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_int64_strided_boundaries(causal, device):
    c = Case(1, 2, 1, 30, 30, 16, causal=causal, rope=True)
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(c, device)
    cu = torch.tensor([0, -1, 11, -1, 30], dtype=torch.int64, device=device)[::2]
    out = attention(q, k, v, cu_seqlens=cu, **kw)
    ref = reference.attention(q64, k64, v64, cu_seqlens=cu, **kw64)
    assert rel_err(out, ref) < TOL[c.dtype]


@pytest.mark.interpreter
def test_no_visible_key_gives_zeros(device):
    q = torch.randn(2, 4, 5, 64, device=device)
    k = torch.randn(2, 2, 0, 64, device=device)
    out, lse = attention(q, k, k, causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = attention(q[:, :, :0], k, k, return_lse=True)
    assert out.shape == (2, 4, 0, 64) and lse.shape == (2, 4, 0)


@pytest.mark.interpreter
def test_lse_not_computed_unless_asked(device):
    (q, k, v, kw), _ = make_inputs(Case(1, 2, 1, 9, 9, 16), device)
    out = attention(q, k, v, **kw)
    assert isinstance(out, torch.Tensor)
    o, lse = attention_forward(q, k, v, None, None, None, options(q, k, v, kw), return_lse=False)
    assert lse is None and torch.equal(o, out)


@pytest.mark.interpreter
@pytest.mark.parametrize("bounds,window,chunk", [([0, 30, 31, 90], 7, None), ([0, 45, 90], None, 16),
                                                 ([0, 20, 90], 12, 10)], ids=["window", "chunk", "both"])
def test_packed_documents_with_windows_and_chunks(bounds, window, chunk, device):
    """Windows and chunks count positions inside each document, as if each ran alone."""
    S = bounds[-1]
    c = Case(1, 2, 1, S, S, 32, rope=True, norm="head", window=window, chunk=chunk, sinks=True, blocks=(16, 16))
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(c, device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    out, lse = run_kernel(q, k, v, {**kw, "cu_seqlens": cu}, c.blocks)
    ref, ref_lse = reference.attention(q64, k64, v64, cu_seqlens=cu, return_lse=True, **kw64)
    assert rel_err(out, ref) < TOL[c.dtype] and rel_err(lse, ref_lse) < TOL[c.dtype]
    for a, b in zip(bounds[:-1], bounds[1:]):
        alone = attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **kw)
        assert rel_err(out[:, :, a:b], alone) < TOL[c.dtype]


@pytest.mark.interpreter
def test_window_wider_than_the_sequence_is_plain_causal(device):
    (q, k, v, kw), _ = make_inputs(Case(1, 2, 1, 40, 50, 32), device)
    assert rel_err(attention(q, k, v, window=4096, **kw), attention(q, k, v, **kw)) < 1e-6
    assert rel_err(attention(q, k, v, chunk=50, **kw), attention(q, k, v, **kw)) < 1e-6


@pytest.mark.interpreter
def test_sink_of_minus_infinity_is_no_sink(device):
    (q, k, v, kw), _ = make_inputs(Case(1, 2, 1, 20, 20, 32), device)
    sinks = torch.full((2,), float("-inf"), device=device)
    assert rel_err(attention(q, k, v, sinks=sinks, **kw), attention(q, k, v, **kw)) < 1e-6


@pytest.mark.interpreter
def test_gqa_equals_repeated_kv(device):
    (q, k, v, kw), _ = make_inputs(Case(1, 4, 1, 33, 40, 32, rope=True, norm="shared"), device)
    grouped = attention(q, k, v, **kw)
    repeated = attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                         **{**kw, "k_norm_weight": kw["k_norm_weight"]})
    assert rel_err(grouped, repeated) < 1e-6


@pytest.mark.interpreter
@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), HKV=st.integers(1, 2), G=st.sampled_from([1, 2, 4]), SQ=st.integers(1, 40),
       extra=st.integers(0, 30), D=st.sampled_from([16, 32, 64]), causal=st.booleans(), rope=st.booleans(),
       norm=st.sampled_from(["none", "shared", "head"]), scale=st.sampled_from(["none", "float", "rows", "batch_rows"]),
       layout=st.sampled_from(["contig", "bshd"]), blocks=st.sampled_from([None, (16, 16), (16, 32), (32, 16)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_property_random_shapes(B, HKV, G, SQ, extra, D, causal, rope, norm, scale, layout, blocks, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_case(Case(B, HKV * G, HKV, SQ, SQ + extra, D, causal=causal, rope=rope, norm=norm, scale=scale,
                    layout=layout, blocks=blocks, dtype=dtype), device)


def _base():
    return dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))


BAD = [
    (dict(q=torch.randn(4, 8, 16)), "q must be 4-D"),
    (dict(k=torch.randn(1, 2, 8), v=torch.randn(1, 2, 8)), "k must be 4-D"),
    (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of"),
    (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), "head dim"),
    (dict(q=torch.randn(1, 4, 8, 52), k=torch.randn(1, 2, 8, 52), v=torch.randn(1, 2, 8, 52)), "head dim D=52"),
    (dict(q=torch.randn(1, 4, 8, 264), k=torch.randn(1, 2, 8, 264), v=torch.randn(1, 2, 8, 264)), "head dim D=264"),
    (dict(q=torch.randn(1, 4, 8, 16).double(), k=torch.randn(1, 2, 8, 16).double(),
          v=torch.randn(1, 2, 8, 16).double()), "dtype"),
    (dict(v=torch.randn(1, 2, 8, 16).half()), "dtype"),
    (dict(k=torch.randn(1, 2, 8, 16, device="meta"), v=torch.randn(1, 2, 8, 16, device="meta")), "device"),
    (dict(q=torch.randn(1, 4, 9, 16)), "causal"),
    (dict(q=torch.randn(1, 4, 9, 16), causal=False, rope=(torch.randn(9, 8), torch.randn(9, 8))), "rope needs Sq <= Sk"),
    (dict(causal=1), "causal must be a bool"),
    (dict(rope=(torch.randn(7, 8), torch.randn(7, 8))), "shorter than Sk"),
    (dict(rope=(torch.randn(8, 16), torch.randn(8, 16))), "rope cos"),
    (dict(rope=(torch.randn(8, 8), torch.randn(8, 4))), "rope sin"),
    (dict(rope=torch.randn(8, 8)), "rope must be"),
    (dict(q_norm_weight=torch.randn(3, 16)), "q_norm_weight"),
    (dict(k_norm_weight=torch.randn(4, 16)), "k_norm_weight"),
    (dict(k_norm_weight=torch.randn(15)), "k_norm_weight"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(softmax_scale=torch.randn(7)), "softmax_scale"),
    (dict(softmax_scale=torch.randn(2, 8)), "softmax_scale"),
    (dict(softmax_scale="x"), "softmax_scale"),
    (dict(softmax_scale=torch.rand(1, 3, 8)), "softmax_scale"),
    (dict(softmax_scale=torch.rand(2, 4, 8)), "softmax_scale"),
    (dict(softmax_scale=-0.1), "softmax_scale must be a finite multiplier in \\[0"),
    (dict(softmax_scale=-torch.rand(8)), r"finite multipliers in \[0, 1e\+06\]"),
    (dict(softmax_scale=torch.full((8,), float("inf"))), "finite multipliers"),
    (dict(softmax_scale=1e38), r"overflow the fp32 logits"),
    (dict(window=0), r"window must be None or an int in \[1, 2\*\*31 - 1\]"),
    (dict(window=2**64), "window must be None or an int in"),
    (dict(chunk=2**64), "chunk must be None or an int in"),
    (dict(window=2.5), "window"),
    (dict(window=4, causal=False), "needs causal=True"),
    (dict(chunk=-1), "chunk must be None or an int in"),
    (dict(chunk=4, causal=False), "needs causal=True"),
    (dict(sinks=torch.randn(2)), r"sinks must be a \(4,\) tensor"),
    (dict(sinks=torch.zeros(4, dtype=torch.int32)), "sinks must be floating point"),
    (dict(softcap=0.0), r"softcap must be None or a float in \(0, 1e\+06\]"),
    (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=1e39), "overflow fp32"),
    (dict(sinks=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "sinks must not hold NaN"),
    (dict(key_mask=torch.ones(2, 7, dtype=torch.bool)), r"key_mask must be a \(1, 8\) tensor"),
    (dict(key_mask=torch.ones(1, 8)), "key_mask must be bool, uint8 or int8"),
    (dict(cu_seqlens=torch.tensor([1, 8], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 8], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 7], dtype=torch.int32)), "end at"),
    (dict(cu_seqlens=torch.tensor([0, 8.0])), "int32"),
    (dict(q=torch.randn(2, 4, 8, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16),
          cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), "batch size"),
]


@pytest.mark.parametrize("override,match", BAD, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD)])
def test_rejects_bad_input(override, match):
    args = _base()
    args.update(override)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **args)


def test_other_devices_are_refused_by_name():
    """CUDA and CPU tensors have kernels (CPU: the interpreter or the PyTorch kernels); others a DeviceError."""
    args = _base()
    with pytest.raises(DeviceError, match="runs on CUDA tensors .*got meta"):
        attention(*(args[n].to("meta") for n in ("q", "k", "v")))


@pytest.mark.parametrize("which", ["q", "k", "v", "q_norm_weight", "k_norm_weight"])
def test_requires_grad_gets_a_gradient(which, device):
    """The backward landed (tests/test_attention_bwd.py checks its values): a leaf gets its .grad."""
    args = {name: t.to(device) for name, t in _base().items()}
    args["q_norm_weight"] = torch.ones(16, device=device)
    args["k_norm_weight"] = torch.ones(16, device=device)
    leaf = args[which].requires_grad_()
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    attention(q, k, v, **args).float().sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape and torch.isfinite(leaf.grad).all()


@pytest.mark.interpreter
def test_requires_grad_runs_under_no_grad(device):
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(Case(1, 2, 1, 9, 9, 16), device)
    q.requires_grad_()
    with torch.no_grad():
        out = attention(q, k, v, **kw)
    assert not out.requires_grad
    assert rel_err(out, reference.attention(q64.detach(), k64, v64, **kw64)) < TOL[torch.float32]


GPU_CASES = [
    replace(c, dtype=dt, layout=layout)
    for dt in (torch.bfloat16, torch.float16)
    for layout in ("contig", "bshd")
    for c in [
        Case(2, 8, 2, 63, 63, 64, rope=True, norm="shared", scale="rows"),
        Case(1, 32, 8, 1000, 1000, 128, rope=True, norm="head"),
        Case(2, 16, 2, 777, 2048, 64, scale="batch_rows"),
        Case(1, 8, 1, 1, 4099, 128, rope=True, scale="float"),
        Case(1, 4, 4, 513, 700, 128, causal=False, norm="head"),
        Case(1, 4, 1, 300, 300, 256, rope=True, norm="shared"),
        Case(1, 4, 2, 129, 129, 16, rope=True, norm="head"),
        Case(1, 4, 2, 129, 257, 32, rope=True),
        Case(1, 4, 1, 4096, 4096, 128, rope=True, norm="head", scale="rows"),
        Case(1, 4, 1, 300, 300, 64, rope=True, norm="head", blocks=(16, 16)),
        Case(1, 8, 2, 2048, 2048, 128, window=500, rope=True, norm="head", scale="head_rows"),
        Case(1, 8, 2, 2048, 2048, 128, chunk=512, sinks=True),
        Case(2, 8, 8, 1000, 1000, 256, softcap=30.0, scale="rows"),
        Case(1, 8, 2, 777, 1500, 80, rope=True, norm="head", window=128, sinks=True),
        Case(1, 8, 4, 1024, 1024, 96, scale="heads", softcap=50.0),
    ]
] + [
    Case(1, 2, 1, 16384, 16384, 64, rope=True, norm="head", scale="rows", dtype=torch.bfloat16),
    Case(1, 2, 2, 4096, 16384, 128, dtype=torch.float16, layout="bshd"),
    Case(1, 4, 2, 1000, 1000, 64, rope=True, norm="head", dtype=torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("c", GPU_CASES, ids=lambda c: c.id)
def test_matches_reference_gpu(c, device):
    check_case(c, device)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_packed_documents_gpu(dtype, device):
    bounds = [0, 1000, 1001, 3000, 3333, 8192]
    S = bounds[-1]
    c = Case(1, 8, 2, S, S, 128, rope=True, norm="head", scale="rows", layout="bshd", dtype=dtype)
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(c, device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    out, lse = attention(q, k, v, cu_seqlens=cu, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q64, k64, v64, cu_seqlens=cu, return_lse=True, **kw64)
    assert rel_err(out, ref) < TOL[dtype] and rel_err(lse, ref_lse) < TOL[dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["aligned", "offset", "strided_d"])
def test_tma_and_pointer_paths_agree(layout, device):
    """Aligned K/V go through TMA descriptors; a misaligned base or a non-unit D stride falls back to
    pointer loads (the recorded launch says which), with the same results."""
    from drope.inspect import recording

    c = Case(1, 4, 2, 50, 70, 32, window=30, sinks=True, scale="rows")
    (q, k, v, kw), (q64, k64, v64, kw64) = make_inputs(c, device)
    if layout == "offset":
        k = torch.cat([torch.zeros_like(k[..., :1]), k], -1)[..., 1:]
        v = torch.cat([torch.zeros_like(v[..., :1]), v], -1)[..., 1:]
    elif layout == "strided_d":
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    with recording() as launches:
        attention(q, k, v, **kw)
    assert launches[-1].args["USE_TMA"] == (layout == "aligned")
    with poisoned_empty():
        out = attention(q, k, v, **kw)
    assert rel_err(out, reference.attention(q64, k64, v64, **kw64)) < TOL[c.dtype]


def test_interpreter_switched_on_after_import_changes_nothing():
    """TRITON_INTERPRET=1 set after `import drope` (kernels compiled at import): CPU tensors still run drope's exact
    PyTorch kernels (cpu_backend says so), never Triton's "0 active drivers"."""
    import subprocess
    import sys

    code = ("import os, torch\nos.environ.pop('TRITON_INTERPRET', None)\nimport drope.kernels as k\n"
            "from drope import reference\nfrom drope.kernels import ops\n"
            "os.environ['TRITON_INTERPRET'] = '1'\nq = torch.randn(1, 2, 8, 16)\n"
            "out = k.attention(q, q, q)\nref = reference.attention(q.double(), q.double(), q.double())\n"
            "print(ops.cpu_backend(), float((out.double() - ref).abs().max()))\n")
    env = {n: v for n, v in __import__("os").environ.items() if n != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    backend, err = r.stdout.split()
    assert backend == "torch" and float(err) < 1e-5, r.stderr[-2000:]


def test_tf32_switch_read_through_either_torch_api():
    """Issue 23: torch >= 2.9 raises on ``matmul.allow_tf32`` once the newer ``fp32_precision`` API was used
    (transformers does for TrainingArguments(tf32=True)); the fp32 dot precision reads whichever API is set."""
    from drope.kernels.toolkit import dot_precision

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 switch")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "ieee"
        assert dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.fp32_precision = before


@pytest.mark.gpu
def test_side_stream_and_second_device_launches():
    """Issue 23: the TMA descriptor scratch comes from the launch's stream and device (a side stream here, and
    the second GPU when there is one), and the results equal the default stream's."""
    (q, k, v, kw), _ = make_inputs(Case(1, 8, 2, 1000, 1000, 128, rope=True, norm="head", dtype=torch.bfloat16),
                                   "cuda")
    want = attention(q, k, v, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = attention(q, k, v, **kw)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)
    if torch.cuda.device_count() > 1:
        moved = [t.to("cuda:1") for t in (q, k, v)]
        kw1 = {n: (x.to("cuda:1") if isinstance(x, torch.Tensor) else tuple(t.to("cuda:1") for t in x)
                   if isinstance(x, tuple) else x) for n, x in kw.items()}
        assert torch.cuda.current_device() == 0  # drope makes the inputs' GPU current for its launches
        assert torch.equal(attention(*moved, **kw1).cpu(), want.cpu())
