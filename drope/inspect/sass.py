"""What a compiled kernel holds: registers, spills and warnings from ``ptxas -v``, the SASS census of its loops.

From every compiled kernel the inspector reads registers and shared memory, re-runs Triton's bundled
``ptxas -v`` on the PTX for spills and warnings (C7510-C7515: wgmma serialised), and disassembles the
cubin with the bundled ``cuobjdump -sass`` for a census of the main KV loop.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

from .compiler import cuobjdump, run_ptxas

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

MMA_OPS = ("HGMMA", "HMMA", "QGMMA", "IMMA")
LOAD_OPS = ("LDG", "LDGSTS", "UTMALDG", "LDSM", "LDS")
INT_ALU = ("IADD3", "IADD", "IMAD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IABS", "IMNMX", "VIADD", "VIMNMX",
           "PRMT", "SGXT", "BMSK", "POPC", "FLO", "BREV", "UIADD3", "UIMAD", "ULEA", "USHF", "ULOP3", "UISETP",
           "USEL", "UIMNMX", "UPRMT", "USGXT", "UBMSK", "UMOV", "MOV", "S2R", "S2UR", "CS2R", "R2UR")
FP_OPS = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "MUFU", "F2F", "F2FP", "FCHK", "FSWZADD", "HADD2",
          "HMUL2", "HFMA2")


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
    log = run_ptxas(ptx, md, arch)
    p = parse_ptxas_log(log)
    res = cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+)", res)
    n_regs = int(m.group(1)) if m else p["regs"]
    sass = cuobjdump(cubin, "-sass")
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

