"""What defines a NIAH sweep: :class:`RunConfig`, its RoPE-scaling and temperature specs, and the errors.

RoPE scaling goes through transformers' own ``config.rope_parameters`` (``rope_type`` linear = PI,
dynamic = NTK, yarn, longrope, llama3); this module only parses the spec (:mod:`.loading` applies it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .tasks import TASKS, VALUE_TYPES

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
    """Everything that defines a sweep. Lengths in tokens, depths as fractions in [0, 1]. ``context_parallel``: ranks
    each prompt is sharded over (``torchrun --nproc_per_node`` that many; the same answers as one process, so it is
    not part of the identity a resumed run must match)."""

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
    context_parallel: int = 1

    def __post_init__(self) -> None:
        cp = self.context_parallel
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
            raise NIAHError(f"context_parallel must be an int >= 1, got {cp!r}")
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



class SlowPathWarning(UserWarning):
    """The run takes an attention path far slower than the alternatives (the message says which to use)."""

