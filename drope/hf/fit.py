"""Fit the softmax-temperature coefficient c of a DroPE model at a target length.

The paper's procedure: the attention logits are multiplied by ``1 + c * ln(L / L_train)`` beyond the
training length, and c is the value that minimises perplexity on held-out text at the target length.
:func:`fit_temperature` evaluates a coarse grid of c, then narrows the best grid cell down with a
golden-section search, and leaves the model set to the best c.

With ``per_head=True`` it fits one coefficient per layer and query head instead (HeadScale-style,
Wang et al. 2024: the model frozen, only the per-head coefficients trained by gradient descent on the
next-token loss at the target length), stored as the setting's ``head_coefs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

MODES = ("length", "position")
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class TemperatureFit:
    """What :func:`fit_temperature` found.

    Attributes:
        coef: the perplexity-minimising coefficient c among those evaluated.
        curve: every evaluated ``(c, perplexity)``, sorted by c.
        mode: ``"length"`` or ``"position"``.
        train_length: L_train of the temperature formula.
        target_length: the length, in tokens, of the windows the perplexity was measured on.
        tokens: how many predicted tokens each perplexity averages over.
    """

    coef: float
    curve: List[Tuple[float, float]]
    mode: str
    train_length: int
    target_length: int
    tokens: int = 0
    perplexity: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "perplexity", dict(self.curve)[self.coef])

    def temperature(self) -> Dict[str, object]:
        """The config entry that sets this fit: ``{"mode", "coef", "train_length"}``."""
        return {"mode": self.mode, "coef": self.coef, "train_length": self.train_length}


def _windows(input_ids, target_length: int) -> torch.Tensor:
    if isinstance(input_ids, np.ndarray) or isinstance(input_ids, (list, tuple)):
        input_ids = torch.as_tensor(np.asarray(input_ids))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise ValueError("input_ids must be a 1-D stream or a 2-D (N, S) batch of token ids (tensor, array or list)")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    rows = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    n = rows.shape[1] // target_length
    if n == 0:
        raise ValueError(
            f"input_ids has {rows.shape[1]} tokens per row, too few for one window of target_length={target_length}; "
            f"give at least {target_length} held-out tokens"
        )
    return rows[:, : n * target_length].reshape(-1, target_length).long()


def _checked_windows(config, input_ids, target_length: int, max_windows: Optional[int]) -> torch.Tensor:
    """The windows of :func:`_windows`, at most ``max_windows``, every id inside the model's vocabulary."""
    windows = _windows(input_ids, target_length)
    if max_windows is not None:
        windows = windows[: _positive_int("max_windows", max_windows)]
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
        raise ValueError(f"input_ids must be token ids in [0, {vocab}), "
                         f"got values in [{int(windows.min())}, {int(windows.max())}]")
    return windows


def _check_grid(grid) -> List[float]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, (Sequence, np.ndarray, torch.Tensor)):
        raise ValueError(f"grid must be a sequence of coefficients c, got {type(grid).__name__}")
    values = [float(c) for c in grid]
    if not values:
        raise ValueError("grid is empty: give at least one coefficient c to evaluate")
    if not all(math.isfinite(c) and c >= 0 for c in values):
        raise ValueError(f"grid values must be finite coefficients c >= 0, got {values}")
    return sorted(set(values))


@dataclass(frozen=True)
class HeadTemperatureFit:
    """What :func:`fit_temperature` found with ``per_head=True``.

    Attributes:
        head_coefs: per layer, one coefficient per query head.
        perplexity: at the fitted coefficients, over every window.
        start_perplexity: at the starting coefficients (``start_coef`` for every head).
        curve: ``(step, training loss)`` of every optimiser step.
        mode, train_length, target_length, tokens: as :class:`TemperatureFit`.
    """

    head_coefs: List[List[float]]
    perplexity: float
    start_perplexity: float
    curve: List[Tuple[int, float]]
    mode: str
    train_length: int
    target_length: int
    tokens: int = 0

    def temperature(self) -> Dict[str, object]:
        """The config entry that sets this fit."""
        return {"mode": self.mode, "coef": 0.0, "train_length": self.train_length, "head_coefs": self.head_coefs}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def fit_temperature(model, input_ids, *, target_length: int, train_length: Optional[int] = None, mode: str = "length",
                    grid: Sequence[float] = DEFAULT_GRID, refine_steps: int = 8, batch_size: int = 1,
                    max_windows: Optional[int] = None, show_progress: bool = True, per_head: bool = False,
                    steps: int = 200, lr: float = 0.1, start_coef: Optional[float] = None):
    """Fit the temperature coefficient c that minimises perplexity at ``target_length``.

    The held-out ``input_ids`` are cut into non-overlapping windows of ``target_length`` tokens; for each
    candidate c the model is set to ``{"mode": mode, "coef": c, "train_length": train_length}`` and the
    perplexity over every next-token prediction of the windows is measured. The grid is evaluated first;
    then ``refine_steps`` golden-section steps search the interval between the best grid point's
    neighbours (perplexity is assumed unimodal there). A tqdm bar counts the evaluations.

    The model is left set to the best c (with ``mode`` and ``train_length``) and in the training/eval
    mode it came in; ``fit.temperature()`` gives that config entry. If an evaluation raises, the
    model's previous temperature is restored before the error propagates.

    Args:
        model: a DroPE causal LM (see ``drope.to_drope``) whose config carries ``drope_temperature``.
        input_ids: held-out token ids, a 1-D stream or a 2-D (N, S) batch (tensor, numpy array or list).
        target_length: window length L at which perplexity is minimised; must exceed ``train_length``.
        train_length: L_train of the formula; None reads ``model.config.drope_temperature["train_length"]``
            and, failing that, ``model.config.max_position_embeddings``.
        mode: ``"length"`` (one multiplier per forward) or ``"position"`` (per query position).
        grid: coefficients c >= 0 evaluated first (default 0.0, 0.1, ..., 0.8).
        refine_steps: golden-section evaluations after the grid, inside the interval between the best
            grid point's neighbours (0, or a single grid value, = grid only).
        batch_size: windows per forward pass.
        max_windows: use at most this many windows (None = all).
        show_progress: show the tqdm progress bar.
        per_head: fit one coefficient per layer and query head (see the module docstring) instead of
            one c; ``grid`` and ``refine_steps`` are then unused.
        steps, lr: per-head fit: Adam steps (one batch of windows each, cycling) and learning rate
            (HeadScale's 200 steps at 0.1 by default); coefficients are kept >= 0.
        start_coef: per-head fit: every head's starting coefficient (None: the model's current
            ``coef`` when its mode is ``mode``, else 0).

    Returns:
        A :class:`TemperatureFit` with ``.coef``, ``.curve`` [(c, ppl), ...] sorted by c, ``.mode``,
        ``.train_length``, ``.target_length``, ``.perplexity`` (at ``.coef``) and ``.tokens``; with
        ``per_head=True`` a :class:`HeadTemperatureFit`. Either way ``.temperature()`` is the config
        entry the model is left set to.

    Raises:
        ValueError: a model that is not DroPE, ``target_length <= train_length``, fewer tokens than one window, an empty or
            non-finite or negative grid, an unknown mode, a non-positive ``refine_steps``/``batch_size``/``max_windows``,
            or no ``train_length`` to be found.
    """
    from tqdm.auto import tqdm

    from .temperature import set_temperature

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    config = getattr(model, "config", None)
    if config is None or not str(getattr(config, "model_type", "")).endswith("_drope"):
        raise ValueError(
            f"fit_temperature needs a DroPE model (model_type llama_drope / qwen2_drope / qwen3_drope), got "
            f"model_type {getattr(config, 'model_type', None)!r}: convert it with drope.to_drope and recalibrate first"
        )
    if train_length is None:
        current = getattr(config, "drope_temperature", None) or {}
        train_length = current.get("train_length") or getattr(config, "max_position_embeddings", None)
        if train_length is None:
            raise ValueError("train_length is None and the model config names none; pass train_length=")
    train_length = _positive_int("train_length", train_length)
    target_length = _positive_int("target_length", target_length)
    if target_length <= train_length:
        raise ValueError(
            f"target_length must be greater than train_length (the temperature only acts beyond the training length), "
            f"got target_length={target_length} <= train_length={train_length}"
        )
    if per_head:
        return _fit_per_head(model, input_ids, target_length=target_length, train_length=train_length, mode=mode,
                             batch_size=batch_size, max_windows=max_windows, show_progress=show_progress, steps=steps,
                             lr=lr, start_coef=start_coef)
    values = _check_grid(grid)
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be a non-negative int, got {refine_steps!r}")
    batch_size = _positive_int("batch_size", batch_size)
    windows = _checked_windows(config, input_ids, target_length, max_windows)

    device = next(model.parameters()).device
    tokens = windows.shape[0] * (target_length - 1)
    evaluated: Dict[float, float] = {}
    previous = getattr(config, "drope_temperature", None)
    previous = dict(previous) if isinstance(previous, dict) else previous
    was_training = model.training
    bar = tqdm(total=len(values) + (refine_steps if len(values) > 1 else 0), desc="fit temperature",
               unit="eval", disable=not show_progress)

    def perplexity(c: float) -> float:
        if c in evaluated:
            return evaluated[c]
        set_temperature(model, {"mode": mode, "coef": c, "train_length": train_length})
        nll = 0.0
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size].to(device)
                out = model(input_ids=batch, labels=batch, use_cache=False)
                nll += float(out.loss.double()) * batch.shape[0] * (target_length - 1)
        evaluated[c] = math.exp(nll / tokens)
        bar.update(1)
        bar.set_postfix(c=f"{c:.4g}", ppl=f"{evaluated[c]:.4g}")
        return evaluated[c]

    try:
        model.eval()
        for c in values:
            perplexity(c)
        if refine_steps and len(values) > 1:
            i = min(range(len(values)), key=lambda j: evaluated[values[j]])
            lo, hi = values[max(i - 1, 0)], values[min(i + 1, len(values) - 1)]
            a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
            fa = perplexity(a)
            fb = perplexity(b) if refine_steps > 1 else math.inf
            for _ in range(refine_steps - 2):
                if fa <= fb:
                    hi, b, fb = b, a, fa
                    a = hi - _GOLDEN * (hi - lo)
                    fa = perplexity(a)
                else:
                    lo, a, fa = a, b, fb
                    b = lo + _GOLDEN * (hi - lo)
                    fb = perplexity(b)
        best = min(evaluated, key=evaluated.get)
        set_temperature(model, {"mode": mode, "coef": best, "train_length": train_length})
    except BaseException:
        set_temperature(model, previous)
        raise
    finally:
        bar.close()
        model.train(was_training)
    curve = sorted(evaluated.items())
    return TemperatureFit(coef=best, curve=curve, mode=mode, train_length=train_length, target_length=target_length,
                          tokens=tokens)


def _drope_attentions(model) -> List[torch.nn.Module]:
    from .modeling import DropeAttention

    return sorted((m for m in model.modules() if isinstance(m, DropeAttention)), key=lambda m: m.layer_idx)


def _fit_per_head(model, input_ids, *, target_length: int, train_length: int, mode: str, batch_size: int,
                  max_windows: Optional[int], show_progress: bool, steps: int, lr: float,
                  start_coef: Optional[float]) -> HeadTemperatureFit:
    """HeadScale-style fit: frozen model, per-(layer, head) coefficients trained at the target length.

    The coefficients live as ``drope_head_coef`` parameters on the attention modules during the fit
    (their logit multipliers are then differentiable) and the model runs through ``sdpa`` (the fused
    kernels' softmax scale has no gradient); everything is restored afterwards, whatever happens.
    """
    from tqdm.auto import tqdm

    from .temperature import set_temperature

    steps = _positive_int("steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(float(lr)) or lr <= 0:
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    config = model.config
    current = getattr(config, "drope_temperature", None) or {}
    if start_coef is None:
        start_coef = float(current.get("coef") or 0.0) if current.get("mode") == mode else 0.0
    if isinstance(start_coef, bool) or not isinstance(start_coef, Real) or not math.isfinite(float(start_coef)) \
            or start_coef < 0:
        raise ValueError(f"start_coef must be a finite coefficient >= 0, got {start_coef!r}")
    batch_size = _positive_int("batch_size", batch_size)
    windows = _checked_windows(config, input_ids, target_length, max_windows)
    attns = _drope_attentions(model)
    if not attns:
        raise ValueError("per_head=True needs the DroPE attention modules of drope's model classes")
    device = next(model.parameters()).device
    tokens = windows.shape[0] * (target_length - 1)
    previous = getattr(config, "drope_temperature", None)
    previous = dict(previous) if isinstance(previous, dict) else previous
    was_training, impl = model.training, config._attn_implementation
    grads = {n: p.requires_grad for n, p in model.named_parameters()}

    def perplexity() -> float:
        nll = 0.0
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start:start + batch_size].to(device)
                nll += float(model(input_ids=batch, labels=batch, use_cache=False).loss.double()) * batch.shape[0]
        return math.exp(nll * (target_length - 1) / tokens)

    curve: List[Tuple[int, float]] = []
    bar = tqdm(total=steps, desc="fit per-head temperature", unit="step", disable=not show_progress)
    try:
        model.eval()
        model.set_attn_implementation("sdpa")
        for p in model.parameters():
            p.requires_grad_(False)
        set_temperature(model, {"mode": mode, "coef": 0.0, "train_length": train_length})
        coefs = []
        for m in attns:
            m.drope_head_coef = torch.nn.Parameter(torch.full((m.num_heads,), float(start_coef), device=device))
            coefs.append(m.drope_head_coef)
        start_ppl = perplexity()
        opt = torch.optim.Adam(coefs, lr=float(lr))
        for step in range(steps):
            i = (step * batch_size) % windows.shape[0]
            batch = windows[i:i + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for c in coefs:
                    c.clamp_(min=0.0)
            curve.append((step, float(loss.detach())))
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1][1]:.4g}")
        head_coefs = [[float(x) for x in c.detach().cpu()] for c in coefs]
        fit_ppl = perplexity()
    except BaseException:
        set_temperature(model, previous)
        raise
    finally:
        bar.close()
        for m in attns:
            if hasattr(m, "drope_head_coef"):
                del m.drope_head_coef
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
        model.set_attn_implementation(impl)
        model.train(was_training)
    result = HeadTemperatureFit(head_coefs=head_coefs, perplexity=fit_ppl, start_perplexity=start_ppl, curve=curve,
                                mode=mode, train_length=train_length, target_length=target_length, tokens=tokens)
    set_temperature(model, result.temperature())
    return result
