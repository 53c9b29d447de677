"""The compile inspector's recording (``drope.inspect.recording``) intercepts launches from outside the kernels:
it swaps the ``launch`` name of each kernel module for the duration of its block and restores it after, so a
normal launch runs ``kernel[grid](**args)`` and nothing of the inspector."""

import importlib
import sys

import pytest
import torch

from drope.inspect import Launch, recording
from drope.kernels import attention, toolkit

fwd = importlib.import_module("drope.kernels.attention")  # the module; drope.kernels.attention is the function


def _launch_names() -> dict:
    return {name: vars(m)["launch"] for name, m in sys.modules.items()
            if name.startswith("drope.kernels.") and m is not None and "launch" in vars(m)}


def _meta_call(**kw):
    q = torch.empty(1, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(1, 2, 64, 64, device="meta", dtype=torch.bfloat16)
    return attention(q, kv, kv, **kw)


def test_launch_is_swapped_inside_the_block_only():
    plain = _launch_names()
    assert set(plain.values()) == {toolkit.launch} and len(plain) >= 6, plain
    assert not toolkit.RECORDING
    with recording() as outer:
        assert toolkit.RECORDING and toolkit.launch is not plain["drope.kernels.toolkit"]
        with recording() as inner:
            _meta_call()
        _meta_call(q_norm_weight=torch.empty(64, device="meta", dtype=torch.bfloat16))
        assert toolkit.RECORDING
    assert _launch_names() == plain and not toolkit.RECORDING
    assert [launch.name for launch in inner] == ["_attn_fwd_kernel"]
    assert [(launch.name, launch.role) for launch in outer] == [("_qk_prologue_kernel", "prologue"),
                                                                ("_attn_fwd_kernel", "attention")]
    with pytest.raises(RuntimeError, match="meta"):  # outside the block meta tensors are refused again
        _meta_call()


def test_an_error_inside_the_block_restores_the_launch_name():
    plain = _launch_names()
    with pytest.raises(ZeroDivisionError), recording():
        1 / 0
    assert _launch_names() == plain and not toolkit.RECORDING


def test_candidates_are_the_kernels_own_pruning():
    with recording() as launches:
        _meta_call()
    (launch,) = launches
    want = [c for c in fwd._CONFIGS if fwd._keep(c, launch.args)]
    assert want and launch.configs == want and len(want) < len(fwd._CONFIGS)
    fixed = Launch(fwd._attn_fwd_kernel, (1,), {})
    assert fixed.configs == [] and fixed.role == "attention"


def test_a_kernel_without_a_role_is_refused():
    def _new_kernel():
        pass

    with pytest.raises(KeyError, match="_new_kernel"):
        Launch(_new_kernel, (1,), {}).role
