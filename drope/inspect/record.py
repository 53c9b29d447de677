"""Recording an op's kernel launches instead of running them, on ``meta`` tensors, without a GPU.

Every kernel module launches through ``drope.kernels.toolkit.launch`` (a plain ``kernel[grid](**args)``).
:func:`recording` swaps that name, in each kernel module that holds it, for a recorder for the duration
of a ``with`` block, and sets ``toolkit.RECORDING`` so that ``meta`` tensors pass the device checks and take
the compiled (TMA) path; outside the block nothing of the inspector runs. :func:`record_op` calls an op
through the public functions inside it, so the launches are exactly those a user's call makes.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import triton

from ..kernels import toolkit

# what each kernel does in an op (the manifest's "role"); a kernel not listed here is refused by Launch.role
ROLES = {
    "_attn_fwd_kernel": "attention", "_dkdv_kernel": "attention", "_dq_kernel": "attention",
    "_decode_split_kernel": "attention", "_decode_merge_kernel": "merge", "_qk_prologue_kernel": "prologue",
    "_qk_epilogue_kernel": "epilogue", "_delta_kernel": "other", "_append_kernel": "other",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("prefill_fwd", "prefill_bwd", "decode")

# the launch function as drope.kernels defines it (the kernel modules hold it while nothing records)
_LAUNCH = toolkit.launch


@dataclass
class Launch:
    """One kernel launch as a user's call makes it."""

    kernel: Any                      # a triton JITFunction (or an Autotuner / Heuristics around one)
    grid: Any                        # a tuple, or a callable of the meta-parameters
    args: Dict[str, Any]

    @property
    def name(self) -> str:
        """The kernel's Python name (under the interpreter too)."""
        fn = self.kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        return fn.__name__

    @property
    def role(self) -> str:
        """"attention" | "prologue" | "epilogue" | "merge" | "other" (:data:`ROLES`).

        Raises:
            KeyError: a kernel :data:`ROLES` does not list (add it there).
        """
        if self.name not in ROLES:
            raise KeyError(f"drope.inspect.record.ROLES has no role for kernel {self.name}; add it there")
        return ROLES[self.name]

    @property
    def configs(self) -> List[triton.Config]:
        """The autotune candidates that survive the kernel's pruning for these arguments; empty when the
        launch is not autotuned (its meta-parameters are in ``args``)."""
        tuner = self.kernel
        if not isinstance(tuner, triton.runtime.Autotuner):
            return []
        if tuner.early_config_prune is None:
            return list(tuner.configs)
        # launches pass keyword arguments only, so the positional ones are empty
        return list(tuner.early_config_prune(tuner.configs, {}, **self.args))


def _holds_launch(module) -> bool:
    fn = vars(module).get("launch")
    return fn is _LAUNCH or getattr(fn, "records_launches", False)


@contextlib.contextmanager
def recording() -> Iterator[List[Launch]]:
    """Record launches instead of running them; the kernels then accept ``meta`` tensors.

    Process-wide for the duration of the block (not per thread): every launch of drope's kernels is
    recorded, none runs. Blocks nest; each restores what it found.

    Yields:
        The list the launches are appended to, in launch order.
    """
    launches: List[Launch] = []

    def record(kernel, grid, **args) -> None:
        launches.append(Launch(kernel, grid, dict(args)))

    record.records_launches = True
    # importing drope.kernels (above) imported every kernel module: each already holds its launch name
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("drope.kernels.") and m is not None and _holds_launch(m)]
    saved = [(m, m.launch) for m in modules]
    was_recording = toolkit.RECORDING
    for m in modules:
        m.launch = record
    toolkit.RECORDING = True
    try:
        yield launches
    finally:
        toolkit.RECORDING = was_recording
        for m, fn in reversed(saved):
            m.launch = fn


@dataclass(frozen=True)
class Shape:
    """What one inspected call looks like (the CLI's arguments)."""

    op: str
    dtype: str
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    rope: bool = False
    q_norm: bool = False
    k_norm: bool = False
    row_scale: bool = False
    window: Optional[int] = None
    chunk: Optional[int] = None
    sinks: bool = False
    softcap: Optional[float] = None
    key_mask: bool = False
    docs: int = 0             # prefill: documents packed along S (cu_seqlens), batch 1
    varlen: bool = False      # prefill: queries packed apart from the keys (cu_seqlens_k): each document's last half
    q_len: int = 1            # decode: new query rows
    page_size: int = 0        # decode: a paged cache of this page size (block_table), 0 = contiguous
    append: bool = False      # decode: write the new tokens' K/V into the cache first (k_new / v_new)
    num_sms: int = 132        # decode: SMs the split count is chosen for (an H100 / H200)
    num_splits: Optional[int] = None


def _meta(*shape, dtype, grad=False) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _decode_splits(s: Shape) -> int:
    """The split count ``decode_attention`` picks on a GPU with ``s.num_sms`` SMs (on meta it would see 1 SM)."""
    from ..kernels import decode
    G = s.heads // s.kv_heads
    BM = decode._blocks(G, s.q_len, toolkit.padded_dim(s.head_dim))[0]
    m_blocks = triton.cdiv(G * s.q_len, BM)
    live = s.seq
    if s.window is not None:
        live = min(live, s.window + s.q_len - 1)
    if s.chunk is not None:
        live = min(live, s.chunk + s.q_len - 1)
    return decode.choose_num_splits(live, s.batch * s.kv_heads * m_blocks, s.num_sms)


def record_op(s: Shape) -> Tuple[Dict[str, Any], List[Launch]]:
    """Call the op on meta tensors inside ``recording()``; returns (the call's args, its launches)."""
    if s.op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {s.op!r}")
    dt = DTYPES[s.dtype]
    B, HQ, HKV, S, D = s.batch, s.heads, s.kv_heads, s.seq, s.head_dim
    sinks = _meta(HQ, dtype=torch.float32, grad=s.op == "prefill_bwd") if s.sinks else None
    args: Dict[str, Any] = dict(op=s.op, dtype=s.dtype, batch=B, heads=HQ, kv_heads=HKV, seq=S, head_dim=D,
                                causal=True, rope=s.rope, q_norm=s.q_norm, k_norm=s.k_norm, row_scale=s.row_scale,
                                window=s.window, chunk=s.chunk, sinks=s.sinks, softcap=s.softcap, key_mask=s.key_mask,
                                docs=s.docs, varlen=s.varlen)
    km = _meta(B, S, dtype=torch.bool) if s.key_mask else None
    from ..kernels import attention, decode_attention
    if s.op == "decode":
        if s.rope or s.q_norm or s.k_norm:
            raise ValueError("decode is NoPE attention on a cache: --rope / --q-norm / --k-norm do not apply")
        splits = s.num_splits if s.num_splits is not None else _decode_splits(s)
        q = _meta(B, HQ, s.q_len, D, dtype=dt)
        paged = {}
        if s.page_size:
            pages = triton.cdiv(S, s.page_size)
            kc, vc = (_meta(B * pages, s.page_size, HKV, D, dtype=dt) for _ in range(2))
            # a meta block table has no values to check
            paged = dict(block_table=_meta(B, pages, dtype=torch.int32), check_values=False)
        else:
            kc, vc = _meta(B, HKV, S, D, dtype=dt), _meta(B, HKV, S, D, dtype=dt)
        if s.append:
            paged.update(k_new=_meta(B, HKV, s.q_len, D, dtype=dt), v_new=_meta(B, HKV, s.q_len, D, dtype=dt))
        lens = _meta(B, dtype=torch.int32)
        scale = _meta(B, s.q_len, dtype=torch.float32) if s.row_scale else None
        args.update(q_len=s.q_len, num_splits=splits, num_sms=s.num_sms, cache_seqlens=True, page_size=s.page_size,
                    append=s.append)
        with recording() as launches, torch.no_grad():
            decode_attention(q, kc, vc, cache_seqlens=lens, softmax_scale=scale, num_splits=splits, window=s.window,
                             chunk=s.chunk, sinks=sinks, softcap=s.softcap, key_mask=km, **paged)
        return args, launches

    grad = s.op == "prefill_bwd"
    SQ = S // 2 if s.varlen else S
    if (s.docs or s.varlen) and (B != 1 or s.docs < 1 or (s.varlen and s.rope)):
        raise ValueError("--docs N packs N >= 1 documents in batch 1 (--batch 1); --varlen needs --docs, not --rope")
    q = _meta(B, HQ, SQ, D, dtype=dt, grad=grad)
    k, v = _meta(B, HKV, S, D, dtype=dt, grad=grad), _meta(B, HKV, S, D, dtype=dt, grad=grad)
    rope = (_meta(S, D // 2, dtype=torch.float32), _meta(S, D // 2, dtype=torch.float32)) if s.rope else None
    wq = _meta(D, dtype=dt, grad=grad) if s.q_norm else None
    wk = _meta(D, dtype=dt, grad=grad) if s.k_norm else None
    scale = _meta(B, SQ, dtype=torch.float32) if s.row_scale else None
    kw = dict(causal=True, softmax_scale=scale, rope=rope, q_norm_weight=wq, k_norm_weight=wk, window=s.window,
              chunk=s.chunk, sinks=sinks, softcap=s.softcap, key_mask=km)
    if s.docs:
        # boundaries on meta have no values: the kernels never read them on the host
        kw.update(cu_seqlens=_meta(s.docs + 1, dtype=torch.int32), check_values=False)
        if s.varlen:
            kw["cu_seqlens_k"] = _meta(s.docs + 1, dtype=torch.int32)
        if s.varlen and s.page_size:
            # the keys in a paged cache: each document's S / docs keys on its own pages
            per_doc = triton.cdiv(triton.cdiv(S, s.docs), s.page_size)
            k, v = (_meta(s.docs * per_doc, s.page_size, HKV, D, dtype=dt) for _ in range(2))
            kw["block_table"] = _meta(s.docs, per_doc, dtype=torch.int32)
            if grad or s.k_norm or s.key_mask:
                raise ValueError("--page-size with prefill: forward only, without --k-norm / --key-mask")
    if not grad:
        with recording() as launches, torch.no_grad():
            attention(q, k, v, **kw)
        return args, launches
    with recording():
        out = attention(q, k, v, **kw)
    # only the backward's launches: the forward of a training step is prefill_fwd with the LSE stored
    with recording() as launches:
        out.backward(torch.empty_like(out))
    return args, launches

