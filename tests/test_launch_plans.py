"""The launchers' memoised plans (``toolkit.cached_plan``): a call's non-tensor launch arguments are built once per
kind of call and reused, so a plan must never be reused for a call that differs in anything the plan read (strides
most of all: same shapes, another layout). Back-to-back calls that differ in one such thing, each against the
float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from drope import kernels, reference
from drope.kernels import toolkit
from helpers import rel_err

pytestmark = pytest.mark.interpreter
# the modules (drope.kernels re-exports functions of the same names)
attention_module = importlib.import_module("drope.kernels.attention")
decode_module = importlib.import_module("drope.kernels.decode")

B, HQ, HKV, S, D = 2, 4, 2, 37, 32


def _qkv(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g).to(device) for h in (HQ, HKV, HKV)]


def _layouts(x):
    """The same values in three layouts of one shape: contiguous, (B, S, H, D) seen as (B, H, S, D) (how
    transformers hands q), and a slice of a wider buffer (another head stride)."""
    wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 11, x.shape[3], device=x.device, dtype=x.dtype)
    wide[:, :, 3:3 + x.shape[2]] = x
    return [x.contiguous(), x.transpose(1, 2).contiguous().transpose(1, 2), wide[:, :, 3:3 + x.shape[2]]]


def test_prefill_plans_follow_the_layout(device):
    q, k, v = _qkv(device)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    for round_ in range(2):  # the second round finds every plan stored
        for ql, kl, vl in zip(_layouts(q), _layouts(k), reversed(_layouts(v))):
            with torch.no_grad():
                out = kernels.attention(ql, kl, vl, causal=True)
            assert rel_err(out, ref) < 1e-5, f"round {round_}: strides {ql.stride()}, {kl.stride()}, {vl.stride()}"


def test_prefill_plans_follow_the_options(device):
    """Same tensors, options changed call to call: causal, a key mask, per-row scales, a window, a softcap."""
    q, k, v = _qkv(device, seed=1)
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[0, :5] = False
    rows = 1 + torch.rand(B, S, device=device)
    calls = [dict(causal=True), dict(causal=False), dict(causal=True, key_mask=mask),
             dict(causal=True, softmax_scale=rows), dict(causal=True, window=9), dict(causal=True, softcap=5.0),
             dict(causal=True, softmax_scale=0.3)]
    for round_ in range(2):
        for kw in calls:
            with torch.no_grad():
                out = kernels.attention(q, k, v, **kw)
            ref = reference.attention(q.double(), k.double(), v.double(),
                                      **{n: x.double() if n == "softmax_scale" and torch.is_tensor(x) else x
                                         for n, x in kw.items()})
            assert rel_err(out, ref) < 1e-5, f"round {round_}: {sorted(kw)}"


def test_decode_plans_follow_the_cache_layout(device):
    """Caches of one shape: contiguous, and a slice of a larger-capacity buffer (another head stride); splits and
    lengths vary call to call."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, HQ, 1, D, generator=g).to(device)
    k, v = (torch.randn(B, HKV, 160, D, generator=g).to(device) for _ in range(2))
    wide_k, wide_v = (torch.zeros(B, HKV, 300, D, device=device) for _ in range(2))
    wide_k[:, :, :160], wide_v[:, :, :160] = k, v
    for round_ in range(2):
        for kc, vc in ((k, v), (wide_k[:, :, :160], wide_v[:, :, :160])):
            for splits, lens in ((1, [160, 97]), (3, [5, 160]), (3, [64, 65])):
                L = torch.tensor(lens, dtype=torch.int32, device=device)
                out = kernels.decode_attention(q, kc, vc, cache_seqlens=L, num_splits=splits)
                ref = reference.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=L)
                assert rel_err(out, ref) < 1e-5, f"round {round_}: strides {kc.stride()}, {splits} splits, {lens}"


def test_plan_store_is_bounded(device, monkeypatch):
    """Past its capacity the store empties (a long-running server sees many shapes), and calls stay exact."""
    monkeypatch.setattr(toolkit, "PLAN_CAPACITY", 2)
    monkeypatch.setattr(attention_module, "_PLANS", {})
    monkeypatch.setattr(decode_module, "_PLANS", {})
    g = torch.Generator().manual_seed(3)
    for s in (9, 17, 33, 9):
        q, k, v = (torch.randn(1, 2, s, 16, generator=g).to(device) for _ in range(3))
        with torch.no_grad():
            out = kernels.attention(q, k, v, causal=True)
        assert rel_err(out, reference.attention(q.double(), k.double(), v.double(), causal=True)) < 1e-5
        out = kernels.decode_attention(q[:, :, -1:], k, v)
        ref = reference.decode_attention(q[:, :, -1:].double(), k.double(), v.double())
        assert rel_err(out, ref) < 1e-5
        assert len(attention_module._PLANS) <= 2 and len(decode_module._PLANS) <= 2
