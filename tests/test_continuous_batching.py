"""Continuous batching on drope's kernels (issue 32): transformers' generate_batch with the kernel repository of
drope.hf.continuous_batching_attention(), loaded by the `kernels` package from a local directory. Each request's
tokens equal greedy generate alone; a spy proves drope's kernels ran with the query norm and temperature fused; the
attention reads no device value on the host and takes transformers' padded batches."""

from __future__ import annotations

import pytest
import torch

import drope
from drope import kernels, reference
from drope.hf import batching
from drope.kernels import ops
from helpers import HostReads, rel_err
from hf_tiny import VOCAB, ZOO, drope_model, rope_model, zoo_model

pytestmark = pytest.mark.skipif(not __import__("transformers.utils", fromlist=["x"]).is_kernels_available(),
                                reason="needs the kernels package (the test extra installs it)")

MODELS = {
    "drope-full-norm-position": lambda: drope_model(
        "llama", qk_norm="full", temperature={"mode": "position", "coef": 0.3, "train_length": 4}, device="cpu"),
    "drope-head-norm-length": lambda: drope_model(
        "llama", qk_norm="head", temperature={"mode": "length", "coef": 0.3, "train_length": 4}, device="cpu"),
    "rope-llama": lambda: rope_model("llama", device="cpu"),
}


def small_cb():
    """A paged cache of a few pages (transformers would size it from the machine's RAM)."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=64)


def greedy_alone(model, prompts, n):
    """Each prompt's greedy tokens with eager attention, one request at a time."""
    model.set_attn_implementation("eager")
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(input_ids=torch.tensor([p], device=model.device), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def batched(model, prompts, n):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=-1)
    results = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=small_cb())
    got = {tuple(r.prompt_ids): r.generated_tokens for r in results.values()}
    return [got[tuple(p)] for p in prompts]


def spy_kernels(monkeypatch):
    calls = []
    for name in ("attention", "decode_attention"):
        fn = getattr(kernels, name)

        def spy(*args, _fn=fn, _name=name, **kw):
            calls.append((_name, kw.get("q_norm_weight") is not None, isinstance(kw.get("softmax_scale"),
                                                                                torch.Tensor)))
            return _fn(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return calls


# every model on the PyTorch CPU kernels; the fused DroPE case also through the Triton kernels (the interpreter)
CASES = [(kind, "torch") for kind in MODELS] + [pytest.param("drope-head-norm-length", "interpreter",
                                                             marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("kind,backend", CASES)
def test_generate_batch_on_drope_kernels_equals_greedy_alone(monkeypatch, kind, backend):
    if backend == "torch":
        monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")
    model = MODELS[kind]()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 3, 8)]
    want = greedy_alone(model, prompts, 4)
    model.set_attn_implementation(drope.hf.continuous_batching_attention())
    calls = spy_kernels(monkeypatch)
    assert batched(model, prompts, 4) == want
    # every step ran drope's varlen forward (the CPU has no decode fast path), fused for the DroPE classes
    assert calls and all(c[0] == "attention" for c in calls)
    if kind == "drope-head-norm-length":
        assert all(c[1] and c[2] for c in calls), "the query norm and the temperature reached the kernel"
    if kind == "drope-full-norm-position":
        assert all(c[2] for c in calls)


def test_zoo_under_continuous_batching(monkeypatch):
    """Every zoo architecture that transformers' continuous batching runs with sdpa gives, on drope's kernels (the
    torch CPU kernels here: the interpreter would take minutes), each request's greedy tokens."""
    from transformers import GenerationConfig

    monkeypatch.setattr(ops, "cpu_backend", lambda: "torch")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 13)]
    ran = []
    for model_type in ZOO:
        model = zoo_model(model_type, device="cpu")
        config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=-1)
        try:
            model.set_attn_implementation("sdpa")  # some architectures have no sdpa at all (Gemma 2)
            model.generate_batch(inputs=prompts[:1], generation_config=config, continuous_batching_config=small_cb())
        except Exception:  # not an architecture transformers' continuous batching runs with sdpa (Gemma 2 has no
            continue        # sdpa, Llama 4's chunked layers have no paged allocator): out of this comparison
        want = greedy_alone(model, prompts, 3)
        model.set_attn_implementation(drope.hf.continuous_batching_attention())
        assert batched(model, prompts, 3) == want, model_type
        ran.append(model_type)
    assert len(ran) >= len(ZOO) // 2, f"only {ran} ran under continuous batching"


def _packed_step(T=11, padded=3, HQ=4, HKV=2, D=16, seed=0):
    """A continuous-batching step as transformers hands it: three requests packed (queries the last rows of their
    keys), plus ``padded`` rows after the last boundary (a batch padded to a fixed size)."""
    g = torch.Generator().manual_seed(seed)
    lq, lk = [4, 1, 6], [9, 20, 6]
    cu_q = torch.tensor([0, 4, 5, 11, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 29, 35, 35], dtype=torch.int32)
    q = torch.randn(1, HQ, T + padded, D, generator=g)
    k, v = torch.randn(1, HKV, 35 + padded, D, generator=g), torch.randn(1, HKV, 35 + padded, D, generator=g)
    return q, k, v, cu_q, cu_k, lq, lk


class _Module:
    is_causal, training, config, layer_idx = True, False, None, 0


def test_attention_takes_padded_batches_and_reads_no_device_value():
    q, k, v, cu_q, cu_k, lq, lk = _packed_step()
    rows = 0.5 + torch.rand(1, q.shape[2])
    w = 0.5 + torch.rand(16)
    with HostReads() as reads, torch.no_grad():
        out, _ = batching.flash_attn_forward(_Module(), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu_q,
                                             cu_seq_lens_k=cu_k, drope_q_norm_weight=w, drope_row_scale=rows)
    assert reads.calls == []
    assert out.shape == (1, q.shape[2], 4, 16)
    assert torch.equal(out[0, 11:], torch.zeros_like(out[0, 11:])), "padded rows are zeros"
    qn = reference.rms_norm(q.double(), w.double(), 1e-6)
    ref = reference.attention(qn[:, :, :11], k[:, :, :35].double(), v[:, :, :35].double(), cu_seqlens_q=cu_q[:4],
                              cu_seqlens_k=cu_k[:4], softmax_scale=(rows[:, :11] * 0.25).double())
    assert rel_err(out[:, :11].transpose(1, 2), ref) < 1e-5


def test_decode_fast_path_with_a_block_table_and_padded_rows():
    """The decode fast path (CUDA in transformers; called directly here): one new row per request appended to the
    paged cache and attended; a padded request (length 0, table of -1) gives zeros and writes nothing."""
    from test_paged import paged_cache

    B, HQ, HKV, D, page, pages = 3, 4, 2, 16, 16, 3
    kc, vc, table, k, v = paged_cache(B, HKV, pages, page, D, "cpu", spare=1)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    table = table.clone()
    table[2] = -1
    lens = torch.tensor([17, 40, 0])  # after the append; the third request is padding
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, HQ, B, D, generator=g)
    k_new, v_new = torch.randn(1, HKV, B, D, generator=g), torch.randn(1, HKV, B, D, generator=g)
    before = kc.clone()
    with HostReads() as reads, torch.no_grad():
        out, _ = batching.flash_attn_forward(_Module(), q, k_new, v_new, None, cu_seq_lens_q=torch.arange(B + 1),
                                             cu_seq_lens_k=cu_k, block_table=table.to(torch.int32), k_cache=kc,
                                             v_cache=vc)
    assert reads.calls == []
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))
    changed = (kc != before).any(-1).any(-1)
    assert int(changed.sum()) == 2, "one row per real request was written"
    ref = reference.decode_attention(q[0].transpose(0, 1)[:2, :, None].double(), kc.double(), vc.double(),
                                     cache_seqlens=lens[:2], block_table=table[:2])
    assert rel_err(out[0, :2], ref[:, :, 0]) < 1e-5


def test_outside_continuous_batching_the_name_runs_drope_triton():
    """generate with the continuous-batching name (a 4-D boolean mask from transformers' sdpa mask function) equals
    eager, padded batch included: the mask becomes drope's key-slot codes."""
    model = MODELS["drope-head-norm-length"]()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                              do_sample=False, pad_token_id=0)
    model.set_attn_implementation(drope.hf.continuous_batching_attention())
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_the_route_is_what_transformers_loads():
    """What would break the route, checked as transformers resolves it: the name loads this repository through the
    kernels package, and the registered attention is drope's function (not transformers' flash wrapper)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = drope.hf.continuous_batching_attention()
    model = MODELS["rope-llama"]()
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    # 5.25 registers the module's flash_attn_forward; 5.17 (whose continuous batching wraps the implementation in
    # its paged wrapper) the function the name designates, drope's own paged forward
    want = batching.paged_attention_forward if batching.paged_era() else batching.flash_attn_forward
    assert ALL_ATTENTION_FUNCTIONS[name] is want


@pytest.mark.gpu
def test_gpu_continuous_batching_with_cuda_graphs():
    """On a GPU transformers pads the batches and captures CUDA graphs (and takes the block-table decode path):
    the tokens still equal greedy generate alone."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = drope_model("llama", qk_norm="head", temperature={"mode": "position", "coef": 0.3, "train_length": 4},
                        device="cuda").to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 31, 12, 64, 2, 17)]
    want = greedy_alone(model, prompts, 8)
    model.set_attn_implementation(drope.hf.continuous_batching_attention())
    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=-1)
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=256, use_cuda_graph=True)
    results = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cb)
    got = {tuple(r.prompt_ids): r.generated_tokens for r in results.values()}
    assert [got[tuple(p)] for p in prompts] == want
