"""README's examples, run as a CPU user runs them: a fresh process without TRITON_INTERPRET (drope's PyTorch CPU
kernels), every self-contained ```python block of README.md as written. A block's shapes in ``# torch.Size(...)``
comments must be what it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# blocks that are not whole programs, by a line they hold: why, and where they are tested instead
FRAGMENTS = {
    "with dh.context_parallel(model, group) as cp:": "a fragment (model, group, ids from the text around it); "
                                                     "tests/test_hf_context_parallel.py runs the route",
}
TORCHRUN = "dist.init_process_group("  # a script for torchrun: test_context_parallel_example below

RUNNER = """
import contextlib, io, json, sys
blocks = json.load(open(sys.argv[1]))
printed = []
for name, code in blocks:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    printed.append(buf.getvalue())
json.dump(printed, open(sys.argv[2], "w"))
"""


def blocks():
    text = README.read_text()
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        yield f"README.md:{text[:m.start()].count(chr(10)) + 2}", m.group(1)


def cpu_user_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])
    return env


def test_every_block_is_run_or_named():
    """A new README block is run below unless it is listed here with the reason (so none goes untested)."""
    found = [code for _, code in blocks()]
    assert len(found) >= 10
    for marker in [*FRAGMENTS, TORCHRUN]:
        assert sum(marker in code for code in found) == 1, marker


@pytest.mark.timeout(900)
def test_examples_run_on_the_cpu_kernels(tmp_path):
    todo = [(name, code) for name, code in blocks()
            if TORCHRUN not in code and not any(f in code for f in FRAGMENTS)]
    (tmp_path / "blocks.json").write_text(json.dumps(todo))
    (tmp_path / "runner.py").write_text(RUNNER)
    r = subprocess.run([sys.executable, "runner.py", "blocks.json", "printed.json"], cwd=tmp_path, env=cpu_user_env(),
                       capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, r.stderr[-4000:]
    printed = json.loads((tmp_path / "printed.json").read_text())
    for (name, code), out in zip(todo, printed, strict=True):
        for comment in re.findall(r"#\s*(torch\.Size\(.*)$", code, re.M):
            for size in re.findall(r"torch\.Size\(\[[\d, ]*\]\)", comment):
                assert size in out, f"{name}: {size} not printed; printed {out!r}"


@pytest.mark.timeout(600)
def test_context_parallel_example(tmp_path):
    """The torchrun script of README's context-parallel section, on gloo with two processes."""
    code = next(code for _, code in blocks() if TORCHRUN in code)
    (tmp_path / "cp_example.py").write_text(code)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "cp_example.py"], cwd=tmp_path, env=cpu_user_env(), capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stderr[-4000:]
    m = re.search(r"prefill (\S+), decode (\S+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-5, m.group(0)
