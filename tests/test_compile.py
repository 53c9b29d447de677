"""The fast path users take: drope's kernels as PyTorch operators under torch.compile / torch.export, and the
"drope_triton" layer compile-clean (one graph, no recompiles, no host reads) in transformers' prefill and decode.

CPU: the kernels run in Triton's interpreter behind their operators; ``backend="aot_eager"`` traces forward and
backward through the operators' fake implementations and registered autograd, as Inductor would.
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.generation import CompileConfig

from drope import kernels, reference
from drope.hf import attention as hfa, temperature as hft
from drope.inspect import recording
from helpers import HostReads, rel_err, with_cache
from hf_tiny import DEVICE, VOCAB, drope_model, rope_model

pytestmark = pytest.mark.interpreter
TEMP = {"mode": "position", "coef": 0.3, "train_length": 4}


def _inputs(B=2, HQ=4, HKV=2, SQ=24, SK=24, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(DEVICE) for s in ((B, HQ, SQ, D), (B, HKV, SK, D), (B, HKV, SK, D))]


def _features(name, B, HQ, SQ, SK, D):
    g = torch.Generator().manual_seed(1)
    f = {
        "rope-norms-rows": dict(rope=reference.rope_tables(SK, D), q_norm_weight=0.5 + torch.rand(HQ, D, generator=g),
                                k_norm_weight=0.5 + torch.rand(D, generator=g),
                                softmax_scale=0.2 + torch.rand(B, SQ, generator=g)),
        "head-scale-window-sinks": dict(softmax_scale=0.2 + torch.rand(HQ, generator=g), window=7,
                                        sinks=torch.randn(HQ, generator=g)),
        "chunk-softcap": dict(chunk=5, softcap=3.0, softmax_scale=0.3),
        "key-mask": dict(key_mask=torch.rand(B, SK, generator=g) > 0.3),
        "packed": dict(cu_seqlens=torch.tensor([0, 7, 7, 20, SK], dtype=torch.int32)),
        "varlen": dict(cu_seqlens=torch.tensor([0, 2, 2, 10, SQ], dtype=torch.int32),
                       cu_seqlens_k=torch.tensor([0, 5, 5, 14, SK], dtype=torch.int32), window=6),
    }[name]
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else tuple(t.to(DEVICE) for t in v)
                if isinstance(v, tuple) else v) for k, v in f.items()}


FEATURES = ["rope-norms-rows", "head-scale-window-sinks", "chunk-softcap", "key-mask", "packed", "varlen"]


@pytest.mark.parametrize("feature", FEATURES)
def test_attention_compiles_fullgraph_forward_and_backward(feature):
    B = 1 if feature in ("packed", "varlen") else 2
    SQ = 16 if feature == "varlen" else 24
    q, k, v = _inputs(B=B, SQ=SQ)
    kw = _features(feature, B, 4, SQ, 24, 16)
    leaves = [q, k, v] + [kw[n] for n in ("q_norm_weight", "k_norm_weight", "sinks") if n in kw]

    def loss(*ts):
        out, lse = kernels.attention(*ts[:3], return_lse=True, **{**kw, **dict(zip(
            [n for n in ("q_norm_weight", "k_norm_weight", "sinks") if n in kw], ts[3:]))})
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    def grads(fn):
        ts = [t.detach().clone().requires_grad_(True) for t in leaves]
        value = fn(*ts)
        return value.detach(), torch.autograd.grad(value, ts)

    torch._dynamo.reset()
    ref_value, ref_grads = grads(loss)
    value, got = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert rel_err(value, ref_value) < 1e-6
    for a, b in zip(got, ref_grads):
        assert rel_err(a, b) < 1e-6
    explained = torch._dynamo.explain(loss)(*leaves)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("key_mask", [None, "keys", "rows"])
def test_decode_compiles_and_exports(key_mask):
    q = _inputs(SQ=3)[0]
    _, k, v = _inputs(SK=40)
    lens = torch.tensor([40, 23], dtype=torch.int32, device=DEVICE)
    kw = dict(cache_seqlens=lens, window=11, sinks=torch.randn(4, device=DEVICE), softmax_scale=0.3)
    if key_mask == "keys":
        kw["key_mask"] = (torch.rand(2, 40) > 0.2).to(DEVICE)
    elif key_mask == "rows":
        kw["key_mask"] = (torch.rand(2, 3, 40) > 0.2).to(DEVICE)

    def fn(q, k, v):
        return kernels.decode_attention(q, k, v, num_splits=2, **kw)

    torch._dynamo.reset()
    with torch.no_grad():
        want = fn(q, k, v)
        assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v), want)

    class Decode(torch.nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    exported = torch.export.export(Decode(), (q, k, v))
    assert "torch.ops.drope.decode" in exported.graph_module.code
    assert torch.equal(exported.module()(q, k, v), want)


def test_attention_exports_and_trains_through_the_exported_program():
    q, k, v = _inputs()
    w = (0.5 + torch.rand(16)).to(DEVICE)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, w):
            return kernels.attention(q, k, v, q_norm_weight=w, window=9, key_mask=torch.ones_like(q[:, 0, :, 0]) > 0)

    exported = torch.export.export(Attn(), (q, k, v, w))
    assert "torch.ops.drope.attention_fwd" in exported.graph_module.code
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = exported.module()(*leaves)
    got = torch.autograd.grad(out.square().sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, w)]
    ref = reference.attention(*leaves64[:3], q_norm_weight=leaves64[3], window=9)
    want = torch.autograd.grad(ref.square().sum(), leaves64)
    assert rel_err(out, ref) < 1e-5 and all(rel_err(a, b) < 1e-4 for a, b in zip(got, want))


def test_qk_norm_rope_operator():
    x = _inputs()[0].requires_grad_(True)
    w = (0.5 + torch.rand(4, 16)).to(DEVICE).requires_grad_(True)
    rope = reference.rope_tables(40, 16, device=DEVICE)
    y = kernels.qk_norm_rope(x, w, rope, pos0=5)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = reference.apply_rope(reference.rms_norm(x64, w64, 1e-6), rope[0][5:29].double(), rope[1][5:29].double())
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x64, w64), g.double())
    assert rel_err(y, ref) < 1e-6 and all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
    fn = torch.compile(lambda x, w: kernels.qk_norm_rope(x, w, rope, pos0=5), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x, w), y)
    with pytest.raises(ValueError, match="rope cos table has 40 rows, shorter than Sk=41"):
        kernels.qk_norm_rope(x, w, rope, pos0=17)


OPCHECK = {
    "attention_fwd": lambda q, k, v: (q, k, v, None, None, torch.randn(4, device=DEVICE), None, None, None, None,
                                      (torch.rand(2, 24) > 0.2).to(DEVICE), None, None, True, 0.25, 1e-6, 9, None, 2.0, True),
    "attention_fwd-varlen": lambda q, k, v: (
        q[:1, :, :10], k[:1], v[:1], None, None, None, None, None, None,
        torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE), None,
        torch.tensor([0, 9, 24], dtype=torch.int32, device=DEVICE), None, True, 0.25, 1e-6, 5, None, None, True),
    "decode": lambda q, k, v: (q[:, :, :2], k, v, torch.tensor([24, 10], dtype=torch.int32, device=DEVICE), None, None,
                               None, 0.25, 2, None, None, None, None),
    # paged: 4 pages of 16 rows, batch row 0 on pages (3, 1), row 1 on (0, 2)
    "decode-paged": lambda q, k, v: (q[:, :, :2], torch.randn(4, 16, 2, 16, device=DEVICE),
                                     torch.randn(4, 16, 2, 16, device=DEVICE),
                                     torch.tensor([30, 17], dtype=torch.int32, device=DEVICE), None, None, None, 0.25, 2,
                                     None, None, None, torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEVICE)),
    "kv_append": lambda q, k, v: (k.clone(), v.clone(), k[:, :, :2].clone(), v[:, :, :2].clone(),
                                  torch.tensor([24, 10], dtype=torch.int32, device=DEVICE), None),
    "qk_norm_rope": lambda q, k, v: (q, (0.5 + torch.rand(16)).to(DEVICE), *reference.rope_tables(24, 16, device=DEVICE),
                                     0, 1e-6),
}


@pytest.mark.parametrize("op", list(OPCHECK))
def test_operators_pass_opcheck(op):
    q, k, v = _inputs()
    args = OPCHECK[op](q, k, v)
    if op.split("-")[0] not in ("decode", "kv_append"):
        args = (args[0].requires_grad_(True), *args[1:])
    torch.library.opcheck(getattr(torch.ops.drope, op.split("-")[0]).default, args)


# ---- the "drope_triton" layer in transformers --------------------------------------------------------------------

def _models():
    return {"llama": rope_model("llama"),
            "drope": drope_model("llama", qk_norm="head", temperature=TEMP)}


def _calls(model, kind):
    """(prepare, call) for one forward of ``kind`` under drope_triton: prepare builds caches (not measured)."""
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2)).to(model.device)
    pad = torch.ones(2, 12, dtype=torch.long, device=model.device)
    pad[1, :4] = 0

    if kind == "prefill":
        return lambda: {"input_ids": ids}
    if kind == "padded-prefill":
        return lambda: {"input_ids": ids, "attention_mask": pad}

    def cached():
        cache = DynamicCache(config=model.config) if kind.startswith("dynamic") else StaticCache(
            config=model.config, max_cache_len=24)
        padded = kind.endswith("padded")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=pad if padded else None, **with_cache(model, cache))
        step = {"input_ids": ids[:, :1], **with_cache(model, cache)}
        if padded:
            step["attention_mask"] = torch.cat([pad, pad[:, :1]], 1)
        if kind.startswith("static"):
            step["position_ids"] = torch.full((2, 1), 12, device=model.device)
        return step

    return cached


KINDS = ["prefill", "padded-prefill", "dynamic-decode", "static-decode", "dynamic-decode-padded", "static-decode-padded"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["llama", "drope"])
def test_layer_traces_as_one_graph_without_host_reads(name, kind):
    """One dynamo graph, no break, and no host read of a tensor value (a GPU sync) in drope's code or the model's."""
    model = _models()[name]
    model.set_attn_implementation("drope_triton")
    prepare = _calls(model, kind)
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(**prepare())
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        inputs = prepare()
        with recording(), HostReads() as reads:  # launches recorded, not run: only the Python path counts
            model(**inputs)
    assert reads.calls == []


@pytest.mark.parametrize("kind", ["prefill", "padded-prefill", "static-decode-padded", "dynamic-decode"])
def test_compiled_model_equals_eager(kind):
    model = _models()["drope"]
    model.set_attn_implementation("drope_triton")
    prepare = _calls(model, kind)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(**prepare()).logits
        got = compiled(**prepare()).logits
    assert rel_err(got, want) < 1e-6


def test_compiled_training_step_with_packed_documents():
    """No cache, restarting position_ids: transformers always asks for packed sequences while tracing; the
    documents come from the mask function on the device, and the loss and gradients equal eager's."""
    model = drope_model("llama", qk_norm="head", temperature={"mode": "length", "coef": 0.4, "train_length": 4})
    model.train()
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(4)).to(model.device)
    pos = torch.cat([torch.arange(6), torch.arange(8)])[None].expand(2, -1).to(model.device)
    results = {}
    for impl, fn in (("eager", model), ("drope_triton", torch.compile(model, fullgraph=True, backend="aot_eager"))):
        model.set_attn_implementation(impl)
        model.zero_grad()
        torch._dynamo.reset()
        loss = fn(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        results[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert rel_err(results["drope_triton"][0], results["eager"][0]) < 1e-5
    for a, b in zip(results["drope_triton"][1], results["eager"][1]):
        assert rel_err(a, b) < 1e-3


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", ["llama", "drope"])
def test_static_generate_compiles_once(name, padded):
    """transformers' own bar: generate(cache_implementation="static") with CompileConfig(fullgraph=True,
    dynamic=False) compiles the decode step once, never recompiles, and gives eager's tokens."""
    model = _models()[name]
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6)).to(model.device)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    tokens = {}
    for impl in ("eager", "drope_triton"):
        model.set_attn_implementation(impl)
        config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
        config._compile_all_devices = True  # transformers' switch to compile on a CPU (tests)
        graphs.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            tokens[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                          do_sample=False, pad_token_id=0, cache_implementation="static",
                                          compile_config=config)
        assert len(graphs) == 1, f"{impl}: {len(graphs)} graphs compiled for one static decode step"
    assert torch.equal(tokens["drope_triton"], tokens["eager"])


def test_shared_work_happens_once_per_forward(monkeypatch):
    """The mask (codes) and the temperature's shared part are computed once per forward, not once per layer."""
    model = drope_model("llama", qk_norm="head", temperature=TEMP, num_hidden_layers=3)
    model.set_attn_implementation("drope_triton")
    counts = {"mask": 0, "temperature": 0}
    mask_fn, temp_fn = hfa.drope_mask, hft.forward_temperature

    def count(name, fn):
        def wrapped(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapped

    from transformers.masking_utils import AttentionMaskInterface
    from drope.hf import modeling
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "drope_triton", count("mask", mask_fn))
    monkeypatch.setattr(modeling, "forward_temperature", count("temperature", temp_fn))
    pad = torch.ones(2, 9, dtype=torch.long, device=model.device)
    pad[0, :2] = 0
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (2, 9)).to(model.device), attention_mask=pad)
    assert counts == {"mask": 1, "temperature": 1}


def test_refused_under_compile_with_a_clear_error():
    """What has no sync-free form is refused while tracing, with the reason: a gradient through a padded cache."""
    model = drope_model("llama", qk_norm="head")
    model.set_attn_implementation("drope_triton")
    ids = torch.randint(3, VOCAB, (1, 6)).to(model.device)
    cache = DynamicCache(config=model.config)
    pad = torch.tensor([[0, 1, 1, 1, 1, 1]], device=model.device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=pad, **with_cache(model, cache))
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="live length is a device value"):
        step(input_ids=ids[:, :2], attention_mask=torch.cat([pad, pad[:, :2]], 1), **with_cache(model, cache))


@pytest.mark.gpu
def test_static_decode_step_replays_in_a_cuda_graph():
    """A StaticCache decode step captured once in a CUDA graph replays for new tokens and lengths, equal to eager
    steps (the split count and grid come from capacities; nothing reads a device value on the host)."""
    model = drope_model("llama", qk_norm="head", temperature=TEMP, device="cuda")
    model.set_attn_implementation("drope_triton")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(8)).cuda()
    new = torch.randint(3, VOCAB, (6, 2, 1), generator=torch.Generator().manual_seed(9)).cuda()
    caches = {name: StaticCache(config=model.config, max_cache_len=32) for name in ("graph", "eager")}
    with torch.no_grad():
        for cache in caches.values():
            model(input_ids=ids, **with_cache(model, cache))
        token = new[0].clone()
        position = torch.full((2, 1), 10, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (allocator, descriptors)
            warm = StaticCache(config=model.config, max_cache_len=32)
            model(input_ids=ids, **with_cache(model, warm))
            model(input_ids=token, position_ids=position, **with_cache(model, warm))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(input_ids=token, position_ids=position, **with_cache(model, caches["graph"])).logits
        # capture records the step without running it: the first replay is step 0
        for step in range(new.shape[0]):
            token.copy_(new[step])
            position.fill_(10 + step)
            graph.replay()
            want = model(input_ids=new[step], position_ids=position.clone(), **with_cache(model, caches["eager"])).logits
            assert rel_err(logits, want) < 1e-4, step
