"""``to_drope``: turn a RoPE causal LM (Llama / SmolLM, Qwen2, Qwen3) into a DroPE model."""

from __future__ import annotations

import copy

import torch

from .modeling import DROPE_CLASSES
from .temperature import validate_temperature

__all__ = ["to_drope", "QK_NORM_CHOICES"]

QK_NORM_CHOICES = ("auto", "full", "head", None)
_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "attention_type", "qk_norm_type",
              "drope_temperature", "_name_or_path")


def to_drope(model, *, qk_norm="auto", temperature=None):
    """Convert a RoPE causal LM into a DroPE model with the same weights.

    RoPE is removed from every layer; new QK-norm weights start at one; the returned model's config
    is a ``*_drope`` config (``attention_type``, ``qk_norm_type``, ``drope_temperature``) and its
    ``save_pretrained`` output loads with ``AutoModelForCausalLM`` after ``import drope``.

    Args:
        model: a ``LlamaForCausalLM`` (SmolLM included), ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``.
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
            temperature, a model with no attention layers, or ``qk_norm`` other than "head" for Qwen3.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None and str(model_type).endswith("_drope"):
        raise ValueError(f"the model is already a DroPE model (model_type {model_type!r}); set_temperature changes "
                         "its temperature")
    if model_type not in DROPE_CLASSES:
        raise ValueError(f"to_drope supports model_type {', '.join(DROPE_CLASSES)} (Llama/SmolLM, Qwen2, Qwen3); got "
                         f"{model_type!r} ({type(model).__name__})")
    if qk_norm not in QK_NORM_CHOICES:
        raise ValueError(f"qk_norm must be one of 'auto', 'full', 'head' or None, got {qk_norm!r}")
    temperature = None if temperature is None else validate_temperature(temperature)
    config_cls, lm_cls, family = DROPE_CLASSES[model_type]
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

    fields = {k: v for k, v in config.to_dict().items() if k not in _DROP_KEYS}
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
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"to_drope left tensors without values: {left[:5]}")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
