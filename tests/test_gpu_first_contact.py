"""The GPU first-contact command (scripts/gpu_first_contact.py), dry-run on a CPU: every smoke selection collects
exactly its tests (a renamed test must not silently empty a group), the time boxes add up to at most its budget
with the benchmarks' share above their minimum, and it writes at most 8 files."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_first_contact as fc  # noqa: E402


def test_dry_run_collects_every_selection_and_fits_the_budget():
    pytest.importorskip("pytest_timeout")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_first_contact.py"), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for g in fc.GROUPS:
        assert f"{len(g.tests)}/{len(g.tests)} tests collected" in r.stdout


def test_plan_arithmetic():
    groups = sum(g.box_s + fc.KILL_S for g in fc.GROUPS)
    assert fc.ENV_S + groups + fc.bench_budget_s() + fc.KILL_S + fc.REPORT_S <= fc.BUDGET_S <= 540
    assert fc.bench_budget_s() >= fc.MIN_BENCH_S and len(fc.FILES) <= 8
    assert all(g.test_s <= g.box_s for g in fc.GROUPS)
    names = {t.split("::")[0] for g in fc.GROUPS for t in g.tests}
    # every kernel path of the issue: forward, backward, decode, the HF layer, recalibration, compiled generate
    assert {"tests/test_attention.py", "tests/test_attention_bwd.py", "tests/test_decode.py",
            "tests/test_hf_models.py", "tests/test_recalibrate.py", "tests/test_compile.py"} <= names
    assert not any("fp32" in t for g in fc.GROUPS for t in g.tests)


def test_groups_still_run_without_pytest_timeout(monkeypatch):
    # a GPU image without the plugin must not lose every group to "unrecognized arguments: --timeout"
    g = fc.GROUPS[0]
    monkeypatch.setattr(fc, "has_pytest_timeout", lambda: True)
    assert f"--timeout={g.test_s}" in fc._pytest(g)
    monkeypatch.setattr(fc, "has_pytest_timeout", lambda: False)
    cmd = fc._pytest(g, "--collect-only")
    assert not any(a.startswith("--timeout") for a in cmd) and cmd[-1] == "--collect-only"
    assert list(g.tests) == cmd[3:3 + len(g.tests)]
