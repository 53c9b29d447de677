"""Layouts of one sequence over the ranks of a context-parallel group, and the functions that cut and join it.

A sequence of S positions lives on W ranks in one of two layouts:

- ``"headtail"`` (default): S is cut into 2W equal chunks of ``c = S / (2W)`` rows; rank r holds chunks r and
  2W-1-r, in that order. Under a causal mask chunk j costs about j + 1/2 key blocks per query block, so every rank's
  pair costs the same (2W key-chunk units): the layout Llama 3 and TransformerEngine use for all-gather CP.
- ``"contiguous"``: rank r holds positions [r*S/W, (r+1)*S/W). The last rank does W times the first one's causal
  work; it is the layout of a sharded KV cache and of non-causal attention.

Tensors are in drope's layout (B, H, S, D): the sequence dimension is 2 unless a ``dim`` says otherwise.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["LAYOUTS", "Group", "resolve_group", "check_layout", "split_size", "segments", "shard", "unshard",
           "positions", "global_order", "rank_major_order"]

LAYOUTS = ("headtail", "contiguous")


class Group(NamedTuple):
    """A resolved process group: its registered name (what the operators take), size W and this rank r."""

    name: str
    size: int
    rank: int


def resolve_group(group=None) -> Group:
    """The name, size and this process's rank of ``group`` (None: the default group).

    Raises:
        ValueError: naming ``group`` when torch.distributed is unavailable or not initialised, or when this
            process is not a member of ``group``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed has no initialised process group; call "
                         "torch.distributed.init_process_group(...) on every rank first (drope.distributed's "
                         "functions run on a process group, group=None meaning the default one)")
    pg = dist.group.WORLD if group is None else group
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    return Group(pg.group_name, dist.get_world_size(pg), rank)


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def split_size(S: int, W: int, layout: str, *, name: str = "x") -> int:
    """Rows per rank of a sequence of S positions; raises ValueError (naming ``name``) when the layout cannot cut S."""
    check_layout(layout)
    parts = 2 * W if layout == "headtail" else W
    if S % parts:
        raise ValueError(f"{name}: a sequence of {S} positions cannot be split by layout {layout!r} over {W} ranks: "
                         f"it needs S % {parts} == 0 ({'2W chunks' if layout == 'headtail' else 'W shards'})")
    return S // W


def segments(W: int, r: int, S_local: int, layout: str) -> List[Tuple[int, int, int]]:
    """The runs of consecutive global positions rank r holds, as ``(local start, local end, global start)``."""
    if layout == "contiguous":
        return [(0, S_local, r * S_local)]
    c = S_local // 2
    return [(0, c, r * c), (c, 2 * c, (2 * W - 1 - r) * c)]


def positions(seq_len: int, *, group=None, layout: str = "headtail", device=None) -> torch.Tensor:
    """int64 global positions of this rank's rows of a sequence of ``seq_len`` positions.

    The DroPE temperature is a function of the global position: per-row scales for :func:`drope.distributed.attention`
    are computed from these.

    Raises:
        ValueError: no process group (``group``), an unknown ``layout``, or ``seq_len`` the layout cannot split.
    """
    g = resolve_group(group)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
    n = split_size(seq_len, g.size, layout, name="seq_len")
    return torch.cat([torch.arange(s, s + b - a, device=device, dtype=torch.int64)
                      for a, b, s in segments(g.size, g.rank, n, layout)])


def _check_dim(x, dim, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}) for a {x.dim()}-D {name}, got {dim!r}")
    return dim % x.dim()


def shard(x: torch.Tensor, *, group=None, layout: str = "headtail", dim: int = 2) -> torch.Tensor:
    """This rank's rows of the full tensor ``x`` (the same ``x`` on every rank), cut along ``dim``.

    ``"contiguous"`` returns a view of ``x``; ``"headtail"`` a new tensor (its two chunks joined). Differentiable.
    No communication.

    Raises:
        ValueError: no process group (``group``), an unknown ``layout``, a bad ``dim``, or a length the layout
            cannot split (naming ``x``).
    """
    g = resolve_group(group)
    dim = _check_dim(x, dim, "x")
    n = split_size(x.shape[dim], g.size, layout)
    parts = [x.narrow(dim, s, b - a) for a, b, s in segments(g.size, g.rank, n, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def global_order(x: torch.Tensor, W: int, layout: str) -> torch.Tensor:
    """Rows (dim 0) gathered rank by rank -> global order. Contiguous: ``x`` itself; head-tail: one copy."""
    if layout == "contiguous":
        return x
    c = x.shape[0] // (2 * W)
    heads = [x[r * 2 * c:r * 2 * c + c] for r in range(W)]
    tails = [x[r * 2 * c + c:(r + 1) * 2 * c] for r in reversed(range(W))]
    return torch.cat(heads + tails)


def rank_major_order(x: torch.Tensor, W: int, layout: str) -> torch.Tensor:
    """The inverse of :func:`global_order`: rows in global order -> rank by rank (what a reduce-scatter cuts)."""
    if layout == "contiguous":
        return x
    c = x.shape[0] // (2 * W)
    return torch.cat([piece for r in range(W) for piece in (x[r * c:(r + 1) * c],
                                                            x[(2 * W - 1 - r) * c:(2 * W - r) * c])])


def unshard(x_local: torch.Tensor, *, group=None, layout: str = "headtail", dim: int = 2,
            check_ranks: bool = True) -> torch.Tensor:
    """The full tensor, on every rank, from every rank's ``x_local`` (its rows as :func:`shard` cuts them).

    One all-gather (the operator ``drope::cp_all_gather``), preceded by a small all-gather of the shapes and dtypes
    when ``check_ranks`` (so that ranks passing different shapes raise instead of crashing or hanging in the
    collective). Differentiable: the gradient of ``x_local`` is the sum over ranks of its rows of the full tensor's
    gradient (a reduce-scatter), as for any all-gather.

    Raises:
        ValueError: no process group (``group``), an unknown ``layout``, a bad ``dim``, an odd number of local rows
            under ``"headtail"``, or ranks whose ``x_local`` differ in shape or dtype: on every rank.
    """
    from .collectives import all_gather, exchange, signature

    g = resolve_group(group)
    error: Optional[Exception] = None
    try:
        dim = _check_dim(x_local, dim, "x_local")
        check_layout(layout)
        if layout == "headtail" and x_local.shape[dim] % 2:
            raise ValueError(f"x_local: the head-tail layout holds two equal chunks per rank; got {x_local.shape[dim]} "
                             "rows, an odd number")
    except ValueError as e:
        error = e
    ok = error is None
    sig = []
    if check_ranks:
        shape = list(x_local.shape)[:8] if isinstance(x_local, torch.Tensor) else []
        sig = signature("drope.distributed.unshard", [
            x_local.dim() if isinstance(x_local, torch.Tensor) else None, *(shape + [None] * (8 - len(shape))),
            dim if ok else None, LAYOUTS.index(layout) if ok else None,
            x_local.dtype if isinstance(x_local, torch.Tensor) else None])
    if error is not None:
        if torch.compiler.is_compiling() or not check_ranks:
            raise error
        exchange(g, sig, device=getattr(x_local, "device", None), local_error=error)
    moved = x_local.movedim(dim, 0)
    full = global_order(all_gather(moved, g, sig), g.size, layout)
    return full.movedim(0, dim)
