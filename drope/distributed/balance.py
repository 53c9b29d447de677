"""Arithmetic of context parallelism: each rank's forward work in the kernel's tiles, and the bytes each collective
moves. Pure Python (no tensors, no group): what ``docs/context_parallel.md`` quotes and the benchmarks compare with.

Work unit: one (BM x BN) tile of the forward kernel, per (batch, query head). A program of the forward kernel takes
BM query rows of one call and visits the key blocks from the lowest key any of its rows sees to one past the highest,
in steps of BN (``drope/kernels/attention.py``: ``lo_blk`` / ``hi_blk``); a rank's work is the sum over its calls
(one per run of consecutive global rows, as :func:`drope.distributed.attention` makes them).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .layout import segments, split_size

__all__ = ["forward_tiles", "rank_tiles", "balance", "kv_bytes", "collective_bytes"]

# the forward's first bf16 autotune candidate at D 64-128 on Hopper (drope/kernels/attention.py, _TILES_16BIT)
BLOCK_M, BLOCK_N = 128, 64


def forward_tiles(Sq: int, Sk: int, *, block_m: int = BLOCK_M, block_n: int = BLOCK_N, causal: bool = True,
                  window: Optional[int] = None, chunk: Optional[int] = None) -> int:
    """Key blocks the forward kernel visits for one call (Sq query rows, the last of Sk keys), per (batch, head)."""
    tiles = 0
    for m0 in range(0, Sq, block_m):
        first, last = Sk - Sq + m0, Sk - Sq + min(m0 + block_m, Sq) - 1  # positions of the block's rows
        hi = min(last + 1, Sk) if causal else Sk
        lo = 0
        if window is not None:
            lo = max(lo, first - window + 1)
        if chunk is not None:
            lo = max(lo, (max(first, 0) // chunk) * chunk)
        tiles += -(-max(hi - lo, 0) // block_n)
    return tiles


def rank_tiles(S: int, W: int, layout: str = "headtail", **kw) -> List[int]:
    """:func:`forward_tiles` summed over each rank's calls, for ranks 0..W-1 (``kw``: block sizes, causal, window,
    chunk). Without a causal mask a rank makes one call of its S/W rows against all S keys."""
    n = split_size(S, W, layout, name="S")
    if not kw.get("causal", True):
        return [forward_tiles(n, S, **kw) for _ in range(W)]
    return [sum(forward_tiles(b - a, s + b - a, **kw) for a, b, s in segments(W, r, n, layout)) for r in range(W)]


def balance(S: int, W: int, layout: str = "headtail", **kw) -> float:
    """The busiest rank's work over the mean rank's (1.0: perfectly balanced; the step waits for the busiest)."""
    work = rank_tiles(S, W, layout, **kw)
    return max(work) * W / sum(work)


def kv_bytes(S: int, *, B: int, Hkv: int, D: int, elem: int = 2) -> int:
    """Bytes of K and V for S positions: the all-gather's output buffer on every rank (2 * B * Hkv * S * D * elem)."""
    return 2 * B * Hkv * S * D * elem


def collective_bytes(S: int, W: int, *, B: int, Hkv: int, D: int, elem: int = 2) -> Dict[str, int]:
    """What each collective of one attention layer moves, per rank, in bytes (received; a ring all-gather or
    reduce-scatter also sends as much): the K/V all-gather of the forward, the same again in the backward, the fp32
    dK/dV reduce-scatter of the backward, and the gathered K/V buffer each rank holds while attending."""
    full = kv_bytes(S, B=B, Hkv=Hkv, D=D, elem=elem)
    return {"forward_all_gather": full * (W - 1) // W, "backward_all_gather": full * (W - 1) // W,
            "backward_reduce_scatter": kv_bytes(S, B=B, Hkv=Hkv, D=D, elem=4) * (W - 1) // W,
            "gathered_kv_buffer": full}
