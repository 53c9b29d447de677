"""Compile inspector: every kernel and autotune candidate an op launches, compiled for sm_90a without a GPU.

``python -m drope.kernels.inspect --arch sm_90a --op prefill_fwd --dtype bf16 --batch 1 --heads 32
--kv-heads 8 --seq 8192 --head-dim 128 [--rope] [--q-norm] [--k-norm] [--row-scale] [--out DIR]``

The op is called through the public functions (``attention``, its ``.backward()``, ``decode_attention``)
on ``meta`` tensors inside :func:`drope.kernels.toolkit.recording`, so the launches are exactly those a
user's call makes. Each launch, and each autotune candidate that survives pruning, is then compiled by
the JIT with the same specialisation as a real launch (``JITFunction.warmup``), against a stand-in driver
whose target is ``GPUTarget("cuda", 90, 32)`` (Triton appends the "a"). From every compiled kernel it
reads registers and shared memory, re-runs Triton's bundled ``ptxas -v`` on the PTX for spills and
warnings (C7510-C7515: wgmma serialised), and disassembles the cubin with the bundled ``cuobjdump -sass``
for a census of the main KV loop. ``DIR/manifest.json`` holds the numbers (schema in DESIGN.md,
"Compile inspector"); a summary table goes to stdout.

The jit functions are built when ``drope.kernels`` is imported, so Triton's interpreter must be off in
this process: ``main`` re-executes itself without ``TRITON_INTERPRET``, the library functions refuse.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect as _pyinspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from .toolkit import defined_interpreted as interpreter_enabled
from . import toolkit

__all__ = ["ARCHS", "Shape", "StandInDriver", "stand_in", "record_op", "compile_launch", "compile_entries", "analyse",
           "sass_census", "ctas_per_sm", "inspect_op", "problems", "summary_table", "main"]

# arch name -> compute capability; Triton names sm_90 "sm_90a" itself (wgmma, setmaxnreg)
ARCHS = {"sm_90a": 90}
ANALYSIS_VERSION = 4

# H100 / H200 (sm_90) limits
SMEM_PER_BLOCK = 227 * 1024      # opt-in dynamic shared memory of one CTA
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024     # the driver's per-CTA reservation
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256             # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SERIALISED_WGMMA = tuple(f"C75{i}" for i in range(10, 16))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("prefill_fwd", "prefill_bwd", "decode")
MMA_OPS = ("HGMMA", "HMMA", "QGMMA", "IMMA")
LOAD_OPS = ("LDG", "LDGSTS", "UTMALDG", "LDSM", "LDS")
INT_ALU = ("IADD3", "IADD", "IMAD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IABS", "IMNMX", "VIADD", "VIMNMX",
           "PRMT", "SGXT", "BMSK", "POPC", "FLO", "BREV", "UIADD3", "UIMAD", "ULEA", "USHF", "ULOP3", "UISETP",
           "USEL", "UIMNMX", "UPRMT", "USGXT", "UBMSK", "UMOV", "MOV", "S2R", "S2UR", "CS2R", "R2UR")
FP_OPS = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "MUFU", "F2F", "F2FP", "FCHK", "FSWZADD", "HADD2",
          "HMUL2", "HFMA2")


def _target_arch(arch: str) -> int:
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


class StandInDriver(DriverBase):
    """Triton's active driver for compiling only: a fixed CUDA target, device 0, stream 0, no CUDA calls."""

    def __init__(self, capability: int = 90):
        self.capability = capability

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the sm_90a stand-in driver compiles only; nothing can be benchmarked")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> Tuple[int, int]:
        return divmod(self.capability, 10)


@contextlib.contextmanager
def stand_in(arch: str = "sm_90a") -> Iterator[StandInDriver]:
    """Make a :class:`StandInDriver` Triton's active driver for the duration (restores the previous one)."""
    config = triton.runtime.driver
    previous = getattr(config, "_active", None)
    driver = StandInDriver(_target_arch(arch))
    config.set_active(driver)
    try:
        yield driver
    finally:
        if hasattr(config, "_active"):
            config._active = previous
        else:  # older DriverConfig without the lazily created default
            config.set_active(previous)


def _refuse_interpreter() -> None:
    if interpreter_enabled():
        raise RuntimeError(
            "drope.kernels.inspect compiles real kernels: TRITON_INTERPRET is set, so the jit functions were built "
            "for Triton's interpreter when drope.kernels was imported. Run it in a process without TRITON_INTERPRET "
            "(`env -u TRITON_INTERPRET python -m drope.kernels.inspect ...`).")


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
    from . import decode
    G = s.heads // s.kv_heads
    BM = decode._blocks(G, s.q_len, toolkit.padded_dim(s.head_dim))[0]
    m_blocks = triton.cdiv(G * s.q_len, BM)
    live = s.seq
    if s.window is not None:
        live = min(live, s.window + s.q_len - 1)
    if s.chunk is not None:
        live = min(live, s.chunk + s.q_len - 1)
    return decode.choose_num_splits(live, s.batch * s.kv_heads * m_blocks, s.num_sms)


def record_op(s: Shape) -> Tuple[Dict[str, Any], List[toolkit.Launch]]:
    """Call the op on meta tensors inside ``toolkit.recording()``; returns (the call's args, its launches)."""
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
    from . import attention, decode_attention
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
        with toolkit.recording() as launches, torch.no_grad():
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
        with toolkit.recording() as launches, torch.no_grad():
            attention(q, k, v, **kw)
        return args, launches
    with toolkit.recording():
        out = attention(q, k, v, **kw)
    # only the backward's launches: the forward of a training step is prefill_fwd with the LSE stored
    with toolkit.recording() as launches:
        out.backward(torch.empty_like(out))
    return args, launches


def _jit_function(kernel):
    """(the JITFunction, heuristics to apply) behind an Autotuner / Heuristics / JITFunction."""
    heuristics = []
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        if isinstance(fn, triton.runtime.Heuristics):
            heuristics.append(fn.values)
        if not hasattr(fn, "fn"):
            raise TypeError(f"cannot compile {kernel!r}: not a triton JITFunction (is TRITON_INTERPRET set?)")
        fn = fn.fn
    return fn, heuristics


def compile_launch(launch: toolkit.Launch, config: Optional[triton.Config] = None):
    """Compile one recorded launch (with ``config`` for an autotune candidate) as its real launch would.

    Needs :func:`stand_in` active. Returns Triton's ``CompiledKernel`` (from Triton's cache when warm).
    """
    _refuse_interpreter()
    fn, heuristics = _jit_function(launch.kernel)
    kwargs = dict(launch.args)
    if config is not None:
        if config.pre_hook is not None:
            config.pre_hook({**kwargs, **config.kwargs})
        kwargs.update(config.all_kwargs())
    for values in reversed(heuristics):
        for name, rule in values.items():
            kwargs[name] = rule(kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        return fn.warmup(grid=(1,), **kwargs)


def _tool(name: str) -> str:
    from triton import knobs
    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            return get_ptxas(90).path
        except ImportError:
            return knobs.nvidia.ptxas.path
    return getattr(knobs.nvidia, name).path


def _ptxas_flags(metadata) -> List[str]:
    """The flags Triton's own ptxas call uses (so the re-run reproduces its registers and warnings)."""
    from triton.backends.nvidia.compiler import CUDABackend
    src = _pyinspect.getsource(CUDABackend.make_cubin)
    flags = ["-lineinfo", "-v"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if "regAllocOptLevel=2" in src:
        flags.append("--regAllocOptLevel=2")
    if getattr(metadata, "ptx_options", None):
        flags += metadata.ptx_options.split(" ")
    return flags


def _run_ptxas(ptx: str, metadata, gpu_name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_tool("ptxas"), *_ptxas_flags(metadata), f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.stdout + r.stderr


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([_tool("cuobjdump"), *flags, path], capture_output=True, text=True, check=True)
        return r.stdout


def parse_ptxas_log(log: str) -> Dict[str, Any]:
    """Registers, stack, spills, static shared memory and warnings from ``ptxas -v`` output."""
    def grab(pattern, default=0):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else default
    warns = [line.strip() for line in log.splitlines() if "warning" in line.lower()]
    return dict(regs=grab(r"Used (\d+) registers"), stack=grab(r"(\d+) bytes stack frame"),
                spill_stores=grab(r"(\d+) bytes spill stores"), spill_loads=grab(r"(\d+) bytes spill loads"),
                static_smem=grab(r"(\d+) bytes smem"), warnings=warns)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def _sass_instructions(sass: str) -> List[Tuple[int, str, str]]:
    """(address, opcode, text) of each instruction (predicate stripped from the opcode)."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if not m:
            continue
        text = m.group(2).strip()
        body = re.sub(r"^@!?U?P\w+\s+", "", text)
        out.append((int(m.group(1), 16), body.split()[0] if body else "", text))
    return out


def _census(instrs: Sequence[Tuple[int, str, str]]) -> Dict[str, Any]:
    ops = [op for _, op, _ in instrs if op != "NOP"]
    base = [op.split(".")[0] for op in ops]
    loads = {name: base.count(name) for name in LOAD_OPS if base.count(name)}
    int64 = sum(1 for op, b in zip(ops, base) if b in INT_ALU and (
        ".WIDE" in op or ".64" in op or "U64" in op or re.search(r"\.(X|EX)(\.|$)", op)))
    return dict(instructions=len(ops), mma=sum(b in MMA_OPS for b in base), loads=sum(loads.values()),
                load_kinds=loads, int64=int64, int_alu=sum(b in INT_ALU for b in base),
                fp=sum(b in FP_OPS for b in base), exp2=sum(op.startswith("MUFU.EX2") for op in ops),
                barriers=sum(b in ("BAR", "SYNCS", "WARPGROUP") for b in base),
                local=sum(b in ("LDL", "STL") for b in base))


def sass_census(sass: str) -> Dict[str, Any]:
    """Census of the whole kernel and of its loops (backward branches whose body holds MMAs).

    The main loop is, among the innermost loops that contain MMAs, the one with the most MMAs and then
    the fewest instructions (the unmasked KV loop of a forward split into masked/unmasked phases).
    """
    instrs = _sass_instructions(sass)
    loops = []
    exits = [a for a, op, text in instrs if op == "EXIT" and not text.startswith("@")]
    last_exit = exits[-1] if exits else instrs[-1][0] if instrs else 0
    for n, (addr, op, text) in enumerate(instrs):
        # out-of-line stubs (an mbarrier wait retried in a tiny self-loop, then a BRA back into straight-line
        # code) sit after the last EXIT, or end with an unconditional BRA right after their self-loop
        if not op.startswith("BRA") or addr > last_exit:
            continue
        m = _BRANCH_TARGET.search(text.split(None, 2)[-1] if text.startswith("@") else text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        if not text.startswith("@") and n and instrs[n - 1][1].startswith("BRA"):
            prev = _BRANCH_TARGET.search(instrs[n - 1][2].split(None, 2)[-1])
            if prev and instrs[n - 1][0] - int(prev.group(1), 16) <= 0x40:
                continue
        body = [i for i in instrs if target <= i[0] <= addr]
        c = _census(body)
        if c["mma"]:
            loops.append(dict(start=hex(target), end=hex(addr), **c))
    inner = [lp for lp in loops if not any(o is not lp and int(lp["start"], 16) <= int(o["start"], 16)
                                           and int(o["end"], 16) <= int(lp["end"], 16) for o in loops)]
    main_loop = min(inner, key=lambda lp: (-lp["mma"], lp["instructions"])) if inner else None
    return dict(total=_census(instrs), loops=loops, main_loop=main_loop)


def _mma_kind(ptx: str) -> str:
    kinds = [name for name, token in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if token in ptx]
    return "+".join(kinds) if kinds else "none"


def _load_kind(ptx: str) -> str:
    if "cp.async.bulk.tensor" in ptx:
        return "tma"
    if re.search(r"cp\.async\.(ca|cg)", ptx):
        return "cp.async"
    return "ld.global"


def ctas_per_sm(n_regs: int, shared: int, num_warps: int) -> Tuple[int, str]:
    """(resident CTAs per SM, the limiting resource) on an sm_90 SM."""
    per_warp = math.ceil(max(n_regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "warps": MAX_WARPS_PER_SM // num_warps,
        "regs": (REGS_PER_SM // per_warp) // num_warps,
        "smem": SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA),
        "ctas": MAX_CTAS_PER_SM,
    }
    name = min(limits, key=limits.get)
    return limits[name], name


def _analysis_cache_dir() -> str:
    try:
        from triton import knobs
        root = knobs.cache.dir
    except (ImportError, AttributeError):
        root = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(root, "drope_inspect")


def analyse(ck, arch: str = "sm_90a") -> Dict[str, Any]:
    """Registers, spills, shared memory, ptxas warnings, MMA and load kinds and the SASS census of a kernel.

    Results (with the ptxas log and the SASS text) are cached beside Triton's cache, keyed by the
    kernel's hash, so a warm run costs no ptxas or cuobjdump call.
    """
    md = ck.metadata
    cache = os.path.join(_analysis_cache_dir(), f"{md.hash}-{arch}-v{ANALYSIS_VERSION}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    ptx, cubin = ck.asm["ptx"], ck.asm["cubin"]
    log = _run_ptxas(ptx, md, arch)
    p = parse_ptxas_log(log)
    res = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+)", res)
    n_regs = int(m.group(1)) if m else p["regs"]
    sass = _cuobjdump(cubin, "-sass")
    shared = int(md.shared) + p["static_smem"]
    ctas, limiter = ctas_per_sm(n_regs, shared, md.num_warps)
    result = dict(
        n_regs=n_regs, spill_bytes=p["spill_stores"], spill_loads=p["spill_loads"], stack_bytes=p["stack"],
        shared_bytes=shared, ptxas_warnings=p["warnings"],
        serialised=[w for w in p["warnings"] if any(code in w for code in SERIALISED_WGMMA)],
        mma=_mma_kind(ptx), loads=_load_kind(ptx), ctas_per_sm=ctas, ctas_limit=limiter,
        sass=sass_census(sass), ptxas_log=log, sass_text=sass)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cache)
    return result


def _config_of(launch: toolkit.Launch, config: Optional[triton.Config], ck) -> Dict[str, Any]:
    """BM/BN/num_warps/num_stages (+ the other block sizes); kernels without a key block report their tile."""
    meta = {**launch.args, **(config.kwargs if config is not None else {})}
    blocks = {k: int(v) for k, v in meta.items() if k in ("BM", "BN", "BD", "BS", "BH", "BR")}
    bm = blocks.get("BM", blocks.get("BS", blocks.get("BR", 1)))
    bn = blocks.get("BN", blocks.get("BH", blocks.get("BD", 1)))
    return {"BM": bm, "BN": bn, "num_warps": int(ck.metadata.num_warps), "num_stages": int(ck.metadata.num_stages),
            **{k: v for k, v in blocks.items() if k not in ("BM", "BN")}}


def _constexprs(fn, kwargs) -> Dict[str, Any]:
    out = {}
    for p in fn.params:
        if p.is_constexpr and p.name in kwargs:
            v = kwargs[p.name]
            out[p.name] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


def _grid(launch: toolkit.Launch, config: Optional[triton.Config]):
    grid = launch.grid
    if callable(grid):
        grid = grid({**launch.args, **(config.kwargs if config is not None else {})})
    return [int(g) for g in grid]


def _stem(i: int, name: str, cfg: Dict[str, Any]) -> str:
    return f"{i:02d}_{name.lstrip('_')}_{cfg['BM']}x{cfg['BN']}_w{cfg['num_warps']}_s{cfg['num_stages']}"


def compile_entries(launches: Sequence[toolkit.Launch], out_dir: Optional[str], arch: str = "sm_90a",
                    rel_dir: str = "kernels") -> List[Dict[str, Any]]:
    """Compile and analyse every launch and candidate; write ptx/cubin/sass under ``out_dir/rel_dir``."""
    entries = []
    with stand_in(arch):
        for launch in launches:
            fn, _ = _jit_function(launch.kernel)
            for config in (launch.configs or [None]):
                ck = compile_launch(launch, config)
                a = analyse(ck, arch)
                cfg = _config_of(launch, config, ck)
                entry = dict(kernel=fn.__name__, role=launch.role, config=cfg, n_regs=a["n_regs"],
                             spill_bytes=a["spill_bytes"], shared_bytes=a["shared_bytes"],
                             ptxas_warnings=a["ptxas_warnings"], ptx=None, cubin=None,
                             autotuned=config is not None, spill_loads=a["spill_loads"], stack_bytes=a["stack_bytes"],
                             serialised_wgmma=a["serialised"], mma=a["mma"], loads=a["loads"],
                             ctas_per_sm=a["ctas_per_sm"], ctas_limit=a["ctas_limit"], main_loop=a["sass"]["main_loop"],
                             loops=a["sass"]["loops"], sass_total=a["sass"]["total"], grid=_grid(launch, config),
                             constexprs=_constexprs(fn, {**launch.args, **(config.kwargs if config else {})}),
                             hash=ck.metadata.hash)
                if out_dir is not None:
                    stem = _stem(len(entries), fn.__name__, cfg)
                    os.makedirs(os.path.join(out_dir, rel_dir), exist_ok=True)
                    for ext, data in (("ptx", ck.asm["ptx"]), ("cubin", ck.asm["cubin"]), ("sass", a["sass_text"]),
                                      ("ptxas.log", a["ptxas_log"])):
                        rel = f"{rel_dir}/{stem}.{ext}"
                        with open(os.path.join(out_dir, rel), "wb" if isinstance(data, bytes) else "w") as f:
                            f.write(data)
                        if ext in ("ptx", "cubin"):
                            entry[ext] = rel
                    entry["sass"] = f"{rel_dir}/{stem}.sass"
                entries.append(entry)
    return entries


def inspect_op(s: Shape, out_dir: Optional[str] = None, arch: str = "sm_90a") -> Dict[str, Any]:
    """Record the op's launches, compile each launch and candidate for ``arch``; the manifest (written when
    ``out_dir`` is given, as ``out_dir/manifest.json``)."""
    _refuse_interpreter()
    _target_arch(arch)
    args, launches = record_op(s)
    manifest = dict(arch=arch, triton=triton.__version__, op=s.op, args=args,
                    launches=compile_entries(launches, out_dir, arch),
                    torch=torch.__version__, limits=dict(shared_bytes=SMEM_PER_BLOCK, regs=255))
    if out_dir is not None:
        with open(os.path.join(out_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def problems(entry: Dict[str, Any], op: str, dtype: str) -> List[str]:
    """What the compile check (tests/test_inspect.py) rejects in one manifest entry."""
    out = []
    if entry["spill_bytes"] or entry.get("spill_loads"):
        out.append(f"spills {entry['spill_bytes']} B stores / {entry.get('spill_loads', 0)} B loads")
    if entry.get("serialised_wgmma"):
        out.append("wgmma serialised: " + "; ".join(entry["serialised_wgmma"]))
    if entry["shared_bytes"] > SMEM_PER_BLOCK:
        out.append(f"shared memory {entry['shared_bytes']} B > {SMEM_PER_BLOCK} B")
    if (entry["role"] == "attention" and op in ("prefill_fwd", "prefill_bwd") and dtype in ("bf16", "fp16")
            and entry.get("mma") != "wgmma"):
        out.append(f"MMA is {entry.get('mma')}, not wgmma")
    return out


def summary_table(manifest: Dict[str, Any]) -> str:
    """Markdown table: one row per launch/candidate, the main loop's census in the last columns."""
    head = ("| kernel | role | tile BMxBN w s | mma | loads | regs | spills | smem KB | CTAs/SM | loop instr | "
            "loop MMA | loop loads | loop int64 | loop int ALU | warnings |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in manifest["launches"]:
        c = e["config"]
        lp = e.get("main_loop") or {}
        warn = ", ".join(sorted({m.group(0) for w in e["ptxas_warnings"] for m in [re.search(r"C\d{4}", w)] if m}))
        rows.append(
            f"| {e['kernel']} | {e['role']} | {c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']} | {e['mma']} | "
            f"{e['loads']} | {e['n_regs']} | {e['spill_bytes']} | {e['shared_bytes'] / 1024:.0f} | "
            f"{e['ctas_per_sm']} ({e['ctas_limit']}) | {lp.get('instructions', '-')} | {lp.get('mma', '-')} | "
            f"{lp.get('loads', '-')} | {lp.get('int64', '-')} | {lp.get('int_alu', '-')} | {warn or '-'} |")
    a = manifest["args"]
    flags = [f for f in ("rope", "q_norm", "k_norm", "row_scale", "sinks", "key_mask", "varlen") if a.get(f)]
    flags += [f"{f}={a[f]}" for f in ("window", "chunk", "softcap") if a.get(f) is not None]
    flags += [f"docs={a['docs']}"] if a.get("docs") else []
    flags += [f"page_size={a['page_size']}"] if a.get("page_size") else []
    flags += ["append"] if a.get("append") else []
    title = (f"{manifest['op']} {a['dtype']} B{a['batch']} H{a['heads']} KV{a['kv_heads']} S{a['seq']} "
             f"D{a['head_dim']} {' '.join(flags)} -- {manifest['arch']}, triton {manifest['triton']}")
    return title.strip() + "\n\n" + "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m drope.kernels.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a", choices=sorted(ARCHS))
    p.add_argument("--op", required=True, choices=OPS)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192, help="sequence length (decode: the cache length)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rope", action="store_true")
    p.add_argument("--q-norm", action="store_true")
    p.add_argument("--k-norm", action="store_true")
    p.add_argument("--row-scale", action="store_true", help="a (B, S) softmax scale tensor (per-row temperature)")
    p.add_argument("--window", type=int)
    p.add_argument("--chunk", type=int)
    p.add_argument("--sinks", action="store_true")
    p.add_argument("--softcap", type=float)
    p.add_argument("--key-mask", action="store_true", help="a (B, S) key mask (padding / unwritten cache slots)")
    p.add_argument("--docs", type=int, default=0, help="prefill: N documents packed along S (cu_seqlens), batch 1")
    p.add_argument("--varlen", action="store_true",
                   help="prefill: queries packed apart from the keys (cu_seqlens_k), S/2 of them; needs --docs")
    p.add_argument("--q-len", type=int, default=1, help="decode: new query rows")
    p.add_argument("--page-size", type=int, default=0,
                   help="decode, or prefill_fwd with --varlen: a paged cache (block_table) of this page size")
    p.add_argument("--append", action="store_true", help="decode: append the new tokens' K/V first (k_new / v_new)")
    p.add_argument("--num-sms", type=int, default=132, help="decode: SMs the split count is chosen for")
    p.add_argument("--num-splits", type=int, help="decode: force the split count")
    p.add_argument("--out", help="directory for manifest.json and the ptx/cubin/sass files")
    p.add_argument("--json", action="store_true", help="print the manifest instead of the table")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if interpreter_enabled():
        # the jit functions were built for the interpreter at import: start again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("drope.kernels.inspect: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "drope.kernels.inspect", *argv], env)
    a = _parser().parse_args(argv)
    s = Shape(op=a.op, dtype=a.dtype, batch=a.batch, heads=a.heads, kv_heads=a.kv_heads, seq=a.seq,
              head_dim=a.head_dim, rope=a.rope, q_norm=a.q_norm, k_norm=a.k_norm, row_scale=a.row_scale,
              window=a.window, chunk=a.chunk, sinks=a.sinks, softcap=a.softcap, key_mask=a.key_mask, docs=a.docs, varlen=a.varlen, q_len=a.q_len,
              page_size=a.page_size, append=a.append,
              num_sms=a.num_sms, num_splits=a.num_splits)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    manifest = inspect_op(s, a.out, a.arch)
    if a.json:
        print(json.dumps(manifest, indent=1))
    else:
        print(summary_table(manifest))
        bad = [(e, problems(e, s.op, s.dtype)) for e in manifest["launches"]]
        for e, why in bad:
            if why:
                c = e["config"]
                print(f"! {e['kernel']} {c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']}: {'; '.join(why)}")
        if a.out:
            print(f"\nmanifest: {os.path.join(a.out, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
