"""Turn a benchmark record into a markdown report and PNG plots.

``python -m benchmarks.report [record.json ...] [--out DIR]``: without a path, the newest record in
``benchmarks/results/``; several records of one device (a full suite run in several commands) are
merged into ``<first>-merged.json`` and reported together. Writes ``<record>.md``,
``<record>-prefill.png`` and ``<record>-decode.png``
next to the record (or into ``--out``) and prints the markdown.

Ratios are speedups, ``t_reference / t_provider`` (above 1: faster than the reference): against
the fastest SDPA backend of the same case and against the unfused pipeline (models: against
Hugging Face's ``sdpa`` and ``eager`` implementations).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFILL_OPS = ("prefill_fwd", "prefill_fwd_bwd")
OPS = ("prefill_fwd", "prefill_fwd_bwd", "decode", "model_prefill", "model_decode", "model_decode_compiled",
       "varlen_prefill", "paged_decode", "model_generate_batch", "cp_prefill", "cp_decode")
SERVING_OPS = ("varlen_prefill", "paged_decode")
CP_OPS = ("cp_prefill", "cp_decode")
PROVIDER_ORDER = ("drope_triton", "unfused", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex",
                  "flash_attn", "sdpa", "eager")


def newest_record(results_dir: Path = RESULTS_DIR) -> Path:
    """The record with the latest ``created_utc`` (file modification time when a record lacks it).

    Raises:
        FileNotFoundError: when the folder holds no ``*.json`` record.
    """
    paths = sorted(Path(results_dir).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no benchmark record (*.json) in {results_dir}; run `pytest benchmarks "
                                "--benchmark-only` on a GPU first, or pass a record's path")

    def key(p: Path):
        try:
            created = json.loads(p.read_text()).get("created_utc") or ""
        except (OSError, ValueError):
            created = ""
        return (created, p.stat().st_mtime)
    return max(paths, key=key)


def _case_key(r: Dict[str, Any]) -> Tuple:
    return (r["op"], r["D"], r["H"], r["Hkv"], r["B"], r["S"], r["dtype"])


def _provider_rank(p: str) -> Tuple[int, str]:
    return (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER), p)


def ratios(results: Sequence[Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    """Speedup of every result against the best SDPA backend and the unfused pipeline of its case.

    Returns:
        ``{id(result): {"best_sdpa": name|None, "vs_best_sdpa": float|None, "vs_unfused": float|None,
        "vs_eager": float|None}}``; for model ops "best SDPA" is Hugging Face's ``sdpa`` and the
        unfused reference is also ``sdpa`` (the norm and temperature run as separate ops there).
    """
    by_case: Dict[Tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_case[_case_key(r)].append(r)
    out: Dict[int, Dict[str, Any]] = {}
    for rows in by_case.values():
        model = rows[0]["op"].startswith("model_")
        sdpa = [r for r in rows if (r["provider"] == "sdpa" if model else r["provider"].startswith("sdpa_"))]
        best = min(sdpa, key=lambda r: r["ms"]) if sdpa else None
        unfused = next((r for r in rows if r["provider"] == ("sdpa" if model else "unfused")), None)
        eager = next((r for r in rows if r["provider"] == "eager"), None) if model else None
        for r in rows:
            out[id(r)] = {
                "best_sdpa": best["provider"] if best else None,
                "vs_best_sdpa": best["ms"] / r["ms"] if best else None,
                "vs_unfused": unfused["ms"] / r["ms"] if unfused else None,
                "vs_eager": eager["ms"] / r["ms"] if eager else None,
            }
    return out


def _f(v: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(record: Dict[str, Any]) -> str:
    """The markdown report of a record: environment, ceilings, one table per op, skips and failures."""
    ceil = record.get("ceilings", {})
    results = record.get("results", [])
    rat = ratios(results)
    lines = [f"# drope benchmarks: {record.get('device', '?')}", ""]
    if record.get("synthetic"):
        lines += ["> **Synthetic record** (made up for a test of the report, not measured).", ""]
    lines += [f"torch {record.get('torch', '?')}, triton {record.get('triton', '?')}, CUDA {record.get('cuda', '?')}, "
              f"git `{record.get('git_sha', '?')}`, {record.get('created_utc', '?')}"
              + (", quick set" if record.get("quick") else ""), "",
              f"Ceilings measured in the same run: copy **{_f(ceil.get('copy_gbps'), '{:.0f}')} GB/s** "
              f"(bytes read + written), bf16 matmul **{_f(ceil.get('matmul_tflops'), '{:.0f}')} TFLOP/s**.", "",
              "Times are medians of CUDA-event timed repetitions; ratios are speedups "
              "(reference time / provider time, above 1 = faster). `peak MB`: memory the call allocates "
              "on top of its inputs.", ""]
    ops = sorted({r["op"] for r in results}, key=lambda op: OPS.index(op) if op in OPS else 9)
    for op in ops:
        rows = sorted((r for r in results if r["op"] == op),
                      key=lambda r: (_case_key(r), _provider_rank(r["provider"])))
        lines += [f"## {op}", ""]
        if op in PREFILL_OPS:
            header = ["D", "H", "Hkv", "B", "S", "provider", "ms", "TFLOP/s", "% matmul", "vs best SDPA",
                      "vs unfused", "peak MB"]
            body = [[str(r["D"]), str(r["H"]), str(r["Hkv"]), str(r["B"]), str(r["S"]), r["provider"],
                     _f(r["ms"]), _f(r.get("tflops"), "{:.1f}"),
                     _f(100 * r["tflops"] / ceil["matmul_tflops"] if r.get("tflops") and ceil.get("matmul_tflops")
                        else None, "{:.0f}"),
                     _x(rat[id(r)]["vs_best_sdpa"]) + (f" ({rat[id(r)]['best_sdpa'][5:]})"
                                                       if rat[id(r)]["best_sdpa"] else ""),
                     _x(rat[id(r)]["vs_unfused"]), _f(r.get("peak_mem_mb"), "{:.0f}")] for r in rows]
        elif op == "decode":
            header = ["B", "cache", "H", "Hkv", "D", "provider", "ms", "ms (CUDA graph)", "GB/s", "% copy BW",
                      "tokens/s", "vs best SDPA", "vs unfused", "peak MB"]
            body = [[str(r["B"]), str(r["S"]), str(r["H"]), str(r["Hkv"]), str(r["D"]), r["provider"],
                     _f(r["ms"]), _f(r.get("ms_graph")), _f(r.get("gbps"), "{:.0f}"),
                     _f(100 * r["frac_copy_bw"] if r.get("frac_copy_bw") is not None else None, "{:.0f}"),
                     _f(r.get("tokens_per_s"), "{:.0f}"),
                     _x(rat[id(r)]["vs_best_sdpa"]) + (f" ({rat[id(r)]['best_sdpa'][5:]})"
                                                       if rat[id(r)]["best_sdpa"] else ""),
                     _x(rat[id(r)]["vs_unfused"]), _f(r.get("peak_mem_mb"), "{:.0f}")] for r in rows]
        elif op in SERVING_OPS:
            # against the same attention on contiguous (unpaged, batched) keys of the same case
            base = {_case_key(r): r["ms"] for r in rows if r["provider"] == "contiguous"}
            header = ["B", "S", "provider", "ms", "TFLOP/s", "GB/s", "contiguous / this", "peak MB"]
            body = [[str(r["B"]), str(r["S"]), r["provider"], _f(r["ms"]), _f(r.get("tflops"), "{:.1f}"),
                     _f(r.get("gbps"), "{:.0f}"), _x(base[_case_key(r)] / r["ms"] if _case_key(r) in base else None),
                     _f(r.get("peak_mem_mb"), "{:.0f}")] for r in rows]
        elif op in CP_OPS:
            # W ranks simulated one after the other on one GPU: the step is the busiest rank (no communication)
            header = ["B", "S", "H", "Hkv", "D", "provider", "step ms", "balance (measured / tiles)", "efficiency",
                      "TFLOP/s per GPU" if op == "cp_prefill" else "merge ms", "gathered K/V MB", "peak MB"]
            body = [[str(r["B"]), str(r["S"]), str(r["H"]), str(r["Hkv"]), str(r["D"]), r["provider"], _f(r["ms"]),
                     f"{_f(r.get('balance'), '{:.3f}')} / {_f(r.get('tiles_balance'), '{:.3f}')}",
                     _f(r.get("efficiency"), "{:.2f}"),
                     _f(r.get("tflops_per_gpu") if op == "cp_prefill" else r.get("merge_ms"), "{:.1f}"
                        if op == "cp_prefill" else "{:.4f}"),
                     _f(r.get("gathered_kv_mb"), "{:.0f}"), _f(r.get("peak_mem_mb"), "{:.0f}")] for r in rows]
        elif op == "model_generate_batch":
            # B prompts (S the longest); sdpa and paged|eager are continuous batching, the others padded generate
            header = ["prompts", "longest", "provider", "first call ms", "ms", "tokens/s", "vs sdpa",
                      "equal to greedy alone", "peak MB"]
            body = [[str(r["B"]), str(r["S"]), r["provider"], _f(r.get("first_ms"), "{:.0f}"), _f(r["ms"], "{:.0f}"),
                     _f(r.get("tokens_per_s"), "{:.0f}"), _x(rat[id(r)]["vs_unfused"]),
                     f"{r.get('agree')} / {r['B']}", _f(r.get("peak_mem_mb"), "{:.0f}")] for r in rows]
        else:
            header = ["B", "S", "provider", "ms", "tokens/s", "vs sdpa", "vs eager", "peak MB"]
            body = [[str(r["B"]), str(r["S"]), r["provider"], _f(r["ms"]), _f(r.get("tokens_per_s"), "{:.0f}"),
                     _x(rat[id(r)]["vs_unfused"]), _x(rat[id(r)]["vs_eager"]), _f(r.get("peak_mem_mb"), "{:.0f}")]
                    for r in rows]
        lines += _table(header, body) + [""]
    for kind, title in (("failed", "Failed (wrong result or error; not in the tables)"), ("skipped", "Skipped")):
        entries = record.get(kind) or []
        if not entries:
            continue
        groups: Dict[Tuple[str, str, str], List[str]] = defaultdict(list)
        for e in entries:
            groups[(e["op"], e["provider"], e["reason"])].append(
                f"B{e['B']}-H{e['H']}-Hkv{e['Hkv']}-S{e['S']}-D{e['D']}")
        lines += [f"## {title}", ""]
        lines += _table(["op", "provider", "reason", "cases"],
                        [[op, p, reason.replace("|", "/"), ", ".join(shapes[:6]) + (f" (+{len(shapes) - 6})"
                                                                                    if len(shapes) > 6 else "")]
                         for (op, p, reason), shapes in sorted(groups.items())])
        lines += [""]
    return "\n".join(lines)


def _save(fig, title: str, out_stem: Path, kind: str) -> Path:
    """Title, lay out, write ``<stem>-<kind>.png`` and close one figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out_stem.with_name(f"{out_stem.name}-{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(record: Dict[str, Any], out_stem: Path) -> List[Path]:
    """PNG plots: TFLOP/s vs S per provider (prefill) and GB/s vs cache length (decode, copy ceiling drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record.get("results", [])
    ceil = record.get("ceilings", {})
    written = []
    tag = " (SYNTHETIC)" if record.get("synthetic") else ""
    prefill = [r for r in results if r["op"] in PREFILL_OPS and r.get("tflops") is not None]
    if prefill:
        panels = sorted({(r["op"], r["D"], r["H"], r["Hkv"]) for r in prefill},
                        key=lambda p: (PREFILL_OPS.index(p[0]), p[1], p[2], p[3]))
        cols = min(4, len(panels))
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, (op, D, H, Hkv) in zip(axes.flat, panels):
            rows = [r for r in prefill if (r["op"], r["D"], r["H"], r["Hkv"]) == (op, D, H, Hkv)]
            for p in sorted({r["provider"] for r in rows}, key=_provider_rank):
                pts = sorted((r["S"], r["tflops"]) for r in rows if r["provider"] == p)
                ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o", label=p)
            if ceil.get("matmul_tflops"):
                ax.axhline(ceil["matmul_tflops"], color="k", ls="--", lw=1, label="bf16 matmul (measured)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} D{D} H{H} Hkv{Hkv}", fontsize=9)
            ax.set_xlabel("sequence length S (B*S = 16k)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        written.append(_save(fig, f"drope prefill attention, {record.get('device', '?')}{tag}", out_stem, "prefill"))
    decode = [r for r in results if r["op"] == "decode" and r.get("gbps") is not None]
    if decode:
        batches = sorted({r["B"] for r in decode})
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False)
        for ax, B in zip(axes.flat, batches):
            rows = [r for r in decode if r["B"] == B]
            for p in sorted({r["provider"] for r in rows}, key=_provider_rank):
                pts = sorted((r["S"], r["gbps"]) for r in rows if r["provider"] == p)
                ax.plot([s for s, _ in pts], [g for _, g in pts], marker="o", label=p)
            if ceil.get("copy_gbps"):
                ax.axhline(ceil["copy_gbps"], color="k", ls="--", lw=1, label="copy bandwidth (measured)")
            H, Hkv, D = rows[0]["H"], rows[0]["Hkv"], rows[0]["D"]
            ax.set_xscale("log", base=2)
            ax.set_title(f"decode B{B} H{H} Hkv{Hkv} D{D}", fontsize=9)
            ax.set_xlabel("cache length")
            ax.set_ylabel("GB/s (K+V bytes read)")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        written.append(_save(fig, f"drope decode attention, {record.get('device', '?')}{tag}", out_stem, "decode"))
    return written


def write_report(record_path: Path, out_dir: Optional[Path] = None) -> List[Path]:
    """Write ``<stem>.md`` and the PNG plots of a record into ``out_dir`` (default: beside it)."""
    record_path = Path(record_path)
    record = json.loads(record_path.read_text())
    out_dir = Path(out_dir) if out_dir else record_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / record_path.stem
    md = stem.with_suffix(".md")
    text = render_markdown(record)
    written = plot(record, stem)
    if written:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    md.write_text(text)
    return [md] + written


def merge_records(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One record from several runs on one device (a full suite split over several commands).

    Environment and ceilings come from the first record; results, skips and failures are
    concatenated (a later result of the same op, provider and shape replaces an earlier one).

    Raises:
        ValueError: when the records come from different devices.
    """
    if not records:
        raise ValueError("records must hold at least one record")
    devices = {r.get("device") for r in records}
    if len(devices) > 1:
        raise ValueError(f"records come from different devices {sorted(map(str, devices))}; compare them apart")
    merged = dict(records[0])
    merged["merged_from"] = [r.get("created_utc") for r in records]
    merged["ceilings_per_run"] = [r.get("ceilings") for r in records]
    by_key: Dict[Tuple, Dict[str, Any]] = {}
    for r in records:
        for entry in r.get("results", []):
            by_key[_case_key(entry) + (entry["provider"],)] = entry
    merged["results"] = list(by_key.values())
    for kind in ("skipped", "failed"):
        merged[kind] = [e for r in records for e in r.get(kind, [])]
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="*", type=Path,
                        help="record JSON (default: the newest in benchmarks/results); several are merged "
                             "into one report (same device)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the .md and .png (default: beside the record)")
    args = parser.parse_args(argv)
    try:
        paths = args.records or [newest_record()]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        if not path.is_file():
            print(f"error: record {path} does not exist", file=sys.stderr)
            return 2
    path = paths[0]
    if len(paths) > 1:
        try:
            merged = merge_records([json.loads(p.read_text()) for p in paths])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out_dir = args.out or path.parent
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / (path.stem + "-merged.json")
        path.write_text(json.dumps(merged, indent=1) + "\n")
    written = write_report(path, args.out)
    print(written[0].read_text())
    print("\n".join(f"wrote {p}" for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
