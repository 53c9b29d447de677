"""The "drope_triton" attention + mask functions: registration, every dispatch path, packing, fallback, errors."""

import importlib.util
import types
import warnings

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DataCollatorWithFlattening
from transformers.masking_utils import (AttentionMaskInterface, and_masks, causal_mask_function,
                                       chunked_causal_mask_function, or_masks, packed_sequence_mask_function,
                                       sliding_window_causal_mask_function, padding_mask_function,
                                       sliding_window_overlay)

import drope
from drope.hf import attention as hfa
from drope.kernels import ops
from helpers import rel_err
from hf_tiny import DEVICE, VOCAB, drope_model, logits, rope_model, tiny_tokenizer, to_device

TOL = 1e-3
POSITION_TEMP = {"mode": "position", "coef": 0.3, "train_length": 4}
MODULE = types.SimpleNamespace(is_causal=True, training=False)


def _oracle(q, k, v, valid, scale, w, eps, window=None, sinks=None, softcap=None):
    """float64 masked causal attention: query i at slot p = L-Sq+i sees real keys at slots j <= p
    (and p - window < j); sinks join the softmax denominator; softcap caps the scaled logits."""
    B, HQ, SQ, D = q.shape
    L = valid.shape[1]
    q, k, v = q.double(), k[:, :, :L].double(), v[:, :, :L].double()
    if w is not None:
        q = drope.reference.rms_norm(q, w.double(), eps)
    G = HQ // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    pos = torch.arange(L - SQ, L)
    j = torch.arange(L)[None, :]
    visible = j <= pos[:, None]
    if window is not None:
        visible &= j > pos[:, None] - window
    visible = visible[None] & valid[:, None, :]  # (B, Sq, L)
    s = q @ k.transpose(-1, -2) * (scale if not torch.is_tensor(scale) else scale.double()[:, None, :, None])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, HQ, SQ, 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if sinks is not None:
        p = p[..., :-1]
    return (p @ v).transpose(1, 2)  # (B, Sq, Hq, D)


def _spy(monkeypatch):
    """Record (function, packed?) of every call the layer makes into drope.kernels."""
    calls = []
    for name in ("attention", "attention_with_cache"):
        fn = getattr(drope.kernels, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            calls.append((_name, kwargs.get("cu_seqlens") is not None))
            return _fn(*args, **kwargs)

        monkeypatch.setattr(drope.kernels, name, wrapped)
    return calls


def _path(monkeypatch, path):
    """The device for the kernels (Triton: compiled on a GPU, the interpreter on a CPU) or drope's PyTorch CPU
    kernels (what CPU users without the interpreter run)."""
    if path == "torch":
        monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")
        return "cpu"
    return DEVICE


PATHS = [pytest.param("kernels", marks=pytest.mark.interpreter), "torch"]
FEATURES = {"plain": {}, "qnorm-rowscale": {}, "window-sinks": {"window": 6, "sinks": True},
            "window-softcap": {"window": 9, "softcap": 0.7}}


# name, B, Sq, cached tokens, key slots (Sk; > live = StaticCache), padding per row (an int: that many slots on
# the left; a tuple: those slots), expected kernel call
CASES = [
    ("prefill", 2, 37, 0, 37, (0, 0), ("attention", False)),
    ("decode", 2, 1, 28, 29, (0, 0), ("attention_with_cache", False)),
    ("static-decode", 2, 1, 20, 32, (0, 0), ("attention_with_cache", False)),
    ("static-chunk", 2, 5, 16, 32, (0, 0), ("attention_with_cache", False)),
    ("static-prefill", 2, 21, 0, 32, (0, 0), ("attention_with_cache", False)),
    ("padded-prefill", 3, 19, 0, 19, (0, 7, 18), ("attention", False)),
    ("padded-decode", 2, 1, 23, 24, (0, 9), ("attention_with_cache", False)),
    ("padded-static-decode", 2, 2, 21, 30, (5, 0), ("attention_with_cache", False)),
    ("padded-chunk", 2, 20, 10, 30, (3, 12), ("attention_with_cache", False)),
    ("holes-prefill", 2, 23, 0, 23, ((2, 3, 9), (0, 17, 18)), ("attention", False)),
    ("holes-decode", 2, 1, 27, 28, ((4, 5, 20), ()), ("attention_with_cache", False)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dispatch_paths_match_masked_oracle(monkeypatch, case, feature, path):
    name, B, SQ, past, SK, pads, expected = case
    device = _path(monkeypatch, path)
    norm = feature != "plain"
    extra = FEATURES[feature]
    g = torch.Generator().manual_seed(len(name) + SQ)
    HQ, HKV, D = 4, 2, 16
    sinks = torch.randn(HQ, generator=g) if extra.get("sinks") else None
    window, softcap = extra.get("window"), extra.get("softcap")
    q = torch.randn(B, SQ, HQ, D, generator=g).transpose(1, 2)  # HF's layout
    k = torch.randn(B, HKV, SK, D, generator=g)
    v = torch.randn(B, HKV, SK, D, generator=g)
    w = (0.5 + torch.rand(D, generator=g)) if norm else None
    rows = (0.8 + torch.rand(B, SQ, generator=g)) if norm else None
    L = past + SQ
    mask2d = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        if isinstance(p, int):
            mask2d[b, :p] = 0
        else:
            mask2d[b, list(p)] = 0
    padded = not bool(mask2d.all())
    mask_fn = None if window is None else sliding_window_causal_mask_function(window)
    mask = hfa.drope_mask(B, q_length=SQ, kv_length=SK, q_offset=past, attention_mask=mask2d.to(device),
                          mask_function=mask_fn)
    # key-slot codes: 0 real, -1 padding, -2 past the live length
    want = torch.full((B, SK), -2, dtype=torch.int8)
    want[:, :L] = torch.where(mask2d.bool(), 0, -1)
    assert mask.shape == (B, 1, 1, SK) and mask.dtype == torch.int8 and torch.equal(mask[:, 0, 0].cpu(), want)
    assert hfa.drope_mask(B, q_length=SQ, kv_length=SK, q_offset=past, mask_function=mask_fn) is None or SK > L
    dev = [None if t is None else t.to(device) for t in (q, k, v, w, rows, sinks)]
    calls = _spy(monkeypatch)
    out, weights = hfa.drope_attention_forward(MODULE, *dev[:3], mask, scaling=0.3, drope_q_norm_weight=dev[3],
                                               drope_norm_eps=1e-6, drope_row_scale=dev[4], s_aux=dev[5],
                                               softcap=softcap, sliding_window=window)
    out = out.cpu()
    assert weights is None and out.shape == (B, SQ, HQ, D) and out.is_contiguous()
    assert calls and calls[0] == expected and all(c == expected for c in calls)
    scale = 0.3 if rows is None else rows * 0.3
    ref = _oracle(q, k, v, mask2d.bool(), scale, w, 1e-6, window=window, sinks=sinks, softcap=softcap)
    real_rows = mask2d.bool()[:, L - SQ:]
    assert rel_err(out[real_rows], ref[real_rows]) < TOL
    # a padding query row sees the real keys before it (as eager): zeros only where there are none
    blind = ~(mask2d.bool().cumsum(1) > 0)[:, L - SQ:]
    assert torch.all(out[blind] == 0) and (padded or not blind.any())


def test_registered_on_import():
    assert "drope_triton" in AttentionInterface._global_mapping
    assert "drope_triton" in AttentionMaskInterface._global_mapping
    assert AttentionInterface._global_mapping["drope_triton"] is hfa.drope_attention_forward
    assert AttentionMaskInterface._global_mapping["drope_triton"] is hfa.drope_mask


def test_rope_model_from_pretrained_with_drope_triton(tmp_path):
    model = rope_model("llama", seed=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="drope_triton").to(DEVICE).eval()
    assert loaded.config._attn_implementation == "drope_triton"
    tok = tiny_tokenizer()
    batch = tok(["the fox", "dropping positional embeddings"], padding=True, return_tensors="pt")
    ref = logits(model, "eager", batch["input_ids"], attention_mask=batch["attention_mask"])
    out = logits(loaded, "drope_triton", batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert rel_err(out[real], ref[real]) < TOL
    gen = {}
    for impl, m in (("eager", model), ("drope_triton", loaded)):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            gen[impl] = m.generate(**to_device(batch, DEVICE), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(gen["eager"], gen["drope_triton"])


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("kind", ["rope", "drope"])
def test_packed_batch_equals_documents_alone(monkeypatch, flash_kwargs, kind):
    """Packed documents without a cache (training): transformers' rule finds them, nothing attends across."""
    model = rope_model("llama", seed=3) if kind == "rope" else drope_model(
        "llama", qk_norm="head", temperature={"mode": "length", "coef": 0.5, "train_length": 4})
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 12, 5)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d.tolist()} for d in docs])
    assert batch["input_ids"].shape == (1, 24)
    if flash_kwargs:
        assert batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 24]
    batch.pop("labels")
    calls = _spy(monkeypatch)
    model.set_attn_implementation("drope_triton")
    with torch.no_grad():
        out = model(**to_device(batch, model.device), use_cache=False).logits[0].cpu()
    assert calls and all(c == ("attention", True) for c in calls)
    ref = torch.cat([logits(model, "eager", d[None])[0] for d in docs])
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("path", PATHS)
def test_position_restart_with_cache_attends_across_as_eager(monkeypatch, path):
    """Issue 14, silent result 5: with a cache (the default use_cache=True) transformers does not split
    documents at restarting position_ids; neither does drope_triton."""
    device = _path(monkeypatch, path)
    model = drope_model("llama", qk_norm="head", device=device)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    pos = torch.cat([torch.arange(6), torch.arange(8)])[None].expand(2, -1)
    ref = logits(model, "eager", ids, position_ids=pos)
    out = logits(model, "drope_triton", ids, position_ids=pos)
    assert rel_err(out, ref) < TOL
    ref_split = logits(model, "eager", ids, position_ids=pos, use_cache=False)
    assert rel_err(logits(model, "drope_triton", ids, position_ids=pos, use_cache=False), ref_split) < TOL
    assert rel_err(ref_split, ref) > 10 * TOL  # the two calls do differ


def test_rows_of_packed_documents(monkeypatch):
    """Batch > 1 with position_ids restarting inside rows, no cache: no token attends across a document."""
    model = drope_model("qwen3", temperature={"mode": "position", "coef": 0.5, "train_length": 3})
    g = torch.Generator().manual_seed(8)
    lengths = [(5, 7), (8, 4)]
    docs = [[torch.randint(3, VOCAB, (n,), generator=g) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    calls = _spy(monkeypatch)
    out = logits(model, "drope_triton", ids, position_ids=pos, use_cache=False)
    assert calls and all(c == ("attention", True) for c in calls)
    ref = torch.stack([torch.cat([logits(model, "eager", d[None])[0] for d in row]) for row in docs])
    assert rel_err(out, ref) < TOL


def test_cpu_torch_kernels_are_exact_and_never_the_reference(monkeypatch):
    """Without the interpreter, CPU tensors run drope's PyTorch kernels (no warning); drope.reference is not called."""
    monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")

    def no_reference(*args, **kwargs):
        raise AssertionError("drope.reference called on the CPU path")

    monkeypatch.setattr(drope.reference, "attention", no_reference)
    monkeypatch.setattr(drope.reference, "decode_attention", no_reference)
    monkeypatch.setattr(drope.reference, "rms_norm", no_reference)
    model = drope_model("qwen2", qk_norm="head", temperature=POSITION_TEMP, device="cpu")
    batch = tiny_tokenizer()(["the fox", "dropping positional embeddings"], padding=True, return_tensors="pt")
    ref = logits(model, "eager", batch["input_ids"], attention_mask=batch["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = logits(model, "drope_triton", batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert rel_err(out[real], ref[real]) < TOL


def test_bad_input():
    q = torch.randn(1, 4, 6, 16)
    k = v = torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="4-D"):
        hfa.drope_attention_forward(MODULE, q, k, v, torch.zeros(1, 1, 6, 6))
    with pytest.raises(ValueError, match="dropout"):
        hfa.drope_attention_forward(types.SimpleNamespace(is_causal=True, training=True), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="causal attention only"):
        hfa.drope_attention_forward(types.SimpleNamespace(is_causal=False, training=False), q, k, v, None)
    with pytest.raises(ValueError, match="packed"):
        hfa.drope_attention_forward(MODULE, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                    v.expand(2, -1, -1, -1), None,
                                    cu_seq_lens_q=torch.tensor([0, 2, 6], dtype=torch.int32))
    # issue 14, silent result 4: a (1, S) mask for a batch of 2
    with pytest.raises(ValueError, match="batch 1 but the inputs have batch 2"):
        hfa.drope_mask(2, q_length=6, kv_length=6, attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="covers 9 tokens"):
        hfa.drope_mask(1, q_length=6, kv_length=6, attention_mask=torch.ones(1, 9))
    mask = hfa.drope_mask(1, q_length=6, kv_length=6, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="made for batch 1 and 6 key slots; the layer has batch 2"):
        hfa.drope_attention_forward(MODULE, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                    v.expand(2, -1, -1, -1), mask)
    with pytest.raises(ValueError, match="custom 4-D masks"):
        hfa.drope_attention_forward(MODULE, q, k, v, mask.bool())
    # mask patterns the kernels cannot express are named
    with pytest.raises(ValueError, match="or_mask"):
        hfa.drope_mask(1, q_length=6, kv_length=6, mask_function=or_masks(causal_mask_function, lambda *a: True))
    with pytest.raises(ValueError, match="non-causal"):
        hfa.drope_mask(1, q_length=6, kv_length=6, mask_function=and_masks(sliding_window_overlay(3)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_training_gradients_match_eager(monkeypatch, layout, path):
    """Recalibration path: loss and every parameter gradient through drope_triton equal eager's."""
    device = _path(monkeypatch, path)
    model = drope_model("llama", qk_norm="head", temperature={"mode": "position", "coef": 0.3, "train_length": 4},
                        device=device)
    model.train()
    g = torch.Generator().manual_seed(6)
    if layout == "padded":
        ids = torch.randint(3, VOCAB, (2, 11), generator=g)
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, 7:] = 0
        batches = {"eager": {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}}
        batches["drope_triton"] = batches["eager"]
    else:
        docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 9)]
        packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
        batches = {"drope_triton": packed, "eager": {k: packed[k] for k in ("input_ids", "labels", "position_ids")}}
    losses, grads = {}, {}
    for impl in ("eager", "drope_triton"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        try:
            loss = model(**to_device(batches[impl], model.device), use_cache=False).loss
            loss.backward()
        except RuntimeError as e:
            if "backward not implemented" in str(e):
                pytest.skip("drope.kernels.attention has no backward yet (it raises when inputs require grad)")
            raise
        losses[impl] = loss.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(losses["drope_triton"], losses["eager"], rtol=1e-4)
    assert grads["eager"].keys() == grads["drope_triton"].keys()
    for name, ref in grads["eager"].items():
        assert rel_err(grads["drope_triton"][name], ref) < TOL, name


def test_mask_function_accepts_both_transformers_signatures():
    pad = torch.ones(2, 21, dtype=torch.long)
    pad[0, :4] = 0
    new = hfa.drope_mask(2, q_length=1, kv_length=32, q_offset=20, attention_mask=pad)
    old = hfa.drope_mask(2, cache_position=torch.tensor([20]), kv_length=32, attention_mask=pad)
    assert new.shape == (2, 1, 1, 32) and new.dtype == torch.int8 and torch.equal(new, old)
    assert new[0, 0, 0, :4].tolist() == [-1] * 4 and (new[:, 0, 0, 4:21] == 0).all() and (new[..., 21:] == -2).all()
    # a StaticCache's offset is a device tensor: never read on the host, same codes
    static = hfa.drope_mask(2, q_length=1, kv_length=32, q_offset=torch.tensor(20), attention_mask=pad)
    assert torch.equal(static, new)
    # every slot live and real: no mask at all
    assert hfa.drope_mask(2, q_length=3, kv_length=8, q_offset=5) is None
    with pytest.raises(ValueError, match="q_length"):
        hfa.drope_mask(2, kv_length=8)


def _groups(codes: torch.Tensor) -> list:
    """Which slots share a segment, per row, as lists of slot indices (padding slots left out)."""
    out = []
    for row in codes[:, 0, 0].tolist():
        seg = {}
        for j, c in enumerate(row):
            if c >= 0:
                seg.setdefault(c, []).append(j)
        out.append(sorted(seg.values()))
    return out


def test_mask_function_reads_transformers_patterns():
    """Chunks (with transformers' left-padding origin), packed sequences, sliding caches' offsets."""
    assert hfa.drope_mask(2, q_length=5, kv_length=5, mask_function=sliding_window_causal_mask_function(4)) is None
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    lp = torch.tensor([2, 0])
    m = hfa.drope_mask(2, q_length=8, kv_length=8, attention_mask=pad, mask_function=chunked_causal_mask_function(3, lp))
    # chunk ids (slot - left padding) // 3: row 0 -1 -1 0 0 0 1 1 1, row 1 0 0 0 1 1 1 2 2
    assert m.dtype == torch.int32 and m[0, 0, 0, :2].tolist() == [-1, -1]
    assert _groups(m) == [[[2, 3, 4], [5, 6, 7]], [[0, 1, 2], [3, 4, 5], [6, 7]]]
    # a chunked layer without padding, its slots aligned with the chunks: the kernels' own chunk, no mask
    assert hfa.drope_mask(1, q_length=8, kv_length=8, mask_function=chunked_causal_mask_function(3, lp[1:])) is None
    # packed sequences (what transformers builds from restarting position_ids without a cache)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    packed = and_masks(causal_mask_function, packed_sequence_mask_function(ids))
    assert _groups(hfa.drope_mask(1, q_length=8, kv_length=8, mask_function=packed)) == [[[0, 1, 2], [3, 4], [5, 6, 7]]]
    # older transformers put the 2-D mask into the tree too: the call's own is accepted, another refused
    pad2 = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    tree = and_masks(causal_mask_function, padding_mask_function(pad2))
    m = hfa.drope_mask(2, q_length=4, kv_length=4, attention_mask=pad2, mask_function=tree)
    assert m[:, 0, 0].tolist() == [[-1, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="padding mask other than"):
        hfa.drope_mask(2, q_length=4, kv_length=4, attention_mask=torch.ones(2, 4), mask_function=tree)
    # a sliding cache past its window: keys start at absolute position kv_offset, the 2-D mask is read there
    pad3 = torch.ones(1, 11)
    pad3[0, 8] = 0
    m = hfa.drope_mask(1, q_length=1, kv_length=4, q_offset=10, kv_offset=7,
                       mask_function=sliding_window_causal_mask_function(4), attention_mask=pad3)
    assert m[0, 0, 0].tolist() == [0, -1, 0, 0]


@pytest.mark.parametrize("kind", ["rope", "drope"])
def test_config_attribute_switches_every_layer(monkeypatch, kind):
    """The usage line ``model.config.attn_implementation = "drope_triton"`` switches the model on its next forward
    (transformers 5.x alone ignores it: a plain attribute nothing reads); another name switches back; an unknown
    name raises, naming the ways that work."""
    model = rope_model("llama", seed=5) if kind == "rope" else drope_model("llama", qk_norm="head",
                                                                          temperature=POSITION_TEMP)
    calls = []
    real = AttentionInterface._global_mapping[hfa.ATTN_IMPLEMENTATION]
    monkeypatch.setitem(AttentionInterface._global_mapping, hfa.ATTN_IMPLEMENTATION,
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).to(model.device)
    model.config.attn_implementation = "eager"
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.config.attn_implementation = "drope_triton"
    assert model.config._attn_implementation == model.config.attn_implementation == "drope_triton"
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers and rel_err(out, ref) < TOL
    model.config.attn_implementation = "sdpa"
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="not a registered attention implementation.*set_attn_implementation"):
        model.config.attn_implementation = "drope_tritonn"
    assert model.config._attn_implementation == "sdpa"
    # None (transformers' default depends on the model) and a flash-attention release that is not installed are
    # refused by name, as model.set_attn_implementation would resolve or refuse them (issue 30's sweep)
    for value, match in ((None, "None is not resolved by the config.*set_attn_implementation"),
                         ({"": None}, "None is not resolved"),
                         ("flash_attention_2", "flash-attention package is not installed")):
        if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
            continue
        with pytest.raises(ValueError, match=match):
            model.config.attn_implementation = value
        assert model.config._attn_implementation == "sdpa"


def test_unregistered_private_implementation_is_a_clear_error():
    """``config._attn_implementation = "bogus"`` (the private attribute, unchecked by transformers) on a DroPE model:
    the forward raises a ValueError naming it and the registered ones (was a bare KeyError)."""
    model = drope_model("llama", qk_norm="head", temperature=POSITION_TEMP)
    model.config._attn_implementation = "bogus"
    with pytest.raises(ValueError, match="'bogus' is not a registered attention implementation.*sdpa"):
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]], device=model.device))
