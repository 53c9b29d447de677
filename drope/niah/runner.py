"""Run NIAH sweeps on a local model: the orchestration of loading, checks, greedy requests and results.

Each job has its module: :mod:`.config` (the sweep's settings, RoPE-scaling and temperature specs, errors),
:mod:`.loading` (tokenizer, model, RoPE scaling, temperature, the checks before the first request),
:mod:`.decode` (the timed greedy decode loop), :mod:`.results` (incremental, resumable ``results.json``,
``samples.jsonl``, scoring, the out-of-memory record). Their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

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
    "check_lengths", "context_group", "sweep", "run",
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



def context_group(cfg: RunConfig, device: torch.device) -> Tuple[bool, int, torch.device]:
    """The process group of a sweep with ``context_parallel`` > 1: torchrun's (initialised here when it is not yet:
    gloo on a CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``). One process: ``(False, 0, device)``.

    Returns:
        ``(created, rank, device)``: whether this call initialised the group, this rank, the rank's device.

    Raises:
        NIAHError: no process group and no torchrun environment, or a world size other than ``context_parallel``.
    """
    import torch.distributed as dist

    W = cfg.context_parallel
    if W == 1:
        return False, 0, device
    created = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise NIAHError(f"--context-parallel {W} runs under torchrun --nproc_per_node {W} (no process group and no "
                            "torchrun environment here)")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if dist.get_world_size() != W:
        world = dist.get_world_size()
        if created:
            dist.destroy_process_group()
        raise NIAHError(f"--context-parallel {W} needs {W} processes (torchrun --nproc_per_node {W}); the process "
                        f"group has {world}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return created, dist.get_rank(), device


def _resumed_rows(cfg: RunConfig, out_dir: Path, rank: int, *, resume: bool, overwrite: bool) -> list:
    """:func:`resumed_rows` read by rank 0 and sent to the other ranks (so that they skip the same cells, and no rank
    reads the file rank 0 is about to write); its error raised on every rank."""
    rows, error = [], None
    if rank == 0:
        try:
            rows = resumed_rows(cfg, out_dir, resume=resume, overwrite=overwrite)
        except NIAHError as e:
            error = str(e)
    if cfg.context_parallel > 1:
        import torch.distributed as dist

        box = [(rows, error)]
        dist.broadcast_object_list(box, src=0)
        rows, error = box[0]
    if error is not None:
        raise NIAHError(error)
    return rows


def sweep(cfg: RunConfig, model, tokenizer, builder: PromptBuilder, device: torch.device, out_dir: Path,
          results: Dict[str, object], *, progress: Optional[bool], on_request, context=None) -> None:
    """Run every cell not yet in ``results``, appending its row and rewriting results.json after each. Under context
    parallelism (``context``) every rank runs every request and rank 0 alone writes (and shows the bar)."""
    from tqdm.auto import tqdm

    done = {cell_key(r) for r in results["results"]}
    todo = [(L, t, d) for L in cfg.lengths for t in cfg.tasks for d in cfg.depths if (t, L, round(d, 6)) not in done]
    eos = eos_token_ids(model, tokenizer)
    writer = context is None or context.rank == 0
    hide = (not progress) if progress is not None else None
    bar = tqdm(total=len(todo) * cfg.trials, desc="niah", unit="req", disable=hide if writer else True)
    warmed, traced = set(), set()
    try:
        for length, task, depth in todo:
            bar.set_postfix_str(f"{task} {length} d={depth:g}")
            samples = [builder.build(task, length, depth, seed=cfg.seed, trial=i, max_new_tokens=cfg.max_new_tokens)
                       for i in range(cfg.trials)]
            trace_path = None
            try:
                gens = measure_cell(model, samples, eos, device, warmup=0 if length in warmed else cfg.warmup,
                                    on_request=on_request, bar=bar, context=context)
                warmed.add(length)
                if cfg.trace and (task, length) not in traced:
                    trace_path = trace_request(model, samples[0], eos, device, out_dir, context=context)
                    traced.add((task, length))
            except torch.OutOfMemoryError as e:
                raise out_of_memory(e, task, length, depth, device, out_dir, results, write=writer) from None
            scored = score_requests(samples, gens, tokenizer)
            results["results"].append(cell_row(task, length, depth, scored, trace_path))
            if writer:
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
    ``cfg.attn`` on the device before the first request. With ``cfg.context_parallel`` > 1 (under torchrun; see
    :func:`context_group`) each prompt is sharded over the ranks (``drope.hf.context_parallel``), every rank runs
    every request and gets the same tokens, and rank 0 writes the files (every rank reads ``results.json`` when
    resuming: one machine, or a shared filesystem).

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
    _, rank, device = context_group(cfg, resolve_device(cfg.device))
    rows = _resumed_rows(cfg, out_dir, rank, resume=resume, overwrite=overwrite)
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
    if cfg.context_parallel > 1:
        each = check_attention_path("drope_triton", device)["path"]
        path = dict(path, path=f"drope_cp: drope.distributed over {cfg.context_parallel} ranks ({each})")

    # errors of an earlier attempt are superseded by this one (a resumed cell runs again)
    results = {"config": run_record(cfg, model, device, dtype, rope, builder, path), "results": rows, "errors": []}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not rows:
            (out_dir / "samples.jsonl").unlink(missing_ok=True)
        write_json(out_dir / "results.json", results)
    block = contextlib.nullcontext()
    if cfg.context_parallel > 1:
        from drope.hf.parallel import context_parallel

        block = context_parallel(model)
    with block as context:
        sweep(cfg, model, tokenizer, builder, device, out_dir, results, progress=progress, on_request=on_request,
              context=context)
    return results
