"""``drope niah``: needle-in-a-haystack accuracy and long-context profile of a local model."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .tasks import TASKS, parse_depths, parse_lengths, parse_tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``drope niah`` (``drope.cli`` gives the parser its defaults-showing formatter)."""
    parser.add_argument("--model", help="local model directory (save_pretrained format, tokenizer beside it); "
                                        "required unless --compare alone")
    parser.add_argument("--lengths", default="4k,8k,16k,32k", help="prompt lengths in tokens: 4096, 4k, 128k (k = 1024)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)} (or all)")
    parser.add_argument("--trials", type=int, default=5, help="samples per (task, length, depth)")
    parser.add_argument("--depths", default="5", help="N evenly spread depths, or a list: 0,0.5,1 or 0%%,50%%,100%%")
    parser.add_argument("--attn", default="sdpa",
                        help="attention implementation: sdpa (the one to pick on CPU), drope_triton (fused kernels on "
                             "CUDA), eager, flash_attention_2")
    parser.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR[:ORIG]",
                        help="RoPE baseline via transformers' rope_parameters: linear (PI), dynamic (NTK), yarn, "
                             "llama3, longrope; or a .json file of rope_parameters (default: the model's own)")
    parser.add_argument("--temperature", default=None, metavar="MODE:COEF:TRAIN_LENGTH",
                        help="DroPE softmax temperature: none, length:C:L or position:C:L (default: the model's stored one)")
    parser.add_argument("--haystack", default="essay", help="essay (shipped, generated), noise (RULER) or a text file")
    parser.add_argument("--value-type", default="number", choices=("number", "word", "uuid"),
                        help="needle values (RULER's types): 7-digit numbers (the DroPE paper's), words that are one "
                             "token of the model's tokenizer, or UUIDs")
    parser.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                        help="wrap the prompt in the tokenizer's chat template (auto: when it has one)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget per request (default: 32 for single and multikey, 64 for the others)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up requests per length")
    parser.add_argument("--trace", action="store_true", help="write a torch.profiler Chrome trace of one request per (task, length)")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="memory available for KV cache + activations (default: the device's free memory)")
    parser.add_argument("--label", default=None, help="name of this run in plots and tables (default: model and settings)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                        help="other results.json files (or their directories) to plot against; alone (no --model) "
                             "it only draws the comparison into --out")
    parser.add_argument("--resume", action="store_true", help="continue DIR/results.json, skipping finished cells")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing DIR/results.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads: N, or auto (OMP_NUM_THREADS when set, else the cores not busy now)")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="shard each prompt over N ranks: run under torchrun --nproc_per_node N (gloo on CPU, "
                             "NCCL on GPUs); rank 0 writes the results, the same answers as one process")
    parser.add_argument("--out", required=True, help="output directory (required)")


def _fail(msg: str) -> int:
    print(f"drope niah: error: {msg}", file=sys.stderr)
    return 2


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"drope niah: warning: {message}", file=sys.stderr)


def _unwritable(out: Path) -> str:
    """Why ``out`` cannot take the run's files (checked before a model is loaded), or ''."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({e.strerror or e})"
    if not os.access(out, os.W_OK | os.X_OK):
        return "is not writable"
    return ""


def run(args: argparse.Namespace) -> int:
    """Run the sweep (or only the comparison) and write results.json, CSV, PNGs; print the table.

    Returns:
        0 on success, 2 on bad input, 1 when the sweep stopped early (out of memory), 130 on Ctrl-C.
    """
    from . import report
    from .profile import set_threads
    from .runner import RunConfig, context_group, resolve_device

    out = Path(args.out)
    problem = _unwritable(out)
    if problem:
        return _fail(f"--out {out}: {problem}; give a folder this process can create and write")
    try:
        compare = [report.load_run(p) for p in args.compare]
    except ValueError as e:
        return _fail(f"--compare: {e}")
    if args.model is None:
        if not compare:
            return _fail("--model is required (or give --compare RUN ... to only plot existing runs)")
        out.mkdir(parents=True, exist_ok=True)
        path = report.plot_accuracy_vs_length(compare, out / "accuracy_vs_length.png",
                                              train_length=compare[0]["config"].get("max_position_embeddings"))
        for r in compare:
            print(report.format_table(r) + "\n")
        print(f"wrote {path}")
        return 0

    try:
        cfg = RunConfig(
            model=args.model, lengths=parse_lengths(args.lengths), tasks=parse_tasks(args.tasks),
            depths=parse_depths(args.depths), trials=args.trials, attn=args.attn, rope_scaling=args.rope_scaling,
            temperature=args.temperature, haystack=args.haystack, chat_template=args.chat_template,
            value_type=args.value_type, dtype=args.dtype,
            device=args.device, max_new_tokens=args.max_new_tokens, seed=args.seed, warmup=args.warmup,
            trace=args.trace, memory_budget_mb=args.memory_budget_mb, label=args.label,
            context_parallel=args.context_parallel,
        )
        threads = set_threads(args.threads)
        created, rank, _ = context_group(cfg, resolve_device(cfg.device))
    except ValueError as e:
        return _fail(str(e))
    try:
        return _sweep(args, cfg, out, compare, threads, rank)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _sweep(args, cfg, out: Path, compare, threads: int, rank: int) -> int:
    """The sweep of :func:`run` and its report (rank 0's alone under context parallelism)."""
    from . import report
    from .runner import NIAHError, SweepStopped
    from .runner import run as run_sweep

    status = 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            print(f"drope niah: {threads} CPU thread{'s' * (threads > 1)} (--threads {args.threads})", file=sys.stderr)
            results = run_sweep(cfg, out, resume=args.resume, overwrite=args.overwrite,
                                progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print(f"drope niah: interrupted; finished cells are in {out / 'results.json'} (rerun with --resume)",
              file=sys.stderr)
        return 130
    except SweepStopped as e:
        print(f"drope niah: error: {e}", file=sys.stderr)
        results, status = e.results, 1
    except NIAHError as e:
        return _fail(str(e))
    if rank != 0:
        return status
    paths = report.write_report(results, out, compare)
    print(report.format_table(results))
    print("wrote " + ", ".join(str(p) for p in [out / "results.json", *paths]))
    return status
