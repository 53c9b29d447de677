"""Loading a local model for a NIAH sweep, and every check that runs before or right after it.

The tokenizer and model come from a local ``save_pretrained`` directory (nothing is downloaded), with the
run's attention implementation, RoPE scaling (transformers' ``config.rope_parameters``) and DroPE
temperature (``drope.hf.temperature.set_temperature``); the checks refuse what cannot run (an unusable
attention, a length that does not fit in memory, the interpreter trap) before any request.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import warnings
from pathlib import Path
from typing import Dict, Iterator

import torch

from . import profile as prof
from .config import DTYPES, NIAHError, RunConfig, SlowPathWarning, parse_rope_scaling, parse_temperature
from .tasks import DEFAULT_MAX_NEW_TOKENS


def apply_rope_scaling(config, spec: str) -> Dict[str, object]:
    """Set ``config.rope_parameters`` for a RoPE-scaling baseline (transformers computes the rest).

    Args:
        config: the model's config, modified in place before the model is built.
        spec: see :func:`parse_rope_scaling`.

    Returns:
        The new ``rope_parameters``.

    Raises:
        NIAHError: the model has no RoPE parameters (NoPE/DroPE models), per-layer RoPE, missing
            longrope factors, or parameters transformers rejects.
    """
    params = parse_rope_scaling(spec)
    if str(getattr(config, "model_type", "")).endswith("_drope"):
        raise NIAHError(
            f"--rope-scaling applies to RoPE models; this is a DroPE model (model_type {config.model_type!r}) "
            "with no RoPE to scale: use --temperature instead"
        )
    base = getattr(config, "rope_parameters", None)
    if not base or "rope_theta" not in base:
        raise NIAHError(
            "--rope-scaling applies to RoPE models; this model's config has no rope_parameters with rope_theta "
            "(a NoPE/DroPE model has nothing to scale)"
        )
    rope_type = params["rope_type"]
    new = {"rope_theta": base["rope_theta"]}
    if "partial_rotary_factor" in base:
        new["partial_rotary_factor"] = base["partial_rotary_factor"]
    original = base.get("original_max_position_embeddings") or config.max_position_embeddings
    if rope_type in ("yarn", "longrope", "llama3"):
        new["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        new.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if rope_type == "longrope" and "long_factor" not in params:
        if base.get("rope_type") != "longrope":
            raise NIAHError(
                "--rope-scaling longrope needs per-frequency short_factor/long_factor lists; pass a .json file "
                "with the full rope_parameters (or use a model whose config already has them)"
            )
        new.update(short_factor=base["short_factor"], long_factor=base["long_factor"])
    new.update(params)
    if rope_type == "dynamic" and "original_max_position_embeddings" in params:
        # transformers' dynamic NTK takes the original length from max_position_embeddings
        config.max_position_embeddings = int(new.pop("original_max_position_embeddings"))
    config.rope_parameters = new
    try:
        if hasattr(config, "validate_rope"):
            config.validate_rope()
    except (KeyError, ValueError, TypeError) as e:
        raise NIAHError(f"--rope-scaling {spec!r}: transformers rejects rope_parameters {new}: {e}") from None
    return new



def available_attn_implementations() -> Dict[str, str]:
    """Each implementation this harness knows, mapped to "" when usable or to why it is not."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out = {"eager": "", "sdpa": ""}
    try:
        from transformers.utils import is_flash_attn_2_available

        out["flash_attention_2"] = "" if is_flash_attn_2_available() else "the flash-attn package is not installed"
    except ImportError:
        out["flash_attention_2"] = "transformers cannot check for flash-attn"
    importlib.import_module("drope.hf")  # registers drope_triton
    out["drope_triton"] = "" if "drope_triton" in ALL_ATTENTION_FUNCTIONS else (
        "importing drope did not register it with transformers' AttentionInterface")
    for name in ALL_ATTENTION_FUNCTIONS:
        out.setdefault(name, "")
    return out


def check_attn(attn: str) -> None:
    """Raise :class:`NIAHError` when ``attn`` is unknown or not usable here."""
    avail = available_attn_implementations()
    if attn not in avail:
        raise NIAHError(f"--attn: unknown attention implementation {attn!r}; accepted: {', '.join(avail)}")
    if avail[attn]:
        raise NIAHError(f"--attn {attn} is not available: {avail[attn]}")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise NIAHError(f"--device: {spec!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NIAHError(f"--device {spec}: CUDA is not available on this machine")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


@contextlib.contextmanager
def _transformers_progress_bars_off() -> Iterator[None]:
    """No "Loading weights" bar from transformers inside the block; the previous setting is restored."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def check_model_dir(model: str) -> Path:
    """The model directory, or :class:`NIAHError` saying what a local model directory holds."""
    path = Path(model)
    if not path.exists():
        raise NIAHError(
            f"--model: {path} does not exist; a local directory written by save_pretrained (config.json, "
            "weights, tokenizer files) is expected, nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        raise NIAHError(f"--model: {path} has no config.json; expected a directory written by save_pretrained")
    return path


def load_tokenizer(model: str):
    """The tokenizer saved beside a local model.

    Raises:
        NIAHError: missing directory or config, no usable tokenizer.
    """
    from transformers import AutoTokenizer

    path = check_model_dir(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError or TypeError depending on what is missing
        raise NIAHError(
            f"--model: no usable tokenizer in {path} ({type(e).__name__}: {e}); save the tokenizer beside the "
            "model with tokenizer.save_pretrained"
        ) from None
    if tokenizer is None or not callable(tokenizer):
        raise NIAHError(f"--model: no usable tokenizer in {path}")
    return tokenizer


def load_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype, tokenizer=None):
    """Model and tokenizer from a local directory, with the run's attention, RoPE scaling, temperature.

    Args:
        cfg: the run (model, attn, rope_scaling, temperature are read).
        device, dtype: where and how to load the weights.
        tokenizer: the model's tokenizer when already loaded (:func:`load_tokenizer`).

    Returns:
        ``(model, tokenizer, effective_rope_parameters)``.

    Raises:
        NIAHError: missing path, config or tokenizer; unusable attention; rejected RoPE scaling or
            temperature.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from drope.hf.temperature import set_temperature

    path = check_model_dir(cfg.model)
    check_attn(cfg.attn)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    rope = apply_rope_scaling(config, cfg.rope_scaling) if cfg.rope_scaling else getattr(config, "rope_parameters", None)
    try:
        with _transformers_progress_bars_off():  # the sweep's own bar is the one bar of the job
            model = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, attn_implementation=cfg.attn, local_files_only=True
            )
    except (ValueError, ImportError, KeyError) as e:
        raise NIAHError(f"cannot load {path} with attn_implementation={cfg.attn!r}: {e}") from None
    model.to(device).eval()
    if cfg.temperature is not None:
        try:
            set_temperature(model, parse_temperature(cfg.temperature))
        except ValueError as e:
            raise NIAHError(f"--temperature {cfg.temperature}: {e}") from None
    return model, tokenizer, rope



def kernels_interpreted() -> bool:
    """Whether drope's Triton kernels were defined under Triton's interpreter (``TRITON_INTERPRET=1`` before the
    import); otherwise CPU tensors run drope's exact PyTorch kernels."""
    from ..kernels.toolkit import defined_interpreted

    return defined_interpreted()


def check_attention_path(attn: str, device: torch.device) -> Dict[str, object]:
    """What ``attn`` will run on ``device`` (:func:`drope.niah.profile.attention_path`), with a warning
    (:class:`SlowPathWarning`) about a path far slower than the others (drope's kernels in Triton's interpreter)."""
    path = prof.attention_path(attn, device)
    if attn != "drope_triton" or not path["slow"]:
        return path
    warnings.warn(
        f"--attn drope_triton with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} exported before drope was "
        "imported runs drope's Triton kernels in Triton's interpreter, which executes every kernel program in "
        "Python: not what a measurement should run. The interpreter is meant for tests; for real runs unset it "
        "(`env -u TRITON_INTERPRET drope niah ...`: CPU tensors then run drope's PyTorch kernels), or use --attn sdpa",
        SlowPathWarning, stacklevel=3,
    )
    return path


def check_memory(cfg: RunConfig, model, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse lengths whose estimated memory exceeds the budget, naming the implementations that would fit.

    Raises:
        NIAHError: with each length's estimate and what to change.
    """
    avail = cfg.memory_budget_mb if cfg.memory_budget_mb is not None else prof.available_memory_mb(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / prof.MB
    new = cfg.max_new_tokens or max(DEFAULT_MAX_NEW_TOKENS[t] for t in cfg.tasks)
    W = cfg.context_parallel

    def estimate(attn: str, length: int) -> Dict[str, float]:
        if W == 1:
            return prof.estimate_memory_mb(model.config, length, new, dtype, attn, device)
        # a rank of a context-parallel run: its 1/W of the rows (O(L) attention), plus one layer's gathered K/V
        est = prof.estimate_memory_mb(model.config, -(-length // W), new, dtype, "sdpa", device)
        layer = prof.estimate_memory_mb(model.config, length, 0, dtype, "sdpa", device)["kv_cache_mb"] / max(
            1, int(getattr(model.config.get_text_config(), "num_hidden_layers", 1)))
        return dict(est, activations_mb=est["activations_mb"] + layer, total_mb=est["total_mb"] + 1.1 * layer)

    too_big = [n for n in cfg.lengths if estimate(cfg.attn, n)["total_mb"] > avail]
    if not too_big:
        return
    lines = []
    for n in too_big:
        est = estimate(cfg.attn, n)
        lines.append(f"  length {n}: needs ~{est['total_mb']:.0f} MiB (KV cache {est['kv_cache_mb']:.0f} MiB + "
                     f"activations {est['activations_mb']:.0f} MiB, +10 %)")
    usable = available_attn_implementations()
    others = [a for a in ("sdpa", "drope_triton", "flash_attention_2")
              if a != cfg.attn and not usable.get(a, "missing") and (a != "flash_attention_2" or device.type == "cuda")]
    fits = [a for a in others if all(estimate(a, n)["total_mb"] <= avail for n in too_big)]
    where = "--memory-budget-mb" if cfg.memory_budget_mb is not None else f"free on {device}"
    advice = "drop them from --lengths"
    if fits:
        advice += ", use " + " or ".join(f"--attn {a}" for a in fits) + f" (O(L) memory on {device.type}, fits them)"
    raise NIAHError(
        f"the model cannot fit these lengths with --attn {cfg.attn} on {device}, which runs "
        f"{prof.attention_path(cfg.attn, device)['path']} ({avail:.0f} MiB {where}, weights {weights:.0f} MiB already "
        "loaded):\n" + "\n".join(lines) + f"\n{advice}, or use a device with more memory"
    )


def check_model_settings(cfg: RunConfig) -> None:
    """RoPE scaling and temperature against the model's config, before any weight is loaded.

    Raises:
        NIAHError: scaling a model without RoPE, rejected parameters, a temperature for a model that is
            not a DroPE model, a bad temperature.
    """
    from transformers import AutoConfig

    from drope.hf.temperature import validate_temperature

    config = AutoConfig.from_pretrained(check_model_dir(cfg.model), local_files_only=True)
    if cfg.rope_scaling:
        apply_rope_scaling(copy.deepcopy(config), cfg.rope_scaling)
    if cfg.temperature is not None:
        model_type = str(getattr(config, "model_type", ""))
        if not model_type.endswith("_drope"):
            raise NIAHError(f"--temperature {cfg.temperature}: the softmax temperature applies to DroPE models "
                            f"(model_type llama_drope / qwen2_drope / qwen3_drope); {cfg.model} is {model_type!r}: "
                            "convert it with drope.to_drope first")
        try:
            validate_temperature(parse_temperature(cfg.temperature))
        except ValueError as e:
            raise NIAHError(f"--temperature {cfg.temperature}: {e}") from None


