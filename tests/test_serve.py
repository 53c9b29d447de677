"""`drope serve` end to end: transformers' OpenAI-compatible server started as a user starts it, on loopback, serving
the shipped mini DroPE checkpoint; a bounded number of requests, then it is stopped."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers.utils.import_utils import is_serve_available

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "drope" / "demo" / "checkpoints" / "drope"
PROMPT = "the key is 4 2 7. "
READY_S = 300  # how long the server may take to answer /health (a busy 2-core machine loads slowly)
TIMEOUT_S = 300  # any one subprocess the tests run

pytestmark = pytest.mark.skipif(not is_serve_available(), reason='needs transformers\' serving extra: '
                                                                   'pip install "transformers[serving]"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body, *, raw: bool = False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:  # a plain-text error page
            return e.code, {"detail": raw.decode(errors="replace")}


def wait_until_ready(url: str, proc: subprocess.Popen, log_path: Path, ready_s: float = READY_S) -> None:
    """Return once ``url/health`` answers 200; ``pytest.fail`` with the log's tail when ``proc`` exits first or
    ``ready_s`` seconds pass (a readiness bound for a busy machine, not a timing assertion)."""
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"drope serve exited ({proc.returncode}) before answering /health:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # not listening yet, or an error status while it loads
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"drope serve did not answer {url}/health within {ready_s:g} s:\n{_tail(log_path)}")
        time.sleep(0.5)


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:] if log_path.is_file() else "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=60)


@contextlib.contextmanager
def serving(*extra: str):
    """``drope serve`` on the mini checkpoint in a subprocess, on a free loopback port: (url, process, tmp dir). It
    runs drope's kernels (the default) as a CPU user does: the PyTorch CPU kernels, TRITON_INTERPRET unset.

    Fails (with the server's log) unless the server answers /health: the process is stopped in every case.
    """
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="drope-serve-test-")
    log_path = Path(tmp, "serve.log")
    # the checkpoint view goes here: a test can see it removed
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TMPDIR": tmp}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "drope.cli", "serve", str(MINI), "--device", "cpu", "--port",
                                 str(port), *extra], stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, proc, log_path)
            yield url, proc, tmp
        finally:
            _stop(proc)


@pytest.fixture(scope="module")
def server():
    with serving() as running:
        yield running


def _greedy(n: int):
    import drope  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINI)
    model = AutoModelForCausalLM.from_pretrained(MINI).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1], out.shape[1] - ids.shape[1]


def test_completion_equals_eager_greedy(server):
    url, _, _ = server
    status, body = _post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
    assert status == 200, body
    want, n_prompt, n_new = _greedy(12)
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == n_new
    assert body["choices"][0]["text"] == want


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(server):
    url, proc, _ = server
    status, body = _post(url + "/v1/completions", b"{not json", raw=True)
    assert status == 422 and "JSON" in json.dumps(body)
    status, body = _post(url + "/v1/completions", {"prompt": 5, "max_tokens": 3})
    assert status == 400 and "prompt must be a string" in body["detail"]
    status, body = _post(url + "/v1/completions", {"model": "some-other-model", "prompt": PROMPT, "max_tokens": 3})
    # 5.2x's server is pinned to its model; 5.17's tries to load the other one and fails (an error either way)
    assert status >= 400 and ("pinned" in body["detail"] or status >= 500)
    assert proc.poll() is None
    status, body = _post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    from drope.serve_cli import expose_for_old_loader

    if expose_for_old_loader(str(MINI)):
        return  # transformers serve 5.17 answers /v1/models for a local checkpoint with its own 500
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        models = json.loads(r.read())["data"]
    assert len(models) == 1 and models[0]["id"].endswith("drope")


def test_stopping_removes_the_checkpoint_view():
    with serving() as (url, proc, tmp):
        views = [p for p in Path(tmp).iterdir() if p.name.startswith("drope-serve-")]
        assert len(views) == 1 and (views[0] / "drope" / "config.json").is_file()
        from drope.serve_cli import expose_for_old_loader

        # transformers serve before 5.2x needs the checkpoint's architectures (the class exposed to its loader)
        kept = expose_for_old_loader(str(MINI))
        assert ("architectures" in json.loads((views[0] / "drope" / "config.json").read_text())) == kept
        proc.terminate()
        proc.wait(timeout=60)
        assert not views[0].exists()


@pytest.mark.parametrize("code,ready_s,why", [
    ("import sys; print('bad weights', flush=True); sys.exit(3)", 60, "exited \\(3\\) before answering"),
    ("import time; print('loading', flush=True); time.sleep(120)", 3, "did not answer .* within 3 s"),
], ids=["exits", "never-answers"])
def test_readiness_fails_fast_with_the_log(tmp_path, code, ready_s, why):
    """A server that exits, or never answers /health, fails the fixture with its log: never a yield, never a hang."""
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not log_path.read_text() and time.monotonic() < deadline:  # the child has started
                time.sleep(0.1)
            with pytest.raises(pytest.fail.Exception, match=why) as failed:
                wait_until_ready(f"http://127.0.0.1:{_free_port()}", proc, log_path, ready_s=ready_s)
            if "sleep" in code:
                assert proc.poll() is None, "the readiness bound, not the child's exit, ended the wait"
        finally:
            _stop(proc)
    assert log_path.read_text().strip() in str(failed.value)


def test_bad_arguments_are_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "drope.cli", "serve", str(tmp_path)], capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 2 and "local checkpoint directory with a config.json" in r.stderr
    r = subprocess.run([sys.executable, "-m", "drope.cli", "serve", str(MINI), "--attn-implementation", "bogus"],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 2 and "invalid choice: 'bogus'" in r.stderr


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", '{"hidden_size": 8}'],
                         ids=["invalid-json", "a-list", "empty", "no-model_type"])
def test_unreadable_config_is_a_usage_error(tmp_path, capsys, content):
    from drope.cli import main

    (tmp_path / "config.json").write_text(content)
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "drope serve:" in err and "config.json" in err and "Traceback" not in err


def test_checkpoint_view_of_the_current_directory(tmp_path, monkeypatch):
    """`drope serve .` inside a checkpoint: the view is named after the folder, not '.' (was a FileExistsError)."""
    from drope.serve_cli import checkpoint_view

    ckpt = tmp_path / "my-model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama_drope", "architectures": ["X"]}))
    (ckpt / "weights.bin").write_text("w")
    monkeypatch.chdir(ckpt)
    root = tmp_path / "views"
    root.mkdir()
    view = Path(checkpoint_view(".", str(root)))
    assert view.name == "my-model" and (view / "weights.bin").resolve() == (ckpt / "weights.bin").resolve()
    assert "architectures" not in json.loads((view / "config.json").read_text())


CB_FLAGS = ("--continuous-batching", "--", "--cb-num-blocks", "16", "--cb-max-batch-tokens", "128")


def _greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_continuous_batching_burst_of_concurrent_clients():
    """`drope serve --continuous-batching` (drope's kernels): 8 clients at once, each completion equal to greedy
    generate alone; a malformed request in the burst gets a clear error while the others complete; then a clean
    stop."""
    import concurrent.futures

    import drope  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINI)
    model = AutoModelForCausalLM.from_pretrained(MINI).eval()
    prompts = [f"the key is {i} {i + 3} {2 * i}. " + "x " * (3 * i) for i in range(8)]
    lengths = [4 + (i % 3) * 3 for i in range(8)]
    want = [_greedy_text(model, tok, p, n) for p, n in zip(prompts, lengths)]
    with serving(*CB_FLAGS) as (url, proc, _):
        with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
            futures = [pool.submit(_post, url + "/v1/completions", {"prompt": p, "max_tokens": n})
                       for p, n in zip(prompts, lengths)]
            bad = pool.submit(_post, url + "/v1/completions", {"prompt": 5, "max_tokens": 3})
            done = [f.result(timeout=TIMEOUT_S) for f in futures]
            status, body = bad.result(timeout=TIMEOUT_S)
        assert status == 400 and "prompt must be a string" in body["detail"]
        for i, (code, body) in enumerate(done):
            assert code == 200, body
            assert body["choices"][0]["text"] == want[i], f"request {i}"
        assert proc.poll() is None
    assert proc.returncode is not None
