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
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
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
