"""The QK prologue on the CPU: ``rope(rms_norm(x) * w)`` per head, and the append of new tokens to a KV cache.

The same arithmetic as the Triton prologue (``qk_transform``): fp32 (fp64 for fp64 inputs), the RMSNorm of each
row computed on ``x / c`` for a power of two ``c >= max|x| / 2`` (so ``x^2`` cannot overflow), RoPE in the
rotate-half convention; the result is rounded to x's dtype, as the kernels' temporaries are.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["append_kv", "compute_dtype", "qk_hat", "qk_hat_backward", "qk_norm_rope", "qk_norm_rope_backward", "rms_norm"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for 16/32-bit inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2) + eps) per row, computed on x / c for a power of two c >= max|x| / 2 where max|x| > 1 (x / c
    is exact and its squares finite)."""
    c = torch.exp2(torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True).clamp_min(1.0))))
    return torch.rsqrt((x / c).square().mean(-1, keepdim=True) + eps / (c * c)) / c


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, in x's dtype (pass fp32 for the kernels' rounding);
    ``weight`` broadcasts against x's last dims. Any device: the QK-norm modules of the DroPE classes use it too."""
    return x * _inv_rms(x, eps) * weight.to(x.dtype)


def _per_head(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = w.to(dtype)
    return w[None, :, None, :] if w.dim() == 2 else w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotate-half RoPE by the angles of ``pos`` (``sign`` -1: the inverse rotation, RoPE's transpose)."""
    c, s = cos[pos].to(x.dtype), sin[pos].to(x.dtype) * sign  # (S, D/2) rows of the positions
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _positions(x: torch.Tensor, pos: Optional[torch.Tensor], pos0: int) -> torch.Tensor:
    return torch.arange(pos0, pos0 + x.shape[2]) if pos is None else pos.long()


def qk_hat(x: torch.Tensor, weight: Optional[torch.Tensor], cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
           pos: Optional[torch.Tensor], pos0: int, eps: float) -> torch.Tensor:
    """``rope(norm(x))`` in x's dtype (``x`` itself when there is neither a weight nor tables).

    Row s of x (B, H, S, D) sits at position ``pos[s]`` (packed documents) or ``pos0 + s``.
    """
    if weight is None and cos is None:
        return x
    y = x.to(compute_dtype(x.dtype))
    if weight is not None:
        y = y * _inv_rms(y, eps) * _per_head(weight, y.dtype)
    if cos is not None:
        y = _rotate(y, cos, sin, _positions(x, pos, pos0), 1.0)
    return y.to(x.dtype)


def qk_hat_backward(gy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                    sin: Optional[torch.Tensor], pos: Optional[torch.Tensor], pos0: int, eps: float, need_dx: bool,
                    need_dw: bool):
    """(dx in x's dtype, dw in weight's dtype) from the gradient ``gy`` of :func:`qk_hat`, each None when not asked
    for: RoPE's transpose (the inverse rotation), then the RMSNorm Jacobian ``r * (u - n * mean(n * u))`` with
    ``n = x * r``, ``u = w * g``."""
    ct = compute_dtype(x.dtype)
    g = gy.to(ct)
    if cos is not None:
        g = _rotate(g, cos, sin, _positions(x, pos, pos0), -1.0)
    dw = None
    if weight is not None:
        xf = x.to(ct)
        r = _inv_rms(xf, eps)
        n = xf * r
        if need_dw:
            dw = (g * n).sum(dim=(0, 2))
            dw = (dw.sum(0) if weight.dim() == 1 else dw).to(weight.dtype)
        u = g * _per_head(weight, ct)
        g = r * (u - n * (n * u).mean(-1, keepdim=True))
    return (g.to(x.dtype) if need_dx else None), dw


def qk_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], rope_cos: Optional[torch.Tensor],
                 rope_sin: Optional[torch.Tensor], pos0: int, eps: float) -> torch.Tensor:
    """The ``drope::qk_norm_rope`` operator on CPU tensors: a new contiguous tensor in x's dtype."""
    y = qk_hat(x, weight, rope_cos, rope_sin, None, pos0, eps)
    return y.contiguous() if y is not x else x.clone(memory_format=torch.contiguous_format)


def qk_norm_rope_backward(gy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                          rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], pos0: int, eps: float,
                          need_dx: bool, need_dw: bool):
    """(dx, dw) of :func:`qk_norm_rope` (each None when not asked for)."""
    return qk_hat_backward(gy, x, weight, rope_cos, rope_sin, None, pos0, eps, need_dx, need_dw)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              cache_seqlens: Optional[torch.Tensor], block_table: Optional[torch.Tensor]) -> None:
    """Write k_new / v_new (B, Hkv, Sq, D) at positions ``cache_seqlens[b] - Sq + i``, in place; positions outside
    the cache and pages outside the pool are skipped (never written through), as the Triton kernel does."""
    B, _, SQ, _ = k_new.shape
    if k_new.numel() == 0:
        return
    paged = block_table is not None
    smax = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
    lens = torch.full((B,), smax, dtype=torch.int64) if cache_seqlens is None else cache_seqlens.long().cpu()
    pos = lens[:, None] - SQ + torch.arange(SQ)[None, :]  # (B, Sq)
    b = torch.arange(B)[:, None].expand(B, SQ)
    ok = (pos >= 0) & (pos < smax)
    if paged:
        page_size = k_cache.shape[1]
        page = block_table.long().cpu()[b, pos.clamp(0, smax - 1) // page_size]
        ok = ok & (page >= 0) & (page < k_cache.shape[0])
        b, pos, page = b[ok], pos[ok], page[ok]
        i = ok.nonzero()[:, 1]
        k_cache[page, pos % page_size] = k_new[b, :, i]
        v_cache[page, pos % page_size] = v_new[b, :, i]
    else:
        i = ok.nonzero()[:, 1]
        b, pos = b[ok], pos[ok]
        k_cache[b, :, pos] = k_new[b, :, i]
        v_cache[b, :, pos] = v_new[b, :, i]
