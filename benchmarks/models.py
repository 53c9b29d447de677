"""The whole-model cases: a Llama-family DroPE model with random weights, and its prefill or one decode
step bound to a Hugging Face attention implementation (``MODEL_PROVIDERS``)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

import drope
from drope.hf import cache_argument

from .cases import MODEL_DECODE_LENS, MODEL_PREFILL_LENS, Case, temperature
from .providers import ProviderSkip

MODEL_PROVIDERS = ("drope_triton", "sdpa", "eager")


def build_model(config_kwargs: Dict[str, Any], device, dtype: torch.dtype, *, seed: int = 0):
    """A Llama-family causal LM of the given sizes with random weights, turned into a DroPE model.

    ``drope.to_drope(model, qk_norm="head", temperature=position mode, c=0.103, L_train=2048)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config_kwargs, max_position_embeddings=max(MODEL_DECODE_LENS + MODEL_PREFILL_LENS),
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = drope.to_drope(model.to(dtype), qk_norm="head", temperature=temperature("position"))
    return model.to(device=device, dtype=dtype).eval()


def eager_fits(case: Case, free_bytes: Optional[int]) -> Optional[str]:
    """None when HF's eager attention fits, else the reason: it materialises (S x S) weights per layer."""
    Sq = 1 if case.is_decode else case.S
    need = case.B * case.H * Sq * case.S * (2 + 4 + 2)
    if free_bytes is not None and need > 0.5 * free_bytes:
        return (f"eager attention would materialise ~{need / 2**30:.1f} GiB of (S x S) weights per layer, "
                f"{free_bytes / 2**30:.1f} GiB free")
    return None


def build_model_case(model, case: Case, provider: str, *, seed: int = 0) -> Dict[str, Any]:
    """Bind a model op (prefill of S tokens / one decode step on S-1 cached ones) to an attention implementation."""
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(MODEL_PROVIDERS)}, got {provider!r}")
    device = next(model.parameters()).device
    if provider == "eager" and device.type == "cuda":
        reason = eager_fits(case, torch.cuda.mem_get_info()[0])
        if reason:
            raise ProviderSkip(reason)
    try:
        model.set_attn_implementation(provider)
    except Exception as e:  # transformers raises ValueError/ImportError for an implementation it cannot use
        raise ProviderSkip(f"attn_implementation={provider!r} refused: {type(e).__name__}: {str(e)[:200]}")
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (case.B, case.S), generator=g, device=device)
    extra = {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
    if case.op == "model_prefill":
        def call(x):
            with torch.inference_mode():
                return model(input_ids=x, use_cache=False, logits_to_keep=1).logits
        return {"call": call, "sets": [ids], "check": None, "extra": extra}
    if case.op != "model_decode":
        raise ValueError(f"case.op must be model_prefill or model_decode, got {case.op!r}")
    # the cache is filled through SDPA (eager could not hold 64k x 64k weights); the timed step uses provider
    model.set_attn_implementation("sdpa")
    name = cache_argument(model)
    with torch.inference_mode():
        cache = getattr(model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1), name)
    model.set_attn_implementation(provider)
    keep = case.S - 1

    def call(x):
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=True, logits_to_keep=1, **{name: cache}).logits
        extra_tokens = cache.get_seq_length() - keep
        if extra_tokens > 0:  # a negative crop removes tokens in every transformers 4.4x-5.x
            cache.crop(-extra_tokens)
        return logits
    return {"call": call, "sets": [ids[:, -1:]], "check": None, "extra": extra, "cache": cache, "prefix": ids[:, :-1]}
