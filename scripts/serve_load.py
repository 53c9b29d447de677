"""Load test of `drope serve` on loopback: requests/s and p50 / p99 latency, for each attention and mode.

    python scripts/serve_load.py [--clients 8] [--requests 32] [--max-tokens 16] [--modes drope-cb,sdpa-cb,...]

For each mode it starts `drope serve` on the shipped mini DroPE checkpoint (CPU, drope's PyTorch CPU kernels:
TRITON_INTERPRET unset), waits for /health, sends ``--requests`` completions from ``--clients`` concurrent clients
(prompts of mixed lengths), checks every answer is a 200 with the asked number of tokens, stops the server, and
prints one table row. Modes: ``drope-cb`` / ``sdpa-cb`` (``--continuous-batching``), ``drope`` / ``sdpa`` (one
request at a time, transformers serve's default).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "drope" / "demo" / "checkpoints" / "drope"
MODES = {"drope-cb": ("drope", True), "sdpa-cb": ("sdpa", True), "drope": ("drope", False), "sdpa": ("sdpa", False)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, prompt: str, n: int):
    req = urllib.request.Request(url, data=json.dumps({"prompt": prompt, "max_tokens": n}).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        body = json.loads(r.read())
    return time.perf_counter() - t, body["usage"]["completion_tokens"]


def run(mode: str, clients: int, requests: int, max_tokens: int, threads: int) -> dict:
    attn, cb = MODES[mode]
    port = _port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "drope.cli", "serve", str(MINI), "--device", "cpu", "--port", str(port),
           "--attn-implementation", attn]
    if cb:
        cmd += ["--continuous-batching", "--", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "512"]
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{mode}: the server did not come up:\n{(Path(tmp) / 'serve.log').read_text()}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            _post(url + "/v1/completions", "warm up. ", 4)
            prompts = [f"the key is {i % 10} {(3 * i) % 10} {(7 * i) % 10}. " + "a b c " * (i % 7) for i in
                       range(requests)]
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(lambda p: _post(url + "/v1/completions", p, max_tokens), prompts))
            wall = time.perf_counter() - t
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    lat = sorted(d for d, _ in done)
    tokens = sum(n for _, n in done)
    if any(n != max_tokens for _, n in done):
        raise RuntimeError(f"{mode}: a request returned another number of tokens than {max_tokens}")
    return {"mode": mode, "requests_per_s": requests / wall, "tokens_per_s": tokens / wall,
            "p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="drope-cb,sdpa-cb,drope,sdpa")
    a = p.parse_args()
    print(f"{a.requests} requests, {a.clients} concurrent clients, {a.max_tokens} tokens each, {a.threads} threads")
    print("| mode | requests/s | tokens/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for mode in a.modes.split(","):
        r = run(mode, a.clients, a.requests, a.max_tokens, a.threads)
        print(f"| {mode} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
