"""Measuring one NIAH request: wall time with device syncs, peak memory, memory estimates, traces."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

MB = 1024.0 ** 2


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """A timestamp in seconds taken after the device's queued work has finished."""
    synchronize(device)
    return time.perf_counter()


def _read_status_kb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of the code inside the ``with`` block, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors only, weights included).
    On CPU: the process's peak resident set (``VmHWM``), reset on entry through
    ``/proc/self/clear_refs`` where the kernel allows it; where it cannot be reset the figure is the
    peak since the process started, and ``kind`` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: Optional[float] = None
        self.kind = "cuda_allocated" if device.type == "cuda" else "cpu_rss"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.kind = "cpu_rss_since_start"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            kb = _read_status_kb("VmHWM")
            self.peak_mb = None if kb is None else kb / 1024.0


def available_memory_mb(device: torch.device) -> float:
    """Memory free for new allocations: CUDA free memory, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / MB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def estimate_memory_mb(config, length: int, new_tokens: int, dtype: torch.dtype, attn: str) -> Dict[str, float]:
    """Rough memory a single request of ``length`` prompt tokens needs beyond the weights.

    KV cache: ``2 * layers * kv_heads * head_dim * (length + new_tokens)`` elements. Activations:
    the peak layer of the prefill (hidden states, Q/K/V, the MLP's three intermediate tensors),
    plus the ``Hq * L^2`` score matrix (and an ``L^2`` mask) for ``eager`` attention, which
    materializes them; the fused implementations need O(L). Logits: last position only.

    Args:
        config: the model's ``PretrainedConfig`` (Llama-like fields).
        length: prompt tokens.
        new_tokens: tokens to generate.
        dtype: the model's dtype.
        attn: attention implementation name.

    Returns:
        ``{"kv_cache_mb", "activations_mb", "total_mb"}``; total includes a 10 % margin.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    elt = torch.empty((), dtype=dtype).element_size()
    layers = int(text.num_hidden_layers)
    hq = int(text.num_attention_heads)
    hkv = int(getattr(text, "num_key_value_heads", None) or hq)
    hidden = int(text.hidden_size)
    hd = int(getattr(text, "head_dim", None) or hidden // hq)
    inter = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    total_len = length + new_tokens
    kv = 2.0 * layers * hkv * hd * total_len * elt
    act = float(length) * (4 * hidden + 3 * inter + (hq + 2 * hkv) * hd) * elt
    if attn == "eager":
        act += float(hq) * length * length * (2 * elt + 4) + float(length) * length * elt
    act += 2.0 * vocab * 4
    return {"kv_cache_mb": kv / MB, "activations_mb": act / MB, "total_mb": 1.1 * (kv + act) / MB}


@contextlib.contextmanager
def chrome_trace(path: Path, device: torch.device) -> Iterator[None]:
    """Record the block with ``torch.profiler`` and write a Chrome trace (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        yield
        synchronize(device)
    prof.export_chrome_trace(str(path))
