"""The first command on a GPU machine: a smoke test of every kernel path, then the quick benchmark record.

One device command of at most BUDGET_S seconds, worst case (start-up aside): the smoke groups run one by one,
each in its own pytest process with its own time box (``timeout``) and a per-test ``--timeout``, ``--durations=0``
and no ``-x`` across groups; fp32 stays out (its exact dots compile 10-15x slower). The quick benchmark record
gets the time left. At most 8 files land in ``$OUT``: env.log, gpu_tests.log, bench.log, the record (JSON), its
report (.md) and two plots. The record's sha comes from ``DROPE_GIT_SHA`` (the GPU machine's copy has no .git).

    OUT=... DROPE_GIT_SHA=$(git rev-parse --short HEAD) python scripts/gpu_first_contact.py   # on the GPU machine
    python scripts/gpu_first_contact.py --dry-run      # on a CPU: collect every selection, check the arithmetic

The later tiers (the full GPU test matrix, fp32, the 32k HF and NIAH profiles, the full benchmarks) are separate
commands of ``scripts/gpu_session.sh``, listed in CONTRIBUTING.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 540
ENV_S = 20        # the environment probe (nvidia-smi, versions)
KILL_S = 10       # SIGINT, then SIGKILL this much later
REPORT_S = 20     # the record's report and the summary
MIN_BENCH_S = 90  # the quick record needs at least this much to hold a comparison
FILES = ("env.log", "gpu_tests.log", "bench.log", "<record>.json", "<record>.md", "<record>-prefill.png",
         "<record>-decode.png")


@dataclass(frozen=True)
class Group:
    name: str
    box_s: int      # the group's process, all tests
    test_s: int     # one test (pytest-timeout)
    tests: Tuple[str, ...]


GROUPS = (
    Group("decode", 60, 35, (
        "tests/test_decode.py::test_gpu_matrix[None-1-1-64-bf16]",
        "tests/test_decode.py::test_gpu_matrix[7-64-8-128-bf16]",
        "tests/test_decode.py::test_gpu_matrix[None-5-4-128-fp16]",
        "tests/test_decode.py::test_gpu_million_token_cache_int64_addressing",
        "tests/test_decode.py::test_gpu_zero_length_rows",
        "tests/test_decode.py::test_gpu_no_device_sync_with_max_seqlen_hint",
        "tests/test_decode.py::test_chunked_prefill_with_decode_kernel[B2-Hq16-Hkv2-S3000-chunk64-D128-bf16]",
        # serving paths last in their groups: they only take what the box has left
        "tests/test_paged.py::test_paged_decode_bf16",
        # the first visible key at every offset of a tile, page-sized tiles (the TMA path Hopper takes)
        "tests/test_tile_alignment.py::test_decode_every_tile_offset[window-page64-D64-2split-twin]",
        "tests/test_tile_alignment.py::test_decode_every_tile_offset[key-mask-page128-D256-1split-twin]",
    )),
    Group("forward", 120, 60, (
        "tests/test_attention.py::test_matches_reference_gpu[B1-Hq32-Hkv8-Sq1000-Sk1000-D128-bf16-causal-rope-norm_head]",
        "tests/test_attention.py::test_matches_reference_gpu[B2-Hq8-Hkv2-Sq63-Sk63-D64-bf16-causal-rope-norm_shared-scale_rows]",
        "tests/test_attention.py::test_matches_reference_gpu[B1-Hq4-Hkv1-Sq300-Sk300-D256-bf16-causal-rope-norm_shared]",
        "tests/test_attention.py::test_matches_reference_gpu"
        "[B1-Hq8-Hkv2-Sq777-Sk1500-D80-bf16-causal-rope-norm_head-window128-sinks]",
        "tests/test_attention.py::test_packed_documents_gpu[bf16]",
        "tests/test_attention.py::test_side_stream_and_second_device_launches",
        "tests/test_paged.py::test_gpu_paged_varlen_bf16[tiles]",
    )),
    Group("backward", 80, 60, (
        "tests/test_attention_bwd.py::test_launcher_gpu[B1-Hq8-Hkv2-Sq2048-Sk2048-D128-bf16-causal-rope-norm_head-scale_batch_rows]",
        "tests/test_attention_bwd.py::test_autograd_gpu_bf16[B2-Hq8-Hkv8-Sq1000-Sk1500-D64-bf16-full-rope]",
        "tests/test_varlen.py::test_gpu_long_documents_bf16[causal]",
    )),
    Group("hf", 90, 60, (
        "tests/test_hf_models.py::test_smollm_360m_shaped_prefill_long_context[S4096]",
        "tests/test_recalibrate.py::test_recalibrate_on_gpu_bf16_through_the_kernel",
        "tests/test_compile.py::test_static_decode_step_replays_in_a_cuda_graph",
        "tests/test_compile.py::test_static_generate_compiles_once[drope-left-padded]",
        "tests/test_compile.py::test_layer_traces_as_one_graph_without_host_reads[drope-static-decode]",
    )),
)


def bench_budget_s() -> int:
    """Seconds the benchmarks get, in the worst case (every group runs its whole box and its kill grace)."""
    return BUDGET_S - ENV_S - REPORT_S - sum(g.box_s + KILL_S for g in GROUPS) - KILL_S


def has_pytest_timeout() -> bool:
    return importlib.util.find_spec("pytest_timeout") is not None


def _pytest(group: Group, *extra: str) -> List[str]:
    # without pytest-timeout a --timeout flag would end every group at argument parsing; the group's box still holds
    per_test = [f"--timeout={group.test_s}"] if has_pytest_timeout() else []
    return [sys.executable, "-m", "pytest", *group.tests, "-q", "-p", "no:cacheprovider", "-rfEs",
            "--durations=0", *per_test, *extra]


def dry_run() -> int:
    """On a CPU: every selection collects exactly its tests, the boxes and files fit, pytest-timeout is there."""
    problems = [] if has_pytest_timeout() else ["pytest-timeout is not installed: the groups would run without "
                                                "their per-test --timeout"]
    for g in GROUPS:
        r = subprocess.run(_pytest(g, "--collect-only"), cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", r.stdout)
        got = int(m.group(1)) if m else 0
        print(f"{g.name:9s} box {g.box_s:3d}s, per test {g.test_s:3d}s: {got}/{len(g.tests)} tests collected")
        if got != len(g.tests) or r.returncode not in (0, 5):
            problems.append(f"group {g.name}: {got} of {len(g.tests)} selected tests collected\n{r.stdout[-2000:]}"
                            f"{r.stderr[-2000:]}")
        if g.test_s > g.box_s:
            problems.append(f"group {g.name}: per-test timeout {g.test_s}s above its box {g.box_s}s")
    bench = bench_budget_s()
    groups = sum(g.box_s + KILL_S for g in GROUPS)
    worst = ENV_S + groups + bench + KILL_S + REPORT_S
    print(f"worst case: env {ENV_S}s + groups {groups}s + benchmarks {bench}s (+{KILL_S}s kill) + report "
          f"{REPORT_S}s = {worst}s of {BUDGET_S}s; files in $OUT: {len(FILES)}")
    if worst > BUDGET_S:
        problems.append(f"worst case {worst}s above {BUDGET_S}s")
    if bench < MIN_BENCH_S:
        problems.append(f"the benchmarks would get {bench}s, under {MIN_BENCH_S}s")
    if len(FILES) > 8:
        problems.append(f"{len(FILES)} files for $OUT, more than 8")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


def _log(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def run(out: Path) -> int:
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1", "DROPE_GIT_SHA": os.environ.get("DROPE_GIT_SHA", "unknown")}
    probe = ("import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
             "'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', "
             "torch.cuda.get_device_name() if torch.cuda.is_available() else None)")
    with (out / "env.log").open("w") as f:
        f.write(f"git {env['DROPE_GIT_SHA']}\n")
        for cmd in (["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit",
                     "--format=csv"], [sys.executable, "-c", probe]):
            try:
                f.write(subprocess.run(cmd, capture_output=True, text=True, timeout=ENV_S // 2).stdout)
            except (OSError, subprocess.TimeoutExpired) as e:
                f.write(f"{cmd[0]}: {e}\n")
    print((out / "env.log").read_text(), end="")
    tests_log = out / "gpu_tests.log"
    tests_log.write_text("" if has_pytest_timeout() else "pytest-timeout missing: no per-test --timeout\n")
    summary = []
    for g in GROUPS:
        t0 = time.monotonic()
        cmd = ["timeout", "-s", "INT", "-k", str(KILL_S), str(g.box_s), *_pytest(g)]
        _log(tests_log, f"\n== {g.name} (box {g.box_s}s): {' '.join(cmd[5:])}\n")
        with tests_log.open("a") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        line = f"== {g.name}: rc {rc}{' (time box reached)' if rc == 124 else ''} in {time.monotonic() - t0:.0f}s"
        _log(tests_log, line + "\n")
        summary.append(line)
        print(line, flush=True)
    left = int(BUDGET_S - (time.monotonic() - start) - REPORT_S - KILL_S)
    results = ROOT / "benchmarks" / "results"
    before = set(results.glob("*.json"))
    bench_env = {**env, "DROPE_BENCH_BUDGET_S": str(max(30, left - 40))}
    cmd = ["timeout", "-s", "INT", "-k", str(KILL_S), str(max(45, left)), sys.executable, "-m", "pytest", "benchmarks",
           "--benchmark-only", "--quick", "-q", "-p", "no:cacheprovider", "-rs",
           "--benchmark-columns=min,median,iqr,rounds", "--benchmark-sort=name"]
    with (out / "bench.log").open("w") as f:
        bench_rc = subprocess.run(cmd, cwd=ROOT, env=bench_env, stdout=f, stderr=subprocess.STDOUT).returncode
    summary.append(f"== benchmarks: rc {bench_rc}, budget {left}s")
    new = sorted(set(results.glob("*.json")) - before)
    if new:
        record = new[-1]
        shutil.copy(record, out / record.name)
        subprocess.run([sys.executable, "-m", "benchmarks.report", str(record), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
        summary.append(f"== record {record.name}")
    else:
        summary.append("== no benchmark record (see bench.log)")
    print("\n".join(summary))
    tail = [ln for ln in tests_log.read_text().splitlines() if re.search(r"passed|failed|error|FAILED|^== ", ln)]
    print("\n".join(tail[-30:]))
    print(f"done in {time.monotonic() - start:.0f}s; $OUT: {' '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on a CPU: check the selections and the time arithmetic")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run()
    return run(Path(os.environ.get("OUT", ROOT / "out")))


if __name__ == "__main__":
    sys.exit(main())
