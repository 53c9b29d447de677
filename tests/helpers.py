"""Small utilities shared by the tests, and the attention tests' one ``Case`` vocabulary."""

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from drope import reference
from drope.validation import check_attention, split_scale


DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NORMS = ("none", "shared", "head")
SCALES = ("none", "float", "rows", "batch_rows", "heads", "head_rows")
LAYOUTS = ("contig", "bshd")


@dataclass(frozen=True)
class Case:
    """One attention problem of the forward and backward kernel tests; ``id`` is its pytest id.

    ``B2-Hq8-Hkv2-Sq63-Sk63-D64-fp32-causal-rope-norm_shared-scale_rows``: the shapes, the dtype, causal or full,
    then each feature that is on. How a test turns a case into tensors is its own (the forward builds inputs in
    the case's dtype, the backward float64 leaves); what the names mean is fixed here.
    """

    B: int
    HQ: int
    HKV: int
    SQ: int
    SK: int
    D: int
    causal: bool = True
    rope: bool = False
    norm: str = "none"  # none | shared: one (D,) weight for every head | head: (H, D)
    scale: str = "none"  # none | float | rows (Sq,) | batch_rows (B, Sq) | heads (Hq,) | head_rows (B, Hq, Sq)
    layout: str = "contig"  # contig | bshd: (B, H, S, D) views of (B, S, H, D) memory
    dtype: torch.dtype = torch.float32
    blocks: Optional[Tuple[int, int]] = None  # forced (BM, BN); None = the default path
    window: Optional[int] = None
    chunk: Optional[int] = None
    sinks: bool = False
    softcap: Optional[float] = None

    def __post_init__(self):
        for name, accepted in (("norm", NORMS), ("scale", SCALES), ("layout", LAYOUTS), ("dtype", DTYPE_NAME)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"Case.{name} must be one of {list(accepted)}, got {getattr(self, name)!r}")

    @property
    def id(self) -> str:
        parts = [f"B{self.B}-Hq{self.HQ}-Hkv{self.HKV}-Sq{self.SQ}-Sk{self.SK}-D{self.D}", DTYPE_NAME[self.dtype]]
        parts.append("causal" if self.causal else "full")
        if self.rope:
            parts.append("rope")
        if self.norm != "none":
            parts.append(f"norm_{self.norm}")
        if self.scale != "none":
            parts.append(f"scale_{self.scale}")
        if self.layout != "contig":
            parts.append(self.layout)
        if self.blocks:
            parts.append("blocks{}x{}".format(*self.blocks))
        for name in ("window", "chunk", "softcap"):
            if getattr(self, name) is not None:
                parts.append(f"{name}{getattr(self, name)}")
        if self.sinks:
            parts.append("sinks")
        return "-".join(parts)

    def norm_shapes(self) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        """Shapes of (q_norm_weight, k_norm_weight); None without QK-norm."""
        if self.norm == "none":
            return None
        return ((self.D,), (self.D,)) if self.norm == "shared" else ((self.HQ, self.D), (self.HKV, self.D))

    def scale_shape(self) -> Optional[Tuple[int, ...]]:
        """Shape of the softmax scale tensor; None for no scale or a float."""
        return {"rows": (self.SQ,), "batch_rows": (self.B, self.SQ), "heads": (self.HQ,),
                "head_rows": (self.B, self.HQ, self.SQ)}.get(self.scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def cu_seqlens(docs, device="cpu"):
    """Boundaries (cu_seqlens_q, cu_seqlens_k), int32, of packed documents given as (Lq, Lk) pairs."""
    cq = torch.tensor([0] + [lq for lq, _ in docs], device=device).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + [lk for _, lk in docs], device=device).cumsum(0).to(torch.int32)
    return cq, ck


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` (B, H, S, D) behind a (B, S, H, D) memory layout, as HF hands them."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def with_cache(model, cache) -> dict:
    """Keyword argument passing a KV cache to ``model``: ``cache`` on transformers >= 5.24, else ``past_key_values``."""
    from drope.hf import cache_argument

    return {cache_argument(model): cache}


@contextlib.contextmanager
def poisoned_empty():
    """Every ``torch.empty`` / ``torch.empty_like`` inside the block is NaN-filled (floats) or -1 (ints):
    unwritten output fails."""
    reals = {name: getattr(torch, name) for name in ("empty", "empty_like")}

    def poisoned(real):
        def make(*args, **kwargs):
            t = real(*args, **kwargs)
            if t.device.type != "meta":
                t.fill_(float("nan") if t.is_floating_point() else -1)
            return t
        return make

    for name, real in reals.items():
        setattr(torch, name, poisoned(real))
    try:
        yield
    finally:
        for name, real in reals.items():
            setattr(torch, name, real)


def lowp_attention(q, k, v, *, causal=True, softmax_scale=None, rope=None, q_norm_weight=None, k_norm_weight=None,
                   norm_eps=1e-6, cu_seqlens=None, window=None, chunk=None, sinks=None, softcap=None, key_mask=None,
                   cu_seqlens_k=None):
    """The attention of ``reference.attention`` computed the way a 16-bit kernel rounds it.

    Normed/rotated q and k are rounded to q's dtype, products accumulate in fp32, the softmax is fp32,
    the probabilities are rounded to the dtype before ``@ v``, and the output is rounded: the baseline
    of flash-attention's rule (kernel error at most twice this one's, per row).
    """
    dt = q.dtype
    B, HQ, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    shape = check_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, rope=rope,
                            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps,
                            cu_seqlens=cu_seqlens, window=window, chunk=chunk, sinks=sinks, softcap=softcap,
                            key_mask=key_mask, kernel=False, cu_seqlens_k=cu_seqlens_k)
    const, rows = split_scale(softmax_scale, shape, q.device, torch.float32)
    scale = const if rows is None else rows[..., None]
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, SQ]
    kbounds = cu_seqlens_k.tolist() if cu_seqlens_k is not None else bounds
    outs = []
    for a, b, ka, kb in zip(bounds[:-1], bounds[1:], kbounds[:-1], kbounds[1:]):
        if cu_seqlens is None:
            qd, kd, vd, pos0, ka, kb = q, k, v, SK - SQ, 0, SK
        else:
            qd, kd, vd, pos0 = q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], (kb - ka) - (b - a)
        qf, kf = reference._prepare_qk(qd.float(), kd.float(), rope, q_norm_weight, k_norm_weight, norm_eps, pos0)
        qf, kf = qf.to(dt).float(), kf.to(dt).float()
        kf = kf.repeat_interleave(HQ // HKV, 1)
        vf = vd.float().repeat_interleave(HQ // HKV, 1)
        s = qf @ kf.transpose(-1, -2) * (scale if rows is None or cu_seqlens is None else scale[:, :, a:b])
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            n = qd.shape[2]
            vis = reference._visible(torch.arange(n) + pos0, torch.arange(kb - ka), window, chunk)
            s = s.masked_fill(~vis, float("-inf"))
        if key_mask is not None:
            s = s.masked_fill(~key_mask[:, ka:kb].bool()[:, None, None, :], float("-inf"))
        if sinks is not None:
            s = torch.cat((s, sinks.float()[None, :, None, None].expand(*s.shape[:-1], 1)), -1)
        m = s.amax(-1, keepdim=True).clamp(min=-1e30)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        if sinks is not None:
            p = p[..., :-1]
        o = (p.to(dt).float() @ vf) / torch.where(denom == 0, 1.0, denom)
        outs.append(o)
    return torch.cat(outs, 2).to(dt)


def assert_rows_close(out, ref64, ref_low, floor: float, what: str = "output"):
    """flash-attention's rule, per row: max |out - ref64| <= 2 * max |ref_low - ref64| + floor.

    The floor grows by one ulp of the row's largest value in ``out``'s dtype: Triton's interpreter
    converts fp32 -> bf16 by truncation (a whole ulp), where the baseline rounds to nearest.
    """
    err = (out.double() - ref64).abs().amax(-1)
    base = (ref_low.double() - ref64).abs().amax(-1)
    floor = floor + torch.finfo(out.dtype).eps * ref64.abs().amax(-1)
    bad = err > 2 * base + floor
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} rows beyond 2x the low-precision error + the floor; "
                             f"first at {idx}: {err[tuple(idx)].item():.3e} > 2 * {base[tuple(idx)].item():.3e} "
                             f"+ {floor[tuple(idx)].item():.3e}")


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read tensor values on the host (each a device sync on a GPU): ``item``, ``tolist``,
    ``bool()`` / ``int()`` / ``float()`` of a tensor, ``nonzero``, ``unique``, ``equal``, a copy to the CPU...

    On the CPU nothing syncs, so this is how a CPU test sees the syncs a GPU would pay.
    """

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.argwhere,
             torch.Tensor.argwhere, torch.unique, torch.Tensor.unique, torch.unique_consecutive, torch.masked_select,
             torch.Tensor.masked_select, torch.equal, torch.Tensor.equal, torch.allclose, torch.Tensor.numpy,
             torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def flash_oracle(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, softmax_scale=None):
    """flash-attn's attention in float64: q (B, Sq, H, D), k / v (B, Sk, Hkv, D) -> (out, lse (B, H, Sq))."""
    q, k, v = q.double(), k.double(), v.double()
    B, SQ, H, D = q.shape
    SK, HKV = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // HKV, 2), v.repeat_interleave(H // HKV, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * (softmax_scale if softmax_scale is not None else D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(SQ)[:, None] + (SK - SQ)
    j = torch.arange(SK)[None, :]
    left, right = window_size
    keep = torch.ones(SQ, SK, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v), lse
