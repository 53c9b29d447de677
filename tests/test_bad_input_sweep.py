"""Bad and extreme input, swept (issue 24): every call of the public kernels either raises a clear
``ValueError`` / ``TypeError`` (and the reference refuses it too) or equals the float64 reference, never NaN where
the reference has a number, and never changes its inputs."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from drope import kernels, reference
from helpers import rel_err

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
KERNEL_ONLY = "is not supported; accepted"
# per argument: values the contract accepts, and values it refuses (or that are extreme); each example makes
# at most one argument bad, so most examples reach the kernels
GOOD = {
    "softmax_scale": [None, 0.0, 0.3, 1e6, ("S", None), ("BS", None), ("H", None), ("BHS", None), ("BHS", 1e6)],
    "window": [None, 1, 3, 17, 2 ** 31 - 1],
    "chunk": [None, 1, 4, 2 ** 31 - 1],
    "softcap": [None, 5.0, 1e-3, 1e6],
    "sinks": [None, "ok", "-inf", "inf"],
    "key_mask": [None, "ok", "none-attendable"],
}
BAD = {
    "softmax_scale": [-0.5, 1e6 + 1, 1e38, float("inf"), float("nan"), True, "0.1", ("S", -1.0),
                      ("S", float("inf")), ("S", float("nan")), ("BHS", 2e6), ((7,), None)],
    "window": [0, -2, 2 ** 31, 2 ** 64, 2.5, True],
    "chunk": [0, 2 ** 64, 1.5],
    "softcap": [0.0, -1.0, 1e39, float("inf"), True],
    "sinks": ["nan", "shape", "int"],
    "key_mask": ["float", "shape"],
    "dtype": [torch.float64, torch.int32],
    "D": [12, 0, 264],
    "causal": [1, "yes"],
}


def _value(name, choice, B, HQ, SQ, SK, g):
    """The argument ``name`` for the drawn ``choice`` (tensors built here), or the choice itself."""
    if name == "softmax_scale" and isinstance(choice, tuple):
        dims, fill = choice
        shape = dims if isinstance(dims, tuple) else tuple({"B": B, "H": HQ, "S": SQ}[d] for d in dims)
        t = 0.05 + torch.rand(*shape, generator=g)
        if fill is not None:
            t.view(-1)[0] = fill
        return t
    if name == "sinks" and isinstance(choice, str):
        t = torch.randn(HQ + (choice == "shape"), generator=g)
        if choice in ("nan", "inf", "-inf"):
            t[0] = float(choice)
        return t.int() if choice == "int" else t
    if name == "key_mask" and isinstance(choice, str):
        m = torch.rand(B, SK + (choice == "shape"), generator=g) > 0.3
        if choice == "none-attendable":
            m[0] = False
        return m.float() if choice == "float" else m
    return choice


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    same = ((a == b) | (a.isnan() & b.isnan())) if a.is_floating_point() else a == b
    return a.shape == b.shape and a.dtype == b.dtype and bool(same.all())


def _as64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, tuple):
        return tuple(_as64(t) for t in x)
    return x


def _check(call, ref_call, tensors, dtype):
    before = [t.clone() for t in tensors]
    try:
        out = call()
    except (ValueError, TypeError) as e:
        assert str(e), "an error must say what is wrong"
        if KERNEL_ONLY not in str(e):  # the kernels' dtypes and head dims; the reference takes any
            with pytest.raises((ValueError, TypeError)):
                ref_call()
        return
    finally:
        for t, b in zip(tensors, before):
            assert _same(t, b), "an input was changed"
    ref = ref_call()
    finite = torch.isfinite(ref)
    assert not (out.isnan() & finite).any(), "NaN where the float64 reference has a number"
    if finite.any():
        assert rel_err(out[finite], ref[finite]) < TOL[dtype]


def _draw(data, names, B, HQ, SQ, SK, g):
    bad = data.draw(st.sampled_from([None, None, *BAD]))
    args = {}
    for name in names:
        pool = BAD[name] if name == bad else GOOD[name]
        value = _value(name, data.draw(st.sampled_from(pool)), B, HQ, SQ, SK, g)
        if value is not None:
            args[name] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    return bad, args


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_attention_sweep(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    B, G, HKV = data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 2])), data.draw(st.integers(1, 2))
    SQ = data.draw(st.integers(1, 12))
    SK = SQ + data.draw(st.integers(0, 6))
    bad, kw = _draw(data, list(GOOD), B, HKV * G, SQ, SK, g)
    D = data.draw(st.sampled_from(BAD["D"])) if bad == "D" else data.draw(st.sampled_from([16, 24]))
    dtype = data.draw(st.sampled_from(BAD["dtype"] if bad == "dtype" else [torch.float32, torch.float16,
                                                                            torch.bfloat16]))
    kw["causal"] = data.draw(st.sampled_from(BAD["causal"])) if bad == "causal" else True
    q = torch.randn(B, HKV * G, SQ, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, HKV, SK, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, HKV, SK, D, generator=g).to(DEVICE, dtype)
    if data.draw(st.booleans()) and D:
        kw["q_norm_weight"] = (0.5 + torch.rand(D, generator=g)).to(DEVICE)
    tensors = [t for t in (q, k, v, *kw.values()) if isinstance(t, torch.Tensor)]
    _check(lambda: kernels.attention(q, k, v, **kw),
           lambda: reference.attention(q.double(), k.double(), v.double(), **{n: _as64(x) for n, x in kw.items()}),
           tensors, dtype if dtype in TOL else torch.float32)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_decode_sweep(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    B, HKV, G = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 4]))
    SQ, D = data.draw(st.integers(1, 3)), 16
    SMAX = SQ + data.draw(st.integers(0, 40))
    bad, kw = _draw(data, ["softmax_scale", "window", "chunk", "softcap", "sinks", "key_mask"], B, HKV * G, SQ,
                    SMAX, g)
    q = torch.randn(B, HKV * G, SQ, D, generator=g).to(DEVICE)
    k = torch.randn(B, HKV, SMAX, D, generator=g).to(DEVICE)
    v = torch.randn(B, HKV, SMAX, D, generator=g).to(DEVICE)
    lens = data.draw(st.sampled_from([None, "ok", "ok", "short", "long", "float"]))
    if lens is not None:
        L = torch.randint(SQ, SMAX + 1, (B,), generator=g)
        L = {"ok": L, "short": L * 0 + SQ - 1, "long": L + SMAX, "float": L.float()}[lens]
        kw["cache_seqlens"] = (L if lens == "float" else L.to(torch.int32)).to(DEVICE)
    splits = data.draw(st.sampled_from([None, 1, 3, 0, -1, 2.0]))
    if splits is not None:
        kw["num_splits"] = splits
    tensors = [t for t in (q, k, v, *kw.values()) if isinstance(t, torch.Tensor)]
    _check(lambda: kernels.decode_attention(q, k, v, **kw),
           lambda: reference.decode_attention(q.double(), k.double(), v.double(),
                                              **{n: _as64(x) for n, x in kw.items()}), tensors, torch.float32)


def test_extreme_but_legal_inputs_equal_the_reference():
    """bf16 inputs near 1e30 with QK-norm (x^2 overflowed the fp32 norm), scale 1e6 (one-hot softmax), a +inf sink."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 9, 16, generator=g) * 1e30).to(DEVICE, torch.bfloat16)
    k = (torch.randn(1, 2, 9, 16, generator=g) * 1e30).to(DEVICE, torch.bfloat16)
    v = torch.randn(1, 2, 9, 16, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.ones(16, device=DEVICE)
    out = kernels.attention(q, k, v, q_norm_weight=w, k_norm_weight=w)
    ref = reference.attention(q.double(), k.double(), v.double(), q_norm_weight=w.double(), k_norm_weight=w.double())
    assert torch.isfinite(out).all() and rel_err(out, ref) < 5e-2
    normed = kernels.qk_norm_rope(q, w)
    assert torch.isfinite(normed).all() and rel_err(normed, reference.rms_norm(q.double(), w.double(), 1e-6)) < 1e-2
    qf, kf, vf = (t.float() for t in (q / 1e30, k / 1e30, v))
    hot = kernels.attention(qf, kf, vf, softmax_scale=1e6)
    assert rel_err(hot, reference.attention(qf.double(), kf.double(), vf.double(), softmax_scale=1e6)) < 1e-4
    sinks = torch.tensor([math.inf, -math.inf], device=DEVICE)
    out = kernels.attention(qf, kf, vf, sinks=sinks)
    ref = reference.attention(qf.double(), kf.double(), vf.double(), sinks=sinks.double())
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])) and rel_err(out, ref) < 1e-5
    dec = kernels.decode_attention(qf[:, :, -1:], kf, vf, sinks=sinks, num_splits=3)
    assert torch.equal(dec[0, 0], torch.zeros_like(dec[0, 0])) and torch.isfinite(dec).all()


# ---- drope.flash_attn (issue 30): flash-attn's kvcache surface ------------------------------------------------------
# per argument, values flash-attn computes with (drope must give its result) and bad ones (FlashAttnInputError:
# a ValueError and a RuntimeError); each example makes at most one argument bad
FLASH_GOOD = {
    "cache_seqlens": ["int", "tensor", "zero"],
    "cache_leftpad": [None, "ok"],
    "block_table": [None, "ok"],
    "softcap": [0.0, 2.0],
    "window_size": [(-1, -1), (3, 0), "tensor"],
    "append": [None, "same", "more"],
    "D": [16, 20],
}
FLASH_BAD = {
    "cache_seqlens": ["negative", "huge-int", "past-capacity", "float", "shape"],
    "cache_leftpad": ["negative", "past-length", "float", "list"],
    "block_table": ["1d", "index", "float"],
    "softcap": [float("nan"), -1.0, float("inf")],
    "window_size": [(1.5, 0), (2,), "triple"],
    "append": ["shape", "dtype"],
    "D": [264],
}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_flash_kvcache_sweep(data):
    from drope import flash_attn as fa
    from helpers import flash_oracle

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    bad = data.draw(st.sampled_from([None, None, *FLASH_BAD]))
    pick = {n: data.draw(st.sampled_from(FLASH_BAD[n] if n == bad else FLASH_GOOD[n])) for n in FLASH_GOOD}
    B, HKV, G, page, pages = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), 2, 16, 3
    SQ, D, cap = data.draw(st.integers(1, 3)), pick["D"], page * pages
    causal = SQ > 1 or data.draw(st.booleans())
    q = torch.randn(B, SQ, HKV * G, D, generator=g).to(DEVICE)
    logical_k = torch.randn(B, cap, HKV, D, generator=g).to(DEVICE)
    logical_v = torch.randn(B, cap, HKV, D, generator=g).to(DEVICE)
    kw = dict(causal=causal, softcap=pick["softcap"], return_softmax_lse=False)
    kw["window_size"] = {"tensor": torch.tensor([4, 0]), "triple": (1, 0, 0)}.get(pick["window_size"],
                                                                                  pick["window_size"])
    table = torch.randperm(B * pages + 1, generator=g)[:B * pages].reshape(B, pages).to(torch.int32)
    if pick["block_table"] is None:
        kc, vc = logical_k.clone(), logical_v.clone()
    else:
        kc = torch.zeros(B * pages + 1, page, HKV, D, device=DEVICE)
        vc = torch.zeros_like(kc)
        for b in range(B):
            for p in range(pages):
                kc[table[b, p]], vc[table[b, p]] = logical_k[b, p * page:(p + 1) * page], logical_v[b, p * page:(p + 1)
                                                                                                     * page]
        kw["block_table"] = {"ok": table, "1d": table[0], "index": table + B * pages, "float": table.float()}[
            pick["block_table"]].to(DEVICE)
    new = {None: 0, "same": SQ, "more": SQ + 2, "shape": SQ, "dtype": SQ}[pick["append"]]
    lens = torch.randint(0, cap - new - 1, (B,), generator=g).to(torch.int32)
    lens = {"int": lens[:1].expand(B).clone(), "zero": lens * 0}.get(pick["cache_seqlens"], lens)
    kw["cache_seqlens"] = {"int": int(lens[0]), "negative": -3, "huge-int": 2 ** 40, "past-capacity": lens + cap,
                           "float": lens.float(), "shape": lens[:1].repeat(B + 1)}.get(pick["cache_seqlens"], lens)
    if isinstance(kw["cache_seqlens"], torch.Tensor):
        kw["cache_seqlens"] = kw["cache_seqlens"].to(DEVICE)
    if new:
        k_new = torch.randn(B, new, HKV, D + (pick["append"] == "shape"), generator=g).to(DEVICE)
        v_new = torch.randn(B, new, HKV, D + (pick["append"] == "shape"), generator=g).to(DEVICE)
        if pick["append"] == "dtype":
            k_new, v_new = k_new.double(), v_new.double()
        kw.update(k=k_new, v=v_new)
    pad = torch.randint(0, 3, (B,), generator=g).to(torch.int32)
    if pick["cache_leftpad"] is not None:
        kw["cache_leftpad"] = {"ok": torch.minimum(pad, lens), "negative": pad - 5, "past-length": lens + new + 1,
                               "float": pad.float(), "list": pad.tolist()}[pick["cache_leftpad"]]
        if isinstance(kw["cache_leftpad"], torch.Tensor):
            kw["cache_leftpad"] = kw["cache_leftpad"].to(DEVICE)
    before = [t.clone() for t in (q, kc, vc)]
    try:
        out = fa.flash_attn_with_kvcache(q, kc, vc, **kw)
    except ValueError as e:
        assert isinstance(e, fa.FlashAttnInputError) and isinstance(e, RuntimeError) and str(e)
        assert bad is not None, f"a call flash-attn computes was refused: {e}"
        assert _same(q, before[0]) and _same(kc, before[1]) and _same(vc, before[2]), "a refused call changed input"
        return
    assert bad is None, f"bad {bad}={pick[bad]!r} was accepted"
    assert _same(q, before[0])
    L = lens.tolist() if not isinstance(kw["cache_seqlens"], int) else [kw["cache_seqlens"]] * B
    lp = kw["cache_leftpad"].tolist() if "cache_leftpad" in kw else [0] * B
    win = tuple(int(w) for w in kw["window_size"])
    for b in range(B):
        keys = torch.cat((logical_k[b, :L[b]], kw["k"][b])) if new else logical_k[b, :L[b]]
        vals = torch.cat((logical_v[b, :L[b]], kw["v"][b])) if new else logical_v[b, :L[b]]
        ref, _ = flash_oracle(q[b:b + 1], keys[None, lp[b]:], vals[None, lp[b]:], causal=causal, window_size=win,
                              softcap=pick["softcap"])
        assert rel_err(out[b:b + 1], ref) < 1e-4, f"batch row {b}"
        if new and pick["block_table"] is None:
            assert torch.equal(kc[b, L[b]:L[b] + new], kw["k"][b]) and _same(kc[b, :L[b]], before[1][b, :L[b]])
