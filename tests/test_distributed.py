"""Context parallelism (``drope.distributed``) on real gloo process groups of 2 and 3 ranks.

Each group is started once per module (``cp_worker.run_ranks``: one process per rank, file rendezvous, kernels in
Triton's interpreter, every process and the whole run bounded by a deadline) and runs every case of its list; the
tests below check each case's results against ``drope.reference`` in float64 on the full sequence: outputs, LSE,
the gradients of every shard (rows of the full gradients) and of the norm weights and sinks (the ranks' shares sum
to the full gradient), decode over caches sharded with different live lengths, the number and size of the
collectives, error cases (raised on every rank, never a hang), and ``torch.compile(fullgraph=True)``.
``merge_attention_states`` and the errors without a process group run in this process.
"""

from __future__ import annotations

import pytest
import torch

import drope.distributed as dd
from cp_worker import run_ranks
from drope import reference
from drope.distributed.balance import balance, collective_bytes, forward_tiles, rank_tiles
from drope.distributed.collectives import SIG_LEN
from helpers import rel_err

pytestmark = pytest.mark.interpreter

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DECODE_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rows_of(S: int, W: int, r: int, layout: str) -> list:
    """Global rows of rank r, written out independently of drope.distributed.layout."""
    if layout == "contiguous":
        n = S // W
        return list(range(r * n, (r + 1) * n))
    c = S // (2 * W)
    return list(range(r * c, (r + 1) * c)) + list(range((2 * W - 1 - r) * c, (2 * W - r) * c))


def assemble(parts, W: int, layout: str, dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's rows along ``dim``."""
    S = sum(p.shape[dim] for p in parts)
    shape = list(parts[0].shape)
    shape[dim] = S
    full = parts[0].new_full(shape, float("nan"))
    for r, p in enumerate(parts):
        full.index_copy_(dim, torch.tensor(rows_of(S, W, r, layout)), p)
    return full


# ---------------------------------------------------------------- case lists (options; tensors made per run)

def P(W, layout="headtail", B=1, HQ=2, HKV=1, S=None, D=16, dtype=torch.float32, causal=True, window=None, chunk=None,
      softcap=None, sinks=False, qw=None, kw=None, scale=None, grad_kv=True, docs=False):
    S = S or 16 * W
    spec = dict(kind="prefill", W=W, layout=layout, B=B, HQ=HQ, HKV=HKV, S=S, D=D, dtype=dtype, causal=causal,
                window=window, chunk=chunk, softcap=softcap, sinks=sinks, qw=qw, kw=kw, scale=scale, grad_kv=grad_kv,
                docs=docs)
    parts = [f"W{W}", layout, f"B{B}-Hq{HQ}-Hkv{HKV}-S{S}-D{D}", SHORT[dtype]] + (["noncausal"] if not causal else [])
    parts += [f"{n}{spec[n]}" for n in ("window", "chunk", "softcap") if spec[n] is not None]
    parts += [f"{n}-{spec[n]}" for n in ("qw", "kw", "scale") if spec[n] is not None]
    parts += (["sinks"] if sinks else []) + ([] if grad_kv else ["q-grad-only"]) + (["docs"] if docs else [])
    spec["name"] = "-".join(parts)
    return spec


PREFILL_2 = [
    P(2),
    P(2, B=2, qw="head", kw="shared", scale="rows", softcap=5.0, window=6, sinks=True),
    P(2, HQ=4, HKV=1, D=32, chunk=12, sinks=True, scale="row1"),
    P(2, layout="contiguous", window=10, qw="shared", kw="head"),
    P(2, causal=False, HQ=2, HKV=2, sinks=True, scale="head", softcap=4.0),
    P(2, dtype=torch.float16, qw="head", kw="head", scale="rows"),
    P(2, dtype=torch.bfloat16, window=9, grad_kv=False),
    P(2, docs=True, window=5, sinks=True, qw="head", scale="rows"),
    P(2, docs=True, layout="contiguous", causal=False, kw="shared"),
]
PREFILL_3 = [
    P(3, HQ=4, HKV=2, window=20, chunk=16, sinks=True, softcap=6.0, qw="head", kw="shared", scale="rows"),
    P(3, layout="contiguous", causal=False, scale="float", qw="head"),
    P(3, docs=True, chunk=6, kw="head", softcap=5.0),
    P(3, docs=True, causal=False, sinks=True),
]


def Dc(W, lens, smax, B=None, HQ=4, HKV=2, SQ=1, D=16, dtype=torch.float32, window=None, chunk=None, softcap=None,
       sinks=False, scale=None):
    B = len(lens[0])
    spec = dict(kind="decode", W=W, lens=lens, smax=smax, B=B, HQ=HQ, HKV=HKV, SQ=SQ, D=D, dtype=dtype, window=window,
                chunk=chunk, softcap=softcap, sinks=sinks, scale=scale)
    parts = [f"W{W}-decode-B{B}-Hq{HQ}-Hkv{HKV}-Sq{SQ}-D{D}", SHORT[dtype], "lens" + "_".join(
        ",".join(map(str, r)) for r in lens)]
    parts += [f"{n}{spec[n]}" for n in ("window", "chunk", "softcap", "scale") if spec[n] is not None]
    spec["name"] = "-".join(parts + (["sinks"] if sinks else []))
    return spec


DECODE_2 = [
    Dc(2, lens=[[12, 0, 16], [5, 9, 0]], smax=[16, 12]),
    Dc(2, lens=[[12, 3, 16], [5, 9, 1]], smax=[16, 12], window=7, chunk=8, softcap=5.0, sinks=True, scale="rows"),
    # full first shards (no free slot): the queries' own keys straddle the ranks
    Dc(2, lens=[[16, 16, 10], [1, 4, 0]], smax=[16, 8], SQ=3),
    Dc(2, lens=[[16, 7], [2, 9]], smax=[16, 12], SQ=3, HQ=4, HKV=1, window=5, chunk=6, sinks=True, dtype=torch.float16),
]
DECODE_3 = [
    Dc(3, lens=[[10, 0], [0, 7], [6, 5]], smax=[10, 8, 8]),
    Dc(3, lens=[[10, 9], [2, 0], [1, 4]], smax=[12, 4, 6], SQ=4, window=6, sinks=True, scale="rows"),
]
LAYOUT_2 = [dict(kind="layout", W=2, name="layout-W2-headtail-dim2", layout="headtail", dim=2, shape=(2, 3, 16, 4)),
            dict(kind="layout", W=2, name="layout-W2-contiguous-dim-1", layout="contiguous", dim=-1,
                 shape=(2, 3, 4, 8))]
LAYOUT_3 = [dict(kind="layout", W=3, name="layout-W3-headtail-dim1", layout="headtail", dim=1, shape=(2, 12, 5))]


# ---------------------------------------------------------------- inputs and references

def make(spec) -> dict:
    """The spec with fresh random tensors (full sequences; the workers cut their rows)."""
    case = dict(spec)
    if spec["kind"] == "prefill":
        B, HQ, HKV, S, D = (spec[n] for n in ("B", "HQ", "HKV", "S", "D"))
        case.update(q=torch.randn(B, HQ, S, D), k=torch.randn(B, HKV, S, D), v=torch.randn(B, HKV, S, D),
                    dout=torch.randn(B, HQ, S, D), dlse=torch.randn(B, HQ, S), grad_k=spec["grad_kv"],
                    grad_v=spec["grad_kv"])
        for n, H in (("qw", HQ), ("kw", HKV)):
            case[n] = {None: None, "head": torch.rand(H, D) + 0.5, "shared": torch.rand(D) + 0.5}[spec[n]]
        case["sinks"] = torch.randn(HQ) if spec["sinks"] else None
        case["scale"] = {None: None, "float": 0.3, "rows": torch.rand(B, HQ, S) * 0.4 + 0.1,
                         "row1": torch.rand(B, 1, S) * 0.4 + 0.1, "head": torch.rand(HQ) * 0.4 + 0.1}[spec["scale"]]
        case["kwargs"] = {n: spec[n] for n in ("causal", "window", "chunk", "softcap")}
        if spec["docs"]:
            # random documents, one of them empty, boundaries falling anywhere in the rank's chunks
            cuts = sorted(torch.randperm(S - 1)[:4].add(1).tolist())
            case["cu"] = torch.tensor([0, *cuts, cuts[-1], S], dtype=torch.int32)
    elif spec["kind"] == "decode":
        B, HQ, HKV, SQ, D, W = (spec[n] for n in ("B", "HQ", "HKV", "SQ", "D", "W"))
        case["q"] = torch.randn(B, HQ, SQ, D)
        ks, vs, lens = [], [], []
        for r in range(W):
            n = torch.tensor(spec["lens"][r])
            dead = (torch.arange(spec["smax"][r])[None, :] >= n[:, None])[:, None, :, None]
            # slots past a shard's live length hold NaN: they must never be read
            ks.append(torch.randn(B, HKV, spec["smax"][r], D).masked_fill(dead, float("nan")))
            vs.append(torch.randn(B, HKV, spec["smax"][r], D).masked_fill(dead, float("nan")))
            lens.append(n.to(torch.int32))
        case.update(k_caches=ks, v_caches=vs, lens=lens, sinks=torch.randn(HQ) if spec["sinks"] else None,
                    scale=torch.rand(B, HQ, SQ) * 0.4 + 0.1 if spec["scale"] == "rows" else None,
                    kwargs={n: spec[n] for n in ("window", "chunk", "softcap")})
    elif spec["kind"] == "layout":
        case.update(x=torch.randn(*spec["shape"]), w=torch.randn(*spec["shape"]))
    return case


def reference_prefill(case):
    dt = case["dtype"]
    q, k, v = (case[n].to(dt).double().requires_grad_() for n in "qkv")
    extra = {n: None if case[n] is None else case[n].double().requires_grad_() for n in ("qw", "kw", "sinks")}
    scale = case["scale"].double() if isinstance(case["scale"], torch.Tensor) else case["scale"]
    out, lse = reference.attention(q, k, v, softmax_scale=scale, q_norm_weight=extra["qw"], k_norm_weight=extra["kw"],
                                   sinks=extra["sinks"], cu_seqlens=case.get("cu"), return_lse=True, **case["kwargs"])
    ((out * case["dout"].double()).sum() + (lse * case["dlse"].double()).sum()).backward()
    grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    grads.update({"d" + n: None if t is None else t.grad for n, t in extra.items()})
    return out.detach(), lse.detach(), grads


def global_cache(case):
    """The global cache of a decode case: the ranks' live slots concatenated per batch row, and its lengths."""
    W, B = case["W"], case["B"]
    total = sum(case["lens"][r] for r in range(W)).long()
    K = torch.zeros(B, case["HKV"], int(total.max()), case["D"], dtype=torch.float64)
    V = torch.zeros_like(K)
    for b in range(B):
        ks = [case["k_caches"][r][b, :, :case["lens"][r][b]] for r in range(W)]
        vs = [case["v_caches"][r][b, :, :case["lens"][r][b]] for r in range(W)]
        K[b, :, :total[b]] = torch.cat(ks, 1).to(case["dtype"]).double()
        V[b, :, :total[b]] = torch.cat(vs, 1).to(case["dtype"]).double()
    return K, V, total


def lse_close(lse, ref, tol):
    same_inf = torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    return same_inf and bool(((lse.double() - ref)[finite].abs() <= tol).all())


# ---------------------------------------------------------------- the group

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One group of 3 ranks runs every case: the 2-rank ones on the subgroup of ranks 0 and 1 (``group=``), the error
    cases on the default group. One start-up (each process imports torch and Triton: ~4 s) for the whole module."""
    compiled = make(P(2, window=6))
    g = make(Dc(2, lens=[[9, 16], [6, 3]], smax=[16, 8]))
    compiled.update(kind="compiled", name="compiled", qw=torch.rand(2, 16) + 0.5, qd=g["q"],
                    k_caches=g["k_caches"], v_caches=g["v_caches"], lens=g["lens"], decode=g)
    cases = ([make(s) for s in PREFILL_3 + DECODE_3 + LAYOUT_3 + PREFILL_2 + DECODE_2 + LAYOUT_2]
             + [compiled, dict(kind="errors", name="errors")])
    results = run_ranks(tmp_path_factory.mktemp("cp"), 3, cases)
    return {c["name"]: c for c in cases}, results


def result(results, name, r):
    res = results[r][name]
    assert "raised" not in res, f"rank {r}: {res.get('raised')}"
    return res


# ---------------------------------------------------------------- prefill

@pytest.mark.parametrize("spec", PREFILL_2 + PREFILL_3, ids=lambda s: s["name"])
def test_attention_rows_and_gradients_match_the_full_sequence(ranks, spec):
    cases, results = ranks
    case, W, layout, dt = cases[spec["name"]], spec["W"], spec["layout"], spec["dtype"]
    res = [result(results, spec["name"], r) for r in range(W)]
    ref_out, ref_lse, ref_grads = reference_prefill(case)
    tol = TOL[dt]
    assert rel_err(assemble([x["out"] for x in res], W, layout), ref_out) < tol
    lse = assemble([x["lse"] for x in res], W, layout)
    assert rel_err(lse, ref_lse) < tol
    for name in ("dq", "dk", "dv"):
        if name != "dq" and not spec["grad_kv"]:
            assert all(x[name] is None for x in res)
            continue
        got = assemble([x[name] for x in res], W, layout)
        assert got.dtype == dt and rel_err(got, ref_grads[name]) < tol, name
    for name in ("dqw", "dkw", "dsinks"):
        if ref_grads[name] is None:
            continue
        # each rank holds its share: the all-reduce over the context group gives the full gradient
        share_sum = sum(x[name] for x in res)
        assert rel_err(share_sum, ref_grads[name]) < tol, name
        assert rel_err(res[0][name], ref_grads[name]) > tol, f"{name}: rank 0 holds the whole gradient, not a share"


@pytest.mark.parametrize("spec", PREFILL_2 + PREFILL_3, ids=lambda s: s["name"])
def test_attention_collectives(ranks, spec):
    """Forward: the signature check and ONE K/V all-gather (every rank's K and V, W x the local bytes). Backward: the
    K/V all-gather again and ONE fp32 reduce-scatter of dK/dV (none when neither k nor v needs a gradient)."""
    cases, results = ranks
    W, B, HKV, S, D = (spec[n] for n in ("W", "B", "HKV", "S", "D"))
    kv = ("all_gather", S * 2 * B * HKV * D, str(spec["dtype"]))
    for r in range(W):
        res = result(results, spec["name"], r)
        fwd = [(n.split("_into")[0].replace("_single", ""), numel, dtype) for n, numel, dtype in res["fwd"]]
        bwd = [(n.split("_tensor")[0].split("_into")[0].replace("_single", ""), numel, dtype)
               for n, numel, dtype in res["bwd"]]
        assert fwd == [("all_gather", W * (1 + SIG_LEN), "torch.float64"), kv]
        rs = [("reduce_scatter", S // W * 2 * B * HKV * D, "torch.float32")] if spec["grad_kv"] else []
        assert bwd == [kv] + rs


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("spec", DECODE_2 + DECODE_3, ids=lambda s: s["name"])
def test_decode_over_a_sharded_cache(ranks, spec):
    cases, results = ranks
    case, W, dt = cases[spec["name"]], spec["W"], spec["dtype"]
    K, V, total = global_cache(case)
    q = case["q"].to(dt).double()
    scale = None if case["scale"] is None else case["scale"].double()
    sinks = None if case["sinks"] is None else case["sinks"].double()
    ref_out, ref_lse = reference.decode_attention(q, K, V, cache_seqlens=total, softmax_scale=scale, sinks=sinks,
                                                  return_lse=True, **case["kwargs"])
    res = [result(results, spec["name"], r) for r in range(W)]
    for r, x in enumerate(res):
        assert x["out"].dtype == dt and not x["out"].isnan().any(), f"rank {r}"
        assert rel_err(x["out"], ref_out) < DECODE_TOL[dt], f"rank {r}"
        assert lse_close(x["lse"], ref_lse, DECODE_TOL[dt]), f"rank {r}"
        assert torch.equal(x["out"], res[0]["out"]) and torch.equal(x["lse"], res[0]["lse"])
        # signature check, the lengths (only when positions matter), one (out, lse) all-gather
        sizes = [numel for _, numel, _ in x["calls"]]
        B, HQ, SQ, D = q.shape
        lengths = [W * B] if SQ > 1 or spec["window"] or spec["chunk"] else []
        assert sizes == [W * (1 + SIG_LEN)] + lengths + [W * B * HQ * SQ * (D + 1)]
        assert all(name.startswith("all_gather") for name, _, _ in x["calls"])


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("spec", LAYOUT_2 + LAYOUT_3, ids=lambda s: s["name"])
def test_shard_unshard_positions(ranks, spec):
    W = spec["W"]
    cases, results = ranks
    case = cases[spec["name"]]
    dim = spec["dim"] % len(spec["shape"])
    S = spec["shape"][dim]
    for r in range(W):
        res = result(results, spec["name"], r)
        rows = torch.tensor(rows_of(S, W, r, spec["layout"]))
        assert torch.equal(res["part"], case["x"].index_select(dim, rows))
        assert torch.equal(res["positions"], rows)
        assert torch.equal(res["full"], case["x"])
        # d/dx_local of sum_r (r + 1) * <w, unshard(x)>: the sum over ranks (a reduce-scatter) of the rows of w
        assert torch.allclose(res["grad"], case["w"].index_select(dim, rows) * (W * (W + 1) / 2))
        assert [n.split("_")[0] for n, _, _ in res["calls"]] == ["all", "all"]
        assert [n.split("_")[0] for n, _, _ in res["bwd"]] == ["reduce"]


# ---------------------------------------------------------------- compile

def test_compile_fullgraph_traces_prefill_and_decode(ranks):
    """torch.compile(fullgraph=True, backend="aot_eager") on a gloo group (fullgraph: one graph or an error), the same
    collectives as eager, results equal to the reference (prefill with its backward, decode)."""
    cases, results = ranks
    case = dict(cases["compiled"], scale=None, sinks=None, kw=None)
    ref_out, ref_lse, grads = reference_prefill(case)
    res = [result(results, "compiled", r) for r in range(2)]
    assert rel_err(assemble([x["out"] for x in res], 2, "headtail"), ref_out) < TOL[torch.float32]
    assert rel_err(assemble([x["lse"] for x in res], 2, "headtail"), ref_lse) < TOL[torch.float32]
    for name in ("dq", "dk", "dv"):
        assert rel_err(assemble([x[name] for x in res], 2, "headtail"), grads[name]) < TOL[torch.float32]
    assert rel_err(res[0]["dqw"] + res[1]["dqw"], grads["dqw"]) < TOL[torch.float32]
    assert all(len(x["fwd"]) == 2 and len(x["bwd"]) == 2 and len(x["dec_calls"]) == 3 for x in res)
    dec = case["decode"]
    K, V, total = global_cache(dec)
    ref = reference.decode_attention(dec["q"].double(), K, V, cache_seqlens=total, window=6, return_lse=True)
    for x in res:
        assert rel_err(x["dec_out"], ref[0]) < DECODE_TOL[torch.float32]
        assert lse_close(x["dec_lse"], ref[1], DECODE_TOL[torch.float32])


# ---------------------------------------------------------------- errors

ERRORS = {  # sub-case: (what ranks 0 and 2 report, what rank 1 reports); "x|y": both words must appear
    "shape_mismatch": ("differ|D", "differ|D"),
    "odd_rows": ("head-tail", "head-tail"),
    "bad_on_one_rank": ("rejected", "q_norm_weight"),
    "layout_mismatch": ("differ|layout", "differ|layout"),
    "decode_mismatch": ("differ|Sq", "differ|Sq"),
    "unshard_mismatch": ("differ|x_local.shape[2]", "differ|x_local.shape[2]"),
    "op_mismatch": ("different operations", "different operations"),
    "cu_seqlens": ("cu_seqlens|S=24", "cu_seqlens|S=24"),
    "documents_mismatch": ("differ|cu_seqlens (checksum)", "differ|cu_seqlens (checksum)"),
    "decode_grad": ("inference-only", "inference-only"),
    "decode_lengths": ("rejected", "cache_seqlens"),
    "shard_not_divisible": ("x:|S % 6", "x:|S % 6"),
    "positions_not_divisible": ("seq_len", "seq_len"),
    "bad_layout": ("layout", "layout"),
}


@pytest.mark.parametrize("sub", list(ERRORS))
def test_errors_raise_on_every_rank(ranks, sub):
    """Every rank of a 3-rank group raises ValueError (the rank at fault names the argument; the others say which
    rank rejected its input or what differs) and the group stays usable: no rank is left waiting in a collective."""
    _, results = ranks
    for r in range(3):
        res = result(results, "errors", r)
        kind, message = res[sub]
        assert kind in ("ValueError", "DeviceError"), f"rank {r}: {kind}: {message}"
        for word in ERRORS[sub][r == 1].split("|"):
            assert word in message, f"rank {r}: {message!r} lacks {word!r}"
        assert res["after"] == [0.0, 1.0, 2.0, 2.0, 1.0, 0.0]  # head-tail: rank r holds chunks r and 5 - r


def test_every_function_needs_a_process_group():
    q = torch.randn(1, 2, 8, 16)
    calls = [lambda: dd.attention(q, q, q),
             lambda: dd.decode_attention(q[:, :, :1], q, q, cache_seqlens=torch.tensor([8])),
             lambda: dd.shard(q), lambda: dd.unshard(q), lambda: dd.positions(8)]
    for call in calls:
        with pytest.raises(ValueError, match="group"):
            call()


# ---------------------------------------------------------------- merge (no group)

def _split_keys(q, k, v, parts: int, *, empty_row: bool):
    """Random disjoint key sets (key masks), each attended alone in float64 (non-causal)."""
    B, _, SK, _ = k.shape
    owner = torch.randint(0, parts, (B, SK))
    if empty_row:
        owner[0] = parts  # batch row 0 sees no key in any set
    outs, lses = [], []
    for i in range(parts):
        o, m = reference.attention(q, k, v, causal=False, key_mask=owner == i, return_lse=True)
        outs.append(o)
        lses.append(m)
    return outs, lses, owner < parts


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_merge_equals_attention_over_the_union(parts):
    q, k, v = torch.randn(2, 3, 5, 8).double(), torch.randn(2, 3, 40, 8).double(), torch.randn(2, 3, 40, 8).double()
    outs, lses, seen = _split_keys(q, k, v, parts, empty_row=True)
    out, lse = dd.merge_attention_states(outs, lses)
    ref, ref_lse = reference.attention(q, k, v, causal=False, key_mask=seen, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12
    assert lse_close(lse, ref_lse, 1e-12)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()  # no key anywhere: zeros, -inf


def test_merge_of_far_apart_states_does_not_overflow():
    outs = [torch.randn(1, 2, 3, 4) for _ in range(3)]
    lses = [torch.full((1, 2, 3), 1e4), torch.full((1, 2, 3), -1e4), torch.tensor([[[0.0, float("-inf"), 50.0]] * 2])]
    out, lse = dd.merge_attention_states(outs, lses)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and lse.dtype == torch.float32
    assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0])
    # equal lses: the mean, and log(3) above
    out, lse = dd.merge_attention_states(outs, [torch.full((1, 2, 3), 88.0)] * 3)
    assert torch.allclose(out, sum(outs) / 3, atol=1e-6) and torch.allclose(lse, torch.full_like(lse, 88 + 1.0986123))


def test_merge_keeps_low_precision_outputs_and_fp32_lse():
    q, k, v = torch.randn(1, 2, 4, 16).double(), torch.randn(1, 2, 30, 16).double(), torch.randn(1, 2, 30, 16).double()
    outs, lses, _ = _split_keys(q, k, v, 3, empty_row=False)
    out, lse = dd.merge_attention_states([o.to(torch.bfloat16) for o in outs], [m.float() for m in lses])
    ref = reference.attention(q, k, v, causal=False)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2


def test_merge_rejects_bad_lists():
    o, m = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    for outs, lses, word in (([], [], "outs"), ([o], [], "lses"), ([o, o], [m, m[..., :2]], "lses[1]"),
                             ([o, o[..., :2]], [m, m], "outs[1]"), ([o], [m.int()], "lses[0]")):
        with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
            dd.merge_attention_states(outs, lses)


# ---------------------------------------------------------------- work balance (arithmetic, no group)

def _realistic(S0: int, W: int, block: int = 128) -> int:
    """The multiple of 2W query blocks nearest S0 (a length every layout and tile splits evenly)."""
    step = 2 * W * block
    return max(step, round(S0 / step) * step)


@pytest.mark.parametrize("tile", [(128, 64), (128, 128), (64, 64)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_head_tail_balances_causal_work_across_ranks(tile):
    """From the forward kernel's tile counts: head-tail keeps every rank within 1.05x of the mean for W = 2..8 at
    128k..1M positions, contiguous shards cost the last rank about (2W - 1) / W times the mean."""
    for S0 in (131072, 262144, 524288, 1048576):
        for W in range(2, 9):
            S = _realistic(S0, W)
            kw = dict(block_m=tile[0], block_n=tile[1])
            assert balance(S, W, "headtail", **kw) <= 1.05, (S, W)
            assert balance(S, W, "headtail", window=4096, **kw) <= 1.05, (S, W)
            assert balance(S, W, "contiguous", **kw) == pytest.approx((2 * W - 1) / W, rel=0.01), (S, W)


@pytest.mark.parametrize("layout", ["headtail", "contiguous"])
@pytest.mark.parametrize("opts", [dict(), dict(window=700), dict(chunk=1000), dict(causal=False)],
                         ids=["causal", "window", "chunk", "noncausal"])
def test_ranks_do_no_more_tiles_than_one_device(layout, opts):
    """Runs cut at multiples of the query block: the ranks' tiles add up to the single-device call's."""
    S, W = 6 * 2 * 128, 6
    assert sum(rank_tiles(S, W, layout, **opts)) == forward_tiles(S, S, **opts)


@pytest.mark.parametrize("opts", [dict(), dict(window=5), dict(chunk=7), dict(window=9, chunk=6), dict(causal=False)],
                         ids=["causal", "window", "chunk", "window-chunk", "noncausal"])
def test_forward_tiles_follow_the_visible_keys(opts):
    """Against a count from the visibility of every (row, key) pair: a query block visits the key blocks from the
    lowest key any of its rows sees to one past the highest."""
    block_m, block_n = 4, 3
    for Sq, Sk in ((13, 13), (5, 29), (16, 16), (9, 40)):
        want = 0
        for m0 in range(0, Sq, block_m):
            seen = [j for i in range(m0, min(m0 + block_m, Sq)) for j in range(Sk) if _sees(Sk - Sq + i, j, **opts)]
            if seen:
                want += -(-(max(seen) + 1 - min(seen)) // block_n)
        assert forward_tiles(Sq, Sk, block_m=block_m, block_n=block_n, **opts) == want, (Sq, Sk)


def _sees(p: int, j: int, causal: bool = True, window=None, chunk=None) -> bool:
    if not causal:
        return True
    return j <= p and (window is None or j > p - window) and (chunk is None or j // chunk == p // chunk)


def test_collective_bytes_of_a_llama_8b_layer():
    """docs/context_parallel.md's example: Llama 3 8B (Hkv 8, D 128, bf16), 128k positions, 8 ranks."""
    b = collective_bytes(131072, 8, B=1, Hkv=8, D=128)
    assert b["gathered_kv_buffer"] == 512 * 2**20
    assert b["forward_all_gather"] == b["backward_all_gather"] == 448 * 2**20
    assert b["backward_reduce_scatter"] == 896 * 2**20
