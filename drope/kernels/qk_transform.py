"""QK-norm and RoPE as their own O(S*D) passes: ``rope(norm(x))`` forward, and its transpose.

The attention kernels' hot loops stay plain attention: the forward writes ``rope(norm(q))`` and
``rope(norm(k))`` once (one read and one write of q and k, under 1 % of a long prefill) instead of
normalising and rotating every K tile once per query block and head. The backward maps d(x_hat)
back through RoPE^T (rotation by -theta) and the RMSNorm Jacobian, and writes per-block partial
sums of the weight gradient that ``torch.sum`` reduces (deterministic, no atomics).

Any even head dim: each half of D is a power-of-two block ``BH`` with masked lanes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .toolkit import cdiv, launch, named_strides, next_pow2, norm_pow2, upcast

__all__ = ["qk_prologue", "qk_hat", "qk_epilogue", "packed_tables", "row_block"]


@triton.jit
def _load_halves(p, stride_d, m_s, m_h, HALF: tl.constexpr):
    """The two halves of D of a [BS, BH] row block, fp32."""
    m = m_s[:, None] & m_h[None, :]
    b_1 = tl.load(p, mask=m, other=0.0).to(tl.float32)
    b_2 = tl.load(p + HALF * stride_d, mask=m, other=0.0).to(tl.float32)
    return b_1, b_2


@triton.jit
def _norm_scale(b_x1, b_x2, eps, HALF: tl.constexpr):
    """Per row, c (a power of two, :func:`toolkit.norm_pow2`) and rho = rsqrt(mean((x/c)^2) + eps/c^2), so that
    rsqrt(mean(x^2) + eps) = rho / c without ever squaring x (inputs up to the dtype's maximum)."""
    b_c = norm_pow2(tl.maximum(tl.max(tl.abs(b_x1), 1), tl.max(tl.abs(b_x2), 1)))  # [BS]
    b_y1 = b_x1 / b_c[:, None]
    b_y2 = b_x2 / b_c[:, None]
    b_ms = (tl.sum(b_y1 * b_y1, 1) + tl.sum(b_y2 * b_y2, 1)) / (2 * HALF)
    return b_c, tl.rsqrt(b_ms + eps / (b_c * b_c))


@triton.jit
def _program_rows(H, S, HALF: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr):
    """This program's (batch x head, row block) ids, rows, half-D lanes and their masks."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_s = i_s * BS + tl.arange(0, BS)
    o_h = tl.arange(0, BH)
    return i_bh, i_s, i_b, i_h, o_s, o_h, o_s < S, o_h < HALF, o_s.to(tl.int64)


@triton.jit
def _angles(COS, SIN, POS, o_s, m_s, m_h, o_h, pos0, stride_cs, stride_cd, stride_ss, stride_sd,
            PACKED: tl.constexpr):
    """cos and sin [BS, BH] of each row's position (its own table entry when packed)."""
    if PACKED:
        o_pos = tl.load(POS + o_s, mask=m_s, other=0).to(tl.int64)
    else:
        o_pos = o_s.to(tl.int64) + pos0
    m = m_s[:, None] & m_h[None, :]
    b_c = tl.load(COS + o_pos[:, None] * stride_cs + o_h[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
    b_sn = tl.load(SIN + o_pos[:, None] * stride_ss + o_h[None, :] * stride_sd, mask=m, other=0.0).to(tl.float32)
    return b_c, b_sn


@triton.jit
def _qk_prologue_kernel(
    X, Y, W, COS, SIN, POS,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_yb, stride_yh, stride_ys, stride_yd,
    stride_wh, stride_wd, stride_cs, stride_cd, stride_ss, stride_sd,
    H, S, pos0, eps,
    HALF: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, PACKED: tl.constexpr,
):
    i_bh, i_s, i_b, i_h, o_s, o_h, m_s, m_h, o_s64 = _program_rows(H, S, HALF, BH, BS)
    p_x = X + i_b * stride_xb + i_h * stride_xh + o_s64[:, None] * stride_xs + o_h[None, :] * stride_xd
    b_x1, b_x2 = _load_halves(p_x, stride_xd, m_s, m_h, HALF)  # [BS, BH] each
    if HAS_NORM:
        b_pow, b_rho = _norm_scale(b_x1, b_x2, eps, HALF)  # [BS] each
        b_r = b_rho / b_pow
        p_w = W + i_h * stride_wh + o_h * stride_wd
        b_w1 = tl.load(p_w, mask=m_h, other=0.0).to(tl.float32)
        b_w2 = tl.load(p_w + HALF * stride_wd, mask=m_h, other=0.0).to(tl.float32)
        b_x1 = b_x1 * b_r[:, None] * b_w1[None, :]
        b_x2 = b_x2 * b_r[:, None] * b_w2[None, :]
    if HAS_ROPE:
        b_c, b_sn = _angles(COS, SIN, POS, o_s, m_s, m_h, o_h, pos0, stride_cs, stride_cd, stride_ss, stride_sd,
                            PACKED)
        b_y1 = b_x1 * b_c - b_x2 * b_sn
        b_y2 = b_x2 * b_c + b_x1 * b_sn
    else:
        b_y1, b_y2 = b_x1, b_x2
    p_y = Y + i_b * stride_yb + i_h * stride_yh + o_s64[:, None] * stride_ys + o_h[None, :] * stride_yd
    m = m_s[:, None] & m_h[None, :]
    tl.store(p_y, b_y1.to(Y.dtype.element_ty), mask=m)
    tl.store(p_y + HALF * stride_yd, b_y2.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _qk_epilogue_kernel(
    GY, X, DX, W, DW, COS, SIN, POS,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_dxb, stride_dxh, stride_dxs, stride_dxd,
    stride_wh, stride_wd, stride_cs, stride_cd, stride_ss, stride_sd,
    H, S, pos0, eps,
    HALF: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, PACKED: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DW: tl.constexpr,
):
    i_bh, i_s, i_b, i_h, o_s, o_h, m_s, m_h, o_s64 = _program_rows(H, S, HALF, BH, BS)
    p_g = GY + i_b * stride_gb + i_h * stride_gh + o_s64[:, None] * stride_gs + o_h[None, :] * stride_gd
    b_g1, b_g2 = _load_halves(p_g, stride_gd, m_s, m_h, HALF)  # [BS, BH] each
    if HAS_ROPE:
        b_c, b_sn = _angles(COS, SIN, POS, o_s, m_s, m_h, o_h, pos0, stride_cs, stride_cd, stride_ss, stride_sd,
                            PACKED)
        # RoPE^T: rotation by -theta
        b_t1 = b_g1 * b_c + b_g2 * b_sn
        b_g2 = b_g2 * b_c - b_g1 * b_sn
        b_g1 = b_t1
    if HAS_NORM:
        p_x = X + i_b * stride_xb + i_h * stride_xh + o_s64[:, None] * stride_xs + o_h[None, :] * stride_xd
        b_x1, b_x2 = _load_halves(p_x, stride_xd, m_s, m_h, HALF)
        b_pow, b_rho = _norm_scale(b_x1, b_x2, eps, HALF)  # [BS] each
        b_y1 = b_x1 / b_pow[:, None]
        b_y2 = b_x2 / b_pow[:, None]
        if STORE_DW:
            p_dw = DW + (i_bh * tl.num_programs(1) + i_s).to(tl.int64) * (2 * HALF) + o_h
            tl.store(p_dw, tl.sum(b_g1 * b_y1 * b_rho[:, None], 0), mask=m_h)
            tl.store(p_dw + HALF, tl.sum(b_g2 * b_y2 * b_rho[:, None], 0), mask=m_h)
        if STORE_DX:
            p_w = W + i_h * stride_wh + o_h * stride_wd
            b_g1 = b_g1 * tl.load(p_w, mask=m_h, other=0.0).to(tl.float32)[None, :]
            b_g2 = b_g2 * tl.load(p_w + HALF * stride_wd, mask=m_h, other=0.0).to(tl.float32)[None, :]
            # d/dx of x*r with r = rho/c, y = x/c: (rho/c) * (g - y * rho^2 * mean(g*y)), no x^2 or r^3 formed
            b_k = b_rho * b_rho * (tl.sum(b_g1 * b_y1, 1) + tl.sum(b_g2 * b_y2, 1)) / (2 * HALF)
            b_g1 = (b_rho / b_pow)[:, None] * (b_g1 - b_y1 * b_k[:, None])
            b_g2 = (b_rho / b_pow)[:, None] * (b_g2 - b_y2 * b_k[:, None])
    if STORE_DX:
        p_dx = DX + i_b * stride_dxb + i_h * stride_dxh + o_s64[:, None] * stride_dxs + o_h[None, :] * stride_dxd
        m = m_s[:, None] & m_h[None, :]
        tl.store(p_dx, b_g1.to(DX.dtype.element_ty), mask=m)
        tl.store(p_dx + HALF * stride_dxd, b_g2.to(DX.dtype.element_ty), mask=m)


def row_block(S: int) -> int:
    """Rows per program of the O(S*D) passes (this module's, and the backward's delta)."""
    return min(64, max(16, next_pow2(max(S, 1))))


def _half_block(D: int) -> int:
    return max(8, next_pow2(D // 2))


def _weight(w: Optional[torch.Tensor]) -> dict:
    """Strides of a (D,) or (H, D) weight (head stride 0 when shared by all heads)."""
    if w is None:
        return dict(stride_wh=0, stride_wd=0)
    return dict(stride_wh=w.stride(0) if w.dim() == 2 else 0, stride_wd=w.stride(-1))


def _tables(rope) -> dict:
    cos, sin = rope if rope is not None else (None, None)
    return dict(COS=cos, SIN=sin, **named_strides("c", cos, "sd"), **named_strides("s", sin, "sd"))


def qk_prologue(x: torch.Tensor, w: Optional[torch.Tensor], rope, pos: Optional[torch.Tensor], pos0: int,
                eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``rope(norm(x))`` of a (B, H, S, D) tensor (any strides) into a new contiguous tensor of ``dtype``.

    ``w``: None or a (D,) / (H, D) weight; ``rope``: None or (cos, sin) tables; ``pos``: None or
    the (S,) int32 position of each row (packed documents), else row s sits at ``pos0 + s``.
    """
    B, H, S, D = x.shape
    y = torch.empty((B, H, S, D), device=x.device, dtype=dtype)
    if y.numel() == 0:
        return y
    BS = row_block(S)
    launch(_qk_prologue_kernel, (B * H, cdiv(S, BS)),
           X=x, Y=y, W=w, POS=pos, **_tables(rope),
           **named_strides("x", x, "bhsd"), **named_strides("y", y, "bhsd"), **_weight(w),
           H=H, S=S, pos0=pos0, eps=float(eps), HALF=D // 2, BH=_half_block(D), BS=BS,
           HAS_NORM=w is not None, HAS_ROPE=rope is not None, PACKED=pos is not None)
    return y


def qk_hat(x: torch.Tensor, w: Optional[torch.Tensor], rope, pos: Optional[torch.Tensor], pos0: int,
           eps: float) -> torch.Tensor:
    """What the attention kernels multiply: ``rope(norm(x))`` (:func:`qk_prologue`, in x's dtype), or
    ``x`` itself, read through its strides, when there is neither a weight nor tables.

    Under Triton's interpreter bf16 hats are fp32 tensors of bf16-rounded values (its fp32 -> bf16
    cast truncates, and its bf16 ``tl.dot`` is wrong).
    """
    if w is None and rope is None:
        return x
    if upcast(x.dtype):
        return qk_prologue(x, w, rope, pos, pos0, eps, torch.float32).to(torch.bfloat16).to(torch.float32)
    return qk_prologue(x, w, rope, pos, pos0, eps, x.dtype)


def qk_epilogue(gy: torch.Tensor, x: torch.Tensor, w: Optional[torch.Tensor], rope, pos: Optional[torch.Tensor],
                pos0: int, eps: float, need_dx: bool, need_dw: bool):
    """(dx, dw) from the gradient ``gy`` of ``rope(norm(x))``; each None when not asked for.

    dx comes back in x's dtype, dw (summed over heads for a (D,) weight) in w's dtype.
    """
    B, H, S, D = x.shape
    BS = row_block(S)
    nblocks = cdiv(S, BS)
    dx = torch.empty((B, H, S, D), device=x.device, dtype=x.dtype) if need_dx else None
    dw_part = torch.empty((B * H, nblocks, D), device=x.device, dtype=torch.float32) if need_dw else None
    launch(_qk_epilogue_kernel, (B * H, nblocks),
           GY=gy, X=x, DX=dx, W=w, DW=dw_part, POS=pos, **_tables(rope),
           **named_strides("g", gy, "bhsd"), **named_strides("x", x, "bhsd"),
           **named_strides("dx", dx, "bhsd"), **_weight(w),
           H=H, S=S, pos0=pos0, eps=float(eps), HALF=D // 2, BH=_half_block(D), BS=BS,
           HAS_NORM=w is not None, HAS_ROPE=rope is not None, PACKED=pos is not None,
           STORE_DX=need_dx, STORE_DW=need_dw)
    dw = None
    if need_dw:
        dw = dw_part.view(B, H, nblocks, D).sum(dim=(0, 2))
        if w.dim() == 1:
            dw = dw.sum(0)
        dw = dw.to(w.dtype)
    return dx, dw


def packed_tables(cu_seqlens: torch.Tensor, total: int, cu_seqlens_k: Optional[torch.Tensor] = None,
                  total_k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's tables of a packed batch, all int32: ``(tab, cu, pos)``.

    ``tab`` = [document of each query row | its position | document of each key | its position], a
    document's query rows being the last positions of its keys (``cu_seqlens_k``; the queries' own
    boundaries when None); ``cu`` = [query boundaries | key boundaries]; ``pos`` the query rows' positions
    (the RoPE positions when queries and keys are packed together).
    """
    def rows(cu: torch.Tensor, n: int):
        lengths = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=n)
        return doc, torch.arange(n, device=cu.device) - cu[:-1][doc]

    cu = cu_seqlens.to(torch.int64)
    doc_q, pos_q = rows(cu, total)
    if cu_seqlens_k is None:
        tab = torch.cat((doc_q, pos_q, doc_q, pos_q))
        cus = torch.cat((cu, cu))
    else:
        cu_k = cu_seqlens_k.to(torch.int64)
        doc_k, pos_k = rows(cu_k, total_k)
        # bottom-right: query row i of a document with Lq queries and Lk keys sits at position Lk - Lq + i
        pos_q = pos_q + ((cu_k[1:] - cu_k[:-1]) - (cu[1:] - cu[:-1]))[doc_q]
        tab = torch.cat((doc_q, pos_q, doc_k, pos_k))
        cus = torch.cat((cu, cu_k))
    return tab.to(torch.int32), cus.to(torch.int32), pos_q.to(torch.int32)
