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

Per-head temperature: an optional ``"head_coefs"`` entry, one list of coefficients per layer with one
per query head (``[[c_00, c_01, ...], [c_10, ...], ...]``), replaces ``coef`` for each (layer, head):
head h of layer l multiplies its logits by ``1 + c_lh * ln(x / L)`` with x the same length or
position as above. :func:`drope.fit_temperature` fits it with ``per_head=True``. The kernels take the
resulting (B, Hq, Sq) multipliers as their softmax scale, so it costs nothing extra.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Union

import torch

__all__ = ["MODES", "validate_temperature", "check_head_coefs", "temperature_scale", "temperature_rows",
           "forward_temperature", "layer_temperature", "set_temperature", "get_temperature"]

MODES = ("none", "length", "position")
_FIELDS = ("mode", "coef", "train_length", "head_coefs")


def validate_temperature(temperature) -> dict:
    """Check a temperature setting and return it normalised.

    Args:
        temperature: None (no temperature) or a dict ``{"mode": "none" | "length" | "position",
            "coef": c >= 0, "train_length": L >= 1}``; ``coef`` and ``train_length`` may be left out
            only for mode ``"none"``.

            An optional ``"head_coefs"``: a list per layer of per-head coefficients >= 0 (all layers
            the same number of heads), overriding ``coef`` head by head.

    Returns:
        A new dict with the keys ``mode`` (str), ``coef`` (float) and ``train_length`` (int, or None
        for mode ``"none"`` without one), and ``head_coefs`` (a list of lists of floats) when given.

    Raises:
        ValueError: not a dict, an unknown key, an unknown mode, a missing field, ``coef`` negative or
            not a finite number, ``train_length`` not a positive int, ``head_coefs`` not a non-empty
            rectangular list of lists of finite numbers >= 0.
    """
    if temperature is None:
        return {"mode": "none", "coef": 0.0, "train_length": None}
    if not isinstance(temperature, dict):
        raise ValueError(f"drope_temperature must be None or a dict with keys {_FIELDS}, "
                         f"got {type(temperature).__name__}")
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
    out = {"mode": mode, "coef": float(coef), "train_length": train_length}
    if temperature.get("head_coefs") is not None:
        out["head_coefs"] = _check_head_coefs(temperature["head_coefs"])
    return out


def _check_head_coefs(head_coefs) -> list:
    msg = "drope_temperature head_coefs must be a list (one per layer) of lists of per-head coefficients >= 0"
    if isinstance(head_coefs, torch.Tensor):
        head_coefs = head_coefs.tolist()
    if not isinstance(head_coefs, (list, tuple)) or not head_coefs:
        raise ValueError(f"{msg}, got {type(head_coefs).__name__}")
    rows = []
    for layer in head_coefs:
        if not isinstance(layer, (list, tuple)) or not layer:
            raise ValueError(f"{msg}, got a layer entry {layer!r}")
        for c in layer:
            if isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(float(c)) or c < 0:
                raise ValueError(f"{msg}, got {c!r}")
        rows.append([float(c) for c in layer])
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{msg}: every layer the same number of heads, got {[len(r) for r in rows]}")
    return rows


def check_head_coefs(temperature, num_layers: int, num_heads: int) -> None:
    """A ``head_coefs`` entry must cover every layer and query head of the model it is set on."""
    t = validate_temperature(temperature)
    hc = t.get("head_coefs")
    if hc is not None and (len(hc) != num_layers or len(hc[0]) != num_heads):
        raise ValueError(f"drope_temperature head_coefs is {len(hc)} layers x {len(hc[0])} heads but the model has "
                         f"{num_layers} layers x {num_heads} query heads")


def _log_ratio(train_length: int, length: torch.Tensor) -> torch.Tensor:
    """``ln(length / L)`` where ``length > L``, else 0 (float64)."""
    return torch.log((length.to(torch.float64) / train_length).clamp_min(1.0))


def _formula(coef: float, train_length: int, length):
    """``1 + c*ln(length/L)`` where ``length > L``, else 1; ``length`` an int or a tensor (float32 then)."""
    if isinstance(length, torch.Tensor):
        return (1.0 + coef * _log_ratio(train_length, length)).float()
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


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) index, within its row, of each token's segment: a run of consecutive positions (+1 steps).

    A restart (packed documents, or the real tokens after left padding) opens a new segment; this is
    transformers' packed-sequence rule too (``find_packed_sequence_indices``).
    """
    pos = position_ids.to(torch.int64)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    return starts.cumsum(-1) - 1


def _segment_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For each token, the length of its sequence: its segment's last position + 1."""
    B, S = position_ids.shape
    pos = position_ids.to(torch.int64)
    seg = segment_ids(pos)
    last = torch.full((B, S), -1, dtype=torch.int64, device=pos.device)
    last = last.scatter_reduce(1, seg, pos, reduce="amax", include_self=True)
    return last.gather(1, seg) + 1


def forward_temperature(temperature, position_ids: Optional[torch.Tensor]) -> Optional[tuple]:
    """The part of a temperature shared by every layer of one forward, computed once per forward.

    Returns:
        None without a temperature (mode ``"none"``, or ``coef == 0`` without per-head coefficients);
        ``(rows, None)`` with rows the (B, S) float32 multipliers of a single coefficient; or
        ``(log_ratio, coefs)`` with the (B, S) float64 ``ln(x / L)`` term (0 up to L) and the (layers, Hq)
        float64 per-head coefficients, which :func:`layer_temperature` combines per layer.

    Raises:
        ValueError: a bad setting, or ``position_ids`` missing for a mode that needs them.
    """
    t = validate_temperature(temperature)
    per_head = t.get("head_coefs") is not None
    if t["mode"] == "none" or (t["coef"] == 0.0 and not per_head):
        return None
    if position_ids is None:
        raise ValueError(f"temperature mode {t['mode']!r} needs position_ids")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    lengths = position_ids + 1 if t["mode"] == "position" else _segment_lengths(position_ids)
    if not per_head:
        return _formula(t["coef"], t["train_length"], lengths), None
    coefs = torch.tensor(t["head_coefs"], dtype=torch.float64, device=lengths.device)
    return _log_ratio(t["train_length"], lengths), coefs


def layer_temperature(per_forward: Optional[tuple], layer_idx: int,
                      head_coef: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """One layer's multipliers from :func:`forward_temperature`'s result: (B, S), or (B, Hq, S) per head.

    ``head_coef`` (Hq,) overrides the layer's per-head coefficients (what ``fit_temperature(per_head=True)``
    trains); it needs a per-forward result of the per-head form.
    """
    if per_forward is None:
        return None
    first, coefs = per_forward
    if coefs is None and head_coef is None:
        return first
    c = coefs[layer_idx] if head_coef is None else head_coef.to(first.device, torch.float64)
    return (1.0 + c[None, :, None] * first[:, None, :]).float()


def temperature_rows(temperature, position_ids: Optional[torch.Tensor], *, layer_idx: Optional[int] = None,
                     head_coef: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Logit multipliers for a forward whose queries sit at ``position_ids``: (B, S), or (B, Hq, S) per head.

    ``"length"`` takes ``L_total`` per sequence from the positions (last position of each run of
    consecutive positions + 1: the total length including the cache; each document's own length
    in a packed row). Mode ``"none"`` and ``coef == 0`` without per-head coefficients give None (no
    per-row scale at all). The DroPE models compute :func:`forward_temperature` once per forward and
    :func:`layer_temperature` per layer; this is both at once.

    Args:
        temperature: the config dict or None.
        position_ids: (B, S) or (S,) integer positions.
        layer_idx: the layer asking; needed when the setting has ``head_coefs``.
        head_coef: (Hq,) coefficients overriding the setting's for this layer (differentiable: what
            ``fit_temperature(per_head=True)`` trains).

    Returns:
        None or a float32 tensor on the positions' device: (B, S), or (B, Hq, S) with per-head coefficients.

    Raises:
        ValueError: a bad setting, ``position_ids`` missing for a mode that needs them, or per-head
            coefficients without ``layer_idx``.
    """
    t = validate_temperature(temperature)
    if head_coef is not None and t["mode"] != "none":
        if position_ids is None:
            raise ValueError(f"temperature mode {t['mode']!r} needs position_ids")
        pos = position_ids[None] if position_ids.dim() == 1 else position_ids
        lengths = pos + 1 if t["mode"] == "position" else _segment_lengths(pos)
        return layer_temperature((_log_ratio(t["train_length"], lengths), None), 0, head_coef)
    if t.get("head_coefs") is not None and layer_idx is None and t["mode"] != "none":
        raise ValueError("a per-head temperature (head_coefs) needs the layer index")
    return layer_temperature(forward_temperature(temperature, position_ids), layer_idx, head_coef)


def get_temperature(model) -> dict:
    """The normalised temperature setting of ``model`` (its ``config.drope_temperature``)."""
    return validate_temperature(getattr(model.config, "drope_temperature", None))


def set_temperature(model, temperature: Union[dict, None]):
    """Set a DroPE model's softmax temperature; it takes effect on the next forward.

    Args:
        model: a DroPE model (a ``*_drope`` model type, e.g. from :func:`drope.to_drope`).
        temperature: None (no temperature) or ``{"mode", "coef", "train_length"}``, optionally with
            ``"head_coefs"`` (see :func:`validate_temperature`).

    Returns:
        The model (its ``config.drope_temperature`` set to the normalised dict, or None).

    Raises:
        ValueError: a bad setting, ``head_coefs`` that do not match the model's layers and heads, or
            a model that is not a DroPE model.
    """
    config = getattr(model, "config", None)
    if config is None or not str(getattr(config, "model_type", "")).endswith("_drope"):
        raise ValueError(
            "set_temperature needs a DroPE model (model_type llama_drope / qwen2_drope / qwen3_drope); "
            f"got model_type {getattr(config, 'model_type', None)!r}: convert it with drope.to_drope first"
        )
    if temperature is not None:
        check_head_coefs(temperature, config.num_hidden_layers, config.num_attention_heads)
    config.drope_temperature = None if temperature is None else validate_temperature(temperature)
    return model
