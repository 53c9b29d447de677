"""DroPE model classes for Llama (SmolLM, SmolLM3 and Mistral convert to it), Qwen2, Qwen3 and Gemma.

A DroPE model is its RoPE family's model with RoPE removed and an optional QK-norm:

- ``attention_type`` (SakanaAI's vocabulary): ``"nope"`` (no norm), ``"qk_norm_nope"`` (both),
  ``"q_norm_nope"`` (queries only), ``"k_norm_nope"`` (keys only);
- ``qk_norm_type``: ``"full"`` = one RMSNorm over all heads of a token right after the projection
  (weights ``self_attn.q_norm.weight`` (Hq*D,), ``self_attn.k_norm.weight`` (Hkv*D,), eps
  ``rms_norm_eps``: SakanaAI's released models), or ``"head"`` = an RMSNorm per head, weight (D,)
  (Qwen3's shape), fused into the Triton kernel for queries;
- ``drope_temperature``: see :mod:`drope.hf.temperature`;
- optional ``softmax_scale``: replaces ``D**-0.5`` as the base scale when set (as SakanaAI's code).

Keys are cached normalised. With ``attn_implementation="drope_triton"`` the per-head query norm and
the temperature run inside the kernel; with ``"eager"``/``"sdpa"`` the same model applies them in
torch (the reference path). The model types ``llama_drope``, ``qwen2_drope`` (SakanaAI's) and
``qwen3_drope`` are registered with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma.configuration_gemma import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaForCausalLM, GemmaModel
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
)
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

from .attention import ATTN_IMPLEMENTATION
from .temperature import temperature_rows, validate_temperature

__all__ = [
    "ATTENTION_TYPES", "QK_NORM_TYPES", "DropeAttention", "DropeRMSNorm",
    "LlamaDropeConfig", "LlamaDropeModel", "LlamaDropeForCausalLM",
    "Qwen2DropeConfig", "Qwen2DropeModel", "Qwen2DropeForCausalLM",
    "Qwen3DropeConfig", "Qwen3DropeModel", "Qwen3DropeForCausalLM",
    "GemmaDropeConfig", "GemmaDropeModel", "GemmaDropeForCausalLM",
    "register",
]

ATTENTION_TYPES = ("nope", "qk_norm_nope", "q_norm_nope", "k_norm_nope")
QK_NORM_TYPES = ("full", "head")


def cache_argument(model) -> str:
    """Name of the KV-cache argument (and output field) of ``model.forward``: ``"cache"`` on
    transformers >= 5.24, ``"past_key_values"`` before (5.24 still accepts the old name, with a
    deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_drope_config(config) -> None:
    """Raise ValueError on DroPE config fields outside what the model classes accept."""
    attention_type = getattr(config, "attention_type", "nope")
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {', '.join(ATTENTION_TYPES)}, got {attention_type!r}")
    qk_norm_type = getattr(config, "qk_norm_type", "full")
    if qk_norm_type not in QK_NORM_TYPES:
        raise ValueError(f"qk_norm_type must be one of {', '.join(QK_NORM_TYPES)}, got {qk_norm_type!r}")
    validate_temperature(getattr(config, "drope_temperature", None))
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
        raise ValueError("DroPE models need full attention in every layer; sliding-window layers are not supported "
                         f"(layer_types={list(layer_types)}, use_sliding_window={getattr(config, 'use_sliding_window', None)})")


def _init_drope_fields(config, attention_type, qk_norm_type, drope_temperature) -> None:
    config.attention_type = attention_type
    config.qk_norm_type = qk_norm_type
    config.drope_temperature = None if drope_temperature is None else validate_temperature(drope_temperature)


class LlamaDropeConfig(LlamaConfig):
    """Config of a Llama-family DroPE model (``model_type`` ``llama_drope``, SakanaAI's format).

    Args:
        attention_type: ``"nope"``, ``"qk_norm_nope"``, ``"q_norm_nope"`` or ``"k_norm_nope"``.
        qk_norm_type: ``"full"`` (over all heads, SakanaAI's) or ``"head"`` (per head).
        drope_temperature: None or ``{"mode", "coef", "train_length"}``.
        **kwargs: the Llama config fields.
    """

    model_type = "llama_drope"

    def __init__(self, attention_type: str = "nope", qk_norm_type: str = "full",
                 drope_temperature: Optional[dict] = None, **kwargs):
        _init_drope_fields(self, attention_type, qk_norm_type, drope_temperature)
        super().__init__(**kwargs)
        check_drope_config(self)


class Qwen2DropeConfig(Qwen2Config):
    """Config of a Qwen2 DroPE model (``model_type`` ``qwen2_drope``, SakanaAI's format); fields as
    :class:`LlamaDropeConfig`."""

    model_type = "qwen2_drope"

    def __init__(self, attention_type: str = "nope", qk_norm_type: str = "full",
                 drope_temperature: Optional[dict] = None, **kwargs):
        _init_drope_fields(self, attention_type, qk_norm_type, drope_temperature)
        super().__init__(**kwargs)
        check_drope_config(self)


class Qwen3DropeConfig(Qwen3Config):
    """Config of a Qwen3 DroPE model (``model_type`` ``qwen3_drope``); defaults keep Qwen3's per-head
    QK-norm (``attention_type="qk_norm_nope"``, ``qk_norm_type="head"``)."""

    model_type = "qwen3_drope"

    def __init__(self, attention_type: str = "qk_norm_nope", qk_norm_type: str = "head",
                 drope_temperature: Optional[dict] = None, **kwargs):
        _init_drope_fields(self, attention_type, qk_norm_type, drope_temperature)
        super().__init__(**kwargs)
        check_drope_config(self)


class GemmaDropeConfig(GemmaConfig):
    """Config of a Gemma (v1) DroPE model (``model_type`` ``gemma_drope``); fields as :class:`LlamaDropeConfig`."""

    model_type = "gemma_drope"

    def __init__(self, attention_type: str = "nope", qk_norm_type: str = "full",
                 drope_temperature: Optional[dict] = None, **kwargs):
        _init_drope_fields(self, attention_type, qk_norm_type, drope_temperature)
        super().__init__(**kwargs)
        check_drope_config(self)


class DropeRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (as transformers' Llama/Qwen norms)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DropeAttention(nn.Module):
    """NoPE self-attention with optional QK-norm ("full" or "head") and softmax temperature.

    Weight names match transformers' attention modules (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``q_norm``, ``k_norm``), so RoPE checkpoints, SakanaAI's checkpoints and Qwen3's
    per-head norms load unchanged.
    """

    def __init__(self, config, layer_idx: int, *, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        scale = getattr(config, "softmax_scale", None)
        self.scaling = float(scale) if scale is not None else self.head_dim ** -0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0) or 0.0
        self.is_causal = True
        D = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * D, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * D, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * D, config.hidden_size, bias=o_bias)
        attention_type = getattr(config, "attention_type", "nope")
        self.qk_norm_type = getattr(config, "qk_norm_type", "full")
        self.norm_eps = float(config.rms_norm_eps)
        full = self.qk_norm_type == "full"
        if attention_type in ("qk_norm_nope", "q_norm_nope"):
            self.q_norm = DropeRMSNorm(self.num_heads * D if full else D, eps=self.norm_eps)
        else:
            self.q_norm = None
        if attention_type in ("qk_norm_nope", "k_norm_nope"):
            self.k_norm = DropeRMSNorm(self.num_key_value_heads * D if full else D, eps=self.norm_eps)
        else:
            self.k_norm = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        # the KV cache arrives as `cache` (transformers >= 5.24), `past_key_values` or `past_key_value` (older)
        if cache is None:
            cache = past_key_values if past_key_values is not None else kwargs.pop("past_key_value", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        impl = self.config._attn_implementation
        fused = impl == ATTN_IMPLEMENTATION

        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        if self.qk_norm_type == "full":
            q = q if self.q_norm is None else self.q_norm(q)
            k = k if self.k_norm is None else self.k_norm(k)
        q = q.view(hidden_shape).transpose(1, 2)
        k = k.view(hidden_shape).transpose(1, 2)
        v = v.view(hidden_shape).transpose(1, 2)
        q_weight = None
        if self.qk_norm_type == "head":
            # keys are normalised before caching; the query norm runs in the kernel when fused
            k = k if self.k_norm is None else self.k_norm(k)
            if self.q_norm is not None:
                if fused:
                    q_weight = self.q_norm.weight
                else:
                    q = self.q_norm(q)

        B, SQ = q.shape[0], q.shape[2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            position_ids = torch.arange(past, past + SQ, device=q.device)[None]
        rows = temperature_rows(getattr(self.config, "drope_temperature", None), position_ids)
        extra = {}
        if rows is not None:
            rows = rows.to(q.device).expand(B, SQ)
        if fused:
            extra = {"drope_q_norm_weight": q_weight, "drope_norm_eps": self.norm_eps, "drope_row_scale": rows}
        elif rows is not None:
            q = q * rows[:, None, :, None].to(q.dtype)

        if cache is not None:
            cache_kwargs = {"cache_position": kwargs["cache_position"]} if "cache_position" in kwargs else {}
            k, v = cache.update(k, v, self.layer_idx, cache_kwargs)

        if impl == "eager" or impl is None:
            interface = eager_attention_forward
        else:
            interface = ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = interface(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class _NoRotary(nn.Module):
    """Stands where the RoPE module was: DroPE layers take no position embeddings."""

    def forward(self, *args, **kwargs):
        return None


_FAMILIES = {
    # family: (decoder layer, q/k/v bias, o bias)
    "llama": (LlamaDecoderLayer, lambda c: bool(c.attention_bias), lambda c: bool(c.attention_bias)),
    "qwen2": (Qwen2DecoderLayer, lambda c: True, lambda c: False),
    "qwen3": (Qwen3DecoderLayer, lambda c: bool(c.attention_bias), lambda c: bool(c.attention_bias)),
    "gemma": (GemmaDecoderLayer, lambda c: bool(c.attention_bias), lambda c: bool(c.attention_bias)),
}


def _make_nope(backbone: nn.Module, config, family: str) -> None:
    """Swap every layer's attention for :class:`DropeAttention` and remove the RoPE module."""
    check_drope_config(config)
    _, qkv_bias, o_bias = _FAMILIES[family]
    for i, layer in enumerate(backbone.layers):
        layer.self_attn = DropeAttention(config, i, qkv_bias=qkv_bias(config), o_bias=o_bias(config))
    backbone.rotary_emb = _NoRotary()


def _records(family: str) -> dict:
    return {"hidden_states": _FAMILIES[family][0], "attentions": DropeAttention}


class _DynamicAttention:
    """DroPE attention dispatches through ``ALL_ATTENTION_FUNCTIONS`` on every call, so
    ``set_attn_implementation`` may switch it (transformers otherwise guesses from the module source)."""

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True


class LlamaDropeModel(_DynamicAttention, LlamaModel):
    """Llama backbone without RoPE (see :mod:`drope.hf.modeling`)."""

    config_class = LlamaDropeConfig
    _can_record_outputs = _records("llama")

    def __init__(self, config: LlamaDropeConfig):
        super().__init__(config)
        _make_nope(self, config, "llama")
        self.post_init()


class LlamaDropeForCausalLM(_DynamicAttention, LlamaForCausalLM):
    """Llama / SmolLM DroPE causal LM (``model_type`` ``llama_drope``)."""

    config_class = LlamaDropeConfig
    _can_record_outputs = _records("llama")

    def __init__(self, config: LlamaDropeConfig):
        super().__init__(config)
        self.model = LlamaDropeModel(config)
        self.post_init()


class Qwen2DropeModel(_DynamicAttention, Qwen2Model):
    """Qwen2 backbone without RoPE."""

    config_class = Qwen2DropeConfig
    _can_record_outputs = _records("qwen2")

    def __init__(self, config: Qwen2DropeConfig):
        super().__init__(config)
        _make_nope(self, config, "qwen2")
        self.post_init()


class Qwen2DropeForCausalLM(_DynamicAttention, Qwen2ForCausalLM):
    """Qwen2 DroPE causal LM (``model_type`` ``qwen2_drope``)."""

    config_class = Qwen2DropeConfig
    _can_record_outputs = _records("qwen2")

    def __init__(self, config: Qwen2DropeConfig):
        super().__init__(config)
        self.model = Qwen2DropeModel(config)
        self.post_init()


class Qwen3DropeModel(_DynamicAttention, Qwen3Model):
    """Qwen3 backbone without RoPE."""

    config_class = Qwen3DropeConfig
    _can_record_outputs = _records("qwen3")

    def __init__(self, config: Qwen3DropeConfig):
        super().__init__(config)
        _make_nope(self, config, "qwen3")
        self.post_init()


class Qwen3DropeForCausalLM(_DynamicAttention, Qwen3ForCausalLM):
    """Qwen3 DroPE causal LM (``model_type`` ``qwen3_drope``)."""

    config_class = Qwen3DropeConfig
    _can_record_outputs = _records("qwen3")

    def __init__(self, config: Qwen3DropeConfig):
        super().__init__(config)
        self.model = Qwen3DropeModel(config)
        self.post_init()


class GemmaDropeModel(_DynamicAttention, GemmaModel):
    """Gemma backbone without RoPE."""

    config_class = GemmaDropeConfig
    _can_record_outputs = _records("gemma")

    def __init__(self, config: GemmaDropeConfig):
        super().__init__(config)
        _make_nope(self, config, "gemma")
        self.post_init()


class GemmaDropeForCausalLM(_DynamicAttention, GemmaForCausalLM):
    """Gemma (v1) DroPE causal LM (``model_type`` ``gemma_drope``)."""

    config_class = GemmaDropeConfig
    _can_record_outputs = _records("gemma")

    def __init__(self, config: GemmaDropeConfig):
        super().__init__(config)
        self.model = GemmaDropeModel(config)
        self.post_init()


# RoPE family model_type -> (DroPE config, DroPE causal LM, family)
DROPE_CLASSES = {
    "llama": (LlamaDropeConfig, LlamaDropeForCausalLM, "llama"),
    "qwen2": (Qwen2DropeConfig, Qwen2DropeForCausalLM, "qwen2"),
    "qwen3": (Qwen3DropeConfig, Qwen3DropeForCausalLM, "qwen3"),
    "gemma": (GemmaDropeConfig, GemmaDropeForCausalLM, "gemma"),
}


def register() -> None:
    """Register the DroPE configs and models with ``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``."""
    for config_cls, base_cls, lm_cls in (
        (LlamaDropeConfig, LlamaDropeModel, LlamaDropeForCausalLM),
        (Qwen2DropeConfig, Qwen2DropeModel, Qwen2DropeForCausalLM),
        (Qwen3DropeConfig, Qwen3DropeModel, Qwen3DropeForCausalLM),
        (GemmaDropeConfig, GemmaDropeModel, GemmaDropeForCausalLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
