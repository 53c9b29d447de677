"""Benchmark suite of drope: ``pytest benchmarks --benchmark-only`` (GPU), ``python -m benchmarks.report``.

See ``benchmarks/common.py`` for the shapes, providers, timer and the JSON record format.
"""
