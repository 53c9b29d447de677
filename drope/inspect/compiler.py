"""Compiling a recorded launch for sm_90a without a GPU: a stand-in driver, the JIT's own warmup, Triton's tools.

Each launch, and each autotune candidate, is compiled by the JIT with the same specialisation as a real
launch (``JITFunction.warmup``), against a stand-in driver whose target is ``GPUTarget("cuda", 90, 32)``
(Triton appends the "a"). The bundled ``ptxas`` and ``cuobjdump`` are found here for :mod:`.sass`.
"""

from __future__ import annotations

import contextlib
import inspect as _pyinspect
import os
import subprocess
import tempfile
import warnings
from typing import Iterator, List, Optional, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from ..kernels.toolkit import defined_interpreted as interpreter_enabled
from .record import Launch

# arch name -> compute capability; Triton names sm_90 "sm_90a" itself (wgmma, setmaxnreg)
ARCHS = {"sm_90a": 90}


def target_arch(arch: str) -> int:
    """The compute capability of ``arch``; ValueError for an arch the inspector does not compile for."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


class StandInDriver(DriverBase):
    """Triton's active driver for compiling only: a fixed CUDA target, device 0, stream 0, no CUDA calls."""

    def __init__(self, capability: int = 90):
        self.capability = capability

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the sm_90a stand-in driver compiles only; nothing can be benchmarked")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> Tuple[int, int]:
        return divmod(self.capability, 10)


@contextlib.contextmanager
def stand_in(arch: str = "sm_90a") -> Iterator[StandInDriver]:
    """Make a :class:`StandInDriver` Triton's active driver for the duration (restores the previous one)."""
    config = triton.runtime.driver
    previous = getattr(config, "_active", None)
    driver = StandInDriver(target_arch(arch))
    config.set_active(driver)
    try:
        yield driver
    finally:
        if hasattr(config, "_active"):
            config._active = previous
        else:  # older DriverConfig without the lazily created default
            config.set_active(previous)


def refuse_interpreter() -> None:
    """RuntimeError when ``TRITON_INTERPRET`` is set: the jit functions were then built for the interpreter."""
    if interpreter_enabled():
        raise RuntimeError(
            "drope.inspect compiles real kernels: TRITON_INTERPRET is set, so the jit functions were built "
            "for Triton's interpreter when drope.kernels was imported. Run it in a process without TRITON_INTERPRET "
            "(`env -u TRITON_INTERPRET python -m drope.inspect ...`).")


def jit_function(kernel):
    """(the JITFunction, heuristics to apply) behind an Autotuner / Heuristics / JITFunction."""
    heuristics = []
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        if isinstance(fn, triton.runtime.Heuristics):
            heuristics.append(fn.values)
        if not hasattr(fn, "fn"):
            raise TypeError(f"cannot compile {kernel!r}: not a triton JITFunction (is TRITON_INTERPRET set?)")
        fn = fn.fn
    return fn, heuristics


def compile_launch(launch: Launch, config: Optional[triton.Config] = None):
    """Compile one recorded launch (with ``config`` for an autotune candidate) as its real launch would.

    Needs :func:`stand_in` active. Returns Triton's ``CompiledKernel`` (from Triton's cache when warm).
    """
    refuse_interpreter()
    fn, heuristics = jit_function(launch.kernel)
    kwargs = dict(launch.args)
    if config is not None:
        if config.pre_hook is not None:
            config.pre_hook({**kwargs, **config.kwargs})
        kwargs.update(config.all_kwargs())
    for values in reversed(heuristics):
        for name, rule in values.items():
            kwargs[name] = rule(kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        return fn.warmup(grid=(1,), **kwargs)


def tool(name: str) -> str:
    """The path of Triton's bundled NVIDIA tool ``name`` (``ptxas``, ``cuobjdump``)."""
    from triton import knobs
    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            return get_ptxas(90).path
        except ImportError:
            return knobs.nvidia.ptxas.path
    return getattr(knobs.nvidia, name).path


def _ptxas_flags(metadata) -> List[str]:
    """The flags Triton's own ptxas call uses (so the re-run reproduces its registers and warnings)."""
    from triton.backends.nvidia.compiler import CUDABackend
    src = _pyinspect.getsource(CUDABackend.make_cubin)
    flags = ["-lineinfo", "-v"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if "regAllocOptLevel=2" in src:
        flags.append("--regAllocOptLevel=2")
    if getattr(metadata, "ptx_options", None):
        flags += metadata.ptx_options.split(" ")
    return flags


def run_ptxas(ptx: str, metadata, gpu_name: str) -> str:
    """``ptxas -v`` on ``ptx`` with Triton's own flags; its log (stdout and stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [tool("ptxas"), *_ptxas_flags(metadata), f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.stdout + r.stderr


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """``cuobjdump FLAGS`` on ``cubin``; its stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool("cuobjdump"), *flags, path], capture_output=True, text=True, check=True)
        return r.stdout

