"""Measuring one NIAH request: wall time with device syncs, peak memory, memory estimates, traces;
and the CPU thread count of a long job."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch

from ..kernels.ops import cpu_backend

MB = 1024.0 ** 2
# bytes per (Hq, L, L) score element on the drope.reference path: float32 logits, probabilities and
# masked probabilities live at once
_SCORE_BYTES_REFERENCE = 12


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


def attention_path(attn: str, device: torch.device) -> Dict[str, object]:
    """What ``attn`` runs on ``device`` in a NIAH request, and how its memory grows with the length L.

    Returns:
        ``{"path": a short description, "quadratic": True when an (Hq, L, L) score matrix is
        materialised, "slow": a reason when the path is far slower than the alternatives, else ""}``.
    """
    if attn == "eager":
        return {"path": "eager (materialises the scores)", "quadratic": True, "slow": ""}
    if attn == "drope_triton":
        if device.type == "cuda":
            return {"path": "drope's fused Triton kernels", "quadratic": False, "slow": ""}
        if cpu_backend() == "interpreter":
            return {"path": "drope's Triton kernels in Triton's interpreter (TRITON_INTERPRET=1)", "quadratic": False,
                    "slow": "Triton's interpreter runs every kernel program in Python"}
        # drope/kernels/cpu: exact, O(L) memory (soft-capped logits in bounded blocks)
        return {"path": "drope's CPU kernels (PyTorch's flash attention)", "quadratic": False, "slow": ""}
    return {"path": attn, "quadratic": False, "slow": ""}


def estimate_memory_mb(config, length: int, new_tokens: int, dtype: torch.dtype, attn: str,
                       device: Union[torch.device, str] = "cuda") -> Dict[str, float]:
    """Rough memory a single request of ``length`` prompt tokens needs beyond the weights.

    KV cache: ``2 * layers * kv_heads * head_dim * (length + new_tokens)`` elements. Activations:
    the peak layer of the prefill (hidden states, Q/K/V, the MLP's three intermediate tensors),
    plus, where :func:`attention_path` says ``attn`` materialises them on ``device``, the
    ``Hq * L^2`` score matrices and ``L^2`` masks (``eager`` everywhere; ``drope_triton`` on CPU
    without Triton's interpreter, which runs ``drope.reference``); the other paths need O(L).
    Logits: last position only.

    Args:
        config: the model's ``PretrainedConfig`` (Llama-like fields).
        length: prompt tokens.
        new_tokens: tokens to generate.
        dtype: the model's dtype.
        attn: attention implementation name.
        device: where the model runs.

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
    scores = float(hq) * length * length
    if attn == "eager":
        act += scores * (2 * elt + 4) + float(length) * length * elt
    elif attention_path(attn, torch.device(device))["quadratic"]:
        act += scores * _SCORE_BYTES_REFERENCE + 2.0 * length * length  # + the boolean mask and its negation
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


def choose_threads(spec: Union[str, int, None] = "auto") -> int:
    """The number of torch CPU threads for a long job.

    Args:
        spec: an int >= 1 (or its string), or ``"auto"``/None: ``OMP_NUM_THREADS`` (or
            ``MKL_NUM_THREADS``) when set, which torch already honours; otherwise the cores this
            process may run on (``os.sched_getaffinity``) minus the one-minute load average
            (rounded), at least 1. On a busy machine more threads than free cores are slower, not
            faster (oversubscription).

    Returns:
        The thread count.

    Raises:
        ValueError: ``spec`` is neither ``"auto"`` nor a positive int; the message names ``--threads``.
    """
    if spec is None or str(spec).strip().lower() == "auto":
        if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
            return torch.get_num_threads()
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
        return max(1, cores - math.floor(busy + 0.5))
    try:
        n = 0 if isinstance(spec, bool) else int(str(spec).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--threads must be auto or a positive int, got {spec!r}")
    return n


def set_threads(spec: Union[str, int, None] = "auto") -> int:
    """``torch.set_num_threads(choose_threads(spec))``; returns the count (see :func:`choose_threads`)."""
    n = choose_threads(spec)
    torch.set_num_threads(n)
    return n


def machine() -> Dict[str, object]:
    """The CPU side of the machine a measurement ran on: cores usable, threads, load average."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {"cpus": cores, "threads": torch.get_num_threads(), "loadavg": load}

