"""Reports of NIAH runs: CSV, a depth x length heatmap per task, accuracy vs length across runs, a table."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .tasks import TASKS

CSV_FIELDS = ("label", "task", "length", "depth", "trials", "accuracy", "partial", "prefill_ms", "prefill_tok_s",
              "decode_tok_s", "peak_mem_mb", "peak_mem_kind", "new_tokens")


def load_run(path) -> Dict[str, object]:
    """A results dict from a results.json file or the directory holding one.

    Raises:
        ValueError: no such file, or not a drope niah results file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ValueError(f"no results.json at {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or "config" not in data:
        raise ValueError(f"{path} is not a drope niah results file (needs 'config' and 'results')")
    return data


def run_label(run: Dict[str, object]) -> str:
    cfg = run.get("config", {})
    return str(cfg.get("label") or cfg.get("model") or "run")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def write_csv(run: Dict[str, object], path) -> Path:
    """One row per (task, length, depth) cell, with the run's label."""
    path = Path(path)
    label = run_label(run)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in run["results"]:
            w.writerow({"label": label, **row})
    return path


def summarize(run: Dict[str, object]) -> List[Dict[str, object]]:
    """Per (task, length): accuracy and partial averaged over depths (and trials), timings' medians."""
    groups: Dict[Tuple[str, int], List[Dict[str, object]]] = defaultdict(list)
    for row in run["results"]:
        groups[(row["task"], int(row["length"]))].append(row)

    def med(rows, key):
        xs = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    out = []
    order = {t: i for i, t in enumerate(TASKS)}
    for (task, length), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], len(order)), kv[0][0])):
        out.append({
            "task": task, "length": length, "depths": len(rows),
            "accuracy": statistics.fmean(r["accuracy"] for r in rows),
            "partial": statistics.fmean(r["partial"] for r in rows),
            "prefill_ms": med(rows, "prefill_ms"), "decode_tok_s": med(rows, "decode_tok_s"),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None), default=None),
        })
    return out


def format_table(run: Dict[str, object]) -> str:
    """A plain-text table of :func:`summarize`, one line per (task, length)."""
    head = ("task", "length", "acc %", "partial %", "prefill ms", "decode tok/s", "peak MiB")
    lines = [head]
    for s in summarize(run):
        lines.append((
            s["task"], _fmt_len(s["length"]), f"{100 * s['accuracy']:.1f}", f"{100 * s['partial']:.1f}",
            "-" if s["prefill_ms"] is None else f"{s['prefill_ms']:.1f}",
            "-" if s["decode_tok_s"] is None else f"{s['decode_tok_s']:.1f}",
            "-" if s["peak_mem_mb"] is None else f"{s['peak_mem_mb']:.0f}",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = [run_label(run)]
    for n, line in enumerate(lines):
        text.append("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    errors = run.get("errors") or []
    for e in errors:
        text.append(f"error: {e.get('task')} at {e.get('length')}: {e.get('error')}")
    return "\n".join(text)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (plots are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def series_style(i: int, n: int, octaves: float = 0.08) -> Dict[str, object]:
    """Style of line ``i`` of ``n`` on a shared log2 x axis, so that series with equal values stay visible.

    Each series gets its own marker and a small horizontal offset (``dx``, a factor to multiply x by:
    ``octaves`` of an octave per step, centred on zero); earlier series are drawn wider and lower, so
    a later series lying on top of them leaves them visible as a rim.

    Returns:
        ``{"dx", "marker", "color", "linewidth", "markersize", "zorder"}``.
    """
    return {
        "dx": 2.0 ** ((i - (n - 1) / 2) * octaves),
        "marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}",
        "linewidth": 1.2 + 1.6 * (n - 1 - i) / max(1, n - 1), "markersize": 4.5 + 3.0 * (n - 1 - i) / max(1, n - 1),
        "zorder": 2 + i,
    }


def log2_length_axis(ax, lengths: Sequence[int], fmt=None) -> None:
    """A log2 x axis over ``lengths`` (they double), one labelled tick per length, a little margin."""
    fmt = fmt or _fmt_len
    lengths = sorted(set(lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [fmt(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlim(lengths[0] / 2 ** 0.4, lengths[-1] * 2 ** 0.4)


def mark_train_length(ax, train_length: Optional[int], fmt=None):
    """A dashed vertical line at the training length, when it lies on the x axis.

    Returns:
        ``(handle, label)`` for the legend (the label says where the length is when it is off the
        axis, so the lengths keep the whole axis), or None without a training length.
    """
    if not train_length:
        return None
    fmt = fmt or _fmt_len
    text = " ".join(str(fmt(train_length)).split())
    style = dict(color="grey", linestyle="--", linewidth=1)
    lo, hi = ax.get_xlim()
    if lo <= train_length <= hi:
        line = ax.axvline(train_length, zorder=1, **style)
        return line, f"training length ({text})"
    side = "left of" if train_length < lo else "right of"
    return ax.plot([], [], **style)[0], f"training length {text}, {side} the axis"


def plot_heatmaps(run: Dict[str, object], out_dir) -> List[Path]:
    """``heatmap_<task>.png``: accuracy over depth (rows) x length (columns), one file per task."""
    plt = pyplot()
    out_dir = Path(out_dir)
    paths = []
    for task in sorted({r["task"] for r in run["results"]}):
        rows = [r for r in run["results"] if r["task"] == task]
        lengths = sorted({int(r["length"]) for r in rows})
        depths = sorted({float(r["depth"]) for r in rows})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in rows:
            grid[depths.index(float(r["depth"]))][lengths.index(int(r["length"]))] = 100 * r["accuracy"]
        # a floor on the size keeps a one-cell map, its labels and colour bar readable
        fig, ax = plt.subplots(figsize=(max(4.2, 1.6 + 0.9 * len(lengths)), max(2.8, 1.3 + 0.45 * len(depths))))
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9)
        ax.set_title(f"{task} — {run_label(run)}", fontsize=9)
        fig.colorbar(im, ax=ax, label="accuracy %")
        fig.tight_layout()
        path = out_dir / f"heatmap_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_accuracy_vs_length(runs: Sequence[Dict[str, object]], path, train_length: Optional[int] = None,
                            length_label=None, title_suffix: str = "") -> Path:
    """Accuracy (averaged over depths) against length, one panel per task, one line per run.

    Lengths are on a log2 axis spanning the lengths run; series with equal values are offset a
    little sideways and carry distinct markers (:func:`series_style`); the legend sits inside the
    figure, below the panels.

    Args:
        runs: results dicts (e.g. one per model or setting).
        path: PNG to write.
        train_length: draws a dashed vertical line at the training context length when it is on
            the axis, named in the legend (which says where it is when it is off the axis).
        length_label: formats a length for the ticks (default ``4k`` style).
        title_suffix: appended to each panel's title (e.g. the value type).

    Returns:
        ``path``.

    Raises:
        ValueError: if ``runs`` is empty or holds no results.
    """
    if not runs or not any(r["results"] for r in runs):
        raise ValueError("plot_accuracy_vs_length needs at least one run with results")
    plt = pyplot()
    order = {t: i for i, t in enumerate(TASKS)}
    tasks = sorted({row["task"] for r in runs for row in r["results"]}, key=lambda t: (order.get(t, len(order)), t))
    labels = [run_label(r) for r in runs]
    ncol = max(2, min(8, 2 * len(tasks)))
    legend_rows = -(-(len(runs) + 1) // ncol)
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.0, 3.6 * len(tasks)), 3.2 + 0.22 * legend_rows),
                             squeeze=False, sharey=True, layout="constrained")
    note = None
    for ax, task in zip(axes[0], tasks):
        lengths = sorted({int(row["length"]) for r in runs for row in r["results"] if row["task"] == task})
        log2_length_axis(ax, lengths, length_label)
        for i, (run, label) in enumerate(zip(runs, labels)):
            pts = [(s["length"], 100 * s["accuracy"]) for s in summarize(run) if s["task"] == task]
            if pts:
                st = series_style(i, len(runs))
                xs, ys = zip(*pts)
                ax.plot([x * st["dx"] for x in xs], ys, marker=st["marker"], color=st["color"], label=label,
                        linewidth=st["linewidth"], markersize=st["markersize"], zorder=st["zorder"])
        note = mark_train_length(ax, train_length, length_label) or note
        ax.set_ylim(-4, 104)
        ax.set_title(task + title_suffix)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (mean over depths)")
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if note:
        handles[note[1]] = note[0]
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside lower center",
               ncol=min(len(handles), ncol), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run: Dict[str, object], out_dir, compare: Sequence[Dict[str, object]] = ()) -> List[Path]:
    """results.csv, heatmap_<task>.png and accuracy_vs_length.png (this run plus ``compare``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_csv(run, out_dir / "results.csv")]
    if run["results"]:
        paths += plot_heatmaps(run, out_dir)
    runs = [run, *compare]
    if any(r["results"] for r in runs):
        train = run.get("config", {}).get("max_position_embeddings")
        paths.append(plot_accuracy_vs_length(runs, out_dir / "accuracy_vs_length.png", train_length=train))
    return paths
