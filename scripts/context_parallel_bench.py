"""Context parallelism on real ranks: ``drope.distributed`` attention and decode, timed on every rank.

    torchrun --standalone --nproc_per_node 8 scripts/context_parallel_bench.py --seq 262144 [--check] [--out f.json]
    torchrun --standalone --nproc_per_node 2 scripts/context_parallel_bench.py --dry-run     # CPU, gloo, interpreter

Each rank makes its shards of one sequence (``--layout``) and times, with CUDA events after warm-up,
``dd.attention`` forward and forward + backward (DroPE's production call: per-head QK-norm weights and the per-row
"position" temperature by global position) and ``dd.decode_attention`` of one new token against a cache of
``--decode-cache`` slots sharded contiguously. Rank 0 gathers every rank's times and prints, per op: each rank's
median, the balance (busiest / mean) beside the one predicted from the kernel's tile counts, TFLOP/s per GPU, and
what each collective moves per layer (:func:`drope.distributed.balance.collective_bytes`). ``--check`` compares the
unsharded result with one device's kernel on rank 0 (small ``--seq`` only: it holds the whole sequence). ``--out``
writes the numbers as JSON.

Without CUDA (or with ``--device cpu``) the ranks use gloo and the kernels run in Triton's interpreter (the script
sets ``TRITON_INTERPRET=1`` before importing drope); ``--dry-run`` picks tiny shapes that run there in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=131072, help="positions of the sequence (S %% 2W == 0 for headtail)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--layout", choices=("headtail", "contiguous"), default="headtail")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--decode-cache", type=int, default=1048576, help="global cache slots of the decode (0: skip)")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check", action="store_true", help="compare with one device's kernel on rank 0 (small --seq)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait (the group's timeout)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 repetition, --check (a CPU runs it)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON (rank 0)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.seq, args.heads, args.kv_heads, args.head_dim, args.dtype = 64, 2, 1, 16, "fp32"
        args.decode_cache, args.reps, args.warmup, args.check = 48, 1, 0, True
    return args


def timed(fn, *, reps: int, warmup: int, cuda: bool):
    """Milliseconds of each of ``reps`` calls after ``warmup`` calls (CUDA events, else wall clock)."""
    import torch

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before drope defines its kernels
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    import drope.distributed as dd
    from drope import kernels
    from drope.distributed.balance import balance, collective_bytes
    from drope.hf.temperature import temperature_scale

    W, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    B, H, HKV, S, D = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    g = torch.Generator(device=device).manual_seed(1234)  # the same full tensors on every rank where needed

    def full(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    qw = torch.rand(H, D, device=device, generator=g) + 0.5
    kw = torch.rand(HKV, D, device=device, generator=g) + 0.5
    temp = {"mode": "position", "coef": 0.103, "train_length": 2048}

    def rows(positions):
        return (temperature_scale(temp, positions) * D ** -0.5).float()

    if args.check:
        q_full, k_full, v_full = full(B, H, S, D), full(B, HKV, S, D), full(B, HKV, S, D)
        q, k, v = (dd.shard(t, layout=args.layout) for t in (q_full, k_full, v_full))
    else:  # each rank's own rows only: at 1M positions the whole sequence would not fit next to them
        torch.manual_seed(rank)
        q, k, v = (torch.randn(B, h, S // W, D, device=device, dtype=dtype) for h in (H, HKV, HKV))
    scale = rows(dd.positions(S, layout=args.layout, device=device))[None, None, :]
    kwargs = dict(layout=args.layout, softmax_scale=scale, q_norm_weight=qw, k_norm_weight=kw)
    results = {}
    with torch.no_grad():
        results["prefill_fwd"] = timed(lambda: dd.attention(q, k, v, **kwargs), reps=args.reps, warmup=args.warmup,
                                       cuda=cuda)
    if not args.no_backward:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        dout = torch.randn_like(q)

        def fwd_bwd():
            dd.attention(*leaves, **kwargs).backward(dout)
        results["prefill_fwd_bwd"] = timed(fwd_bwd, reps=args.reps, warmup=args.warmup, cuda=cuda)
    checks = {}
    if args.check:
        with torch.no_grad():
            out = dd.unshard(dd.attention(q, k, v, **kwargs), layout=args.layout)
            if rank == 0:
                want = kernels.attention(q_full, k_full, v_full, softmax_scale=rows(torch.arange(S, device=device)),
                                         q_norm_weight=qw, k_norm_weight=kw)
                checks["prefill_rel_err"] = ((out.float() - want.float()).norm() / want.float().norm()).item()
    if args.decode_cache:
        SD = args.decode_cache // W
        qd = full(args.decode_batch, H, 1, D)
        kc, vc = (torch.randn(args.decode_batch, HKV, SD, D, device=device, dtype=dtype) for _ in range(2))
        lens = torch.full((args.decode_batch,), SD, device=device, dtype=torch.int32)
        with torch.no_grad():
            results["decode"] = timed(lambda: dd.decode_attention(qd, kc, vc, cache_seqlens=lens), reps=args.reps,
                                      warmup=args.warmup, cuda=cuda)
            if args.check:
                out = dd.decode_attention(qd, kc, vc, cache_seqlens=lens)
                kg, vg = (dd.unshard(c.contiguous(), layout="contiguous") for c in (kc, vc))
                if rank == 0:
                    want = kernels.decode_attention(qd, kg, vg)
                    checks["decode_rel_err"] = ((out.float() - want.float()).norm() / want.float().norm()).item()
    every = [None] * W
    dist.all_gather_object(every, results)
    if rank == 0:
        report = summarise(args, W, every, checks, balance, collective_bytes,
                           torch.cuda.get_device_name() if cuda else "cpu")
        print(report["text"])
        if args.out:
            args.out.write_text(json.dumps(report["json"], indent=1))
    dist.destroy_process_group()
    bad = [k for k, v in checks.items() if not v <= (1e-4 if args.dtype == "fp32" else 3e-2)]
    return 1 if bad else 0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def summarise(args, W, every, checks, balance, collective_bytes, device_name):
    """The table rank 0 prints and the JSON it writes."""
    B, H, HKV, S, D = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    flops = 4.0 * B * H * S * S * D / 2
    lines = [f"drope.distributed on {W} ranks ({device_name}): B{B} Hq{H} Hkv{HKV} S{S} D{D} {args.dtype}, "
             f"layout {args.layout}, decode cache {args.decode_cache}", ""]
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "world_size": W,
           "device": device_name, "ops": {}, "checks": checks}
    for op in every[0]:
        med = [statistics.median(r[op]) for r in every]
        row = {"rank_ms": med, "step_ms": max(med), "balance": max(med) / (sum(med) / W)}
        if op.startswith("prefill"):
            row["tflops_per_gpu"] = flops * (2.5 if op == "prefill_fwd_bwd" else 1) / W / (max(med) * 1e-3) / 1e12
            row["tiles_balance"] = balance(S, W, args.layout)
        out["ops"][op] = row
        extra = (f", {row['tflops_per_gpu']:.1f} TFLOP/s per GPU, tiles predict {row['tiles_balance']:.3f}"
                 if "tflops_per_gpu" in row else "")
        lines.append(f"{op:16s} step {row['step_ms']:9.3f} ms  balance {row['balance']:.3f}{extra}  ranks: "
                     + " ".join(f"{m:.3f}" for m in med))
    moved = collective_bytes(S, W, B=B, Hkv=HKV, D=D, elem=elem)
    out["collective_bytes_per_layer"] = moved
    lines += ["", "per layer and rank: " + ", ".join(f"{k} {_size(v)}" for k, v in moved.items())]
    lines += [f"check {k}: {v:.2e}" for k, v in checks.items()]
    return {"text": "\n".join(lines), "json": out}


if __name__ == "__main__":
    sys.exit(main())
