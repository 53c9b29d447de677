"""``to_drope``: turn a RoPE causal LM (Llama / SmolLM, SmolLM3, Mistral, Qwen2, Qwen3, Gemma) into a DroPE model."""

from __future__ import annotations

import copy

import torch

from .modeling import DROPE_CLASSES
from .temperature import validate_temperature

__all__ = ["to_drope", "QK_NORM_CHOICES"]

QK_NORM_CHOICES = ("auto", "full", "head", None)
_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "attention_type", "qk_norm_type",
              "drope_temperature", "_name_or_path")
_NO_SLIDING = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
# source model_type -> (DroPE family in DROPE_CLASSES, its config fields that have no meaning without RoPE/windows)
_SOURCES = {
    "llama": ("llama", ()),
    "qwen2": ("qwen2", ()),
    "qwen3": ("qwen3", ()),
    # SmolLM3 and Mistral have Llama's layout (names, biases, norms, MLP): their DroPE model is a llama_drope
    "smollm3": ("llama", ("no_rope_layers", "no_rope_layer_interval") + _NO_SLIDING),
    "mistral": ("llama", _NO_SLIDING),
    "gemma": ("gemma", ("use_bidirectional_attention",)),
}
# architectures to_drope refuses, and why (README lists them)
_REFUSED = {
    "gemma2": ("its attention soft-caps logits and alternates sliding-window layers, which DropeAttention does not "
               "carry"),
    "gemma3_text": "its sliding-window layers and (1 + w) per-head QK-norms are not DropeAttention's",
    "gemma3": "its sliding-window layers and (1 + w) per-head QK-norms are not DropeAttention's",
}


def _check_source(model_type: str, config) -> None:
    """Raise ValueError on settings of the source model its DroPE model would silently drop."""
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = [t for t in layer_types if t != "full_attention"]
    if getattr(config, "use_sliding_window", False) or sliding:
        raise ValueError(f"to_drope: the {model_type} model has sliding-window layers (use_sliding_window="
                         f"{getattr(config, 'use_sliding_window', None)}, layer_types={list(layer_types)}); DroPE "
                         "models have full attention in every layer")
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"to_drope: the Mistral model has sliding_window={config.sliding_window}; DroPE models have "
                         "full attention in every layer (set config.sliding_window = None first if the model was "
                         "trained without a window)")
    if model_type == "gemma" and getattr(config, "use_bidirectional_attention", False):
        raise ValueError("to_drope: the Gemma model uses bidirectional attention; DroPE models are causal")


def to_drope(model, *, qk_norm="auto", temperature=None):
    """Convert a RoPE causal LM into a DroPE model with the same weights.

    RoPE is removed from every layer; new QK-norm weights start at one; the returned model's config
    is a ``*_drope`` config (``attention_type``, ``qk_norm_type``, ``drope_temperature``) and its
    ``save_pretrained`` output loads with ``AutoModelForCausalLM`` after ``import drope``.

    Args:
        model: a ``LlamaForCausalLM`` (SmolLM included), ``SmolLM3ForCausalLM`` (its remaining RoPE
            layers lose RoPE too) or ``MistralForCausalLM`` without sliding window (both become
            ``llama_drope``), ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or ``GemmaForCausalLM``
            (``gemma_drope``). Gemma 2 and Gemma 3 are refused (soft-capping, sliding windows).
        qk_norm: ``"full"`` (one RMSNorm over all heads of a token after the projection: SakanaAI's
            recipe), ``"head"`` (per head, weight (D,), fused into the kernel), None (no norm), or
            ``"auto"``: ``"full"`` for Llama/Qwen2, ``"head"`` for Qwen3. Qwen3 keeps its own trained
            per-head norms and accepts only ``"head"``/``"auto"``.
        temperature: None or ``{"mode", "coef", "train_length"}`` (see ``drope.hf.temperature``).

    Returns:
        A new DroPE causal LM sharing the input's parameter tensors (the input model should not be
        used afterwards), on the same device, in the same dtype, train/eval mode and attention
        implementation.

    Raises:
        ValueError: an unsupported architecture, an already-DroPE model, a bad ``qk_norm`` or
            temperature, a model with no attention layers, ``qk_norm`` other than "head" for Qwen3, a
            model with sliding-window layers.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None and str(model_type).endswith("_drope"):
        raise ValueError(f"the model is already a DroPE model (model_type {model_type!r}); set_temperature changes "
                         "its temperature")
    if model_type in _REFUSED:
        raise ValueError(f"to_drope does not convert {model_type!r} models: {_REFUSED[model_type]}")
    if model_type not in _SOURCES:
        raise ValueError(f"to_drope supports model_type {', '.join(_SOURCES)}; got {model_type!r} "
                         f"({type(model).__name__})")
    _check_source(model_type, config)
    if qk_norm not in QK_NORM_CHOICES:
        raise ValueError(f"qk_norm must be one of 'auto', 'full', 'head' or None, got {qk_norm!r}")
    temperature = None if temperature is None else validate_temperature(temperature)
    family, dropped = _SOURCES[model_type]
    config_cls, lm_cls, family = DROPE_CLASSES[family]
    if family == "qwen3":
        if qk_norm not in ("auto", "head"):
            raise ValueError(f"Qwen3 already has a trained per-head QK-norm; convert it with qk_norm='head' (or "
                             f"'auto'), got {qk_norm!r}")
        qk_norm = "head"
    elif qk_norm == "auto":
        qk_norm = "full"
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not hasattr(model, "lm_head") or layers is None:
        raise ValueError(f"to_drope takes a causal LM with .model.layers and .lm_head (e.g. LlamaForCausalLM); got "
                         f"{type(model).__name__}")
    if len(layers) == 0 or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"the model has no attention layers to convert ({len(layers)} layers with self_attn)")

    fields = {k: v for k, v in config.to_dict().items() if k not in _DROP_KEYS + dropped}
    new_config = config_cls(attention_type="nope" if qk_norm is None else "qk_norm_nope",
                            qk_norm_type=qk_norm or "full", drope_temperature=temperature, **fields)
    new_config._attn_implementation = config._attn_implementation
    new_config.architectures = [lm_cls.__name__]

    reference = next(iter(model.parameters()))
    state = model.state_dict()
    with torch.device("meta"):
        new = lm_cls(new_config)
    result = new.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(f"to_drope could not place weights {unexpected[:5]} of {type(model).__name__}")
    for name in result.missing_keys:
        if not name.endswith(("q_norm.weight", "k_norm.weight")):
            raise ValueError(f"to_drope found no weight for {name} in {type(model).__name__}")
        module_name, _, param = name.rpartition(".")
        module = new.get_submodule(module_name)
        setattr(module, param, torch.nn.Parameter(torch.ones(module.weight.shape, dtype=reference.dtype,
                                                             device=reference.device)))
    new.tie_weights()
    # non-persistent buffers (Gemma's embedding scale) are not in the state dict: take the source's
    source_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta and name in source_buffers and source_buffers[name].shape == buf.shape:
            module_name, _, attr = name.rpartition(".")
            setattr(new.get_submodule(module_name), attr, source_buffers[name])
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"to_drope left tensors without values: {left[:5]}")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
