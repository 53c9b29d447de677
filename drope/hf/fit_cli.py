"""``drope fit-temperature``: fit a DroPE model's softmax temperature on local held-out data and save it.

One coefficient c (grid + golden section) or, with ``--per-head``, one per layer and query head
(HeadScale-style training of the coefficients with the model frozen); see :func:`drope.fit_temperature`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local DroPE model directory with its tokenizer")
    parser.add_argument("data", nargs="+", help="held-out data files or directories: .txt, .jsonl, .npy, .bin")
    parser.add_argument("-o", "--output-dir", default=None,
                        help="save the model with the fitted temperature here (default: only print the fit)")
    parser.add_argument("--target-length", type=int, required=True,
                        help="window length in tokens at which perplexity is minimised (> the training length)")
    parser.add_argument("--train-length", type=int, default=None,
                        help="L_train of 1 + c ln(L / L_train) (default: the model's temperature setting)")
    parser.add_argument("--mode", default="position", choices=("position", "length"),
                        help="position: per query position (cached decoding equals prefill); length: per forward")
    parser.add_argument("--per-head", action="store_true", help="one coefficient per layer and query head")
    parser.add_argument("--steps", type=int, default=200, help="--per-head: optimiser steps")
    parser.add_argument("--lr", type=float, default=0.1, help="--per-head: learning rate of the coefficients")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--max-windows", type=int, default=None, help="use at most this many windows")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--text-field", default="text", help="JSON field of .jsonl files")
    parser.add_argument("--bin-dtype", default="uint16", help="integer dtype of raw .bin token files")
    parser.add_argument("--no-progress", dest="show_progress", action="store_false", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Fit, print the result, save when asked; bad input prints one error line and returns 2."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import load_documents
    from .fit import fit_temperature

    try:
        path = Path(args.model)
        if not (path / "config.json").is_file():
            raise ValueError(f"model: {str(path)!r} is not a local model directory (no config.json)")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        docs = load_documents(args.data, tokenizer, text_field=args.text_field, bin_dtype=args.bin_dtype,
                              vocab_size=model.config.vocab_size)
        ids = torch.from_numpy(np.concatenate(docs).astype(np.int64))
        fit = fit_temperature(model, ids, target_length=args.target_length, train_length=args.train_length,
                              mode=args.mode, batch_size=args.batch_size, max_windows=args.max_windows,
                              show_progress=args.show_progress, per_head=args.per_head, steps=args.steps,
                              lr=args.lr)
    except (ValueError, OSError) as err:
        print(f"drope fit-temperature: error: {err}", file=sys.stderr)
        return 2
    if args.per_head:
        flat = [c for layer in fit.head_coefs for c in layer]
        print(f"per-head temperature ({len(fit.head_coefs)} layers x {len(fit.head_coefs[0])} heads, mode {fit.mode}, "
              f"L_train {fit.train_length}): coefficients {min(flat):.3f}..{max(flat):.3f}, perplexity at "
              f"{fit.target_length} tokens {fit.start_perplexity:.4f} -> {fit.perplexity:.4f}")
    else:
        print(f"temperature c = {fit.coef:.4f} (mode {fit.mode}, L_train {fit.train_length}): perplexity "
              f"{fit.perplexity:.4f} at {fit.target_length} tokens over {fit.tokens} predictions")
    if args.output_dir:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved to {args.output_dir} (config.drope_temperature = the fit)")
    return 0
