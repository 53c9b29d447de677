"""Softmax temperature of DroPE models: the config dict, the formulas, cached decoding equals prefill."""

import math

import pytest
import torch
from transformers import DynamicCache

import drope
from drope.hf import temperature_rows, temperature_scale, validate_temperature
from helpers import rel_err, with_cache
from hf_tiny import VOCAB, drope_model, logits, rope_model

TOL = 1e-3


@pytest.mark.parametrize("bad,field", [
    ("length", "dict"),
    ({"coef": 0.1, "train_length": 8}, "mode"),
    ({"mode": "yarn", "coef": 0.1, "train_length": 8}, "mode"),
    ({"mode": "length", "train_length": 8}, "coef"),
    ({"mode": "position", "coef": 0.1}, "train_length"),
    ({"mode": "length", "coef": -0.1, "train_length": 8}, "coef"),
    ({"mode": "length", "coef": float("nan"), "train_length": 8}, "coef"),
    ({"mode": "length", "coef": 0.1, "train_length": 0}, "train_length"),
    ({"mode": "length", "coef": 0.1, "train_length": 8.5}, "train_length"),
    ({"mode": "length", "coef": 0.1, "train_length": 8, "scale": 2}, "unknown key"),
], ids=["not-dict", "no-mode", "bad-mode", "no-coef", "no-train-length", "negative-coef", "nan-coef",
        "zero-length", "float-length", "unknown-key"])
def test_validate_rejects(bad, field):
    with pytest.raises(ValueError, match=field):
        validate_temperature(bad)


def test_validate_normalises():
    assert validate_temperature(None) == {"mode": "none", "coef": 0.0, "train_length": None}
    assert validate_temperature({"mode": "none"}) == {"mode": "none", "coef": 0.0, "train_length": None}
    assert validate_temperature({"mode": "length", "coef": 1, "train_length": 2048}) == {
        "mode": "length", "coef": 1.0, "train_length": 2048}


def test_scale_formulas():
    t_len = {"mode": "length", "coef": 0.103, "train_length": 2048}
    t_pos = {"mode": "position", "coef": 0.412, "train_length": 100}
    assert temperature_scale(t_len, total_length=2048) == 1.0
    assert temperature_scale(t_len, total_length=1000) == 1.0
    assert temperature_scale(t_len, total_length=8192) == pytest.approx(1 + 0.103 * math.log(4))
    assert temperature_scale(t_pos, positions=99) == 1.0
    assert temperature_scale(t_pos, positions=399) == pytest.approx(1 + 0.412 * math.log(4))
    p = torch.arange(500)
    expected = torch.tensor([1 + 0.412 * math.log((i + 1) / 100) if i + 1 > 100 else 1.0 for i in range(500)])
    assert torch.allclose(temperature_scale(t_pos, positions=p), expected.float(), rtol=1e-6)
    assert temperature_scale(None, positions=p).eq(1).all()
    with pytest.raises(ValueError, match="total_length"):
        temperature_scale(t_len, positions=p)


def test_rows_length_per_sequence_and_document():
    t = {"mode": "length", "coef": 0.5, "train_length": 4}
    # row 0: left padding (positions 0,0,0) then 0..5; row 1: two packed documents of 3 and 6 tokens
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2, 3, 4, 5]])
    rows = temperature_rows(t, pos)
    f6, f3 = 1 + 0.5 * math.log(6 / 4), 1.0
    assert torch.allclose(rows[0, 3:], torch.full((6,), f6))
    assert torch.allclose(rows[1], torch.tensor([f3] * 3 + [f6] * 6))
    # decoding: one new token at position 11 -> L_total = 12
    assert temperature_rows(t, torch.tensor([[11]])).item() == pytest.approx(1 + 0.5 * math.log(3))
    assert temperature_rows(None, pos) is None
    assert temperature_rows({"mode": "position", "coef": 0.0, "train_length": 4}, pos) is None


def _manual_layer_output(model, ids, mult):
    """Layer 0's attention output by hand (full QK-norm), logits multiplied by ``mult`` (S,)."""
    attn = model.model.layers[0].self_attn
    S, D = ids.shape[1], attn.head_dim
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids.to(model.device)))
        q = attn.q_norm(attn.q_proj(h)).view(1, S, -1, D).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h)).view(1, S, -1, D).transpose(1, 2)
        v = attn.v_proj(h).view(1, S, -1, D).transpose(1, 2)
        scale = mult.double().to(model.device) * D ** -0.5
        out = drope.reference.attention(q.double(), k.double(), v.double(), softmax_scale=scale)
        return attn.o_proj(out.float().transpose(1, 2).reshape(1, S, -1)).cpu()


@pytest.mark.parametrize("mode", ["length", "position"])
def test_model_applies_the_formula(mode):
    t = {"mode": mode, "coef": 0.6, "train_length": 5}
    model = drope_model("llama", qk_norm="full", temperature=t)
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(1))
    p = torch.arange(13)
    mult = temperature_scale(t, positions=p) if mode == "position" else torch.full((13,), temperature_scale(
        t, total_length=13))
    ref = _manual_layer_output(model, ids, mult)
    captured = {}

    def keep(module, args, output):
        captured["o"] = output[0].cpu()

    hook = model.model.layers[0].self_attn.register_forward_hook(keep)
    for impl in ("eager", "drope_triton"):
        captured.clear()
        logits(model, impl, ids)
        assert rel_err(captured["o"], ref) < TOL, impl
    hook.remove()


@pytest.mark.parametrize("mode", ["position", "length"])
def test_cached_decoding_vs_prefill(mode):
    """"position" is causal-consistent: decoding token by token equals prefill; "length" is not."""
    t = {"mode": mode, "coef": 0.8, "train_length": 4}
    model = drope_model("qwen3", temperature=t)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2)).to(model.device)
    full = logits(model, "drope_triton", ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, :6], **with_cache(model, cache), use_cache=True).logits]
        for i in range(6, 12):
            steps.append(model(input_ids=ids[:, i:i + 1], **with_cache(model, cache), use_cache=True).logits)
    err = rel_err(torch.cat(steps, 1).cpu(), full)
    assert err < TOL if mode == "position" else err > 10 * TOL


def test_set_temperature_takes_effect_on_next_forward():
    model = drope_model("llama", qk_norm="head")
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    before = logits(model, "eager", ids)
    t = {"mode": "position", "coef": 0.5, "train_length": 4}
    assert drope.set_temperature(model, t) is model
    assert model.config.drope_temperature == {"mode": "position", "coef": 0.5, "train_length": 4}
    assert drope.get_temperature(model) == model.config.drope_temperature
    changed = logits(model, "eager", ids)
    assert rel_err(changed, before) > 1e-3
    assert rel_err(logits(model, "drope_triton", ids), changed) < TOL
    drope.set_temperature(model, None)
    assert model.config.drope_temperature is None
    assert torch.equal(logits(model, "eager", ids), before)
    with pytest.raises(ValueError, match="coef"):
        drope.set_temperature(model, {"mode": "length", "coef": -1, "train_length": 4})
    with pytest.raises(ValueError, match="DroPE model"):
        drope.set_temperature(rope_model("llama"), t)


def _heads_model(head_coefs, mode="position"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=8)
    model = drope.to_drope(LlamaForCausalLM(cfg), qk_norm="head").eval()
    drope.set_temperature(model, {"mode": mode, "coef": 0.0, "train_length": 8, "head_coefs": head_coefs})
    return model


@pytest.mark.parametrize("bad,match", [
    ([], "head_coefs"), ([[0.1, 0.2], [0.3]], "same number of heads"), ([[0.1, -0.2]], ">= 0"),
    ([[float("nan")]], ">= 0"), ("x", "head_coefs"), ([[True]], ">= 0"),
])
def test_head_coefs_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        drope.validate_temperature({"mode": "position", "coef": 0.0, "train_length": 8, "head_coefs": bad})


def test_head_coefs_must_fit_the_model():
    model = _heads_model([[0.1] * 4, [0.2] * 4])
    with pytest.raises(ValueError, match="2 layers x 4 query heads"):
        drope.set_temperature(model, {"mode": "position", "coef": 0.0, "train_length": 8, "head_coefs": [[0.1] * 3] * 2})


def test_rows_per_head_formula():
    from drope.hf.temperature import temperature_rows

    t = {"mode": "position", "coef": 0.0, "train_length": 4, "head_coefs": [[0.0, 0.5], [0.25, 1.0]]}
    pos = torch.arange(10)[None]
    rows = temperature_rows(t, pos, layer_idx=1)
    assert rows.shape == (1, 2, 10)
    want = torch.where(pos + 1 > 4, torch.log((pos + 1) / 4.0), torch.zeros(1))
    assert torch.allclose(rows[0, 0], 1 + 0.25 * want[0]) and torch.allclose(rows[0, 1], 1 + 1.0 * want[0])
    with pytest.raises(ValueError, match="layer index"):
        temperature_rows(t, pos)


@pytest.mark.parametrize("mode", ["position", "length"])
def test_per_head_equal_coefficients_equal_the_scalar_and_differ_otherwise(mode):
    ids = torch.randint(0, 64, (2, 30))
    scalar = _heads_model([[0.3] * 4, [0.3] * 4], mode)
    ref = scalar(input_ids=ids).logits
    drope.set_temperature(scalar, {"mode": mode, "coef": 0.3, "train_length": 8})
    assert torch.allclose(scalar(input_ids=ids).logits, ref, atol=1e-6)
    drope.set_temperature(scalar, {"mode": mode, "coef": 0.0, "train_length": 8,
                                   "head_coefs": [[0.0, 0.3, 0.9, 0.3], [0.3] * 4]})
    assert not torch.allclose(scalar(input_ids=ids).logits, ref, atol=1e-4)


def test_per_head_drope_triton_equals_eager_and_cached_decoding_equals_prefill(tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache

    from helpers import with_cache

    heads = [[0.0, 0.2, 0.7, 1.1], [0.4, 0.1, 0.0, 0.9]]
    model = _heads_model(heads)
    ids = torch.randint(0, 64, (2, 28))
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids).logits
    model.set_attn_implementation("drope_triton")
    fused = model(input_ids=ids).logits
    assert (fused - eager).abs().max() < 1e-4
    # token by token with a cache: each step equals the prefill's row (position mode is causal-consistent)
    cache = DynamicCache(config=model.config)
    steps = [model(input_ids=ids[:, :20], **with_cache(model, cache), use_cache=True).logits[:, -1]]
    for i in range(20, 28):
        steps.append(model(input_ids=ids[:, i:i + 1], **with_cache(model, cache), use_cache=True).logits[:, -1])
    assert (torch.stack(steps[1:], 1) - eager[:, 20:]).abs().max() < 1e-4
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config.drope_temperature["head_coefs"] == heads
