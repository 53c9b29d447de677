"""Host (Python) time of one attention call behind transformers, eager: "drope_triton" against
``sdpa_attention_forward``, on the CPU (runs without a GPU).

A Llama-3.2-1B-shaped layer (32 query heads, 8 KV heads, head dim 64), batch 1 (CUDA tensors where there is a GPU:
``sdpa`` then launches asynchronously and its host time is what is measured): a decode step against a
DynamicCache of 128 tokens, the same against a StaticCache of 256 slots, a left-padded decode step, and a
16-token prefill, each with and without a DroPE temperature (per-row scales), by two paths:

- ``launcher``: ``drope_triton`` runs its whole GPU Python path (the layer, the kernel adapter, the operator, the
  Triton launcher's argument building) with the launch recorded, not run (``drope.inspect.recording``; on a CPU
  machine the CPU tensors are sent to the Triton kernels as under the interpreter): what a GPU would add is
  Triton's own launcher. ``sdpa`` is transformers' ``sdpa_attention_forward`` with its (tiny) CPU compute.
- ``cpu``: both on CPU tensors, each with its compute (drope's PyTorch CPU kernels, ``drope.kernels.cpu``).

Each result's ``extra_info`` holds both medians in microseconds; the test prints the ratio.
"""

import statistics
import time
import types

import pytest
import torch

from drope.hf import attention as hfa
from drope.inspect import recording

B, HQ, HKV, D = 1, 32, 8, 64
# on a GPU machine the layer's CUDA path (launches recorded), else the kernels' path in the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULE = types.SimpleNamespace(is_causal=True, training=False, num_key_value_groups=HQ // HKV, config=None,
                               layer_idx=0)
CASES = {
    # name: (queries, key slots, cached tokens, left padding)
    "decode-dynamic": (1, 128, 127, 0),
    "decode-static": (1, 256, 127, 0),
    "decode-padded": (1, 128, 127, 9),
    "prefill": (16, 16, 0, 0),
}


def _inputs(name: str, temperature: bool):
    SQ, SK, past, pad = CASES[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, SQ, HQ, D, generator=g).transpose(1, 2).to(DEVICE)
    k, v = torch.randn(B, HKV, SK, D, generator=g).to(DEVICE), torch.randn(B, HKV, SK, D, generator=g).to(DEVICE)
    am = torch.ones(B, past + SQ, dtype=torch.long)
    am[:, :pad] = 0
    static = SK > past + SQ
    codes = hfa.drope_mask(B, q_length=SQ, kv_length=SK, q_offset=torch.tensor(past, device=DEVICE) if static
                           else past, attention_mask=am.to(DEVICE) if pad else None, device=DEVICE)
    # what transformers hands sdpa for the same call: no mask where is_causal does (no padding, every slot live),
    # else the (B, 1, Sq, Sk) boolean mask
    sd_mask = None
    if static or pad:
        live = torch.zeros(B, SK, dtype=torch.bool)
        live[:, : past + SQ] = am.bool()
        causal = torch.arange(SK)[None, :] <= (past + torch.arange(SQ))[:, None]
        sd_mask = (causal[None, None] & live[:, None, None, :]).to(DEVICE)
    rows = (1.0 + torch.rand(B, SQ, generator=g)).to(DEVICE) if temperature else None
    return q, k, v, codes, sd_mask, rows


def _paired_us(a, b, n: int = 300, rounds: int = 15):
    """Medians (us per call) of ``a`` and ``b`` and of their per-round ratio, timed in alternating rounds so a busy
    machine slows both alike."""
    for _ in range(50):
        a()
        b()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


@pytest.mark.quick
@pytest.mark.parametrize("temperature", [False, True], ids=["plain", "temperature"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["launcher", "cpu"])
def test_host_time_per_attention_call(benchmark, monkeypatch, path, name, temperature):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from drope.kernels import ops

    if path == "cpu" and DEVICE != "cpu":
        pytest.skip("the CPU kernels' path is measured on CPU tensors")
    # benchmarks/conftest.py defines the kernels under the interpreter; each path names its CPU backend
    monkeypatch.setattr(ops, "cpu_backend", lambda: "interpreter" if path == "launcher" else "torch")
    torch.set_num_threads(1)
    q, k, v, codes, sd_mask, rows = _inputs(name, temperature)
    scale = D ** -0.5

    def drope():
        return hfa.drope_attention_forward(MODULE, q, k, v, codes, scaling=scale, drope_row_scale=rows)

    def sdpa():
        # a temperature costs sdpa users one multiply of q (what DroPE's eager/sdpa path does)
        return sdpa_attention_forward(MODULE, q if rows is None else q * rows[:, None, :, None], k, v, sd_mask,
                                      scaling=scale)

    # one recording around all the timed calls: entering it swaps the kernel modules' launch (~1 ms), which is the
    # inspector's cost, not a call's
    with recording():
        drope_us, sdpa_us, ratio = _paired_us(drope, sdpa)
        benchmark.pedantic(drope, rounds=50, iterations=20, warmup_rounds=2)
    benchmark.extra_info.update({"drope_us": round(drope_us, 2), "sdpa_us": round(sdpa_us, 2),
                                 "ratio": round(ratio, 3), "shape": f"B{B}-H{HQ}-Hkv{HKV}-D{D}"})
    what = "launch recorded" if path == "launcher" else "CPU kernels"
    print(f"\n{path} {name} {'temperature' if temperature else 'plain'}: drope_triton {drope_us:.1f} us ({what}), "
          f"sdpa_attention_forward {sdpa_us:.1f} us (with its CPU compute): {ratio:.2f}x")
