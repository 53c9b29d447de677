"""Softmax temperature of DroPE models beyond their training length.

The setting lives in the model config as ``config.drope_temperature`` (not ``temperature``: that
name is a generation parameter), a dict ``{"mode": "none" | "length" | "position", "coef": c,
"train_length": L}``:

- ``"length"``: one multiplier per forward and sequence, ``1 + c*ln(L_total/L)`` when
  ``L_total > L`` (else 1), ``L_total`` the total length including the cache (the last position + 1;
  with packed documents, each document's own length).
- ``"position"``: per query row at absolute position ``p`` (its ``position_ids`` entry, so the
  position among real tokens under left padding), ``1 + c*ln((p+1)/L)`` when ``p+1 > L``, else 1.
  Causal-consistent: cached decoding equals prefill.

The multiplier scales the attention logits on top of ``D**-0.5``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Union

import torch

__all__ = ["MODES", "validate_temperature", "temperature_scale", "temperature_rows", "set_temperature",
           "get_temperature"]

MODES = ("none", "length", "position")
_FIELDS = ("mode", "coef", "train_length")


def validate_temperature(temperature) -> dict:
    """Check a temperature setting and return it normalised.

    Args:
        temperature: None (no temperature) or a dict ``{"mode": "none" | "length" | "position",
            "coef": c >= 0, "train_length": L >= 1}``; ``coef`` and ``train_length`` may be left out
            only for mode ``"none"``.

    Returns:
        A new dict with exactly the keys ``mode`` (str), ``coef`` (float) and ``train_length``
        (int, or None for mode ``"none"`` without one).

    Raises:
        ValueError: not a dict, an unknown key, an unknown mode, a missing field, ``coef`` negative or
            not a finite number, ``train_length`` not a positive int.
    """
    if temperature is None:
        return {"mode": "none", "coef": 0.0, "train_length": None}
    if not isinstance(temperature, dict):
        raise ValueError(f"drope_temperature must be None or a dict with keys {_FIELDS}, got {type(temperature).__name__}")
    unknown = sorted(set(temperature) - set(_FIELDS))
    if unknown:
        raise ValueError(f"drope_temperature has unknown key(s) {unknown}; accepted keys: {', '.join(_FIELDS)}")
    if "mode" not in temperature:
        raise ValueError(f"drope_temperature is missing the field 'mode' (one of {', '.join(MODES)})")
    mode = temperature["mode"]
    if mode not in MODES:
        raise ValueError(f"drope_temperature mode must be one of {', '.join(MODES)}, got {mode!r}")
    needed = mode != "none"
    for key in ("coef", "train_length"):
        if needed and temperature.get(key) is None:
            raise ValueError(f"drope_temperature mode {mode!r} needs the field {key!r}; got {temperature!r}")
    coef = temperature.get("coef")
    if coef is None:
        coef = 0.0
    if isinstance(coef, bool) or not isinstance(coef, Real) or not math.isfinite(float(coef)) or coef < 0:
        raise ValueError(f"drope_temperature coef must be a finite number >= 0, got {coef!r}")
    train_length = temperature.get("train_length")
    if train_length is not None:
        if isinstance(train_length, bool) or not isinstance(train_length, Integral) or train_length < 1:
            raise ValueError(f"drope_temperature train_length must be a positive int, got {train_length!r}")
        train_length = int(train_length)
    return {"mode": mode, "coef": float(coef), "train_length": train_length}


def _formula(coef: float, train_length: int, length):
    """``1 + c*ln(length/L)`` where ``length > L``, else 1; ``length`` an int or a tensor."""
    if isinstance(length, torch.Tensor):
        ratio = length.to(torch.float64) / train_length
        return torch.where(ratio > 1, 1 + coef * torch.log(ratio.clamp_min(1.0)), torch.ones_like(ratio)).float()
    return 1.0 + coef * math.log(length / train_length) if length > train_length else 1.0


def temperature_scale(temperature, positions=None, *, total_length=None):
    """The logit multiplier of a temperature setting (on top of ``D**-0.5``).

    Args:
        temperature: the config dict (see :func:`validate_temperature`) or None.
        positions: absolute 0-based query positions ``p`` (int or integer tensor of any shape);
            needed for mode ``"position"``: ``1 + c*ln((p+1)/L)`` when ``p+1 > L``, else 1.
        total_length: total sequence length ``L_total`` including the cache (int or tensor);
            needed for mode ``"length"``: ``1 + c*ln(L_total/L)`` when ``L_total > L``, else 1.

    Returns:
        A float (for int arguments) or a float32 tensor of the argument's shape. Mode ``"none"``
        gives 1 (ones shaped like whichever argument is given).

    Raises:
        ValueError: a bad setting, or the argument the mode needs is missing.
    """
    t = validate_temperature(temperature)
    mode = t["mode"]
    if mode == "none":
        ref = positions if positions is not None else total_length
        return torch.ones(ref.shape, dtype=torch.float32, device=ref.device) if isinstance(ref, torch.Tensor) else 1.0
    if mode == "position":
        if positions is None:
            raise ValueError("temperature mode 'position' needs positions=")
        return _formula(t["coef"], t["train_length"], positions + 1)
    if total_length is None:
        raise ValueError("temperature mode 'length' needs total_length=")
    return _formula(t["coef"], t["train_length"], total_length)


def _segment_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For each token, the length of its sequence: its segment's last position + 1.

    A segment is a run of consecutive positions (+1 steps); a restart (packed documents, or the
    real tokens after left padding) opens a new one.
    """
    B, S = position_ids.shape
    pos = position_ids.to(torch.int64)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    seg = starts.cumsum(-1) - 1  # (B, S) segment index within the row
    last = torch.full((B, S), -1, dtype=torch.int64, device=pos.device)
    last = last.scatter_reduce(1, seg, pos, reduce="amax", include_self=True)
    return last.gather(1, seg) + 1


def temperature_rows(temperature, position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per query row multipliers (B, S) float32 for a forward whose queries sit at ``position_ids``.

    ``"length"`` takes ``L_total`` per sequence from the positions (last position of each run of
    consecutive positions + 1: the total length including the cache; each document's own length
    in a packed row). Mode ``"none"`` and ``coef == 0`` give None (no per-row scale at all).

    Args:
        temperature: the config dict or None.
        position_ids: (B, S) or (S,) integer positions.

    Returns:
        None or a float32 tensor (B, S) on the positions' device.

    Raises:
        ValueError: a bad setting, or ``position_ids`` missing for a mode that needs them.
    """
    t = validate_temperature(temperature)
    if t["mode"] == "none" or t["coef"] == 0.0:
        return None
    if position_ids is None:
        raise ValueError(f"temperature mode {t['mode']!r} needs position_ids")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if t["mode"] == "position":
        return _formula(t["coef"], t["train_length"], position_ids + 1)
    return _formula(t["coef"], t["train_length"], _segment_lengths(position_ids))


def get_temperature(model) -> dict:
    """The normalised temperature setting of ``model`` (its ``config.drope_temperature``)."""
    return validate_temperature(getattr(model.config, "drope_temperature", None))


def set_temperature(model, temperature: Union[dict, None]):
    """Set a DroPE model's softmax temperature; it takes effect on the next forward.

    Args:
        model: a DroPE model (a ``*_drope`` model type, e.g. from :func:`drope.to_drope`).
        temperature: None (no temperature) or ``{"mode", "coef", "train_length"}``
            (see :func:`validate_temperature`).

    Returns:
        The model (its ``config.drope_temperature`` set to the normalised dict, or None).

    Raises:
        ValueError: a bad setting, or a model that is not a DroPE model.
    """
    config = getattr(model, "config", None)
    if config is None or not str(getattr(config, "model_type", "")).endswith("_drope"):
        raise ValueError(
            "set_temperature needs a DroPE model (model_type llama_drope / qwen2_drope / qwen3_drope); "
            f"got model_type {getattr(config, 'model_type', None)!r}: convert it with drope.to_drope first"
        )
    config.drope_temperature = None if temperature is None else validate_temperature(temperature)
    return model
