"""Compile inspector: every kernel and autotune candidate an op launches, compiled for sm_90a without a GPU.

``python -m drope.inspect --arch sm_90a --op prefill_fwd --dtype bf16 --batch 1 --heads 32 --kv-heads 8
--seq 8192 --head-dim 128 [--rope] [--q-norm] [--k-norm] [--row-scale] [--out DIR]`` (the old command
``python -m drope.kernels.inspect`` runs this same CLI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from ..kernels.toolkit import defined_interpreted as interpreter_enabled
from .compiler import ARCHS
from .record import DTYPES, OPS, Shape
from .report import inspect_op, problems, summary_table


def _parser(module: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=__doc__.split("\n\n")[0])
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


def main(argv: Optional[Sequence[str]] = None, module: str = "drope.inspect") -> int:
    """Run the inspector's CLI on ``argv`` (None: the command line); returns the exit status.

    Args:
        argv: the arguments (the manifest's schema is in DESIGN.md, "Compile inspector").
        module: the module the command was started as (``python -m MODULE``): the usage line names it and a
            re-run without ``TRITON_INTERPRET`` starts it again.

    Returns:
        0 (bad arguments exit through argparse with status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if interpreter_enabled():
        # the jit functions were built for the interpreter at import: start again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print(f"{module}: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
    a = _parser(module).parse_args(argv)
    s = Shape(op=a.op, dtype=a.dtype, batch=a.batch, heads=a.heads, kv_heads=a.kv_heads, seq=a.seq,
              head_dim=a.head_dim, rope=a.rope, q_norm=a.q_norm, k_norm=a.k_norm, row_scale=a.row_scale,
              window=a.window, chunk=a.chunk, sinks=a.sinks, softcap=a.softcap, key_mask=a.key_mask, docs=a.docs,
              varlen=a.varlen, q_len=a.q_len, page_size=a.page_size, append=a.append, num_sms=a.num_sms,
              num_splits=a.num_splits)
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

