"""Tiny Hugging Face models and a locally trained tokenizer for the HF integration tests (no downloads)."""

from __future__ import annotations

import functools

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import drope

VOCAB = 96
# CPU models run the kernels in Triton's interpreter; on a GPU machine the same tests run compiled on CUDA
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_config(family: str, **overrides):
    """hidden 64, 4 query heads / 2 KV heads of D 16, 2 layers: small enough for the interpreter."""
    config_cls, _ = FAMILIES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return config_cls(**kw)


def rope_model(family: str, seed: int = 0, device: str = DEVICE, **overrides):
    """A randomly initialised RoPE causal LM of the family, fp32, eval mode, eager attention, on ``device``."""
    torch.manual_seed(seed)
    _, model_cls = FAMILIES[family]
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(device)


def perturb_norms(model, seed: int = 1):
    """QK-norm weights away from one, so a test notices a norm applied without its weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def drope_model(family: str, qk_norm="auto", temperature=None, seed: int = 0, device: str = DEVICE, **overrides):
    """A converted DroPE model with random weights and perturbed norm weights (fp32, eval)."""
    model = drope.to_drope(rope_model(family, seed, device, **overrides), qk_norm=qk_norm, temperature=temperature)
    return perturb_norms(model, seed + 1).eval()


def to_device(batch: dict, device) -> dict:
    """The batch's tensors moved to ``device`` (other entries as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def logits(model, impl: str, input_ids, **kwargs) -> torch.Tensor:
    """Logits (on the CPU) of one forward under the attention implementation ``impl``."""
    model.set_attn_implementation(impl)
    kwargs = to_device(kwargs, model.device)
    with torch.no_grad():
        return model(input_ids=input_ids.to(model.device), **kwargs).logits.cpu()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A BPE of at most VOCAB tokens trained in well under a second on a few sentences; left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "the quick brown fox jumps over the lazy dog",
        "a needle hides in a haystack of long context",
        "dropping positional embeddings extends the context",
        "rotary embeddings are removed and the model is recalibrated",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.padding_side = "left"
    assert len(fast) <= VOCAB
    return fast


# The zoo: decoder architectures of transformers that build from a tiny config, each with what it can switch
# on (windows, chunks, sinks, soft-caps) set shorter than the ~24-token test prompts.
ZOO_WINDOW = 7
_ZOO_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, tie_word_embeddings=False, attention_dropout=0.0)
_MIXED = ["sliding_attention", "full_attention"]
# model_type: (config overrides, what the drope_triton calls must receive: window / chunk / sinks / softcap)
ZOO = {
    "llama": ({}, set()),
    "qwen2": (dict(use_sliding_window=True, sliding_window=ZOO_WINDOW, max_window_layers=0, layer_types=_MIXED),
              {"window"}),
    "qwen2_moe": (dict(use_sliding_window=True, sliding_window=ZOO_WINDOW, max_window_layers=0, layer_types=_MIXED,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32), {"window"}),
    "qwen3": (dict(use_sliding_window=True, sliding_window=ZOO_WINDOW, max_window_layers=0, layer_types=_MIXED),
              {"window"}),
    "mistral": (dict(sliding_window=ZOO_WINDOW), {"window"}),
    "phimoe": (dict(sliding_window=ZOO_WINDOW, num_local_experts=4, num_experts_per_tok=2), {"window"}),
    "starcoder2": (dict(sliding_window=ZOO_WINDOW), {"window"}),
    "gemma": ({}, set()),
    "gemma2": (dict(sliding_window=ZOO_WINDOW, layer_types=_MIXED, attn_logit_softcapping=2.0,
                    final_logit_softcapping=5.0), {"window", "softcap"}),
    "gemma3_text": (dict(sliding_window=ZOO_WINDOW, layer_types=_MIXED), {"window"}),
    "cohere2": (dict(sliding_window=ZOO_WINDOW, layer_types=_MIXED), {"window"}),
    "smollm3": (dict(use_sliding_window=True, sliding_window=ZOO_WINDOW, layer_types=_MIXED, no_rope_layers=[1, 0]),
                {"window"}),
    "llama4_text": (dict(attention_chunk_size=ZOO_WINDOW, no_rope_layers=[1, 0], num_local_experts=2,
                         num_experts_per_tok=1, intermediate_size_mlp=96, interleave_moe_layer_step=2,
                         attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5), {"chunk"}),
    "gpt_oss": (dict(sliding_window=ZOO_WINDOW, layer_types=_MIXED, num_local_experts=4, num_experts_per_tok=2),
                {"window", "sinks"}),
    "olmo2": ({}, set()),
    "olmo3": (dict(sliding_window=ZOO_WINDOW, layer_types=_MIXED), {"window"}),
    "granite": (dict(attention_multiplier=0.2, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=1.5),
                set()),
    "phi3": (dict(sliding_window=ZOO_WINDOW), {"window"}),
    "exaone4": (dict(sliding_window=ZOO_WINDOW, layer_types=_MIXED), {"window"}),
}


def zoo_model(model_type: str, seed: int = 0, device: str = DEVICE, **overrides):
    """A randomly initialised tiny causal LM of ``model_type`` (fp32, eval, eager), biases and sinks
    drawn away from zero so that a dropped one shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**_ZOO_COMMON, **ZOO[model_type][0], **overrides})
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.5)
    return model.to(device)
