"""The timer, after ``triton.testing.do_bench``: CUDA events around every repetition after a warm-up,
an L2-sized buffer zeroed between repetitions (it also lets the host run ahead of the GPU), inputs
rotated among enough copies to exceed twice the L2 size; callers report the median. Also the peak
memory a call adds."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Sequence

import torch


def l2_bytes(device=None) -> int:
    """L2 cache size of the CUDA device (50 MiB when torch does not report it)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_count(bytes_per_set: int, l2: int, *, cap: int = 32) -> int:
    """How many input copies to rotate so that the sets together exceed twice the L2 size."""
    if bytes_per_set <= 0:
        return 1
    return int(min(cap, max(1, math.ceil(2 * l2 / bytes_per_set))))


def tensor_bytes(x: Dict[str, Any]) -> int:
    """Total bytes of the tensors in an input dict."""
    return sum(t.numel() * t.element_size() for t in x.values() if isinstance(t, torch.Tensor))


@functools.lru_cache(maxsize=1)
def _flush_buffer() -> torch.Tensor:
    return torch.empty(2 * l2_bytes() // 4, dtype=torch.int32, device="cuda")


def cuda_time(fn: Callable[[Any], Any], sets: Sequence[Any], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 10, max_reps: int = 2000) -> List[float]:
    """Milliseconds of each repetition of ``fn(sets[i % len(sets)])``, timed with CUDA events.

    Warm-up first (compilation, autotuning, handle creation stay out), then about ``rep_ms`` of
    repetitions, each preceded by zeroing an L2-sized buffer (outside the events).
    """
    flush = _flush_buffer()
    fn(sets[0])
    torch.cuda.synchronize()
    est_start, est_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est_start.record()
    for i in range(5):
        flush.zero_()
        fn(sets[i % len(sets)])
    est_end.record()
    torch.cuda.synchronize()
    est = max(est_start.elapsed_time(est_end) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = int(min(max_reps, max(min_reps, rep_ms / est)))
    for i in range(n_warm):
        fn(sets[i % len(sets)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        fn(sets[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def peak_extra_mb(fn: Callable[[Any], Any], x: Any) -> float:
    """MiB the call allocates on top of what is live before it (outputs, workspace, saved tensors)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def graph_time(fn: Callable[[Any], Any], x: Any, *, reps: int = 50, per_graph: int = 20) -> List[float]:
    """Milliseconds of one ``fn(x)`` replayed from a CUDA graph: the GPU time without the host's launch path
    (decode steps of a few microseconds otherwise measure Python). ``per_graph`` calls are captured in one graph
    and each replay's events divided by it. Raises if ``fn`` cannot be captured (a host sync, a CPU tensor)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / per_graph for s, e in zip(starts, ends)]
