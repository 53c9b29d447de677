"""Compile inspector: every kernel and autotune candidate an op launches, compiled for sm_90a without a GPU.

``python -m drope.inspect --arch sm_90a --op prefill_fwd --dtype bf16 --batch 1 --heads 32 --kv-heads 8
--seq 8192 --head-dim 128 [--rope] [--q-norm] [--k-norm] [--row-scale] [--out DIR]``
(``python -m drope.kernels.inspect``, the command DESIGN.md names, runs the same CLI.)

A tool beside the kernels, not inside them: nothing here runs on a normal launch.

- :mod:`.record`: the op is called through the public functions (``attention``, its ``.backward()``,
  ``decode_attention``) on ``meta`` tensors inside :func:`recording`, so the launches are exactly those
  a user's call makes;
- :mod:`.compiler`: each launch, and each autotune candidate that survives pruning, is compiled by the
  JIT as a real launch would be, against a stand-in sm_90a driver;
- :mod:`.sass`: registers, shared memory, spills and ptxas warnings, and the SASS census of the main loop;
- :mod:`.report`: ``DIR/manifest.json`` (schema in DESIGN.md, "Compile inspector"), the compile check
  and the summary table; :mod:`.cli` the command.

The jit functions are built when ``drope.kernels`` is imported, so Triton's interpreter must be off in
this process: ``main`` re-executes itself without ``TRITON_INTERPRET``, the library functions refuse.
"""

from .cli import main
from .compiler import ARCHS, StandInDriver, compile_launch, stand_in, tool
from .record import ROLES, Launch, Shape, record_op, recording
from .report import compile_entries, inspect_op, problems, summary_table
from .sass import SERIALISED_WGMMA, analyse, ctas_per_sm, sass_census

__all__ = ["ARCHS", "ROLES", "SERIALISED_WGMMA", "Launch", "Shape", "StandInDriver", "analyse", "compile_entries",
           "compile_launch", "ctas_per_sm", "inspect_op", "main", "problems", "record_op", "recording", "sass_census",
           "stand_in", "summary_table", "tool"]
