"""The JSON record of a run and what goes into it: the device's measured ceilings (copy bandwidth, bf16
matmul rate), each result's rates from its median time, the environment (device, versions, git sha),
the schema check and the file name ``<device>-<date>-<sha>.json`` under ``benchmarks/results/``
(``DROPE_BENCH_RESULTS_DIR`` overrides the folder)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .cases import Case, case_bytes, case_flops
from .timing import cuda_time

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_RESULTS = "DROPE_BENCH_RESULTS_DIR"


def measure_ceilings(*, copy_mib: int = 1024, mm: int = 8192) -> Dict[str, float]:
    """The device's measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    n = copy_mib * 2**20 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_time(lambda _: dst.copy_(src), [None], rep_ms=200))
    copy_gbps = 2 * n * 2 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(cuda_time(lambda _: torch.mm(a, b), [None], rep_ms=300))
    matmul_tflops = 2 * mm ** 3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": round(copy_gbps, 2), "matmul_tflops": round(matmul_tflops, 2),
            "copy_bytes": 2 * n * 2, "matmul_shape": [mm, mm, mm]}


def metrics(case: Case, ms: float, ceilings: Optional[Dict[str, float]] = None) -> Dict[str, Optional[float]]:
    """TFLOP/s (prefill), GB/s and tokens/s (decode), fraction of the copy bandwidth, from a median time."""
    out: Dict[str, Optional[float]] = {"tflops": None, "gbps": None}
    flops, nbytes = case_flops(case), case_bytes(case)
    if flops is not None:
        out["tflops"] = flops / (ms * 1e-3) / 1e12
    if nbytes is not None:
        out["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if ceilings and ceilings.get("copy_gbps"):
            out["frac_copy_bw"] = out["gbps"] / ceilings["copy_gbps"]
    if case.is_decode:
        out["tokens_per_s"] = case.B / (ms * 1e-3)
        out["cache_len"] = case.S
    elif case.op == "model_prefill":
        out["tokens_per_s"] = case.B * case.S / (ms * 1e-3)
    return out


def result_entry(case: Case, provider: str, times_ms: Sequence[float], *, peak_mem_mb: Optional[float],
                 ceilings: Optional[Dict[str, float]] = None, **extra) -> Dict[str, Any]:
    """One ``results`` entry of the record from the repetition times of a case."""
    ms = statistics.median(times_ms)
    entry = {"op": case.op, "provider": provider, "B": case.B, "H": case.H, "Hkv": case.Hkv, "S": case.S,
             "D": case.D, "dtype": case.dtype, "ms": ms}
    entry.update(metrics(case, ms, ceilings))
    entry["peak_mem_mb"] = peak_mem_mb
    entry["reps"] = len(times_ms)
    entry["ms_min"] = min(times_ms)
    entry["ms_iqr"] = _iqr(times_ms)
    entry.update(extra)
    return entry


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


RESULT_KEYS = {"op": str, "provider": str, "B": int, "H": int, "Hkv": int, "S": int, "D": int, "dtype": str,
               "ms": float, "tflops": (float, type(None)), "gbps": (float, type(None)),
               "peak_mem_mb": (float, type(None))}


def validate_record(record: Dict[str, Any]) -> None:
    """Check a record against the schema of issue 6.

    Raises:
        ValueError: naming the first key that is missing or of the wrong type.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    for key in ("device", "torch", "triton", "git_sha"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"record[{key!r}] must be a str, got {record.get(key)!r}")
    ceil = record.get("ceilings")
    if not isinstance(ceil, dict):
        raise ValueError("record['ceilings'] must be a dict with copy_gbps and matmul_tflops")
    for key in ("copy_gbps", "matmul_tflops"):
        if not isinstance(ceil.get(key), (int, float)) or isinstance(ceil.get(key), bool):
            raise ValueError(f"record['ceilings'][{key!r}] must be a number, got {ceil.get(key)!r}")
    results = record.get("results")
    if not isinstance(results, list):
        raise ValueError("record['results'] must be a list")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"record['results'][{i}] must be a dict")
        for key, typ in RESULT_KEYS.items():
            if key not in r:
                raise ValueError(f"record['results'][{i}] lacks {key!r}")
            v = r[key]
            ok = isinstance(v, typ) and not isinstance(v, bool)
            if typ is float or (isinstance(typ, tuple) and float in typ):
                ok = ok or (isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise ValueError(f"record['results'][{i}][{key!r}] has the wrong type: {v!r}")


def git_sha(short: bool = True) -> str:
    """The checkout's HEAD commit ("unknown" outside git), with "+dirty" when tracked files changed.

    ``DROPE_GIT_SHA`` in the environment overrides it (for copies of the tree without ``.git``).
    """
    if os.environ.get("DROPE_GIT_SHA"):  # a copy of the tree without .git (device machines)
        return os.environ["DROPE_GIT_SHA"]
    args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        sha = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty and sha else "")


def slug(text: str) -> str:
    """A file-name-safe lower-case slug: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def record_path(record: Dict[str, Any], results_dir: Optional[Path] = None) -> Path:
    """``<results_dir>/<device>-<date>-<sha>.json`` for a record (date from its ``created_utc``)."""
    results_dir = Path(results_dir or os.environ.get(ENV_RESULTS) or RESULTS_DIR)
    stamp = _dt.datetime.strptime(record["created_utc"], "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%d-%H%M%S")
    return results_dir / f"{slug(record['device'])}-{stamp}-{slug(record['git_sha'])}.json"


def new_record(device: str, ceilings: Dict[str, float], *, quick: bool = False) -> Dict[str, Any]:
    """An empty record carrying the environment: device, versions, git sha, ceilings, time."""
    import triton

    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "git_sha": git_sha(), "ceilings": dict(ceilings),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(), "quick": bool(quick),
            "results": [], "skipped": [], "failed": []}


def write_record(record: Dict[str, Any], results_dir: Optional[Path] = None) -> Path:
    """Validate and write a record as JSON; returns its path."""
    validate_record(record)
    path = record_path(record, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path
