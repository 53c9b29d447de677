"""drope.kernels.decode_attention (split-KV decode) against the float64 reference.

Interpreter tier: small caches (Smax <= 300), fp16/fp32. GPU tier: bf16, a cache of more than a
million tokens (int64 addressing), big batches, no device sync.
"""

import pytest
import torch

import drope.kernels
import drope.kernels.decode as dec
import drope.kernels.interface as interface
from drope import reference
from drope.kernels import choose_num_splits, decode_attention
from drope.inspect import recording
from helpers import noncontiguous, poisoned_empty, rel_err

# relative error of the output against the float64 reference, and absolute error of the LSE
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def poison():
    """Every buffer the launcher allocates starts as NaN, so an element it forgets to write fails."""
    with poisoned_empty():
        yield


def ragged_lengths(B, SQ, SMAX, device):
    """int32 (B,) lengths in [Sq, Smax] including both ends when B allows."""
    lens = torch.randint(SQ, SMAX + 1, (B,), dtype=torch.int32)
    lens[0] = SMAX
    if B > 1:
        lens[1] = SQ
    return lens.to(device)


def make_inputs(B, HQ, HKV, SQ, SMAX, D, dtype, device, lens):
    """q, clean caches (for the reference) and NaN-past-the-live-length caches (for the kernel)."""
    q = torch.randn(B, HQ, SQ, D, dtype=dtype, device=device)
    k = torch.randn(B, HKV, SMAX, D, dtype=dtype, device=device)
    v = torch.randn(B, HKV, SMAX, D, dtype=dtype, device=device)
    if lens is None:
        return q, k, v, k, v
    dead = torch.arange(SMAX, device=device)[None, :] >= lens.to(device)[:, None].long()  # (B, Smax)
    dead = dead[:, None, :, None]
    return q, k, v, k.masked_fill(dead, float("nan")), v.masked_fill(dead, float("nan"))


def ref64(q, k, v, **kw):
    return reference.decode_attention(q.double(), k.double(), v.double(), return_lse=True, **kw)


def check(out, lse, ref_out, ref_lse, dtype):
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) < TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < LSE_TOL[dtype]


MATRIX = [
    # B, HQ, HKV, SQ, SMAX, D, dtype, num_splits
    (2, 4, 4, 1, 100, 64, torch.float32, 1),
    (3, 8, 2, 5, 257, 64, torch.float16, 3),
    (2, 8, 1, 1, 300, 128, torch.float32, 16),
    (2, 8, 1, 5, 200, 128, torch.float16, None),
    (3, 4, 1, 5, 129, 64, torch.float32, 7),
    (1, 2, 2, 5, 77, 128, torch.float16, 2),
    (2, 16, 2, 1, 63, 64, torch.float16, 5),
    (1, 8, 1, 13, 90, 64, torch.float16, 2),  # 104 packed rows: two row blocks
    (1, 4, 2, 3, 50, 32, torch.float32, 2),
    (1, 2, 1, 1, 40, 16, torch.float16, 1),
    (1, 2, 1, 2, 70, 256, torch.float32, 3),
    # bf16 in the interpreter goes through fp32 dots (its bf16 tl.dot is wrong); the GPU tier has the real path
    (2, 8, 2, 5, 257, 128, torch.bfloat16, 3),
    (3, 8, 1, 1, 300, 64, torch.bfloat16, None),
]


def matrix_id(c):
    B, HQ, HKV, SQ, SMAX, D, dtype, splits = c
    return f"B{B}-Hq{HQ}-Hkv{HKV}-Sq{SQ}-Smax{SMAX}-D{D}-{DTYPE_NAMES[dtype]}-splits{splits}"


def _ids(cases):
    return [matrix_id(c.values if hasattr(c, "values") else c) for c in cases]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,HQ,HKV,SQ,SMAX,D,dtype,num_splits", MATRIX, ids=_ids(MATRIX))
def test_matches_reference_ragged(B, HQ, HKV, SQ, SMAX, D, dtype, num_splits, device):
    lens = ragged_lengths(B, SQ, SMAX, device)
    q, k, v, kd, vd = make_inputs(B, HQ, HKV, SQ, SMAX, D, dtype, device, lens)
    out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=num_splits, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, HQ, SQ) and lse.dtype == torch.float32
    check(out, lse, *ref64(q, k, v, cache_seqlens=lens), dtype)


@pytest.mark.interpreter
def test_every_split_count_agrees(device):
    B, HQ, HKV, SQ, SMAX, D = 3, 4, 1, 3, 300, 64
    lens = torch.tensor([300, 3, 131], dtype=torch.int32, device=device)
    q, k, v, kd, vd = make_inputs(B, HQ, HKV, SQ, SMAX, D, torch.float32, device, lens)
    ref_out, ref_lse = ref64(q, k, v, cache_seqlens=lens)
    one, one_lse = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=1, return_lse=True)
    # 64 is past the 5 tiles of the capacity: capped there, and most splits of the short rows are empty
    for splits in (2, 3, 64):
        out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=splits, return_lse=True)
        check(out, lse, ref_out, ref_lse, torch.float32)
        assert rel_err(out, one) < 1e-6, f"num_splits={splits} disagrees with num_splits=1"
        assert (lse[torch.isfinite(one_lse)] - one_lse[torch.isfinite(one_lse)]).abs().max() < 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("form", ["float", "rows", "batch_rows"])
def test_softmax_scale_forms(form, device):
    B, HQ, HKV, SQ, SMAX, D = 2, 4, 1, 3, 150, 64
    lens = ragged_lengths(B, SQ, SMAX, device)
    q, k, v, kd, vd = make_inputs(B, HQ, HKV, SQ, SMAX, D, torch.float32, device, lens)
    scale = {"float": 0.21,
             "rows": torch.rand(SQ, device=device) * 0.3 + 0.05,
             "batch_rows": torch.rand(B, SQ, device=device) * 0.3 + 0.05}[form]
    out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, softmax_scale=scale, num_splits=3, return_lse=True)
    scale64 = scale.double() if isinstance(scale, torch.Tensor) else scale
    check(out, lse, *ref64(q, k, v, cache_seqlens=lens, softmax_scale=scale64), torch.float32)


FEATURES = [
    # window, chunk, softcap, sinks, scale form, D, num_splits
    (7, None, None, False, None, 64, 1),
    (40, None, None, False, "rows", 64, 3),
    (None, 32, None, False, None, 64, 4),
    (None, None, 4.0, False, "heads", 64, 2),
    (None, None, None, True, None, 64, 1),
    (None, None, None, True, "head_rows", 64, 5),
    (50, 64, 6.0, True, "head_rows", 40, 3),
    (None, None, None, False, None, 80, 2),
    (9, None, None, True, None, 24, None),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("window,chunk,softcap,sinks,scale,D,num_splits", FEATURES,
                         ids=[f"w{w}-c{c}-cap{s}-sinks{k}-{f}-D{d}-splits{n}" for w, c, s, k, f, d, n in FEATURES])
def test_features_match_reference(window, chunk, softcap, sinks, scale, D, num_splits, device):
    """Windows (splits cover only the visible keys), chunks, soft-caps, sinks (added once, in the
    merge or the single split), per-head scales and padded head dims, on ragged caches."""
    B, HQ, HKV, SQ, SMAX = 3, 4, 2, 3, 200
    lens = torch.tensor([200, 3, 117], dtype=torch.int32, device=device)
    q, k, v, kd, vd = make_inputs(B, HQ, HKV, SQ, SMAX, D, torch.float32, device, lens)
    kw = dict(window=window, chunk=chunk, softcap=softcap)
    if sinks:
        kw["sinks"] = torch.randn(HQ, device=device) * 2
    if scale == "rows":
        kw["softmax_scale"] = torch.rand(B, SQ, device=device) * 0.2 + 0.05
    elif scale == "heads":
        kw["softmax_scale"] = torch.rand(HQ, device=device) * 0.2 + 0.05
    elif scale == "head_rows":
        kw["softmax_scale"] = torch.rand(B, HQ, SQ, device=device) * 0.2 + 0.05
    kw64 = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=num_splits, return_lse=True, **kw)
    check(out, lse, *ref64(q, k, v, cache_seqlens=lens, **kw64), torch.float32)
    one = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=1, **kw)
    assert rel_err(out, one) < 1e-6


@pytest.mark.interpreter
def test_window_decode_equals_prefill_rows(device):
    """A sliding-window decode step equals the last rows of a windowed causal prefill."""
    B, HQ, HKV, S, D, W = 2, 4, 2, 90, 32, 20
    q = torch.randn(B, HQ, S, D, device=device)
    k = torch.randn(B, HKV, S, D, device=device)
    v = torch.randn(B, HKV, S, D, device=device)
    full = drope.kernels.attention(q, k, v, window=W)
    step = decode_attention(q[:, :, -2:], k, v, window=W, num_splits=3)
    assert rel_err(step, full[:, :, -2:]) < 1e-5


@pytest.mark.interpreter
def test_strided_inputs(device):
    """HF layout caches (B, S, H, D) seen as (B, H, S, D), a cache sliced from a bigger buffer,
    a transposed q and int64 lengths taken with a stride."""
    B, HQ, HKV, SQ, SMAX, D = 2, 8, 2, 2, 120, 64
    lens64 = torch.tensor([[120, 0], [47, 0]], dtype=torch.int64, device=device)[:, 0]
    q, k, v, kd, vd = make_inputs(B, HQ, HKV, SQ, SMAX, D, torch.float16, device, lens64)
    big_v = torch.randn(B, HKV, SMAX + 9, D, dtype=torch.float16, device=device)
    big_v[:, :, :SMAX] = vd
    k_hf, v_view, q_t = noncontiguous(kd), big_v[:, :, :SMAX], noncontiguous(q)
    assert not (k_hf.is_contiguous() or v_view.is_contiguous() or q_t.is_contiguous() or lens64.is_contiguous())
    out, lse = decode_attention(q_t, k_hf, v_view, cache_seqlens=lens64, num_splits=2, return_lse=True)
    check(out, lse, *ref64(q, k, v, cache_seqlens=lens64), torch.float16)


@pytest.mark.interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
def test_full_cache_without_seqlens(num_splits, device):
    q, k, v, _, _ = make_inputs(2, 4, 2, 4, 90, 64, torch.float32, device, None)
    out, lse = decode_attention(q, k, v, num_splits=num_splits, return_lse=True)
    check(out, lse, *ref64(q, k, v), torch.float32)


@pytest.mark.interpreter
def test_heuristic_path_on_a_pretend_132_sm_device(monkeypatch, device):
    """num_splits=None with an SM count that makes the heuristic split (on CPU it reports one SM)."""
    calls = []
    real = dec.choose_num_splits

    def spy(*args, **kwargs):
        # one tile per split at least: Smax <= 300 keeps the interpreter fast but holds only 5 tiles
        calls.append(real(*args, **{**kwargs, "min_tiles_per_split": 1}))
        return calls[-1]

    monkeypatch.setattr(dec, "_num_sms", lambda _device: 132)
    monkeypatch.setattr(dec, "choose_num_splits", spy)
    lens = torch.tensor([300, 211], dtype=torch.int32, device=device)
    q, k, v, kd, vd = make_inputs(2, 4, 1, 1, 300, 64, torch.float16, device, lens)
    out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, return_lse=True)
    assert calls and calls[0] > 1, "the heuristic should split a 300-key cache read by 2 programs on 132 SMs"
    check(out, lse, *ref64(q, k, v, cache_seqlens=lens), torch.float16)


@pytest.mark.interpreter
def test_zero_length_rows_give_zeros(monkeypatch, device):
    """On CUDA, lengths are not range-checked (that would sync); a length below Sq leaves rows that
    see no key: zeros and LSE -inf, never NaN. The host-side range check is bypassed to get there on CPU."""
    real = interface.check_decode
    monkeypatch.setattr(interface, "check_decode", lambda *a, cache_seqlens, **kw: real(*a, cache_seqlens=None, **kw))
    SQ = 3
    lens = torch.tensor([0, 1, 40], dtype=torch.int32, device=device)
    q, k, v, kd, vd = make_inputs(3, 4, 2, SQ, 40, 64, torch.float32, device, lens)
    for splits in (1, 3):
        out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=splits, return_lse=True)
        assert not out.isnan().any() and not lse.isnan().any()
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
        # length 1 with Sq=3: rows 0 and 1 sit at negative positions, row 2 sees key 0 only
        assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2])) and torch.isneginf(lse[1, :, :2]).all()
        assert rel_err(out[1, :, 2], v[1].repeat_interleave(2, 0)[:, 0]) < 1e-6
        ref_out, ref_lse = ref64(q[2:], k[2:], v[2:], cache_seqlens=lens[2:])
        check(out[2:], lse[2:], ref_out, ref_lse, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_token_by_token_decode_equals_prefill_rows(num_splits, device):
    """Rows with prompts of different lengths decode 6 tokens each against a growing cache; every
    step equals the matching row of one causal prefill over the whole sequence."""
    B, HQ, HKV, D, STEPS = 2, 4, 2, 64, 6
    prompt = torch.tensor([37, 20])
    S = int(prompt.max()) + STEPS
    q = torch.randn(B, HQ, S, D, device=device)
    k = torch.randn(B, HKV, S, D, device=device)
    v = torch.randn(B, HKV, S, D, device=device)
    full = torch.stack([reference.attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double())[0]
                        for b in range(B)])
    k_cache = torch.full((B, HKV, S + 5, D), float("nan"), device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b in range(B):
        n = int(prompt[b])
        k_cache[b, :, :n], v_cache[b, :, :n] = k[b, :, :n], v[b, :, :n]
    for step in range(STEPS):
        pos = prompt + step
        for b in range(B):
            k_cache[b, :, pos[b]], v_cache[b, :, pos[b]] = k[b, :, pos[b]], v[b, :, pos[b]]
        q_step = torch.stack([q[b, :, pos[b]] for b in range(B)])[:, :, None]
        out = decode_attention(q_step, k_cache, v_cache, cache_seqlens=(pos + 1).to(torch.int32).to(device),
                               num_splits=num_splits)
        want = torch.stack([full[b, :, pos[b]] for b in range(B)])[:, :, None]
        assert rel_err(out, want) < TOL[torch.float32], f"step {step}"


def _chunks(S, size):
    return [(a, min(a + size, S)) for a in range(0, S, size)]


CHUNKED = [
    # B, HQ, HKV, S, chunk, D, dtype
    (1, 4, 2, 150, 64, 64, torch.float32),
    (1, 4, 1, 90, 33, 64, torch.float16),
    pytest.param(2, 16, 2, 3000, 64, 128, torch.bfloat16, marks=pytest.mark.gpu),
]


def chunked_id(c):
    B, HQ, HKV, S, C, D, dtype = c
    return f"B{B}-Hq{HQ}-Hkv{HKV}-S{S}-chunk{C}-D{D}-{DTYPE_NAMES[dtype]}"


@pytest.mark.interpreter
@pytest.mark.parametrize("B,HQ,HKV,S,chunk,D,dtype", CHUNKED,
                         ids=[chunked_id(c.values if hasattr(c, "values") else c) for c in CHUNKED])
def test_chunked_prefill_with_decode_kernel(B, HQ, HKV, S, chunk, D, dtype, device):
    """A prompt fed in chunks of <= 64 rows against its growing cache equals one full causal pass."""
    q = torch.randn(B, HQ, S, D, dtype=dtype, device=device)
    k = torch.randn(B, HKV, S, D, dtype=dtype, device=device)
    v = torch.randn(B, HKV, S, D, dtype=dtype, device=device)
    full = reference.attention(q.double(), k.double(), v.double())
    k_cache = torch.full((B, HKV, S + 7, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    outs = []
    for a, b in _chunks(S, chunk):
        k_cache[:, :, a:b], v_cache[:, :, a:b] = k[:, :, a:b], v[:, :, a:b]
        lens = torch.full((B,), b, dtype=torch.int32, device=device)
        outs.append(decode_attention(q[:, :, a:b], k_cache, v_cache, cache_seqlens=lens))
    assert rel_err(torch.cat(outs, dim=2), full) < TOL[dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,HQ,HKV,S,chunk,D,dtype", CHUNKED,
                         ids=[chunked_id(c.values if hasattr(c, "values") else c) for c in CHUNKED])
def test_chunked_prefill_with_attention_kernel(B, HQ, HKV, S, chunk, D, dtype, device):
    """The same with the main kernel (bottom-right causal, Sq < Sk), once it is in the checkout."""
    attention = getattr(drope.kernels, "attention", None)
    if attention is None:
        pytest.skip("drope.kernels.attention is not in this checkout yet (its commit is tagged [fwd-done])")
    q = torch.randn(B, HQ, S, D, dtype=dtype, device=device)
    k = torch.randn(B, HKV, S, D, dtype=dtype, device=device)
    v = torch.randn(B, HKV, S, D, dtype=dtype, device=device)
    full = reference.attention(q.double(), k.double(), v.double())
    outs = [attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal=True) for a, b in _chunks(S, chunk)]
    assert rel_err(torch.cat(outs, dim=2), full) < TOL[dtype]


def test_heuristic_short_live_length_does_not_split():
    assert choose_num_splits(100, 2, 132) == 1
    assert choose_num_splits(0, 2, 132) == 1


def test_heuristic_enough_programs_do_not_split():
    # 2 programs per SM fill 132 SMs at 264 programs; from 80 % of that on, splitting only adds a merge
    for seqlen in (4096, 1 << 20):
        assert choose_num_splits(seqlen, 240, 132) == 1
        assert choose_num_splits(seqlen, 4096, 132) == 1


@pytest.mark.parametrize("seqlen", [1000, 4096, 32768, 1 << 20])
@pytest.mark.parametrize("programs", [1, 8, 64, 200])
def test_heuristic_properties(seqlen, programs):
    block_n, min_tiles, sms, slots = 64, 4, 132, 264
    s = choose_num_splits(seqlen, programs, sms, block_n=block_n, min_tiles_per_split=min_tiles)
    tiles = -(-seqlen // block_n)
    assert 1 <= s <= 128
    assert s == 1 or tiles // s >= min_tiles, "each split keeps at least min_tiles_per_split tiles"
    if programs * 4 <= slots and tiles // min_tiles >= 2:
        assert s > 1, "a live length of several splits' worth, read by few programs, must be split"

    def efficiency(splits):
        waves = programs * splits / slots
        return waves / -(-programs * splits // slots)

    assert s == 1 or efficiency(s) > efficiency(1), "a split count above one must fill the waves better"


def test_heuristic_depends_on_live_length_not_capacity():
    """Same capacity, same programs: the answer moves with the live length it is given."""
    short, long = choose_num_splits(200, 4, 132), choose_num_splits(1 << 17, 4, 132)
    assert short == 1 and long > 8


@pytest.mark.parametrize("kwargs,expected", [
    ({}, 1000),                               # lengths are never read: the capacity (graph-safe)
    ({"max_seqlen": 50}, 50),                 # a caller's host hint lowers the bound
    ({"cache_seqlens": None}, 300),           # no lengths: every row is Smax long
    ({"window": 64}, 64),                     # a window bounds the keys any row sees
], ids=["cpu-lengths", "max_seqlen-hint", "no-lengths", "window"])
def test_launcher_feeds_capacities_to_the_heuristic(monkeypatch, kwargs, expected):
    seen = []
    monkeypatch.setattr(dec, "choose_num_splits", lambda max_seqlen, *a, **kw: seen.append(max_seqlen) or 1)
    q = torch.randn(2, 4, 1, 64)
    k = torch.randn(2, 2, 1000, 64)
    lens = torch.tensor([300, 37], dtype=torch.int32)
    call = {"cache_seqlens": lens, **kwargs}
    if call["cache_seqlens"] is None:
        k = k[:, :, :300]
    with recording() as launches:
        decode_attention(q, k, k, **call)
    assert seen == [expected] and [launch.role for launch in launches] == ["attention"]


def test_grid_and_splits_do_not_depend_on_the_lengths(monkeypatch):
    """Contract (graph-safe decode): one launch configuration for any cache_seqlens values."""
    monkeypatch.setattr(dec, "_num_sms", lambda _device: 132)
    q = torch.randn(1, 8, 1, 64)
    k = torch.randn(1, 2, 4096, 64)
    grids = set()
    for lens in ([1], [100], [4096]):
        with recording() as launches:
            decode_attention(q, k, k, cache_seqlens=torch.tensor(lens, dtype=torch.int32))
        grids.add(tuple((launch.grid, launch.args["NUM_SPLITS"]) for launch in launches))
    assert len(grids) == 1 and next(iter(grids))[0][1] > 1


def _qkv(B=2, HQ=4, HKV=2, SQ=2, SMAX=16, D=64, dtype=torch.float32):
    return (torch.randn(B, HQ, SQ, D, dtype=dtype), torch.randn(B, HKV, SMAX, D, dtype=dtype),
            torch.randn(B, HKV, SMAX, D, dtype=dtype))


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(cache_seqlens=torch.tensor([16, 1], dtype=torch.int32)), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([17, 5], dtype=torch.int32)), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([16.0, 5.0])), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([16, 5, 5], dtype=torch.int32)), "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=[16, 5]), "cache_seqlens"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :8]), "k_cache and v_cache"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), "head dim"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :1].expand(2, 3, 16, 64).contiguous(),
                        v_cache=a["v_cache"][:, :1].expand(2, 3, 16, 64).contiguous()), "Hq"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), "batch"),
    (lambda a: a.update(q=a["q"][0]), "q must be 4-D"),
    (lambda a: a.update(q=a["q"].double(), k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double()), "dtype"),
    (lambda a: a.update(v_cache=a["v_cache"].half()), "dtype"),
    (lambda a: a.update(softmax_scale=torch.ones(3)), "softmax_scale"),
    (lambda a: a.update(softmax_scale="0.1"), "softmax_scale"),
    (lambda a: a.update(num_splits=0), "num_splits"),
    (lambda a: a.update(num_splits=True), "num_splits"),
    (lambda a: a.update(num_splits=2.0), "num_splits"),
    (lambda a: a.update(max_seqlen=1), "max_seqlen"),
    (lambda a: a.update(max_seqlen=17), "max_seqlen"),
    (lambda a: a.update(max_seqlen=8.0), "max_seqlen"),
    (lambda a: a.update(window=0), "window"),
    (lambda a: a.update(chunk=1.5), "chunk"),
    (lambda a: a.update(sinks=torch.zeros(3)), "sinks"),
    (lambda a: a.update(softcap=-1.0), "softcap"),
    (lambda a: a.update(softmax_scale=-0.5), "softmax_scale"),
], ids=["len-below-Sq", "len-above-Smax", "len-float", "len-shape", "len-list", "kv-shape", "D-mismatch",
        "Hq-not-multiple", "batch-mismatch", "q-rank", "float64", "mixed-dtypes", "scale-shape", "scale-type",
        "splits-zero", "splits-bool", "splits-float", "max_seqlen-below-Sq", "max_seqlen-above-Smax",
        "max_seqlen-float", "window-zero", "chunk-float", "sinks-shape", "softcap-negative", "scale-negative"])
def test_bad_input_raises_value_error(change, match):
    q, k, v = _qkv()
    args = {"q": q, "k_cache": k, "v_cache": v, "cache_seqlens": torch.tensor([16, 5], dtype=torch.int32)}
    change(args)
    with pytest.raises(ValueError, match=match):
        decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)


@pytest.mark.parametrize("max_seqlen", [1, 17, 8.0, True], ids=["below-Sq", "above-Smax", "float", "bool"])
def test_reference_rejects_the_same_max_seqlen(max_seqlen):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="max_seqlen"):
        reference.decode_attention(q, k, v, max_seqlen=max_seqlen)
    assert reference.decode_attention(q, k, v, max_seqlen=16).shape == q.shape


def test_requires_grad_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="inference-only"):
        decode_attention(q.requires_grad_(), k, v)


def test_cpu_tensors_without_interpreter_run_the_torch_kernels(monkeypatch):
    """What a CPU user gets without Triton's interpreter: drope's exact PyTorch kernels, not an error."""
    from drope.kernels import ops

    monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")
    q, k, v = _qkv()
    lens = torch.tensor([k.shape[2], k.shape[2] - 3][:q.shape[0]], dtype=torch.int32)
    out = decode_attention(q, k, v, cache_seqlens=lens)
    ref = reference.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=lens)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.interpreter
def test_empty_shapes(device):
    q, k, v = (t.to(device) for t in _qkv(SQ=0))
    out, lse = decode_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 0, 64) and lse.shape == (2, 4, 0)
    q, k, v = (t.to(device) for t in _qkv(B=0))
    assert decode_attention(q, k, v, cache_seqlens=torch.zeros(0, dtype=torch.int32, device=device)).shape == (0, 4, 2, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("SQ", [1, 5, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_gpu_matrix(dtype, D, G, SQ, num_splits):
    B, HKV, SMAX = 4, 4, 4096
    lens = ragged_lengths(B, SQ, SMAX, "cuda")
    q, k, v, kd, vd = make_inputs(B, HKV * G, HKV, SQ, SMAX, D, dtype, "cuda", lens)
    out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, num_splits=num_splits, return_lse=True,
                                max_seqlen=SMAX)
    check(out, lse, *ref64(q, k, v, cache_seqlens=lens), dtype)


@pytest.mark.gpu
def test_gpu_million_token_cache_int64_addressing():
    """Caches of 2 x 16 heads x (2**20 + 64) positions x D=128: element offsets pass 2**31, so any
    32-bit product of batch/head/position strides would read the wrong place."""
    B, HKV, G, SMAX, D, dtype = 2, 16, 2, (1 << 20) + 64, 128, torch.bfloat16
    torch.cuda.empty_cache()
    k = torch.randn(B, HKV, SMAX, D, dtype=dtype, device="cuda")
    v = torch.randn(B, HKV, SMAX, D, dtype=dtype, device="cuda")
    assert k.numel() > 2 ** 32
    q = torch.randn(B, HKV * G, 1, D, dtype=dtype, device="cuda")
    lens = torch.tensor([SMAX - 5, SMAX], dtype=torch.int32, device="cuda")
    for kwargs in ({"max_seqlen": SMAX}, {}, {"num_splits": 1}):
        out = decode_attention(q, k, v, cache_seqlens=lens, **kwargs)
        assert not out.isnan().any()
        for b, hkv in ((0, 0), (1, HKV - 1), (1, HKV // 2)):
            n = int(lens[b])
            heads = slice(hkv * G, (hkv + 1) * G)
            want = reference.decode_attention(q[b:b + 1, heads].double(), k[b:b + 1, hkv:hkv + 1, :n].double(),
                                              v[b:b + 1, hkv:hkv + 1, :n].double())
            assert rel_err(out[b:b + 1, heads], want) < TOL[dtype], f"{kwargs} b={b} hkv={hkv}"
    del k, v
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_big_batch():
    B, HQ, HKV, SQ, SMAX, D, dtype = 96, 32, 8, 1, 2048, 128, torch.bfloat16
    lens = ragged_lengths(B, SQ, SMAX, "cuda")
    q, k, v, kd, vd = make_inputs(B, HQ, HKV, SQ, SMAX, D, dtype, "cuda", lens)
    out, lse = decode_attention(q, kd, vd, cache_seqlens=lens, return_lse=True)
    for a in range(0, B, 16):
        sl = slice(a, a + 16)
        check(out[sl], lse[sl], *ref64(q[sl], k[sl], v[sl], cache_seqlens=lens[sl]), dtype)


@pytest.mark.gpu
def test_gpu_no_device_sync_with_max_seqlen_hint():
    B, HQ, HKV, SMAX, D = 2, 8, 2, 8192, 128
    lens = torch.tensor([8000, 100], dtype=torch.int32, device="cuda")
    q, k, v, _, _ = make_inputs(B, HQ, HKV, 1, SMAX, D, torch.bfloat16, "cuda", None)
    scale = torch.rand(B, 1, device="cuda") + 0.05
    decode_attention(q, k, v, cache_seqlens=lens, softmax_scale=scale, max_seqlen=8000)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = decode_attention(q, k, v, cache_seqlens=lens, softmax_scale=scale, max_seqlen=8000)
        out2 = decode_attention(q, k, v, cache_seqlens=lens, softmax_scale=scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = reference.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=lens,
                                     softmax_scale=scale.double())
    assert rel_err(out, ref) < TOL[torch.bfloat16] and rel_err(out2, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_zero_length_rows():
    lens = torch.tensor([0, 9], dtype=torch.int32, device="cuda")
    q, k, v, _, _ = make_inputs(2, 4, 2, 1, 64, 64, torch.bfloat16, "cuda", None)
    out, lse = decode_attention(q, k, v, cache_seqlens=lens, num_splits=3, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    ref = reference.decode_attention(q[1:].double(), k[1:].double(), v[1:].double(), cache_seqlens=lens[1:])
    assert rel_err(out[1:], ref) < TOL[torch.bfloat16]
