"""A sweep's outputs: ``results.json`` (written atomically after every cell, resumable), ``samples.jsonl``,
the scoring of each request, and the error record of a sweep stopped by running out of memory."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import profile as prof
from .config import IDENTITY_DEFAULTS, IDENTITY_FIELDS, NIAHError, RunConfig, SweepStopped
from .decode import Generation
from .tasks import PromptBuilder, Sample, score


def _median(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_json(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` as JSON through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cell_key(row: Dict[str, object]) -> Tuple[str, int, float]:
    return (str(row["task"]), int(row["length"]), round(float(row["depth"]), 6))


def default_label(cfg: RunConfig) -> str:
    parts = [Path(cfg.model).name or str(cfg.model), cfg.attn]
    if cfg.rope_scaling:
        parts.append(f"rope={Path(cfg.rope_scaling).name}")
    if cfg.temperature:
        parts.append(f"temp={cfg.temperature}")
    if cfg.context_parallel > 1:
        parts.append(f"cp={cfg.context_parallel}")
    return " ".join(parts)


def load_results(out_dir: Path) -> Optional[Dict[str, object]]:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise NIAHError(f"{path} is not valid JSON ({e}); move it away or pass --overwrite") from None
    if not isinstance(data, dict) or "results" not in data or "config" not in data:
        raise NIAHError(f"{path} is not a drope niah results file (no 'config' and 'results')")
    return data



def resumed_rows(cfg: RunConfig, out_dir: Path, *, resume: bool, overwrite: bool) -> List[Dict[str, object]]:
    """The finished rows of ``out_dir/results.json`` to continue, or none.

    Raises:
        NIAHError: both flags, existing results without either, or resuming with different settings.
    """
    if resume and overwrite:
        raise NIAHError("--resume and --overwrite exclude each other")
    previous = load_results(out_dir)
    if previous is None or overwrite:
        return []
    if not resume:
        raise NIAHError(
            f"{out_dir / 'results.json'} already exists ({len(previous['results'])} results); pass --resume to "
            "continue it or --overwrite to start over"
        )
    old = previous["config"].get("identity", {})
    diff = [k for k in IDENTITY_FIELDS if old.get(k, IDENTITY_DEFAULTS.get(k)) != cfg.identity()[k]]
    if diff:
        raise NIAHError(
            f"--resume: {out_dir / 'results.json'} was written with different settings: "
            + ", ".join(f"{k}={old.get(k)!r} (now {cfg.identity()[k]!r})" for k in diff)
        )
    return list(previous["results"])


def run_record(cfg: RunConfig, model, device: torch.device, dtype: torch.dtype, rope, builder: PromptBuilder,
               path: Dict[str, object]) -> Dict[str, object]:
    """The ``config`` block of results.json: the settings, what they resolved to, and the machine."""
    import transformers

    return {
        **dataclasses.asdict(cfg),
        "label": cfg.label or default_label(cfg),
        "identity": cfg.identity(),
        "resolved_device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "resolved_dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": getattr(model.config, "_attn_implementation", cfg.attn),
        "attention_path": path["path"],
        "rope_parameters": rope,
        "rope_type_in_model": sorted({str(m.rope_type) for m in model.modules() if hasattr(m, "rope_type")}),
        "model_type": getattr(model.config, "model_type", None),
        "drope_temperature": getattr(model.config, "drope_temperature", None),
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "chat_template_used": builder.use_chat,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "machine": prof.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }


@dataclass
class Scored:
    """One measured request: its sample, generation, decoded prediction and score (computed once)."""

    sample: Sample
    generation: Generation
    prediction: str
    accuracy: float
    partial: float


def score_requests(samples: Sequence[Sample], gens: Sequence[Generation], tokenizer) -> List[Scored]:
    """Decode and score each request once; the cell row and samples.jsonl both read the result."""
    out = []
    for s, g in zip(samples, gens):
        pred = tokenizer.decode(g.token_ids, skip_special_tokens=True)
        out.append(Scored(s, g, pred, *score(pred, s.answers, s.meta.get("value_type", "number"))))
    return out


def cell_row(task: str, length: int, depth: float, scored: Sequence[Scored], trace_path) -> Dict[str, object]:
    """The results.json row of one (task, length, depth) cell."""
    gens = [r.generation for r in scored]
    peaks = [g.peak_mem_mb for g in gens if g.peak_mem_mb is not None]
    prefill_ms = _median([g.prefill_ms for g in gens])
    row = {
        "task": task, "length": length, "depth": depth, "trials": len(scored),
        "accuracy": statistics.fmean(r.accuracy for r in scored),
        "partial": statistics.fmean(r.partial for r in scored),
        "prefill_ms": prefill_ms,
        "decode_tok_s": _median([g.decode_tok_s for g in gens]),
        "peak_mem_mb": max(peaks) if peaks else None,
        "peak_mem_kind": gens[0].peak_mem_kind,
        "prefill_tok_s": length / (prefill_ms / 1e3),
        "new_tokens": statistics.fmean(len(g.token_ids) for g in gens),
        "needle_token_index": [r.sample.needles[0].token_index for r in scored],
    }
    if trace_path is not None:
        row["trace"] = str(trace_path)
    return row


def append_samples(path: Path, scored: Sequence[Scored]) -> None:
    """One samples.jsonl line per request: the sample, its prediction, score and profile."""
    with open(path, "a") as f:
        for r in scored:
            s, g = r.sample, r.generation
            f.write(json.dumps({
                "task": s.task, "length": s.length, "depth": s.depth, "trial": s.trial,
                "query_keys": s.query_keys, "answers": s.answers, "prediction": r.prediction,
                "accuracy": r.accuracy, "partial": r.partial,
                "needles": [dataclasses.asdict(n) for n in s.needles],
                "prefill_ms": g.prefill_ms, "decode_tok_s": g.decode_tok_s, "peak_mem_mb": g.peak_mem_mb,
            }) + "\n")


def out_of_memory(error: Exception, task: str, length: int, depth: float, device: torch.device,
                   out_dir: Path, results: Dict[str, object], *, write: bool = True) -> SweepStopped:
    """Record the error in results.json (when ``write``: rank 0 of a context-parallel run) and return the exception
    that stops the sweep."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["errors"].append({"task": task, "length": length, "depth": depth,
                              "error": f"out of memory: {error}".splitlines()[0]})
    if write:
        write_json(out_dir / "results.json", results)
    return SweepStopped(
        f"out of memory at length {length} ({task}, depth {depth:g}); the results of the cells before it "
        f"are in {out_dir / 'results.json'}; rerun without this length, or with --resume on a larger device",
        results,
    )

