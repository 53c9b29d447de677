"""Benchmark suite of drope: ``pytest benchmarks --benchmark-only`` (GPU), ``python -m benchmarks.report``.

One module per job: ``cases`` (shapes, FLOP/byte counts, the benchmark temperature), ``providers``
(the kernel providers' registry, inputs, the reference check), ``models`` (the whole-model cases),
``timing`` (CUDA-event timer, L2 rotation, peak memory), ``records`` (ceilings, metrics, the JSON
record), ``conftest`` (pytest options, selection, the timed run of a case), ``report`` (tables, plots).
"""
