"""``scripts/context_parallel_bench.py`` under torchrun on the CPU: two gloo ranks, the kernels in Triton's
interpreter, tiny shapes (``--dry-run``); the ranks' results agree with one device's kernels (its ``--check``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_dry_run(tmp_path):
    out = tmp_path / "cp.json"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "context_parallel_bench.py"), "--dry-run", "--timeout", "60", "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 150 s: {(e.stdout or '')[-2000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert set(report["ops"]) == {"prefill_fwd", "prefill_fwd_bwd", "decode"}
    assert all(len(op["rank_ms"]) == 2 for op in report["ops"].values())
    assert report["checks"]["prefill_rel_err"] < 1e-4 and report["checks"]["decode_rel_err"] < 1e-4
    assert report["collective_bytes_per_layer"]["gathered_kv_buffer"] == 2 * 1 * 1 * 64 * 16 * 4


def test_simulation_summary_and_report_table():
    """The cp rows of a record (as benchmarks/test_context_parallel.py writes them) and their table in the report."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import cases, records, report
    from benchmarks.context_parallel import summary

    stats = summary([[10.0, 11.0, 12.0], [20.0, 19.0, 21.0]], single_ms=30.0)
    assert stats["rank_ms"] == [11.0, 20.0] and stats["step_ms"] == [20.0, 19.0, 21.0]
    assert stats["balance"] == pytest.approx(20 / 15.5) and stats["efficiency"] == pytest.approx(30 / 40)
    pre, dec = cases.cp_prefill_cases()[0], cases.cp_decode_cases()[0]
    rows = [records.result_entry(pre, "headtail-W2", stats["step_ms"], peak_mem_mb=12.0, W=2, layout="headtail",
                                 balance=stats["balance"], tiles_balance=1.0, efficiency=stats["efficiency"],
                                 tflops_per_gpu=123.4, gathered_kv_mb=64.0),
            records.result_entry(dec, "sharded-W2", [0.5, 0.6], peak_mem_mb=None, W=2, merge_ms=0.01,
                                 efficiency=0.9)]
    flops = cases.attention_flops(1, 8, pre.S, pre.S, 128, causal=True)
    assert rows[0]["tflops"] == pytest.approx(flops / 20e-3 / 1e12)
    assert rows[1]["gbps"] is not None and rows[1]["tokens_per_s"] == pytest.approx(1 / 0.55e-3)
    record = {"device": "synthetic", "torch": "x", "triton": "x", "git_sha": "x", "synthetic": True,
              "ceilings": {"copy_gbps": 1.0, "matmul_tflops": 1.0}, "results": rows, "skipped": [], "failed": []}
    records.validate_record(record)
    text = report.render_markdown(record)
    assert "## cp_prefill" in text and "## cp_decode" in text
    assert "1.290 / 1.000" in text and "123.4" in text and "0.0100" in text
