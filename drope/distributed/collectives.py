"""The collectives of context parallelism as PyTorch operators, and the cross-rank check that precedes them.

| operator | forward | autograd |
|---|---|---|
| ``drope::cp_all_gather`` | rows (dim 0) of every rank, rank by rank | ``drope::cp_reduce_scatter`` of the gradient |
| ``drope::cp_reduce_scatter`` | sum over ranks, this rank's rows (dim 0) | ``drope::cp_all_gather`` of the gradient |

As torch's own context parallelism registers its K/V all-gather (``_cp_custom_ops.py``), so that
``torch.compile(fullgraph=True)`` records each collective as one node (its fake gives the shape) and the backward is
explicit. Operators take the group by its registered name (``ProcessGroup.group_name``; a schema holds no Python
objects) and resolve it at run time.

**Errors, never hangs.** A collective whose ranks pass tensors of different sizes crashes gloo
(``EnforceNotMet: Received data size doesn't match expected size``, the process aborts) and hangs NCCL. So every
public entry point first all-gathers a small fixed-size *signature* (shapes, dtypes, options; float64,
``SIG_LEN`` entries, plus a flag saying whether the rank rejected its own input): :func:`exchange` then raises the
same ``ValueError`` on every rank when one rank rejected its input or the ranks disagree. Inside the operators it
reads the gathered signatures on the host (on a GPU: one device sync per call; ``check_ranks=False`` skips it).
Every collective is bounded by the group's timeout (``init_process_group(timeout=...)``): a rank that never arrives
makes the others raise after it, it does not block them forever.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Group

__all__ = ["SIG_LEN", "signature", "exchange", "all_gather", "reduce_scatter", "gather_rows", "scatter_rows"]

SIG_LEN = 48
_MAGIC = 7304.0
_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
           torch.int64, torch.bool)
_DEVICES = ("cpu", "cuda")
# op code -> (public name, field names); codes are positions in this table, the same on every rank
_OPS: Dict[str, Tuple[int, Tuple[str, ...]]] = {}
_NAMES: List[str] = []


def register_signature(op: str, fields: Sequence[str]) -> None:
    """Declare the fields of ``op``'s signature (once, at import)."""
    if len(fields) + 2 > SIG_LEN:
        raise RuntimeError(f"signature of {op} has {len(fields)} fields; at most {SIG_LEN - 2}")
    _OPS[op] = (len(_NAMES), tuple(fields))
    _NAMES.append(op)


def _encode(value) -> float:
    if value is None:
        return -1.0
    if isinstance(value, torch.dtype):
        return float(_DTYPES.index(value)) if value in _DTYPES else 99.0
    if isinstance(value, torch.device):
        return float(_DEVICES.index(value.type)) if value.type in _DEVICES else 9.0
    return float(value)


def signature(op: str, values: Sequence) -> List[float]:
    """``op``'s signature: [magic, op code, *values] as floats (None -1, dtypes and devices as codes), padded."""
    code, fields = _OPS[op]
    if len(values) != len(fields):
        raise RuntimeError(f"signature of {op}: {len(values)} values for {len(fields)} fields")
    row = [_MAGIC, float(code)] + [_encode(v) for v in values]
    return row + [0.0] * (SIG_LEN - len(row))


def _decode(field: str, value: float) -> str:
    if field.endswith("dtype") and 0 <= value < len(_DTYPES):
        return str(_DTYPES[int(value)])
    if field == "device" and 0 <= value < len(_DEVICES):
        return _DEVICES[int(value)]
    if value == -1.0:
        return "None"
    return f"{value:g}" if value != int(value) else str(int(value))


def group_by_name(name: str):
    """The process group registered under ``name`` (what the operators receive)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def comm_device(group_name: str, like: Optional[torch.device]) -> torch.device:
    """Where a small tensor of this group's collectives lives: next to the inputs, else where the backend works."""
    if like is not None:
        return torch.device(like)
    backend = str(dist.get_backend(group_by_name(group_name)))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: Tensor, group_name: str, world_size: int) -> Tensor:
    """All-gather along dim 0 (rank r's rows at [r*n, (r+1)*n)): a new contiguous tensor."""
    x = x.contiguous()
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group_by_name(group_name))
    return out


def scatter_rows(x: Tensor, group_name: str, world_size: int) -> Tensor:
    """Reduce-scatter (sum) along dim 0: this rank's 1/W of the rows of the sum over ranks."""
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world_size, *x.shape[1:]))
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group_by_name(group_name))
    return out


def exchange(group: Group, sig: List[float], *, device: Optional[torch.device] = None,
             local_error: Optional[BaseException] = None) -> None:
    """All-gather every rank's signature (one small collective); raise on every rank if any rank rejected its input
    (``local_error`` here: it is re-raised after the collective) or the signatures differ."""
    flag = 0.0 if local_error is None else 1.0
    row = torch.tensor([[flag, *sig]], dtype=torch.float64, device=comm_device(group.name, device))
    table = gather_rows(row, group.name, group.size).tolist()
    if local_error is not None:
        raise local_error
    op = _NAMES[int(sig[1])]
    rejected = [r for r, t in enumerate(table) if t[0]]
    if rejected:
        raise ValueError(f"{op}: rank(s) {rejected} rejected their input (the ValueError there names the argument); "
                         "nothing was computed on any rank")
    if any(t[1] != _MAGIC or t[2] != sig[1] for t in table):
        ops = [_NAMES[int(t[2])] if t[1] == _MAGIC and 0 <= t[2] < len(_NAMES) else "?" for t in table]
        raise ValueError(f"{op}: the ranks called different operations at once ({', '.join(ops)} on ranks "
                         f"0..{len(table) - 1}); every rank of the group must make the same call")
    fields = _OPS[op][1]
    diffs = []
    for i, field in enumerate(fields):
        values = [t[3 + i] for t in table]
        if any(v != values[0] for v in values):
            diffs.append(f"{field}: " + ", ".join(f"rank {r} {_decode(field, v)}" for r, v in enumerate(values)))
    if diffs:
        raise ValueError(f"{op}: the ranks' inputs differ ({'; '.join(diffs)}); every rank must pass the same shapes, "
                         "dtypes and options (its own rows of one sequence)")


@torch.library.custom_op("drope::cp_all_gather", mutates_args=())
def _cp_all_gather(x: Tensor, group_name: str, world_size: int, check: List[float]) -> Tensor:
    if check:
        exchange(Group(group_name, world_size, -1), check, device=x.device)
    return gather_rows(x, group_name, world_size)


@_cp_all_gather.register_fake
def _(x, group_name, world_size, check):
    return x.new_empty((world_size * x.shape[0], *x.shape[1:]))


@torch.library.custom_op("drope::cp_reduce_scatter", mutates_args=())
def _cp_reduce_scatter(x: Tensor, group_name: str, world_size: int) -> Tensor:
    if x.shape[0] % world_size:
        raise ValueError(f"drope::cp_reduce_scatter: {x.shape[0]} rows do not split over {world_size} ranks")
    return scatter_rows(x, group_name, world_size)


@_cp_reduce_scatter.register_fake
def _(x, group_name, world_size):
    return x.new_empty((x.shape[0] // world_size, *x.shape[1:]))


def _setup(ctx, inputs, output):
    ctx.group = (inputs[1], inputs[2])


def _all_gather_backward(ctx, grad):
    return torch.ops.drope.cp_reduce_scatter(grad, *ctx.group), None, None, None


def _reduce_scatter_backward(ctx, grad):
    return torch.ops.drope.cp_all_gather(grad, *ctx.group, []), None, None


_cp_all_gather.register_autograd(_all_gather_backward, setup_context=_setup)
_cp_reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_setup)


def all_gather(x: Tensor, group: Group, check: Sequence[float] = ()) -> Tensor:
    """``drope::cp_all_gather``: every rank's ``x`` stacked along dim 0, rank by rank; differentiable (the gradient
    is reduce-scattered back). A non-empty ``check`` signature is exchanged first (:func:`exchange`)."""
    return torch.ops.drope.cp_all_gather(x, group.name, group.size, list(check))


def reduce_scatter(x: Tensor, group: Group) -> Tensor:
    """``drope::cp_reduce_scatter``: the sum of every rank's ``x``, this rank's 1/W of its rows; differentiable."""
    return torch.ops.drope.cp_reduce_scatter(x, group.name, group.size)


register_signature("drope.distributed.unshard", ["ndim", *(f"x_local.shape[{i}]" for i in range(8)), "dim",
                                                 "layout", "x_local dtype"])
