"""DroPE model classes, to_drope, SakanaAI checkpoints: drope_triton against the eager path of the same model."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel, StaticCache

import drope
from drope.hf import LlamaDropeConfig, LlamaDropeForCausalLM, Qwen2DropeForCausalLM, Qwen3DropeForCausalLM
from drope.hf.modeling import GemmaDropeForCausalLM
from helpers import rel_err, with_cache
from hf_tiny import (DEVICE, VOCAB, drope_model, logits, perturb_norms, rope_model, tiny_config, tiny_tokenizer,
                     to_device, zoo_model)

TOL = 1e-3  # fp32 model, relative error of the logits
POSITION_TEMP = {"mode": "position", "coef": 0.3, "train_length": 8}
LENGTH_TEMP = {"mode": "length", "coef": 0.4, "train_length": 8}


def _ids(B, S, seed=0):
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,qk_norm,temperature", [
    ("llama", "full", None),
    ("llama", "head", POSITION_TEMP),
    ("llama", None, LENGTH_TEMP),
    ("qwen2", "full", POSITION_TEMP),
    ("qwen3", "head", LENGTH_TEMP),
], ids=["llama-full", "llama-head-position", "llama-none-length", "qwen2-full-position", "qwen3-head-length"])
def test_logits_match_eager_and_sdpa(family, qk_norm, temperature):
    model = drope_model(family, qk_norm=qk_norm, temperature=temperature)
    ids = _ids(2, 23)
    ref = logits(model, "eager", ids)
    assert rel_err(logits(model, "sdpa", ids), ref) < TOL
    assert rel_err(logits(model, "drope_triton", ids), ref) < TOL


def _prompts():
    tok = tiny_tokenizer()
    return tok(["the fox jumps", "a needle hides in the haystack of long context"], padding=True,
               return_tensors="pt")


def _generate(model, impl, batch, cache, new=4):
    model.set_attn_implementation(impl)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(**to_device(batch, model.device), max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences.cpu(), torch.stack(out.logits, dim=1).cpu()  # (B, new, V)


@pytest.mark.parametrize("family,qk_norm,cache", [
    ("llama", "full", "dynamic"),
    ("llama", "head", "static"),
    ("qwen2", "full", "static"),
    ("qwen3", "head", "dynamic"),
], ids=["llama-full-dynamic", "llama-head-static", "qwen2-full-static", "qwen3-head-dynamic"])
def test_generate_left_padded_matches_eager_and_alone(family, qk_norm, cache):
    model = drope_model(family, qk_norm=qk_norm, temperature={"mode": "position", "coef": 0.2, "train_length": 6})
    batch = _prompts()
    seq_ref, lg_ref = _generate(model, "eager", batch, cache)
    seq, lg = _generate(model, "drope_triton", batch, cache)
    assert torch.equal(seq, seq_ref)
    assert rel_err(lg, lg_ref) < TOL
    # each prompt alone (no padding) generates what its row of the padded batch generates
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        alone = {"input_ids": batch["input_ids"][b:b + 1, real], "attention_mask": batch["attention_mask"][b:b + 1, real]}
        seq_b, lg_b = _generate(model, "drope_triton", alone, cache)
        assert torch.equal(seq_b[0, -4:], seq[b, -4:])
        assert rel_err(lg_b[0], lg[b]) < TOL


def test_decode_with_static_and_dynamic_cache_equals_prefill():
    model = drope_model("llama", qk_norm="head", temperature=POSITION_TEMP)
    model.set_attn_implementation("drope_triton")
    ids = _ids(2, 14, seed=3).to(model.device)
    full = logits(model, "drope_triton", ids)
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=20)):
        steps = []
        with torch.no_grad():
            out = model(input_ids=ids[:, :9], **with_cache(model, cache), use_cache=True)
            steps.append(out.logits)
            for t in range(9, 14):
                out = model(input_ids=ids[:, t:t + 1], **with_cache(model, cache), use_cache=True)
                steps.append(out.logits)
        assert rel_err(torch.cat(steps, dim=1).cpu(), full) < TOL, type(cache).__name__


def test_save_pretrained_round_trip(tmp_path):
    model = drope_model("qwen2", qk_norm="head", temperature=LENGTH_TEMP)
    ids = _ids(1, 17)
    ref = logits(model, "eager", ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_drope" and config["qk_norm_type"] == "head"
    assert config["drope_temperature"] == LENGTH_TEMP
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="drope_triton").to(DEVICE).eval()
    assert isinstance(loaded, Qwen2DropeForCausalLM)
    assert loaded.config._attn_implementation == "drope_triton"
    assert torch.equal(logits(loaded, "eager", ids), ref)
    assert rel_err(logits(loaded, "drope_triton", ids), ref) < TOL


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _nope_forward(sd, cfg, ids, attention_type, qkv_bias, gemma=False):
    """Plain float64 NoPE forward of a Llama/Qwen2 checkpoint, SakanaAI's QK-norm over all heads; ``gemma``:
    Gemma's layout (embeddings times sqrt(hidden), (1 + w) layer norms, tanh-GELU MLP)."""
    sd = {k: v.double().cpu() for k, v in sd.items()}
    eps, H, HKV, D = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    S = ids.shape[1]
    h = sd["model.embed_tokens.weight"][ids]
    if gemma:
        h = h * torch.tensor(cfg["hidden_size"] ** 0.5, dtype=torch.float32).double()
        norm = _rms

        def _rms_layer(x, w, e):
            return norm(x, 1.0 + w, e)

        def act(x):
            return torch.nn.functional.gelu(x, approximate="tanh")
    else:
        _rms_layer, act = _rms, torch.nn.functional.silu
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def lin(x, name, bias=False):
            y = x @ sd[p + name + ".weight"].T
            return y + sd[p + name + ".bias"] if bias else y

        x = _rms_layer(h, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (lin(x, f"self_attn.{n}_proj", qkv_bias) for n in "qkv")
        if attention_type in ("qk_norm_nope", "q_norm_nope"):
            q = _rms(q, sd[p + "self_attn.q_norm.weight"], eps)
        if attention_type in ("qk_norm_nope", "k_norm_nope"):
            k = _rms(k, sd[p + "self_attn.k_norm.weight"], eps)
        q = q.view(1, S, H, D).transpose(1, 2)
        k = k.view(1, S, HKV, D).transpose(1, 2).repeat_interleave(H // HKV, 1)
        v = v.view(1, S, HKV, D).transpose(1, 2).repeat_interleave(H // HKV, 1)
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
        h = h + lin(a.transpose(1, 2).reshape(1, S, H * D), "self_attn.o_proj")
        x = _rms_layer(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = lin(x, "mlp.gate_proj"), lin(x, "mlp.up_proj")
        h = h + lin(act(gate) * up, "mlp.down_proj")
    return _rms_layer(h, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention_type", ["nope", "qk_norm_nope", "q_norm_nope", "k_norm_nope"])
def test_sakana_checkpoint_loads_with_its_semantics(tmp_path, family, attention_type):
    base = rope_model(family, seed=5)
    cfg = base.config.to_dict()
    cfg.update(model_type=f"{family}_drope", attention_type=attention_type,
               architectures=[f"DroPE{type(base).__name__}"],
               auto_map={"AutoConfig": "drope.DroPEConfig", "AutoModelForCausalLM": "drope.DroPEModel"})
    cfg.pop("_attn_implementation_autoset", None)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    H, HKV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        # SakanaAI's modules hold both norms for every *norm_nope type (only the named ones are used)
        if attention_type != "nope":
            sd[f"model.layers.{i}.self_attn.q_norm.weight"] = 0.5 + torch.rand(H * D, generator=g)
            sd[f"model.layers.{i}.self_attn.k_norm.weight"] = 0.5 + torch.rand(HKV * D, generator=g)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    model = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert type(model).__name__ == f"{'Llama' if family == 'llama' else 'Qwen2'}DropeForCausalLM"
    assert model.config.attention_type == attention_type and model.config.qk_norm_type == "full"
    ids = _ids(1, 19, seed=2)
    ref = _nope_forward(sd, cfg, ids, attention_type, qkv_bias=family == "qwen2")
    assert rel_err(logits(model, "eager", ids), ref) < 1e-5
    if attention_type == "qk_norm_nope":
        assert rel_err(logits(model, "drope_triton", ids), ref) < TOL


def test_converted_weights_are_kept_and_new_norms_start_at_one():
    base = rope_model("llama", seed=4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = drope.to_drope(base, qk_norm="full")
    assert isinstance(model, LlamaDropeForCausalLM)
    assert model.config.model_type == "llama_drope" and model.config.attention_type == "qk_norm_nope"
    sd = model.state_dict()
    for name, value in before.items():
        assert torch.equal(sd[name], value), name
    norms = [k for k in sd if k.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 4 and all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in norms)
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (4 * 16,)
    # with no norm, the converted model is the RoPE model's weights run without RoPE
    plain = drope.to_drope(rope_model("llama", seed=4), qk_norm=None)
    ids = _ids(1, 15)
    cfg = plain.config.to_dict()
    assert rel_err(logits(plain, "eager", ids), _nope_forward(before, cfg, ids, "nope", False)) < 1e-5


BEYOND = {"smollm3": ("llama_drope", LlamaDropeForCausalLM, dict(no_rope_layers=[1, 0], use_sliding_window=False,
                                                             sliding_window=None, layer_types=None)),
          "mistral": ("llama_drope", LlamaDropeForCausalLM, dict(sliding_window=None)),
          "gemma": ("gemma_drope", GemmaDropeForCausalLM, {})}


@pytest.mark.parametrize("model_type", list(BEYOND))
def test_convert_beyond_llama_and_qwen(tmp_path, model_type):
    """SmolLM3 (its remaining RoPE layers too), Mistral and Gemma: the converted model is the RoPE model's
    weights run without RoPE (a hand-written float64 forward), drope_triton equals eager, save/load round trip."""
    target, cls, overrides = BEYOND[model_type]
    base = zoo_model(model_type, seed=11, **overrides)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    plain = drope.to_drope(base, qk_norm=None)
    assert isinstance(plain, cls) and plain.config.model_type == target
    assert not hasattr(plain.config, "no_rope_layers") and getattr(plain.config, "sliding_window", None) is None
    ids = _ids(1, 17, seed=4)
    ref = _nope_forward(before, plain.config.to_dict(), ids, "nope", False, gemma=model_type == "gemma")
    assert rel_err(logits(plain, "eager", ids), ref) < 1e-5
    model = perturb_norms(drope.to_drope(zoo_model(model_type, seed=11, **overrides), qk_norm="head",
                                         temperature=POSITION_TEMP)).eval()
    batch = _prompts()
    ref = logits(model, "eager", batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    out = logits(model, "drope_triton", batch["input_ids"], attention_mask=batch["attention_mask"])
    assert rel_err(out[real], ref[real]) < TOL
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert isinstance(loaded, cls) and loaded.config.drope_temperature == POSITION_TEMP
    assert torch.equal(logits(loaded, "eager", batch["input_ids"], attention_mask=batch["attention_mask"]), ref)


@pytest.mark.parametrize("model_type,overrides,match", [
    ("gemma2", {}, "soft-caps"),
    ("gemma3_text", {}, "sliding-window layers and"),
    ("mistral", dict(sliding_window=8), "sliding_window=8"),
    ("smollm3", dict(use_sliding_window=True, sliding_window=8), "sliding-window layers"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding-window layers"),
])
def test_to_drope_refuses_what_it_would_drop(model_type, overrides, match):
    with pytest.raises(ValueError, match=match):
        drope.to_drope(zoo_model(model_type, **overrides))


def test_qwen3_keeps_its_per_head_norms_and_tied_embeddings():
    base = rope_model("qwen3", seed=6, tie_word_embeddings=True)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_norm.weight.uniform_(0.5, 1.5)
    w = base.model.layers[0].self_attn.q_norm.weight.clone()
    model = drope.to_drope(base)
    assert isinstance(model, Qwen3DropeForCausalLM) and model.config.qk_norm_type == "head"
    assert torch.equal(model.model.layers[0].self_attn.q_norm.weight, w)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _last_logits(model, impl, ids):
    return logits(model, impl, ids)[0, -1]


def test_no_positional_signal_prefix_permutation():
    """One causal layer: the last position's output ignores the order of earlier tokens (no RoPE)."""
    ids = _ids(1, 16, seed=9)
    perm = torch.cat([torch.randperm(15, generator=torch.Generator().manual_seed(1)), torch.tensor([15])])
    model = drope_model("llama", qk_norm="full", num_hidden_layers=1)
    for impl in ("eager", "drope_triton"):
        assert rel_err(_last_logits(model, impl, ids[:, perm]), _last_logits(model, impl, ids)) < 1e-5
    rope = rope_model("llama", num_hidden_layers=1)
    assert rel_err(_last_logits(rope, "eager", ids[:, perm]), _last_logits(rope, "eager", ids)) > 1e-3


def test_to_drope_bad_input():
    with pytest.raises(ValueError, match="model_type"):
        drope.to_drope(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(ValueError, match="qk_norm"):
        drope.to_drope(rope_model("llama"), qk_norm="rms")
    with pytest.raises(ValueError, match="per-head"):
        drope.to_drope(rope_model("qwen3"), qk_norm="full")
    with pytest.raises(ValueError, match="already a DroPE"):
        drope.to_drope(drope_model("llama"))
    with pytest.raises(ValueError, match="no attention layers"):
        drope.to_drope(rope_model("llama", num_hidden_layers=0))
    with pytest.raises(ValueError, match="mode"):
        drope.to_drope(rope_model("llama"), temperature={"mode": "yarn", "coef": 0.1, "train_length": 8})


def test_config_rejects_unknown_attention_type(tmp_path):
    with pytest.raises(ValueError, match="attention_type"):
        LlamaDropeConfig(attention_type="rope_nope")
    with pytest.raises(ValueError, match="qk_norm_type"):
        LlamaDropeConfig(qk_norm_type="layer")
    cfg = tiny_config("llama").to_dict()
    cfg.update(model_type="llama_drope", attention_type="qk_norm_rope")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="attention_type"):
        AutoConfig.from_pretrained(tmp_path)


def test_broken_drope_checkpoints_are_refused_by_name(tmp_path):
    """Issue 24: a QK-norm weight of the wrong shape or missing, a config without its sizes: clear errors naming
    the weight / field (transformers raised a generic RuntimeError, started missing norms at one, or built a
    full-size Llama from its defaults)."""
    from safetensors.torch import load_file

    model = drope_model("llama", qk_norm="full")
    model.save_pretrained(tmp_path / "good")
    weights = load_file(tmp_path / "good" / "model.safetensors")
    for name, change, match in (
            ("wrong-shape", lambda w: w.update({"model.layers.1.self_attn.k_norm.weight": torch.ones(5)}),
             r"model.layers.1.self_attn.k_norm.weight: checkpoint \(5,\), model \(32,\) \(qk_norm_type 'full'"),
            ("missing", lambda w: w.pop("model.layers.0.self_attn.q_norm.weight"),
             "has no model.layers.0.self_attn.q_norm.weight, but its config asks for QK-norm")):
        folder = tmp_path / name
        model.save_pretrained(folder)
        broken = dict(weights)
        change(broken)
        save_file(broken, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(folder)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "wrong-shape", ignore_mismatched_sizes=True,
                                                        output_loading_info=True)
    assert info["mismatched_keys"] and isinstance(loaded, LlamaDropeForCausalLM)
    for fields in ({"model_type": "llama_drope"}, {**tiny_config("llama").to_dict(), "model_type": "llama_drope",
                                                  "hidden_size": None}):
        fields = {k: v for k, v in fields.items() if v is not None}
        (tmp_path / "sizes").mkdir(exist_ok=True)
        (tmp_path / "sizes" / "config.json").write_text(json.dumps(fields))
        with pytest.raises(ValueError, match="llama_drope config is missing .*hidden_size"):
            AutoConfig.from_pretrained(tmp_path / "sizes")


SMOLLM_360M = dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                   num_attention_heads=15, num_key_value_heads=5, head_dim=64, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, tie_word_embeddings=True)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [4096, 8192, 16384, 32768], ids=lambda s: f"S{s}")
def test_smollm_360m_shaped_prefill_long_context(S):
    """Random-weight SmolLM-360M-shaped DroPE model, bf16: drope_triton's last logits against sdpa's,
    both measured against the fp32 sdpa model (flash-attention's rule: at most 2x sdpa-bf16's error)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(**SMOLLM_360M)).eval()
    model = drope.to_drope(base, qk_norm="full", temperature={"mode": "length", "coef": 0.103, "train_length": 2048})
    perturb_norms(model)
    ids = torch.randint(0, SMOLLM_360M["vocab_size"], (1, S), device="cuda")
    keep = 64
    ref = logits(model, "sdpa", ids, logits_to_keep=keep).double()
    model.to(torch.bfloat16)
    sdpa = logits(model, "sdpa", ids, logits_to_keep=keep)
    ours = logits(model, "drope_triton", ids, logits_to_keep=keep)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= 2 * rel_err(sdpa, ref) + 1e-3, (rel_err(ours, ref), rel_err(sdpa, ref))



def SMALL_CB():
    """A paged cache of a few pages: by default transformers sizes it from free memory, on a CPU the machine's RAM
    (14 GB for a tiny model; two test workers doing that at once were killed for memory)."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64)


CB_MODELS = {
    "full-norm-position": dict(qk_norm="full", temperature={"mode": "position", "coef": 0.3, "train_length": 4}),
    "head-norm-length": dict(qk_norm="head", temperature={"mode": "length", "coef": 0.3, "train_length": 4}),
}


@pytest.mark.parametrize("impl", ["sdpa", "paged|eager"])
@pytest.mark.parametrize("kind", list(CB_MODELS))
def test_continuous_batching_equals_greedy(kind, impl):
    """Issue 22: the DroPE classes under transformers' continuous batching (generate_batch, what `transformers
    serve` runs) with every implementation it accepts here: each request's tokens equal greedy generate alone
    (they came back empty: the paged cache's update kwargs were never passed)."""
    from transformers import GenerationConfig

    model = drope_model("llama", device="cpu", **CB_MODELS[kind])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 3)]
    want = []
    model.set_attn_implementation("eager")
    for p in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    model.set_attn_implementation(impl)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=-1)
    results = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=SMALL_CB())
    got = {tuple(r.prompt_ids): r.generated_tokens for r in results.values()}
    assert [got[tuple(p)] for p in prompts] == want


def test_drope_triton_under_continuous_batching_runs_the_kernel_repository(monkeypatch):
    """A DroPE model set to drope_triton (which transformers' continuous batching refuses by name) runs
    generate_batch on drope's kernels through the kernel repository, and is back on drope_triton afterwards."""
    from transformers import GenerationConfig
    from transformers.utils import is_kernels_available

    if not is_kernels_available():
        pytest.skip("needs the kernels package (the test extra installs it)")
    model = drope_model("llama", qk_norm="head", device="cpu")
    prompt = [5, 6, 7, 9]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)[0, 4:].tolist()
    model.set_attn_implementation("drope_triton")
    seen = []
    real = drope.kernels.attention
    monkeypatch.setattr(drope.kernels, "attention", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    results = model.generate_batch(inputs=[prompt], generation_config=GenerationConfig(
        max_new_tokens=3, do_sample=False, eos_token_id=-1), continuous_batching_config=SMALL_CB())
    assert next(iter(results.values())).generated_tokens == want and seen
    assert model.config._attn_implementation == "drope_triton"


def test_a_failed_continuous_batching_request_raises():
    """A request that fails inside continuous batching is an error the caller sees, not an empty token list."""
    from transformers import GenerationConfig

    model = drope_model("llama", qk_norm="head", device="cpu")
    model.set_attn_implementation("sdpa")

    def broken(module, args, kwargs):
        raise RuntimeError("boom in the attention")

    model.model.layers[0].self_attn.register_forward_pre_hook(broken, with_kwargs=True)
    with pytest.raises(RuntimeError, match="continuous-batching requests failed.*boom in the attention"):
        model.generate_batch(inputs=[[5, 6, 7]], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False,
                                                                                    eos_token_id=-1),
                             continuous_batching_config=SMALL_CB())


def test_continuous_batching_empty_prompt_is_refused():
    """An empty prompt in a continuous batch is refused by name (transformers returned tokens copied from the
    neighbouring request, or raised a reshape error alone)."""
    from transformers import GenerationConfig

    model = drope_model("llama", qk_norm="head", device="cpu")
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"inputs\[1\] is an empty prompt"):
        model.generate_batch(inputs=[[5, 6, 7], []], generation_config=GenerationConfig(max_new_tokens=2,
                                                                                       do_sample=False),
                             continuous_batching_config=SMALL_CB())
