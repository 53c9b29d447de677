"""DroPE model classes for Llama (SmolLM included; SmolLM3 and Mistral convert to it), Qwen2, Qwen3 and Gemma.

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

Every per-family class is built from one row of :data:`FAMILIES` (see :class:`Family`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma.configuration_gemma import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaForCausalLM, GemmaModel
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
)
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

from ..kernels.cpu.prologue import rms_norm
from .attention import ATTN_IMPLEMENTATION
from .batching import KERNEL_REPO, continuous_batching_attention, paged_attention_forward
from .parallel import CP_IMPLEMENTATION
from .temperature import check_head_coefs, forward_temperature, layer_temperature, temperature_rows, validate_temperature

# transformers 5.17 names the continuous-batching implementation "paged|<name>"
PAGED_KERNEL_REPO = "paged|" + KERNEL_REPO

__all__ = [
    "ATTENTION_TYPES", "QK_NORM_TYPES", "FAMILIES", "Family", "DropeAttention", "DropeRMSNorm",
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
    check_head_coefs(getattr(config, "drope_temperature", None), config.num_hidden_layers, config.num_attention_heads)
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
        raise ValueError("DroPE models need full attention in every layer; sliding-window layers are not supported "
                         f"(layer_types={list(layer_types)}, use_sliding_window={getattr(config, 'use_sliding_window', None)})")


class DropeRMSNorm(nn.Module):
    """The QK-norm module: the kernels' RMSNorm arithmetic over the last dim in fp32 (weight included, as in the
    kernel's prologue), back in the input's dtype. ``weight`` is (Hq*D,) / (Hkv*D,) for the
    all-heads norm, (D,) per head."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), self.weight.float(), self.variance_epsilon).to(x.dtype)

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

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        # the KV cache arrives under the installed release's own name (`cache` from transformers 5.24,
        # `past_key_values` before, `past_key_value` older still). Before 5.24 a `cache` kwarg is continuous
        # batching's paged cache addressed to the paged attention function, which fills it itself: it stays
        # in kwargs for that function.
        cache = kwargs.pop(_CACHE_PARAM, None)
        if cache is None:
            cache = kwargs.pop("past_key_value", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        impl = self.config._attn_implementation
        # drope's attention (also continuous batching's kernel repository and context parallelism) takes the query
        # norm and temperature
        fused = impl in (ATTN_IMPLEMENTATION, KERNEL_REPO, PAGED_KERNEL_REPO, CP_IMPLEMENTATION)

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
        # (B, Sq), or (B, Hq, Sq) with a per-head temperature: the backbone computed the shared part once for
        # the forward; a direct call (or a fit, whose drope_head_coef is set) computes it here
        per_forward = kwargs.pop("drope_temperature", _UNSET)
        head_coef = getattr(self, "drope_head_coef", None)
        if per_forward is _UNSET or head_coef is not None:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_ids = torch.arange(SQ, device=q.device)[None] + past
            rows = temperature_rows(getattr(self.config, "drope_temperature", None), position_ids,
                                    layer_idx=self.layer_idx, head_coef=head_coef)
        else:
            rows = layer_temperature(per_forward, self.layer_idx)
        extra = {}
        if rows is not None:
            rows = rows.to(q.device)
            rows = rows.expand(B, SQ) if rows.dim() == 2 else rows.expand(B, -1, SQ)
        if fused:
            extra = {"drope_q_norm_weight": q_weight, "drope_norm_eps": self.norm_eps, "drope_row_scale": rows}
        elif rows is not None:
            q = q * (rows[:, None, :, None] if rows.dim() == 2 else rows[..., None]).to(q.dtype)

        if cache is not None:
            k, v = _cache_update(cache, k, v, self.layer_idx, kwargs)

        if impl == "eager" or impl is None:
            interface = eager_attention_forward
        else:
            try:
                # transformers 5.17's continuous batching: its paged wrapper would drop the fused arguments
                interface = paged_attention_forward if impl == PAGED_KERNEL_REPO else ALL_ATTENTION_FUNCTIONS[impl]
            except KeyError:
                raise ValueError(f"config._attn_implementation {impl!r} is not a registered attention implementation; "
                                 f"registered: eager, {', '.join(ALL_ATTENTION_FUNCTIONS.valid_keys())} (switch with "
                                 "model.set_attn_implementation(name))") from None
        out, weights = interface(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


_UNSET = object()
_CACHE_PARAM = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
# transformers >= 5.2x hands the attention kwargs to Cache.update (the paged cache of continuous batching
# reads and fills them: cu_seq_lens_k, block_table, ...); older releases took a dict of cache kwargs
def _update_takes_kwargs() -> bool:
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:
        return False
    return "kwargs" in inspect.signature(PagedAttentionCache.update).parameters


_UPDATE_TAKES_KWARGS = _update_takes_kwargs()


def _cache_update(cache, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: dict):
    """``cache.update`` called as the family's own attention calls it in the installed transformers."""
    if _UPDATE_TAKES_KWARGS:
        return cache.update(k, v, layer_idx, kwargs=kwargs)
    return cache.update(k, v, layer_idx, {"cache_position": kwargs["cache_position"]} if "cache_position" in kwargs
                        else {})


class _NoRotary(nn.Module):
    """Stands where the RoPE module was: DroPE layers take no position embeddings."""

    def forward(self, *args, **kwargs):
        return None


def _attention_bias(config) -> bool:
    return bool(config.attention_bias)


@dataclass(frozen=True)
class Family:
    """A RoPE family a DroPE model derives from: its transformers classes and what differs in DroPE.

    The table :data:`FAMILIES` drives everything per family: the config, backbone and causal-LM
    classes (``<title>DropeConfig`` etc., ``model_type`` ``<name>_drope``), :data:`DROPE_CLASSES`
    for ``to_drope``, and the Auto-class registration. A new family is one row (and its three names).
    """

    name: str  # the RoPE model_type
    title: str  # class-name prefix
    config: type
    model: type
    causal_lm: type
    decoder_layer: type
    qkv_bias: Callable[[object], bool]
    o_bias: Callable[[object], bool]
    attention_type: str = "nope"  # config defaults
    qk_norm_type: str = "full"


FAMILIES = (
    Family("llama", "Llama", LlamaConfig, LlamaModel, LlamaForCausalLM, LlamaDecoderLayer,
           _attention_bias, _attention_bias),
    Family("qwen2", "Qwen2", Qwen2Config, Qwen2Model, Qwen2ForCausalLM, Qwen2DecoderLayer,
           lambda c: True, lambda c: False),
    # Qwen3 keeps its trained per-head QK-norm by default
    Family("qwen3", "Qwen3", Qwen3Config, Qwen3Model, Qwen3ForCausalLM, Qwen3DecoderLayer,
           _attention_bias, _attention_bias, attention_type="qk_norm_nope", qk_norm_type="head"),
    # Gemma (v1): Llama's attention; its (1 + w) layer norms and scaled embeddings stay Gemma's
    Family("gemma", "Gemma", GemmaConfig, GemmaModel, GemmaForCausalLM, GemmaDecoderLayer,
           _attention_bias, _attention_bias),
)


class _TemperatureOnce:
    """The DroPE backbones compute the temperature's shared part once per forward (position ids, the log
    ratio, per-head coefficients on the device) and hand it to every layer as ``drope_temperature``."""

    def forward(self, *args, **kwargs):
        temperature = getattr(self.config, "drope_temperature", None)
        if temperature is None or "drope_temperature" in kwargs:
            return super().forward(*args, **kwargs)
        position_ids = args[2] if len(args) > 2 else kwargs.get("position_ids")
        if position_ids is None:
            x = args[0] if args else kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            cache = args[3] if len(args) > 3 else kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            # as the family's backbone computes them (it gets the same tensor, so both agree)
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
            if len(args) <= 2:
                kwargs["position_ids"] = position_ids
        kwargs["drope_temperature"] = forward_temperature(temperature, position_ids)
        return super().forward(*args, **kwargs)


class _DynamicAttention:
    """DroPE attention dispatches through ``ALL_ATTENTION_FUNCTIONS`` on every call, so
    ``set_attn_implementation`` may switch it (transformers otherwise guesses from the module source)."""

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, with what it only logs or reports generically made an error that
        names the weights: a weight of the wrong shape (the QK-norm's expected shape said), and QK-norm weights
        the checkpoint lacks (transformers would start them at one: not the model that was saved)."""
        want_info = kwargs.pop("output_loading_info", False)
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        mismatched = sorted(info.get("mismatched_keys", ()))
        if mismatched and not ignore:
            raise ValueError(f"{source}: checkpoint weights of the wrong shape for {model.config.model_type}: "
                             + "; ".join(f"{k}: checkpoint {tuple(a)}, model {tuple(b)}{_norm_hint(model.config, k)}"
                                         for k, a, b in mismatched)
                             + " (ignore_mismatched_sizes=True loads the rest and starts these anew)")
        missing = sorted(k for k in info.get("missing_keys", ()) if k.endswith(("q_norm.weight", "k_norm.weight")))
        if missing:
            raise ValueError(f"{source}: the checkpoint has no {', '.join(missing)}, but its config asks for QK-norm "
                             f"(attention_type={model.config.attention_type!r}); loaded, they would start at one and "
                             "the model would not be the one that was saved. Save the model again, or set "
                             "attention_type to the norms the checkpoint has")
        return (model, info) if want_info else model

    def generate_batch(self, *args, **kwargs):
        """transformers' continuous batching, with a failed request raised (transformers only logs it and
        returns the request with no tokens)."""
        inputs = args[0] if args else kwargs.get("inputs")
        for i, prompt in enumerate(inputs or ()):
            if len(prompt) == 0:
                raise ValueError(f"generate_batch: inputs[{i}] is an empty prompt; every request needs at least one "
                                 "token (e.g. the tokenizer's BOS)")
        impl = self.config._attn_implementation
        if impl == ATTN_IMPLEMENTATION:
            # continuous batching refuses the name drope_triton: the same kernels run as its kernel repository
            self.set_attn_implementation(continuous_batching_attention())
        try:
            results = super().generate_batch(*args, **kwargs)
        finally:
            if impl == ATTN_IMPLEMENTATION:
                self.set_attn_implementation(impl)
        failed = {rid: out.error for rid, out in results.items() if getattr(out, "error", None)}
        if failed:
            first = next(iter(failed.items()))
            raise RuntimeError(f"{len(failed)} of {len(results)} continuous-batching requests failed; "
                               f"{first[0]}: {first[1]}")
        return results

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching manager; a model on drope_triton moves to the same kernels' repository
        name (continuous batching refuses drope_triton by name) and stays there (it serves generate too)."""
        if self.config._attn_implementation == ATTN_IMPLEMENTATION:
            self.set_attn_implementation(continuous_batching_attention())
        return super().init_continuous_batching(*args, **kwargs)

    def _get_stopping_criteria(self, *args, **kwargs):
        # a NoPE model has no position limit: no "exceeded the model's predefined maximum length" reminder
        from transformers.generation.stopping_criteria import MaxLengthCriteria

        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for c in criteria:
            if isinstance(c, MaxLengthCriteria):
                c.max_position_embeddings = None
        return criteria


def _norm_hint(config, key: str) -> str:
    """What shape a QK-norm weight of ``config`` has, for an error about ``key``."""
    if not key.endswith(("q_norm.weight", "k_norm.weight")):
        return ""
    heads = config.num_attention_heads if key.endswith("q_norm.weight") else config.num_key_value_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(config, "qk_norm_type", "full") == "full":
        return f" (qk_norm_type 'full': one norm over all heads, ({heads * D},); 'head' would be ({D},))"
    return f" (qk_norm_type 'head': one norm per head, ({D},); 'full' would be ({heads * D},))"


# a DroPE checkpoint's config must state its sizes: without them the family's defaults build a full-size model
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _config_class(family: Family) -> type:
    def __init__(self, attention_type: str = family.attention_type, qk_norm_type: str = family.qk_norm_type,
                 drope_temperature: Optional[dict] = None, **kwargs):
        self.attention_type = attention_type
        self.qk_norm_type = qk_norm_type
        self.drope_temperature = None if drope_temperature is None else validate_temperature(drope_temperature)
        family.config.__init__(self, **kwargs)
        check_drope_config(self)

    doc = f"""Config of a {family.title} DroPE model (``model_type`` ``{family.name}_drope``).

    Args:
        attention_type: ``"nope"``, ``"qk_norm_nope"``, ``"q_norm_nope"`` or ``"k_norm_nope"``
            (default ``{family.attention_type!r}``).
        qk_norm_type: ``"full"`` (over all heads, SakanaAI's) or ``"head"`` (per head); default
            ``{family.qk_norm_type!r}``.
        drope_temperature: None or ``{{"mode", "coef", "train_length"}}``.
        **kwargs: the {family.title} config fields.
    """
    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        missing = [f for f in SIZE_FIELDS if f not in config_dict and f not in kwargs]
        if missing:
            raise ValueError(f"{family.name}_drope config is missing {', '.join(missing)}: a DroPE checkpoint's "
                             f"config.json must state its sizes (without them transformers would build a full-size "
                             f"{family.title} model from its defaults)")
        return family.config.from_dict.__func__(cls, config_dict, **kwargs)

    return _new_class(f"{family.title}DropeConfig", (family.config,), doc, __init__=__init__, from_dict=from_dict,
                      model_type=f"{family.name}_drope")


def _model_classes(family: Family, config_cls: type) -> tuple:
    records = {"hidden_states": family.decoder_layer, "attentions": DropeAttention}

    def model_init(self, config):
        family.model.__init__(self, config)
        check_drope_config(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = DropeAttention(config, i, qkv_bias=family.qkv_bias(config),
                                             o_bias=family.o_bias(config))
        self.rotary_emb = _NoRotary()
        self.post_init()

    model_cls = _new_class(f"{family.title}DropeModel", (_TemperatureOnce, _DynamicAttention, family.model),
                           f"{family.title} backbone without RoPE (see :mod:`drope.hf.modeling`).",
                           __init__=model_init, config_class=config_cls, _can_record_outputs=records)

    def lm_init(self, config):
        family.causal_lm.__init__(self, config)
        self.model = model_cls(config)
        self.post_init()

    lm_cls = _new_class(f"{family.title}DropeForCausalLM", (_DynamicAttention, family.causal_lm),
                        f"{family.title} DroPE causal LM (``model_type`` ``{family.name}_drope``).",
                        __init__=lm_init, config_class=config_cls, _can_record_outputs=records)
    return model_cls, lm_cls


def _new_class(name: str, bases: tuple, doc: str, **namespace) -> type:
    return type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc, **namespace})


def _family_classes(family: Family) -> tuple:
    config_cls = _config_class(family)
    return (config_cls, *_model_classes(family, config_cls))


_CLASSES = {family.name: _family_classes(family) for family in FAMILIES}
LlamaDropeConfig, LlamaDropeModel, LlamaDropeForCausalLM = _CLASSES["llama"]
Qwen2DropeConfig, Qwen2DropeModel, Qwen2DropeForCausalLM = _CLASSES["qwen2"]
Qwen3DropeConfig, Qwen3DropeModel, Qwen3DropeForCausalLM = _CLASSES["qwen3"]
GemmaDropeConfig, GemmaDropeModel, GemmaDropeForCausalLM = _CLASSES["gemma"]

# RoPE family model_type -> (DroPE config, DroPE causal LM, family name), for to_drope
DROPE_CLASSES = {name: (config_cls, lm_cls, name) for name, (config_cls, _, lm_cls) in _CLASSES.items()}


def register() -> None:
    """Register the DroPE configs and models with ``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``."""
    for config_cls, model_cls, lm_cls in _CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
