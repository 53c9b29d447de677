"""Multi-process harness of the context-parallel tests: :func:`run_ranks` starts W worker processes (this file as a
script) on a gloo group with a file rendezvous, each bounded by a deadline, and returns what each rank reported.

A worker runs every case of the spec file in order and saves ``{case name: result}``; a case that raises records
the exception (type, message) instead, so error cases are checked in the parent. Collectives are counted by
wrapping ``torch.distributed``'s functions (only the outermost call counts). Kernels run in Triton's interpreter:
``TRITON_INTERPRET=1`` is set before drope is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "reduce_scatter", "all_to_all",
               "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "gather", "scatter")


def run_ranks(tmp_path: Path, world: int, cases: list, *, deadline_s: float = 150.0, script: str = __file__,
              interpret: bool = True) -> list:
    """Run ``cases`` on ``world`` worker processes (``script RANK W RDZV SPEC OUT``, this file's :func:`main` by
    default); return each rank's ``{case name: result}``. ``interpret``: kernels in Triton's interpreter (else, on a
    CPU, drope's PyTorch kernels: ``TRITON_INTERPRET`` is removed from the workers' environment).

    Fails the calling test (AssertionError with the logs) when a worker exits non-zero or the deadline passes (then
    every worker is killed: a hang fails, it does not block the suite)."""
    import torch

    tmp_path = Path(tmp_path)
    spec = tmp_path / "spec.pt"
    torch.save(cases, spec)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    if not interpret:
        del env["TRITON_INTERPRET"]
    logs = [open(tmp_path / f"log{r}.txt", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(tmp_path / "rdzv"), str(spec),
                               str(tmp_path)], env=env, stdout=logs[r], stderr=subprocess.STDOUT, cwd=ROOT)
             for r in range(world)]
    end = time.monotonic() + deadline_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    tails = "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"log{r}.txt").read_text()[-3000:] for r in range(world))
    assert not hung, f"ranks {hung} still running after {deadline_s:g} s (killed)\n{tails}"
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks {failed} exited with {[procs[r].returncode for r in failed]}\n{tails}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


class Counter:
    """Counts the outermost calls of torch.distributed's collectives, with the numel and dtype of their output."""

    def __init__(self):
        self.calls = []
        self.depth = 0

    def install(self):
        import torch.distributed as dist

        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            if self.depth == 0:
                first = args[0] if args else None
                self.calls.append((name, getattr(first, "numel", lambda: 0)(), str(getattr(first, "dtype", ""))))
            self.depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                self.depth -= 1
        return counted

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def _prefill(case, rank, world, counter, dd, torch, group):
    layout, dt = case["layout"], case["dtype"]

    def local(name, dim=2):
        return dd.shard(case[name], group=group, layout=layout, dim=dim)

    q, k, v = (local(n).to(dt).detach().requires_grad_(case.get("grad_" + n, True)) for n in "qkv")
    params = {n: None if case.get(n) is None else case[n].clone().requires_grad_() for n in ("qw", "kw", "sinks")}
    scale = case.get("scale")
    if isinstance(scale, torch.Tensor) and scale.dim() == 3:  # per row: this rank's rows by global position
        scale = scale[..., dd.positions(case["q"].shape[2], group=group, layout=layout)]
    counter.take()
    out, lse = dd.attention(q, k, v, group=group, layout=layout, softmax_scale=scale, q_norm_weight=params["qw"],
                            k_norm_weight=params["kw"], sinks=params["sinks"], cu_seqlens=case.get("cu"),
                            return_lse=True, **case["kwargs"])
    fwd = counter.take()
    loss = (out.float() * local("dout")).sum() + (lse * local("dlse")).sum()
    loss.backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad, fwd=fwd, bwd=counter.take(),
                **{"d" + n: None if p is None else p.grad for n, p in params.items()})


def _decode(case, rank, world, counter, dd, torch, group):
    dt = case["dtype"]
    kc, vc, lens = (case[n][rank] for n in ("k_caches", "v_caches", "lens"))
    counter.take()
    with torch.no_grad():
        out, lse = dd.decode_attention(case["q"].to(dt), kc.to(dt), vc.to(dt), cache_seqlens=lens, group=group,
                                       softmax_scale=case.get("scale"), sinks=case.get("sinks"), return_lse=True,
                                       **case["kwargs"])
    return dict(out=out, lse=lse, calls=counter.take())


def _layout(case, rank, world, counter, dd, torch, group):
    x, layout, dim = case["x"], case["layout"], case["dim"]
    part = dd.shard(x, group=group, layout=layout, dim=dim)
    local = part.detach().clone().requires_grad_()
    counter.take()
    full = dd.unshard(local, group=group, layout=layout, dim=dim)
    calls = counter.take()
    (full * case["w"] * (rank + 1)).sum().backward()
    positions = dd.positions(x.shape[dim], group=group, layout=layout)
    return dict(part=part, full=full.detach(), grad=local.grad, positions=positions, calls=calls, bwd=counter.take())


def _compiled(case, rank, world, counter, dd, torch, group):
    torch._dynamo.reset()
    layout = case["layout"]
    q, k, v = (dd.shard(case[n], group=group, layout=layout).detach().requires_grad_() for n in "qkv")
    qw = case["qw"].clone().requires_grad_()

    def prefill(q, k, v, qw):
        return dd.attention(q, k, v, group=group, layout=layout, q_norm_weight=qw, return_lse=True, **case["kwargs"])

    counter.take()
    out, lse = torch.compile(prefill, fullgraph=True, backend="aot_eager")(q, k, v, qw)
    fwd = counter.take()
    ((out * dd.shard(case["dout"], group=group, layout=layout)).sum()
     + (lse * dd.shard(case["dlse"], group=group, layout=layout)).sum()).backward()
    bwd = counter.take()
    kc, vc, lens = (case[n][rank] for n in ("k_caches", "v_caches", "lens"))

    def decode(qd, kc, vc, lens):
        return dd.decode_attention(qd, kc, vc, cache_seqlens=lens, group=group, window=case["kwargs"].get("window"),
                                   return_lse=True)

    with torch.no_grad():
        dec = torch.compile(decode, fullgraph=True, backend="aot_eager")(case["qd"], kc, vc, lens)
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad, dqw=qw.grad, fwd=fwd, bwd=bwd,
                dec_out=dec[0], dec_lse=dec[1],
                dec_calls=counter.take())


def _errors(case, rank, world, counter, dd, torch, group):
    """Each sub-case misbehaves on some ranks; the outcome (exception type and message, or "ok") per sub-case."""
    g = torch.Generator().manual_seed(0)

    def qkv(S, D=16, H=2):
        return [torch.randn(1, H, S, D, generator=g) for _ in range(3)]

    subcases = {
        "shape_mismatch": lambda: dd.attention(*qkv(8, 16 if rank == 0 else 32)),
        "odd_rows": lambda: dd.attention(*qkv(7)),
        "bad_on_one_rank": lambda: dd.attention(*qkv(8), q_norm_weight=torch.ones(3 if rank == 1 else 16)),
        "layout_mismatch": lambda: dd.attention(*qkv(8), layout="headtail" if rank == 0 else "contiguous"),
        "decode_mismatch": lambda: dd.decode_attention(torch.randn(1, 2, 1 + (rank == 1), 16), *qkv(8)[1:],
                                                       cache_seqlens=torch.tensor([4])),
        "unshard_mismatch": lambda: dd.unshard(torch.randn(1, 2, 4 + 2 * rank, 3)),
        "op_mismatch": lambda: dd.attention(*qkv(8)) if rank == 0 else dd.unshard(torch.randn(4, 4, 4)),
        "cu_seqlens": lambda: dd.attention(*qkv(8), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)),
        "documents_mismatch": lambda: dd.attention(*qkv(8), cu_seqlens=torch.tensor([0, 5 + (rank == 1), 24],
                                                                                      dtype=torch.int32)),
        "decode_grad": lambda: dd.decode_attention(torch.randn(1, 2, 1, 16, requires_grad=True), *qkv(8)[1:],
                                                   cache_seqlens=torch.tensor([4])),
        "decode_lengths": lambda: dd.decode_attention(torch.randn(1, 2, 1, 16), *qkv(8)[1:],
                                                      cache_seqlens=torch.tensor([9 if rank == 1 else 4])),
        "shard_not_divisible": lambda: dd.shard(torch.randn(1, 2, 10, 16)),
        "positions_not_divisible": lambda: dd.positions(10),
        "bad_layout": lambda: dd.positions(8, layout="ring"),
    }
    out = {}
    for name, call in subcases.items():
        try:
            call()
            out[name] = ("ok", "")
        except Exception as e:  # noqa: BLE001 - the parent checks type and message
            out[name] = (type(e).__name__, str(e))
    # the group still works after every error: one more collective, the same on every rank
    out["after"] = dd.unshard(torch.full((1, 1, 2, 1), float(rank)), group=group).flatten().tolist()
    return out


SCENARIOS = {"prefill": _prefill, "decode": _decode, "layout": _layout, "compiled": _compiled, "errors": _errors}


def main(argv):
    os.environ["TRITON_INTERPRET"] = "1"

    def run_case(case, rank, W, counter, group):
        import torch

        import drope.distributed as dd

        return SCENARIOS[case["kind"]](case, rank, W, counter, dd, torch, group)

    serve(argv, run_case)


def serve(argv, run_case):
    """A worker's life: join the gloo group (file rendezvous), run every case of the spec (``run_case(case, rank, W,
    counter, group)``; a case of W < world ranks on the subgroup of ranks 0..W-1, the others skip it), save the
    results, leave the group. Environment variables the cases need are set before calling it."""
    rank, world, rdzv, spec, out_dir = int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    # cases of W < world ranks run on the subgroup of ranks 0..W-1 (the others skip them)
    groups = {world: None, **{w: dist.new_group(list(range(w))) for w in range(1, world)}}
    counter = Counter()
    counter.install()
    results = {}
    for case in torch.load(spec, weights_only=False):
        W = case.get("W", world)
        if rank >= W:
            continue
        start = time.perf_counter()
        try:
            results[case["name"]] = run_case(case, rank, W, counter, groups[W])
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
            import traceback

            results[case["name"]] = {"raised": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        print(f"rank {rank}: {time.perf_counter() - start:6.2f} s {case['name']}", flush=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized():  # a case may have ended it (drope recalibrate does)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
