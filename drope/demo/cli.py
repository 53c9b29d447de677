"""``drope demo``: RoPE (plain, PI, NTK, YaRN) vs NoPE vs DroPE on NIAH beyond the training length.

By default it loads the mini models shipped inside the package (``drope/demo/checkpoints``, trained
by ``drope train-mini``) and runs the four NIAH tasks of :mod:`drope.niah` at 1x, 2x, 4x and 8x the
training length for six models:

- ``rope``: the RoPE model as trained;
- ``rope-pi`` / ``rope-ntk`` / ``rope-yarn``: the same weights with transformers' ``rope_parameters``
  ``linear`` / ``dynamic`` / ``yarn`` at the factor of each length (through ``drope.niah``);
- ``nope``: trained from scratch without positional encoding;
- ``drope``: the RoPE run with its last steps recalibrated without RoPE and with QK-norm; the fitted
  softmax temperature is stored in its config.

Everything goes through :func:`drope.niah.run` (prompts, greedy decoding, scoring); this module only
chooses the grid, aggregates, prints and plots. Beside accuracy it measures each model's perplexity
on held-out NIAH documents of every length (:func:`held_out_perplexity`), which shows how each
positional scheme degrades past the training length even where no model retrieves. On CUDA the
attention is ``drope_triton``; on CPU it is ``sdpa`` (the same math as ``drope.reference``), so the
demo never runs Triton's interpreter.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MODELS = ("rope", "rope-pi", "rope-ntk", "rope-yarn", "nope", "drope")
CHECKPOINTS = ("rope", "nope", "drope")
SCALINGS = {"rope-pi": "linear", "rope-ntk": "dynamic", "rope-yarn": "yarn"}
DEFAULT_FACTORS = (1, 2, 4, 8)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# numbers (copied token by token, the paper's) beside single-token words (found, not copied)
DEFAULT_VALUE_TYPES = ("number", "word")


def checkpoint_path(name: str) -> Path:
    """Directory of a shipped checkpoint (``rope``, ``nope`` or ``drope``) inside the installed package.

    Raises:
        ValueError: an unknown name, or a package installed without its checkpoints.
    """
    if name not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {name!r}")
    path = Path(str(resources.files("drope.demo") / "checkpoints" / name))
    if not (path / "config.json").is_file():
        raise ValueError(f"the shipped checkpoint {name!r} is missing at {path}; reinstall drope with its package data "
                         "or train it with `drope train-mini --out DIR` and pass --model DIR")
    return path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _has_rope(path: Path) -> bool:
    cfg = json.loads((path / "config.json").read_text())
    if str(cfg.get("model_type", "")).endswith("_drope"):
        return False
    params = cfg.get("rope_parameters") or {}
    return "rope_theta" in params or "rope_theta" in cfg


def _train_length(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    temp = cfg.get("drope_temperature") or {}
    n = temp.get("train_length") or cfg.get("max_position_embeddings")
    if not n:
        raise ValueError(f"--model {path}: its config names no training length (max_position_embeddings); "
                         "pass --train-length")
    return int(n)


def resolve_models(paths: Sequence[str]) -> List[Tuple[str, Path, Optional[str]]]:
    """``(label, directory, rope_scaling_type)`` for each model run of the comparison.

    With no paths: the six shipped models. Otherwise each path is a model directory or a directory of
    model directories; a RoPE model also yields its PI / NTK / YaRN runs, a NoPE/DroPE model one run.

    Raises:
        ValueError: a path that is neither, or duplicate labels.
    """
    if not paths:
        out = []
        for label in MODELS:
            base = label.split("-")[0]
            out.append((label, checkpoint_path(base), SCALINGS.get(label)))
        return out
    dirs: List[Path] = []
    for p in paths:
        p = Path(p)
        if _is_model_dir(p):
            dirs.append(p)
        elif p.is_dir() and any(_is_model_dir(c) for c in p.iterdir()):
            dirs += sorted(c for c in p.iterdir() if _is_model_dir(c))
        else:
            raise ValueError(f"--model: {p} is neither a model directory (config.json) nor a directory of them")
    out = []
    for d in dirs:
        name = d.name or str(d)
        out.append((name, d, None))
        if _has_rope(d):
            out += [(f"{name}-{suffix.split('-')[1]}", d, kind) for suffix, kind in SCALINGS.items()]
    labels = [o[0] for o in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--model: several models are named {', '.join(dup)}; give directories with distinct names")
    return out


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def held_out_perplexity(model, tokenizer, length: int, windows: int = 4, seed: int = 0, chunk: int = 2048) -> float:
    """Perplexity of ``model`` on ``windows`` held-out NIAH documents of exactly ``length`` tokens.

    The documents are :func:`drope.demo.corpus.niah_stream`'s ``"eval"`` split (haystack, needles,
    question and answer; disjoint from training and from the temperature fit), scored on every next
    token. Logits are formed ``chunk`` positions at a time from the last hidden state, so a large
    vocabulary at a long length does not need an (L x vocab) buffer.
    """
    import torch

    from .corpus import niah_stream

    ids = niah_stream(tokenizer, length, windows, seed=seed, split="eval")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            row = row[None].to(device)
            hidden = model.base_model(input_ids=row, use_cache=False).last_hidden_state
            for a in range(0, length - 1, chunk):
                b = min(a + chunk, length - 1)
                logits = head(hidden[:, a:b]).float()
                total += float(torch.nn.functional.cross_entropy(logits[0], row[0, a + 1:b + 1], reduction="sum"))
                count += b - a
    return math.exp(total / count)


def plot_perplexity(rows: Sequence[Dict[str, object]], path: Path) -> Path:
    """Held-out perplexity (log scale, labelled ticks) against the multiple of the training length,
    one line per model; equal values stay visible (offsets and markers of :func:`drope.niah.series_style`)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    from .. import niah

    plt = niah.pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0), layout="constrained")
    models = list(dict.fromkeys(r["model"] for r in rows))
    factors = sorted({r["factor"] for r in rows})
    niah.log2_length_axis(ax, factors, lambda f: f"{f}x")
    for i, model in enumerate(models):
        st = niah.series_style(i, len(models))
        pts = sorted((r["factor"], r["perplexity"]) for r in rows if r["model"] == model)
        ax.plot([f * st["dx"] for f, _ in pts], [p for _, p in pts], marker=st["marker"], color=st["color"],
                label=model, linewidth=st["linewidth"], markersize=st["markersize"], zorder=st["zorder"])
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    # 1-2-5 ticks, each labelled: a log axis over one or two decades otherwise shows a single label
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    line, text = niah.mark_train_length(ax, 1, lambda f: f"{f}x")
    ax.set_xlabel("context length / training length")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + [line], labels + [text], fontsize=8, loc="upper left")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(out: Path, *, models: Sequence[str] = (), factors: Sequence[int] = DEFAULT_FACTORS,
             tasks: Optional[Sequence[str]] = None, depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 1,
             train_length: Optional[int] = None, attn: str = "auto", device: str = "auto", seed: int = 0,
             ppl_windows: int = 4, value_types: Sequence[str] = DEFAULT_VALUE_TYPES, log=print) -> Dict[str, object]:
    """Run the comparison and write ``out/results.json``, ``out/accuracy_vs_factor.png`` and (with
    ``ppl_windows``) ``out/perplexity_vs_factor.png``.

    Args:
        out: output directory; per-model NIAH runs go to ``out/runs/<model>-x<factor>`` or ``out/runs/<model>``.
        models: model directories (see :func:`resolve_models`); empty = the shipped models.
        factors: multiples of the training length to test (positive ints).
        tasks: NIAH tasks (default all four).
        depths: needle depths in [0, 1].
        trials: samples per (task, length, depth).
        train_length: L_train (default: from each model's config).
        attn: ``auto`` (drope_triton on CUDA, sdpa on CPU) or an implementation name.
        device: ``auto``, ``cpu``, ``cuda``.
        seed: seed of the NIAH samples.
        ppl_windows: held-out documents per length for the perplexity table (0: skip it).
        value_types: needle value types (:data:`drope.niah.VALUE_TYPES`), each a full NIAH grid: 7-digit
            numbers need the value copied token by token, single-token words only the needle found.
        log: where progress lines go.

    Returns:
        ``{"results": [{"model", "factor", "length", "task", "value_type", "accuracy"}, ...], "models": {...},
        "perplexity": [{"model", "factor", "length", "perplexity"}, ...], "config": {...}}`` as written
        to results.json; accuracy is a fraction in [0, 1] averaged over depths and trials; perplexity is
        :func:`held_out_perplexity` with the same model settings (scaling, temperature) as the NIAH runs.

    Raises:
        ValueError: bad factors, trials, depths, tasks or models; errors of :func:`drope.niah.run`.
    """
    import torch

    from .. import niah

    factors = list(factors)
    if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"factors must be positive ints (multiples of the training length), got {factors!r}")
    factors = sorted(dict.fromkeys(factors))
    tasks = list(tasks or niah.TASKS)
    value_types = list(dict.fromkeys(value_types))
    if not value_types or any(v not in niah.VALUE_TYPES for v in value_types):
        raise ValueError(f"value_types must be some of {', '.join(niah.VALUE_TYPES)}, got {value_types!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if isinstance(ppl_windows, bool) or not isinstance(ppl_windows, int) or ppl_windows < 0:
        raise ValueError(f"ppl_windows must be an int >= 0 (0 skips the perplexity table), got {ppl_windows!r}")
    if attn == "auto":
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        attn = "drope_triton" if on_cuda else "sdpa"
    runs = resolve_models(models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, object]] = []
    ppl_rows: List[Dict[str, object]] = []
    niah_runs: List[Dict[str, object]] = []
    info: Dict[str, object] = {}
    machine = niah.machine()
    t_all = time.perf_counter()
    for label, path, scaling in runs:
        L = int(train_length or _train_length(path))
        lengths = {f * L: f for f in factors}
        cfg_json = json.loads((path / "config.json").read_text())
        info[label] = {"path": str(path), "train_length": L, "rope_scaling": scaling,
                       "temperature": cfg_json.get("drope_temperature"), "model_type": cfg_json.get("model_type")}
        t0 = time.perf_counter()
        # a scaling baseline gets its own factor at each length; the others run every length at once
        groups = [([n], f"{scaling}:{f}") for n, f in lengths.items()] if scaling else [(list(lengths), None)]
        for vt in value_types:
            cells: List[Dict[str, object]] = []
            for group_lengths, rope in groups:
                name = label if rope is None else f"{label}-x{lengths[group_lengths[0]]}"
                sub = out / "runs" / (name if vt == "number" else f"{name}-{vt}")
                cfg = niah.RunConfig(model=str(path), lengths=group_lengths, tasks=tasks, depths=list(depths),
                                     trials=trials, attn=attn, rope_scaling=rope, device=device, seed=seed, warmup=0,
                                     label=label, chat_template="off", value_type=vt)
                result = niah.run(cfg, sub, overwrite=True, progress=False)
                cells += result["results"]
            for n, f in lengths.items():
                for task in tasks:
                    accs = [c["accuracy"] for c in cells if c["task"] == task and c["length"] == n]
                    rows.append({"model": label, "factor": f, "length": n, "task": task, "value_type": vt,
                                 "accuracy": _mean(accs)})
            niah_runs.append({"config": {"label": label}, "value_type": vt, "results": cells})
        if ppl_windows:
            dev = niah.resolve_device(device)
            model = None
            for n, f in lengths.items():
                if model is None or scaling:  # a scaling baseline is reloaded with the factor of each length
                    cfg = niah.RunConfig(model=str(path), lengths=[n], attn=attn, device=device,
                                         rope_scaling=f"{scaling}:{f}" if scaling else None)
                    model, tokenizer, _ = niah.load_model(cfg, dev, niah.resolve_dtype("auto", dev))
                ppl = held_out_perplexity(model, tokenizer, n, ppl_windows, seed=seed)
                ppl_rows.append({"model": label, "factor": f, "length": n, "perplexity": ppl})
            del model
        info[label]["seconds"] = round(time.perf_counter() - t0, 1)
        mean = {f: _mean([r["accuracy"] for r in rows if r["model"] == label and r["factor"] == f
                          and r["value_type"] == value_types[0]]) for f in factors}
        ppl = {r["factor"]: r["perplexity"] for r in ppl_rows if r["model"] == label}
        log(f"{label:>12}: " + "  ".join(f"{f}x {100 * a:5.1f}%" for f, a in mean.items())
            + ("   ppl " + " ".join(f"{ppl[f]:.2f}" for f in factors) if ppl else "")
            + f"   ({info[label]['seconds']:.0f} s)")
    results = {
        "results": rows, "perplexity": ppl_rows, "models": info,
        "config": {"factors": factors, "tasks": tasks, "value_types": value_types, "depths": list(depths),
                   "trials": trials, "attn": attn,
                   "ppl_windows": ppl_windows,
                   "device": device, "seed": seed, "seconds": round(time.perf_counter() - t_all, 1),
                   "machine": {"cpus": machine["cpus"], "threads": machine["threads"],
                               "loadavg_start": machine["loadavg"], "loadavg_end": niah.machine()["loadavg"]},
                   "torch": torch.__version__},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    L0 = min(v["train_length"] for v in info.values())
    for vt in value_types:
        png = "accuracy_vs_factor.png" if vt == "number" else f"accuracy_vs_factor_{vt}.png"
        niah.plot_accuracy_vs_length([r for r in niah_runs if r["value_type"] == vt], out / png, train_length=L0,
                                     length_label=lambda n: f"{n // L0}x\n{n}" if n % L0 == 0 else str(n),
                                     title_suffix=f" ({vt} values)")
    if ppl_rows:
        plot_perplexity(ppl_rows, out / "perplexity_vs_factor.png")
    return results


def format_table(results: Dict[str, object]) -> str:
    """Accuracy (%) per model and factor, per value type: the mean over tasks, then one block per task."""
    rows = results["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    factors = sorted({r["factor"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    vts = list(dict.fromkeys(r.get("value_type", "number") for r in rows))
    lines = []
    for vt in vts:
        for title, keep in [("mean over tasks", None)] + [(t, t) for t in tasks]:
            lines += _accuracy_block(rows, models, factors, f"{title} ({vt}s)", keep, vt)
    ppl = results.get("perplexity") or []
    if ppl:
        lines.append(f"{'perplexity':<14}" + "".join(f"{str(f) + 'x':>8}" for f in factors))
        for m in models:
            vals = {r["factor"]: r["perplexity"] for r in ppl if r["model"] == m}
            lines.append(f"  {m:<12}" + "".join(f"{vals[f]:8.2f}" if f in vals else f"{'-':>8}" for f in factors))
    return "\n".join(lines).rstrip()


def _accuracy_block(rows, models, factors, title: str, task: Optional[str], vt: str) -> List[str]:
    lines = [f"{title:<14}" + "".join(f"{str(f) + 'x':>8}" for f in factors)]
    for m in models:
        vals = []
        for f in factors:
            accs = [r["accuracy"] for r in rows if r["model"] == m and r["factor"] == f
                    and (task is None or r["task"] == task) and r.get("value_type", "number") == vt]
            vals.append(f"{100 * _mean(accs):7.1f}%")
        lines.append(f"  {m:<12}" + "".join(f"{v:>8}" for v in vals))
    return lines + [""]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``drope demo`` (``drope.cli`` gives the parser its defaults-showing formatter)."""
    parser.add_argument("--out", default="drope-demo", help="output directory")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="your own model directory, or a directory of them (repeatable) (default: the shipped "
                             "rope / nope / drope mini models)")
    parser.add_argument("--factors", default=",".join(map(str, DEFAULT_FACTORS)),
                        help="multiples of the training length to test")
    parser.add_argument("--tasks", default="all", help="single, multikey, multiquery, multivalue (comma list) or all")
    parser.add_argument("--value-types", default=",".join(DEFAULT_VALUE_TYPES),
                        help="needle values, comma list of number (7 digits, the paper's), word (one token), uuid")
    parser.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)),
                        help="needle depths: a count or a comma list of fractions")
    parser.add_argument("--trials", type=int, default=1, help="samples per (task, length, depth)")
    parser.add_argument("--train-length", type=int, default=None, help="L_train (default: from each model's config)")
    parser.add_argument("--attn", default="auto", help="auto (drope_triton on CUDA, sdpa on CPU), drope_triton, sdpa, eager")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the NIAH samples")
    parser.add_argument("--ppl-windows", type=int, default=4,
                        help="held-out documents per length for the perplexity table (0: skip it)")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads: N, or auto (OMP_NUM_THREADS when set, else the cores not busy now)")


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the table, write results.json and the PNG.

    Returns:
        0 on success, 2 on bad input.
    """
    from ..niah import parse_depths, parse_tasks, set_threads

    t0 = time.perf_counter()
    try:
        threads = set_threads(args.threads)
        try:
            factors = [int(x) for x in str(args.factors).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--factors must be a comma list of positive ints, got {args.factors!r}") from None
        results = run_demo(Path(args.out), models=args.model, factors=factors, tasks=parse_tasks(args.tasks),
                           depths=parse_depths(args.depths), trials=args.trials, train_length=args.train_length,
                           attn=args.attn, device=args.device, seed=args.seed, ppl_windows=args.ppl_windows,
                           value_types=[v.strip() for v in str(args.value_types).split(",") if v.strip()])
    except ValueError as e:
        print(f"drope demo: error: {e}", file=sys.stderr)
        return 2
    print()
    print("NIAH accuracy (%) and held-out perplexity vs multiple of the training length")
    print(format_table(results))
    pngs = ", ".join(str(Path(args.out) / p) for p in ("accuracy_vs_factor.png", "perplexity_vs_factor.png")
                     if (Path(args.out) / p).is_file())
    m = results["config"]["machine"]
    load = "unknown" if m["loadavg_start"] is None else f"{m['loadavg_start'][0]:.1f} at the start"
    print(f"\nwrote {Path(args.out) / 'results.json'}, {pngs} in {time.perf_counter() - t0:.0f} s "
          f"({m['cpus']} CPUs usable, {threads} torch thread{'s' * (threads > 1)}, load average {load})")
    return 0
