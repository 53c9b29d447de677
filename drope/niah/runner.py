"""Run NIAH sweeps on a local model: loading, RoPE-scaling baselines, temperature, greedy decoding,
per-request profiling, and incremental, resumable ``results.json``.

RoPE scaling goes through transformers' own ``config.rope_parameters`` (``rope_type`` linear = PI,
dynamic = NTK, yarn, longrope, llama3); nothing is re-implemented here. DroPE temperature goes
through ``drope.hf.temperature.set_temperature``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import profile as prof
from .tasks import DEFAULT_MAX_NEW_TOKENS, TASKS, VALUE_TYPES, PromptBuilder, Sample, score

ATTN_IMPLEMENTATIONS = ("drope_triton", "sdpa", "eager", "flash_attention_2")
ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
TEMPERATURE_MODES = ("none", "length", "position")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# fields that must agree between a results.json and a run that resumes it
IDENTITY_FIELDS = ("model", "trials", "attn", "rope_scaling", "temperature", "haystack", "chat_template",
                   "value_type", "dtype", "max_new_tokens", "seed")
# identity fields added later, with the value a run written before them used
IDENTITY_DEFAULTS = {"value_type": "number"}


class NIAHError(ValueError):
    """Bad input or a run that cannot proceed; the message says what to change."""


class SweepStopped(NIAHError):
    """The sweep stopped part-way (out of memory); ``results`` holds what was finished and saved."""

    def __init__(self, message: str, results: Dict[str, object]):
        super().__init__(message)
        self.results = results


@dataclass
class RunConfig:
    """Everything that defines a sweep. Lengths in tokens, depths as fractions in [0, 1]."""

    model: str
    lengths: List[int]
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5
    attn: str = "sdpa"
    rope_scaling: Optional[str] = None
    temperature: Optional[str] = None
    haystack: str = "essay"
    chat_template: str = "auto"
    value_type: str = "number"
    dtype: str = "auto"
    device: str = "auto"
    max_new_tokens: Optional[int] = None
    seed: int = 0
    warmup: int = 1
    trace: bool = False
    memory_budget_mb: Optional[float] = None
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 1:
            raise NIAHError(f"trials must be a positive int, got {self.trials!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise NIAHError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise NIAHError(f"warmup must be a non-negative int, got {self.warmup!r}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise NIAHError(f"tasks: unknown task {', '.join(bad) or '(none)'}; accepted: {', '.join(TASKS)}")
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise NIAHError(f"lengths must be positive token counts, got {self.lengths!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise NIAHError(f"depths must be fractions in [0, 1], got {self.depths!r}")
        if self.value_type not in VALUE_TYPES:
            raise NIAHError(f"value_type must be one of {', '.join(VALUE_TYPES)}, got {self.value_type!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise NIAHError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.rope_scaling is not None:
            parse_rope_scaling(self.rope_scaling)
        if self.temperature is not None:
            parse_temperature(self.temperature)

    def identity(self) -> Dict[str, object]:
        out = {k: getattr(self, k) for k in IDENTITY_FIELDS}
        out["model"] = str(Path(self.model).resolve())
        return out


def parse_rope_scaling(spec: str) -> Dict[str, object]:
    """``TYPE:FACTOR[:ORIGINAL_MAX_POSITIONS]`` or the path of a JSON file holding a full
    ``rope_parameters`` dict (needed for longrope's per-frequency factors).

    Returns:
        A partial ``rope_parameters`` dict (``rope_type``, ``factor``, maybe
        ``original_max_position_embeddings``, or the file's content).

    Raises:
        NIAHError: unknown type, a factor that is not a number >= 1, an unreadable file.
    """
    spec = str(spec)
    if spec.endswith(".json"):
        try:
            params = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as e:
            raise NIAHError(f"--rope-scaling: cannot read rope_parameters JSON {spec}: {e}") from None
        if not isinstance(params, dict) or params.get("rope_type") not in ROPE_TYPES:
            raise NIAHError(f"--rope-scaling: {spec} must hold a dict with rope_type in {', '.join(ROPE_TYPES)}")
        return params
    parts = spec.split(":")
    if parts[0] not in ROPE_TYPES or len(parts) not in (2, 3):
        raise NIAHError(
            f"--rope-scaling: {spec!r} is not TYPE:FACTOR[:ORIGINAL_MAX_POSITIONS] with TYPE in "
            f"{', '.join(ROPE_TYPES)} (linear = PI, dynamic = NTK), nor a .json file of rope_parameters"
        )
    try:
        factor = float(parts[1])
        orig = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise NIAHError(f"--rope-scaling: factor and original length in {spec!r} must be numbers") from None
    if not factor >= 1.0 or (orig is not None and orig < 1):
        raise NIAHError(f"--rope-scaling: factor must be >= 1 and the original length positive, got {spec!r}")
    params: Dict[str, object] = {"rope_type": parts[0], "factor": factor}
    if orig is not None:
        params["original_max_position_embeddings"] = orig
    return params


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


def parse_temperature(spec: str) -> Dict[str, object]:
    """``none``, or ``MODE:COEF:TRAIN_LENGTH`` with MODE ``length`` or ``position``.

    Returns:
        The dict ``drope.hf.temperature.set_temperature`` takes: ``{"mode", "coef", "train_length"}``.

    Raises:
        NIAHError: an unknown mode or malformed numbers.
    """
    parts = str(spec).split(":")
    if parts == ["none"]:
        return {"mode": "none", "coef": 0.0, "train_length": 1}
    if parts[0] not in TEMPERATURE_MODES[1:] or len(parts) != 3:
        raise NIAHError(
            f"--temperature: {spec!r} is not none or MODE:COEF:TRAIN_LENGTH with MODE length or position "
            "(e.g. position:0.103:2048)"
        )
    try:
        coef, train_length = float(parts[1]), int(parts[2])
    except ValueError:
        raise NIAHError(f"--temperature: COEF must be a number and TRAIN_LENGTH an int in {spec!r}") from None
    if not math.isfinite(coef) or train_length < 1:
        raise NIAHError(f"--temperature: COEF must be finite and TRAIN_LENGTH positive in {spec!r}")
    return {"mode": parts[0], "coef": coef, "train_length": train_length}


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


def eos_token_ids(model, tokenizer) -> List[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return sorted(ids)


@dataclass
class Generation:
    """One greedy request: the new token ids and its profile."""

    token_ids: List[int]
    prefill_ms: float
    decode_s: float
    decode_steps: int
    peak_mem_mb: Optional[float]
    peak_mem_kind: str

    @property
    def decode_tok_s(self) -> Optional[float]:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else None


@torch.inference_mode()
def greedy_generate(model, input_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int],
                    device: torch.device) -> Generation:
    """Greedy decoding with the KV cache: one timed prefill, then one timed forward per new token.

    The prefill produces the first new token; ``decode_steps`` counts the forwards after it.
    Only the last position's logits are computed (``logits_to_keep=1``) when the model supports it.
    """
    from drope.hf.modeling import cache_argument

    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_name = cache_argument(model)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    n = ids.shape[1]
    eos = set(eos_ids)
    with prof.PeakMemory(device) as mem:
        t0 = prof.now(device)
        out = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=True, **keep)
        token = out.logits[:, -1].argmax(-1)
        new = [int(token.item())]
        t1 = prof.now(device)
        past = getattr(out, cache_name)
        del out
        while len(new) < max_new_tokens and new[-1] not in eos:
            pos = torch.tensor([[n + len(new) - 1]], device=device)
            out = model(input_ids=token[:, None], position_ids=pos, use_cache=True, **{cache_name: past}, **keep)
            token = out.logits[:, -1].argmax(-1)
            past = getattr(out, cache_name)
            new.append(int(token.item()))
        t2 = prof.now(device)
    return Generation(new, (t1 - t0) * 1e3, t2 - t1, len(new) - 1, mem.peak_mb, mem.kind)


def _median(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cell_key(row: Dict[str, object]) -> Tuple[str, int, float]:
    return (str(row["task"]), int(row["length"]), round(float(row["depth"]), 6))


def default_label(cfg: RunConfig) -> str:
    parts = [Path(cfg.model).name or str(cfg.model), cfg.attn]
    if cfg.rope_scaling:
        parts.append(f"rope={Path(cfg.rope_scaling).name}")
    if cfg.temperature:
        parts.append(f"temp={cfg.temperature}")
    return " ".join(parts)


def load_results(out_dir: Path) -> Optional[Dict[str, object]]:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise NIAHError(f"{path} is not valid JSON ({e}); move it away or pass --overwrite") from None
    if not isinstance(data, dict) or "results" not in data or "config" not in data:
        raise NIAHError(f"{path} is not a drope niah results file (no 'config' and 'results')")
    return data


class SlowPathWarning(UserWarning):
    """The run takes an attention path far slower than the alternatives (the message says which to use)."""


def kernels_interpreted() -> bool:
    """Whether drope's Triton kernels were defined under Triton's interpreter.

    Setting ``TRITON_INTERPRET`` after ``import drope`` leaves compiled kernels, which Triton cannot
    launch on CPU tensors ("0 active drivers").
    """
    from ..kernels.toolkit import defined_interpreted

    return defined_interpreted()


def check_attention_path(attn: str, device: torch.device) -> Dict[str, object]:
    """What ``attn`` will run on ``device`` (:func:`drope.niah.profile.attention_path`), refusing the
    interpreter trap and warning (:class:`SlowPathWarning`) about a path far slower than the others.

    Raises:
        NIAHError: ``drope_triton`` with ``TRITON_INTERPRET=1`` set after drope was imported.
    """
    path = prof.attention_path(attn, device)
    if attn != "drope_triton" or not path["slow"]:
        return path
    # attention_path marks drope_triton slow only under Triton's interpreter
    compiled = kernels_interpreted() is False
    if compiled and device.type == "cpu":
        raise NIAHError(
            "--attn drope_triton: TRITON_INTERPRET=1 was set after drope was imported, so its Triton kernels were "
            "built for a GPU and cannot run on CPU tensors (Triton's \"0 active drivers\" error). Unset "
            "TRITON_INTERPRET (the HF layer then takes its CPU path), or use --attn sdpa; set TRITON_INTERPRET=1 "
            "before importing drope only to test the kernels (slow)"
        )
    what = ("makes drope's compiled kernels take their interpreter-only settings (untuned tiles, fp32 dots for "
            "bf16)" if compiled else "runs drope's Triton kernels in Triton's interpreter, which executes every "
            "kernel program in Python")
    warnings.warn(
        f"--attn drope_triton with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} exported {what}: not "
        "what a measurement should run. The interpreter is meant for tests; for real runs unset it "
        "(`env -u TRITON_INTERPRET drope niah ...`), or use --attn sdpa",
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

    def estimate(attn: str, length: int) -> Dict[str, float]:
        return prof.estimate_memory_mb(model.config, length, new, dtype, attn, device)

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


def check_lengths(cfg: RunConfig, builder: PromptBuilder) -> None:
    """Every (task, length) of the sweep can be built, before any weight is loaded.

    Raises:
        NIAHError: a length too short for a task; a short one also suggests the ``k`` suffix.
    """
    for length in cfg.lengths:
        for task in cfg.tasks:
            try:
                builder.build(task, length, 0.0, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
            except ValueError as e:
                hint = (f"; --lengths counts tokens (k = 1024): did you mean {length}k ({length * 1024} tokens)?"
                        if length < 1024 else "")
                raise NIAHError(f"--lengths: {e}{hint}") from None


def resumed_rows(cfg: RunConfig, out_dir: Path, *, resume: bool, overwrite: bool) -> List[Dict[str, object]]:
    """The finished rows of ``out_dir/results.json`` to continue, or none.

    Raises:
        NIAHError: both flags, existing results without either, or resuming with different settings.
    """
    if resume and overwrite:
        raise NIAHError("--resume and --overwrite exclude each other")
    previous = load_results(out_dir)
    if previous is None or overwrite:
        return []
    if not resume:
        raise NIAHError(
            f"{out_dir / 'results.json'} already exists ({len(previous['results'])} results); pass --resume to "
            "continue it or --overwrite to start over"
        )
    old = previous["config"].get("identity", {})
    diff = [k for k in IDENTITY_FIELDS if old.get(k, IDENTITY_DEFAULTS.get(k)) != cfg.identity()[k]]
    if diff:
        raise NIAHError(
            f"--resume: {out_dir / 'results.json'} was written with different settings: "
            + ", ".join(f"{k}={old.get(k)!r} (now {cfg.identity()[k]!r})" for k in diff)
        )
    return list(previous["results"])


def run_record(cfg: RunConfig, model, device: torch.device, dtype: torch.dtype, rope, builder: PromptBuilder,
               path: Dict[str, object]) -> Dict[str, object]:
    """The ``config`` block of results.json: the settings, what they resolved to, and the machine."""
    import transformers

    return {
        **dataclasses.asdict(cfg),
        "label": cfg.label or default_label(cfg),
        "identity": cfg.identity(),
        "resolved_device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "resolved_dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": getattr(model.config, "_attn_implementation", cfg.attn),
        "attention_path": path["path"],
        "rope_parameters": rope,
        "rope_type_in_model": sorted({str(m.rope_type) for m in model.modules() if hasattr(m, "rope_type")}),
        "model_type": getattr(model.config, "model_type", None),
        "drope_temperature": getattr(model.config, "drope_temperature", None),
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "chat_template_used": builder.use_chat,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "machine": prof.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }


@dataclass
class Scored:
    """One measured request: its sample, generation, decoded prediction and score (computed once)."""

    sample: Sample
    generation: Generation
    prediction: str
    accuracy: float
    partial: float


def score_requests(samples: Sequence[Sample], gens: Sequence[Generation], tokenizer) -> List[Scored]:
    """Decode and score each request once; the cell row and samples.jsonl both read the result."""
    out = []
    for s, g in zip(samples, gens):
        pred = tokenizer.decode(g.token_ids, skip_special_tokens=True)
        out.append(Scored(s, g, pred, *score(pred, s.answers, s.meta.get("value_type", "number"))))
    return out


def cell_row(task: str, length: int, depth: float, scored: Sequence[Scored], trace_path) -> Dict[str, object]:
    """The results.json row of one (task, length, depth) cell."""
    gens = [r.generation for r in scored]
    peaks = [g.peak_mem_mb for g in gens if g.peak_mem_mb is not None]
    prefill_ms = _median([g.prefill_ms for g in gens])
    row = {
        "task": task, "length": length, "depth": depth, "trials": len(scored),
        "accuracy": statistics.fmean(r.accuracy for r in scored),
        "partial": statistics.fmean(r.partial for r in scored),
        "prefill_ms": prefill_ms,
        "decode_tok_s": _median([g.decode_tok_s for g in gens]),
        "peak_mem_mb": max(peaks) if peaks else None,
        "peak_mem_kind": gens[0].peak_mem_kind,
        "prefill_tok_s": length / (prefill_ms / 1e3),
        "new_tokens": statistics.fmean(len(g.token_ids) for g in gens),
        "needle_token_index": [r.sample.needles[0].token_index for r in scored],
    }
    if trace_path is not None:
        row["trace"] = str(trace_path)
    return row


def append_samples(path: Path, scored: Sequence[Scored]) -> None:
    """One samples.jsonl line per request: the sample, its prediction, score and profile."""
    with open(path, "a") as f:
        for r in scored:
            s, g = r.sample, r.generation
            f.write(json.dumps({
                "task": s.task, "length": s.length, "depth": s.depth, "trial": s.trial,
                "query_keys": s.query_keys, "answers": s.answers, "prediction": r.prediction,
                "accuracy": r.accuracy, "partial": r.partial,
                "needles": [dataclasses.asdict(n) for n in s.needles],
                "prefill_ms": g.prefill_ms, "decode_tok_s": g.decode_tok_s, "peak_mem_mb": g.peak_mem_mb,
            }) + "\n")


def measure_cell(model, samples: Sequence[Sample], eos: Sequence[int], device: torch.device, *, warmup: int,
                 on_request, bar) -> List[Generation]:
    """``warmup`` short unmeasured requests, then one measured greedy request per sample."""
    for _ in range(warmup):
        greedy_generate(model, samples[0].input_ids, min(4, samples[0].max_new_tokens), eos, device)
    gens = []
    for s in samples:
        g = greedy_generate(model, s.input_ids, s.max_new_tokens, eos, device)
        gens.append(g)
        if on_request is not None:
            on_request(s, g)
        bar.update(1)
    return gens


def trace_request(model, sample: Sample, eos: Sequence[int], device: torch.device, out_dir: Path) -> Path:
    """One more request of ``sample`` under ``torch.profiler``; returns the trace's path relative to ``out_dir``."""
    rel = Path("traces") / f"{sample.task}-{sample.length}.json"
    with prof.chrome_trace(out_dir / rel, device):
        greedy_generate(model, sample.input_ids, sample.max_new_tokens, eos, device)
    return rel


def _out_of_memory(error: Exception, task: str, length: int, depth: float, device: torch.device,
                   out_dir: Path, results: Dict[str, object]) -> SweepStopped:
    """Record the error in results.json and return the exception that stops the sweep."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["errors"].append({"task": task, "length": length, "depth": depth,
                              "error": f"out of memory: {error}".splitlines()[0]})
    _write_json(out_dir / "results.json", results)
    return SweepStopped(
        f"out of memory at length {length} ({task}, depth {depth:g}); the results of the cells before it "
        f"are in {out_dir / 'results.json'}; rerun without this length, or with --resume on a larger device",
        results,
    )


def sweep(cfg: RunConfig, model, tokenizer, builder: PromptBuilder, device: torch.device, out_dir: Path,
          results: Dict[str, object], *, progress: Optional[bool], on_request) -> None:
    """Run every cell not yet in ``results``, appending its row and rewriting results.json after each."""
    from tqdm.auto import tqdm

    done = {cell_key(r) for r in results["results"]}
    todo = [(L, t, d) for L in cfg.lengths for t in cfg.tasks for d in cfg.depths if (t, L, round(d, 6)) not in done]
    eos = eos_token_ids(model, tokenizer)
    bar = tqdm(total=len(todo) * cfg.trials, desc="niah", unit="req", disable=(not progress) if progress is not None else None)
    warmed, traced = set(), set()
    try:
        for length, task, depth in todo:
            bar.set_postfix_str(f"{task} {length} d={depth:g}")
            samples = [builder.build(task, length, depth, seed=cfg.seed, trial=i, max_new_tokens=cfg.max_new_tokens)
                       for i in range(cfg.trials)]
            trace_path = None
            try:
                gens = measure_cell(model, samples, eos, device, warmup=0 if length in warmed else cfg.warmup,
                                    on_request=on_request, bar=bar)
                warmed.add(length)
                if cfg.trace and (task, length) not in traced:
                    trace_path = trace_request(model, samples[0], eos, device, out_dir)
                    traced.add((task, length))
            except torch.OutOfMemoryError as e:
                raise _out_of_memory(e, task, length, depth, device, out_dir, results) from None
            scored = score_requests(samples, gens, tokenizer)
            results["results"].append(cell_row(task, length, depth, scored, trace_path))
            append_samples(out_dir / "samples.jsonl", scored)
            _write_json(out_dir / "results.json", results)
    finally:
        bar.close()


def run(cfg: RunConfig, out_dir, *, resume: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
        on_request: Optional[Callable[[Sample, Generation], None]] = None) -> Dict[str, object]:
    """Run the sweep, writing ``out_dir/results.json`` after every (task, length, depth) cell.

    Cells are run length by length (all tasks and depths at 4k before 8k), so an interrupted sweep
    keeps every shorter length; ``resume=True`` skips the cells already in results.json. Lengths are
    checked against the tokenizer before the weights load, and against the memory estimate of
    ``cfg.attn`` on the device before the first request.

    Args:
        cfg: the sweep.
        out_dir: output directory (created).
        resume: continue an existing results.json written with the same model/settings.
        overwrite: discard an existing results.json.
        progress: show a tqdm bar (None: only on a terminal).
        on_request: called after each measured request (tests use it to count or interrupt).

    Returns:
        The results dict as written: ``{"config": {...}, "results": [row, ...], "errors": [...]}``.

    Raises:
        NIAHError: bad input (see :func:`load_model`), existing results without resume/overwrite,
            resuming with different settings, lengths that cannot fit, lengths too short for a task,
            ``drope_triton`` with ``TRITON_INTERPRET=1`` set after drope was imported.
        SweepStopped: out of memory part-way; the finished cells are saved.

    Warns:
        SlowPathWarning: ``drope_triton`` in Triton's interpreter.
    """
    out_dir = Path(out_dir)
    rows = resumed_rows(cfg, out_dir, resume=resume, overwrite=overwrite)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.model)
    check_attn(cfg.attn)
    path = check_attention_path(cfg.attn, device)
    check_model_settings(cfg)
    try:
        builder = PromptBuilder(tokenizer, haystack=cfg.haystack, chat_template=cfg.chat_template,
                                value_type=cfg.value_type)
    except ValueError as e:
        raise NIAHError(str(e)) from None
    check_lengths(cfg, builder)
    model, tokenizer, rope = load_model(cfg, device, dtype, tokenizer=tokenizer)
    check_memory(cfg, model, device, dtype)

    # errors of an earlier attempt are superseded by this one (a resumed cell runs again)
    results = {"config": run_record(cfg, model, device, dtype, rope, builder, path), "results": rows, "errors": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        (out_dir / "samples.jsonl").unlink(missing_ok=True)
    _write_json(out_dir / "results.json", results)
    sweep(cfg, model, tokenizer, builder, device, out_dir, results, progress=progress, on_request=on_request)
    return results
