"""The inspector's results: every recorded launch and candidate compiled and analysed into a manifest
(schema in DESIGN.md, "Compile inspector"), what the compile check rejects, and the summary table."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
import triton

from .compiler import compile_launch, jit_function, refuse_interpreter, stand_in, target_arch
from .record import Launch, Shape, record_op
from .sass import SMEM_PER_BLOCK, analyse


def _config_of(launch: Launch, config: Optional[triton.Config], ck) -> Dict[str, Any]:
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


def _grid(launch: Launch, config: Optional[triton.Config]):
    grid = launch.grid
    if callable(grid):
        grid = grid({**launch.args, **(config.kwargs if config is not None else {})})
    return [int(g) for g in grid]


def _stem(i: int, name: str, cfg: Dict[str, Any]) -> str:
    return f"{i:02d}_{name.lstrip('_')}_{cfg['BM']}x{cfg['BN']}_w{cfg['num_warps']}_s{cfg['num_stages']}"


def compile_entries(launches: Sequence[Launch], out_dir: Optional[str], arch: str = "sm_90a",
                    rel_dir: str = "kernels") -> List[Dict[str, Any]]:
    """Compile and analyse every launch and candidate; write ptx/cubin/sass under ``out_dir/rel_dir``."""
    entries = []
    with stand_in(arch):
        for launch in launches:
            fn, _ = jit_function(launch.kernel)
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
    refuse_interpreter()
    target_arch(arch)
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

