"""Run NIAH sweeps on a local model: the orchestration of loading, checks, greedy requests and results.

Each job has its module: :mod:`.config` (the sweep's settings, RoPE-scaling and temperature specs, errors),
:mod:`.loading` (tokenizer, model, RoPE scaling, temperature, the checks before the first request),
:mod:`.decode` (the timed greedy decode loop), :mod:`.results` (incremental, resumable ``results.json``,
``samples.jsonl``, scoring, the out-of-memory record). Their public names are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .config import (ATTN_IMPLEMENTATIONS, DTYPES, IDENTITY_DEFAULTS, IDENTITY_FIELDS, ROPE_TYPES, TEMPERATURE_MODES,
                     NIAHError, RunConfig, SlowPathWarning, SweepStopped, parse_rope_scaling, parse_temperature)
from .decode import Generation, eos_token_ids, greedy_generate, measure_cell, trace_request
from .loading import (apply_rope_scaling, available_attn_implementations, check_attention_path, check_attn,
                      check_memory, check_model_dir, check_model_settings, kernels_interpreted, load_model,
                      load_tokenizer, resolve_device, resolve_dtype)
from .results import (Scored, append_samples, cell_key, cell_row, default_label, load_results, out_of_memory,
                      resumed_rows, run_record, score_requests, write_json)
from .tasks import PromptBuilder, Sample

__all__ = [
    "ATTN_IMPLEMENTATIONS", "DTYPES", "IDENTITY_DEFAULTS", "IDENTITY_FIELDS", "ROPE_TYPES", "TEMPERATURE_MODES",
    "NIAHError", "RunConfig", "SlowPathWarning", "SweepStopped", "parse_rope_scaling", "parse_temperature",
    "Generation", "eos_token_ids", "greedy_generate", "measure_cell", "trace_request",
    "apply_rope_scaling", "available_attn_implementations", "check_attention_path", "check_attn", "check_memory",
    "check_model_dir", "check_model_settings", "kernels_interpreted", "load_model", "load_tokenizer",
    "resolve_device", "resolve_dtype",
    "Scored", "append_samples", "cell_key", "cell_row", "default_label", "load_results", "out_of_memory",
    "resumed_rows", "run_record", "score_requests", "write_json",
    "check_lengths", "sweep", "run",
]


def check_lengths(cfg: RunConfig, builder: PromptBuilder) -> None:
    """Every (task, length) of the sweep can be built, before any weight is loaded.

    Raises:
        NIAHError: a length too short for a task; a short one also suggests the ``k`` suffix.
    """
    for length in cfg.lengths:
        for task in cfg.tasks:
            try:
                builder.build(task, length, 0.0, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
            except ValueError as e:
                hint = (f"; --lengths counts tokens (k = 1024): did you mean {length}k ({length * 1024} tokens)?"
                        if length < 1024 else "")
                raise NIAHError(f"--lengths: {e}{hint}") from None



def sweep(cfg: RunConfig, model, tokenizer, builder: PromptBuilder, device: torch.device, out_dir: Path,
          results: Dict[str, object], *, progress: Optional[bool], on_request) -> None:
    """Run every cell not yet in ``results``, appending its row and rewriting results.json after each."""
    from tqdm.auto import tqdm

    done = {cell_key(r) for r in results["results"]}
    todo = [(L, t, d) for L in cfg.lengths for t in cfg.tasks for d in cfg.depths if (t, L, round(d, 6)) not in done]
    eos = eos_token_ids(model, tokenizer)
    bar = tqdm(total=len(todo) * cfg.trials, desc="niah", unit="req", disable=(not progress) if progress is not None else None)
    warmed, traced = set(), set()
    try:
        for length, task, depth in todo:
            bar.set_postfix_str(f"{task} {length} d={depth:g}")
            samples = [builder.build(task, length, depth, seed=cfg.seed, trial=i, max_new_tokens=cfg.max_new_tokens)
                       for i in range(cfg.trials)]
            trace_path = None
            try:
                gens = measure_cell(model, samples, eos, device, warmup=0 if length in warmed else cfg.warmup,
                                    on_request=on_request, bar=bar)
                warmed.add(length)
                if cfg.trace and (task, length) not in traced:
                    trace_path = trace_request(model, samples[0], eos, device, out_dir)
                    traced.add((task, length))
            except torch.OutOfMemoryError as e:
                raise out_of_memory(e, task, length, depth, device, out_dir, results) from None
            scored = score_requests(samples, gens, tokenizer)
            results["results"].append(cell_row(task, length, depth, scored, trace_path))
            append_samples(out_dir / "samples.jsonl", scored)
            write_json(out_dir / "results.json", results)
    finally:
        bar.close()


def run(cfg: RunConfig, out_dir, *, resume: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
        on_request: Optional[Callable[[Sample, Generation], None]] = None) -> Dict[str, object]:
    """Run the sweep, writing ``out_dir/results.json`` after every (task, length, depth) cell.

    Cells are run length by length (all tasks and depths at 4k before 8k), so an interrupted sweep
    keeps every shorter length; ``resume=True`` skips the cells already in results.json. Lengths are
    checked against the tokenizer before the weights load, and against the memory estimate of
    ``cfg.attn`` on the device before the first request.

    Args:
        cfg: the sweep.
        out_dir: output directory (created).
        resume: continue an existing results.json written with the same model/settings.
        overwrite: discard an existing results.json.
        progress: show a tqdm bar (None: only on a terminal).
        on_request: called after each measured request (tests use it to count or interrupt).

    Returns:
        The results dict as written: ``{"config": {...}, "results": [row, ...], "errors": [...]}``.

    Raises:
        NIAHError: bad input (see :func:`load_model`), existing results without resume/overwrite,
            resuming with different settings, lengths that cannot fit, lengths too short for a task,
            a length too long for the memory budget.
        SweepStopped: out of memory part-way; the finished cells are saved.

    Warns:
        SlowPathWarning: ``drope_triton`` in Triton's interpreter.
    """
    out_dir = Path(out_dir)
    rows = resumed_rows(cfg, out_dir, resume=resume, overwrite=overwrite)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.model)
    check_attn(cfg.attn)
    path = check_attention_path(cfg.attn, device)
    check_model_settings(cfg)
    try:
        builder = PromptBuilder(tokenizer, haystack=cfg.haystack, chat_template=cfg.chat_template,
                                value_type=cfg.value_type)
    except ValueError as e:
        raise NIAHError(str(e)) from None
    check_lengths(cfg, builder)
    model, tokenizer, rope = load_model(cfg, device, dtype, tokenizer=tokenizer)
    check_memory(cfg, model, device, dtype)

    # errors of an earlier attempt are superseded by this one (a resumed cell runs again)
    results = {"config": run_record(cfg, model, device, dtype, rope, builder, path), "results": rows, "errors": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        (out_dir / "samples.jsonl").unlink(missing_ok=True)
    write_json(out_dir / "results.json", results)
    sweep(cfg, model, tokenizer, builder, device, out_dir, results, progress=progress, on_request=on_request)
    return results
