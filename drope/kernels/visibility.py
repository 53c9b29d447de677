"""Which (query row, key) pairs of the backward may attend, and which blocks need no mask at all.

Shared by the dK/dV and dQ kernels (:mod:`drope.kernels.attention_bwd`). Positions are bottom-right
aligned: without packing, query row i sits at key index ``Sk - Sq + i``; with packed documents (PACKED)
row r of document d sits at key index ``r + off_d``, ``off_d`` = (d's key end) - (d's query end), which is 0
when queries and keys are packed together (``cu_seqlens`` alone) and the varlen offset with ``cu_seqlens_k``.
``TAB`` and ``CU`` are :func:`drope.kernels.qk_transform.packed_tables`' int32 tables.
"""

import triton
import triton.language as tl

__all__ = ["visible", "full_rows", "full_keys"]


@triton.jit
def visible(o_m, o_n, b_kv, SQ, SK, TAB, WINDOW, CHUNK, IS_CAUSAL: tl.constexpr, PACKED: tl.constexpr,
             HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_KMASK: tl.constexpr, TRANS: tl.constexpr):
    """Mask of (query row, key row) pairs that exist and may attend: [BM, BN], or [BN, BM] under TRANS.

    ``TAB`` (PACKED): int32 [doc of each query row | its position | doc of each key | its position]
    (``packed_tables``). ``b_kv`` [BN]: whether each key may be attended (its key-mask entry), read under
    HAS_KMASK only.
    """
    if PACKED:
        b_dm = tl.load(TAB + o_m, mask=o_m < SQ, other=-1)
        pos_m = tl.load(TAB + SQ + o_m, mask=o_m < SQ, other=0)
        b_dn = tl.load(TAB + 2 * SQ + o_n, mask=o_n < SK, other=-2)
        pos_n = tl.load(TAB + 2 * SQ + SK + o_n, mask=o_n < SK, other=0)
    else:
        pos_m = o_m + (SK - SQ)
        pos_n = o_n
    if TRANS:
        pm, pn, om, on = pos_m[None, :], pos_n[:, None], o_m[None, :], o_n[:, None]
    else:
        pm, pn, om, on = pos_m[:, None], pos_n[None, :], o_m[:, None], o_n[None, :]
    m = (om < SQ) & (on < SK)
    if PACKED:
        if TRANS:
            m = m & (b_dm[None, :] == b_dn[:, None])
        else:
            m = m & (b_dm[:, None] == b_dn[None, :])
    if IS_CAUSAL:
        m = m & (pn <= pm)
    if HAS_WINDOW:
        m = m & (pn > pm - WINDOW)
    if HAS_CHUNK:
        m = m & (pn // CHUNK == pm // CHUNK)
    if HAS_KMASK:
        if TRANS:
            m = m & b_kv[:, None]
        else:
            m = m & b_kv[None, :]
    return m


@triton.jit
def full_rows(n0, SQ, SK, TAB, CU, NB, WINDOW, CHUNK, BN: tl.constexpr, IS_CAUSAL: tl.constexpr,
               PACKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Query rows [f_lo, f_hi) that see every key of the key block [n0, n0 + BN) (empty if none).

    ``CU`` (PACKED): int32 [query boundaries (NB) | key boundaries (NB)]; a document's query row r sits at
    key index r + off, off = (its key end) - (its query end).
    """
    n1 = n0 + BN
    ok = n1 <= SK
    n_last = tl.minimum(n1, SK) - 1
    if PACKED:
        d = tl.load(TAB + 2 * SQ + n0)
        ok = ok & (d == tl.load(TAB + 2 * SQ + n_last))
        f_lo = tl.load(CU + d)
        f_hi = tl.load(CU + d + 1)
        ks = tl.load(CU + NB + d)
        off = tl.load(CU + NB + d + 1) - f_hi
        if IS_CAUSAL:
            f_lo = tl.maximum(f_lo, n_last - off)
        if HAS_WINDOW:
            f_hi = tl.minimum(f_hi, n0 + WINDOW - off)
        if HAS_CHUNK:
            c = (n0 - ks) // CHUNK
            ok = ok & (c == (n_last - ks) // CHUNK)
            f_hi = tl.minimum(f_hi, ks + (c + 1) * CHUNK - off)
    else:
        off = SK - SQ
        f_lo = n0 * 0
        f_hi = SQ
        if IS_CAUSAL:
            f_lo = n_last - off
        if HAS_WINDOW:
            f_hi = tl.minimum(f_hi, n0 + WINDOW - off)
        if HAS_CHUNK:
            c = n0 // CHUNK
            ok = ok & (c == n_last // CHUNK)
            f_hi = tl.minimum(f_hi, (c + 1) * CHUNK - off)
    f_hi = tl.where(ok, f_hi, f_lo)
    return f_lo, f_hi


@triton.jit
def full_keys(m0, SQ, SK, TAB, CU, NB, WINDOW, CHUNK, BM: tl.constexpr, IS_CAUSAL: tl.constexpr,
               PACKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Keys [f_lo, f_hi) seen by every row of the query block [m0, m0 + BM) (empty if none)."""
    m1 = m0 + BM
    ok = m1 <= SQ
    m_last = tl.minimum(m1, SQ) - 1
    if PACKED:
        d = tl.load(TAB + m0)
        ok = ok & (d == tl.load(TAB + m_last))
        f_lo = tl.load(CU + NB + d)
        f_hi = tl.load(CU + NB + d + 1)
        off = f_hi - tl.load(CU + d + 1)
        if IS_CAUSAL:
            f_hi = m0 + off + 1
        if HAS_WINDOW:
            f_lo = tl.maximum(f_lo, m_last + off - WINDOW + 1)
        if HAS_CHUNK:
            ks = tl.load(CU + NB + d)
            c = tl.maximum(m0 + off - ks, 0) // CHUNK
            ok = ok & (c == tl.maximum(m_last + off - ks, 0) // CHUNK)
            f_lo = tl.maximum(f_lo, ks + c * CHUNK)
    else:
        off = SK - SQ
        f_lo = m0 * 0
        f_hi = SK
        if IS_CAUSAL:
            f_hi = m0 + off + 1
        if HAS_WINDOW:
            f_lo = tl.maximum(f_lo, m_last + off - WINDOW + 1)
        if HAS_CHUNK:
            c = (m0 + off) // CHUNK
            ok = ok & (c == (m_last + off) // CHUNK)
            f_lo = tl.maximum(f_lo, c * CHUNK)
    f_hi = tl.where(ok, f_hi, f_lo)
    return f_lo, f_hi
