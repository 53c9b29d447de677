"""pytest glue of the benchmark suite: options, selection, the session record and the timed run of a case.

``pytest benchmarks --benchmark-only [--quick]``. Selection: ``--quick`` (or ``DROPE_BENCH_QUICK=1``)
keeps the cases marked quick; ``DROPE_BENCH_OPS`` / ``DROPE_BENCH_PROVIDERS`` (comma lists) keep those
ops / providers; ``-k`` works on ids such as ``decode-B16-H32-Hkv8-S131072-D128-bf16-drope_triton``.
``DROPE_BENCH_BUDGET_S`` skips (with that reason) the cases left once the budget is spent, so the
session still ends normally and writes its record.
"""

import os

import torch

# Triton's interpreter must be on before any @triton.jit function is defined (CPU smoke case).
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable, Dict, Optional  # noqa: E402

import pytest  # noqa: E402

from benchmarks import cases, providers, records, timing  # noqa: E402

ENV_QUICK = "DROPE_BENCH_QUICK"
ENV_BUDGET = "DROPE_BENCH_BUDGET_S"
ENV_REP_MS = "DROPE_BENCH_REP_MS"

NO_GPU = "GPU benchmark: needs a CUDA device (no CUDA on this machine); the CPU smoke cases run instead"


def pytest_addoption(parser):
    group = parser.getgroup("drope benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="run only the quick set (a first record within a few minutes on one GPU)")
    group.addoption("--bench-rep-ms", type=float, default=None,
                    help="milliseconds of timed repetitions per case (default 100, quick 40)")


def _quick(config) -> bool:
    return bool(config.getoption("--quick") or os.environ.get(ENV_QUICK, "") not in ("", "0"))


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of the quick benchmark set (--quick)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU")
    config._drope_bench = BenchSession(config)


def pytest_collection_modifyitems(config, items):
    quick = _quick(config)
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        case, provider = params.get("case"), params.get("provider")
        ok = True
        if quick and item.get_closest_marker("quick") is None:
            ok = False
        if case is not None and not cases.selected(cases.ENV_OPS, case.op):
            ok = False
        if provider is not None and not cases.selected(cases.ENV_PROVIDERS, provider):
            ok = False
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    # every op with the other providers first, compiled FlexAttention (a compile per shape) last:
    # a run cut short by its time budget still holds complete comparisons of the rest
    order = {op: i for i, op in enumerate(("smoke",) + cases.OPS)}

    def key(pair):
        i, item = pair
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        case = params.get("case")
        op = case.op if case is not None else "smoke"
        return (params.get("provider") == "flex", order.get(op, len(order)), i)
    items[:] = [item for _, item in sorted(enumerate(keep), key=key)]
    if not HAS_CUDA:
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(pytest.mark.skip(reason=NO_GPU))


def pytest_sessionfinish(session, exitstatus):
    bench = getattr(session.config, "_drope_bench", None)
    if bench is None or bench.record is None:
        return
    path = records.write_record(bench.record)
    bench.written = path
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"drope benchmark record: {path} ({len(bench.record['results'])} results, "
                            f"{len(bench.record['skipped'])} skipped, {len(bench.record['failed'])} failed)")


@pytest.fixture(scope="session")
def bench_session(request) -> "BenchSession":
    return request.config._drope_bench


class BenchSession:
    """The run's record (created, with the ceilings, on the first GPU case) and the timed-run helper."""

    def __init__(self, config):
        self.config = config
        self.record: Optional[Dict[str, Any]] = None
        self.written = None
        self.start = time.monotonic()
        budget = os.environ.get(ENV_BUDGET, "")
        self.budget_s = float(budget) if budget else None
        rep = config.getoption("--bench-rep-ms", default=None) or os.environ.get(ENV_REP_MS)
        self.quick = _quick(config)
        self.rep_ms = float(rep) if rep else (40.0 if self.quick else 100.0)

    def _ensure_record(self) -> Dict[str, Any]:
        if self.record is None:
            ceilings = records.measure_ceilings()
            self.record = records.new_record(torch.cuda.get_device_name(), ceilings, quick=self.quick)
        return self.record

    def _note(self, kind: str, case: cases.Case, provider: str, reason: str) -> None:
        if self.record is not None:
            self.record[kind].append({"op": case.op, "provider": provider, "B": case.B, "H": case.H,
                                      "Hkv": case.Hkv, "S": case.S, "D": case.D, "dtype": case.dtype,
                                      "reason": reason})

    def skip(self, case: cases.Case, provider: str, reason: str):
        self._note("skipped", case, provider, reason)
        pytest.skip(f"{provider}: {reason}")

    def fail(self, case: cases.Case, provider: str, reason: str):
        self._note("failed", case, provider, reason)
        pytest.fail(f"{provider}: {reason}", pytrace=False)

    def check_budget(self, case: cases.Case, provider: str) -> None:
        """Skip (noting why in the record) when there is no GPU or the time budget is spent."""
        if not HAS_CUDA:
            pytest.skip(NO_GPU)
        self._ensure_record()
        if self.budget_s is not None and time.monotonic() - self.start > self.budget_s:
            self.skip(case, provider, f"time budget {ENV_BUDGET}={self.budget_s:g}s spent before this case")

    def add(self, benchmark, case: cases.Case, provider: str, times_ms, *, peak_mem_mb: Optional[float],
            **extra) -> Dict[str, Any]:
        """Append a result a test timed itself (host-timed wall time, for calls of seconds such as a whole
        ``generate``) to the record and hand its times to pytest-benchmark."""
        entry = records.result_entry(case, provider, times_ms, peak_mem_mb=peak_mem_mb,
                                     ceilings=self._ensure_record()["ceilings"], **extra)
        self.record["results"].append(entry)
        _feed_benchmark(benchmark, times_ms, None, None)
        benchmark.extra_info.update({k: v for k, v in entry.items() if isinstance(v, (int, float, str))})
        return entry

    def run(self, benchmark, case: cases.Case, provider: str,
            build: Callable[[], Dict[str, Any]], *, tol: Optional[float] = None) -> Dict[str, Any]:
        """Build, check, measure memory and time one (case, provider); append the result to the record.

        ``build()`` returns ``{"call": fn(x), "sets": [x, ...], "check": None | fn() -> rel_err,
        "extra": {...}}`` or raises ``providers.ProviderSkip``. Skips state their reason; a result that
        disagrees with the reference (relative error above ``tol``: default 2e-2, 5e-2 with gradients;
        meant to catch broken results, the tests grade precision) fails and is kept out of ``results``.
        """
        if tol is None:
            tol = 5e-2 if case.op == "prefill_fwd_bwd" else 2e-2
        self.check_budget(case, provider)
        torch.cuda.empty_cache()
        bound: Dict[str, Any] = {}
        caught: list = []
        try:
            try:
                bound = build()
                call, sets = bound["call"], bound["sets"]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = call(sets[0])
                    torch.cuda.synchronize()
                del out
            except providers.ProviderSkip as e:
                self.skip(case, provider, str(e))
            except torch.cuda.OutOfMemoryError as e:
                bound.clear()
                self.skip(case, provider, f"OOM: {str(e).splitlines()[0][:300]}")
            except Exception as e:
                first = (str(e).splitlines() or [""])[0][:300]
                if isinstance(e, NotImplementedError) or "not implemented" in first.lower():
                    self.skip(case, provider, f"not implemented: {first}")
                if isinstance(e, RuntimeError) and ("No available kernel" in first or "No viable backend" in first):
                    self.skip(case, provider, providers.sdpa_refusal(e, caught))
                self.fail(case, provider, f"raised {type(e).__name__}: {first}")
            check = bound.get("check")
            rel = None
            if check is not None:
                try:
                    rel = check()
                except torch.cuda.OutOfMemoryError:
                    rel = None  # the float32 reference did not fit next to the inputs; time unchecked
                    torch.cuda.empty_cache()
                if rel is not None and not rel <= tol:
                    self.fail(case, provider, f"wrong result: rel err {rel:.3e} > {tol:g} vs drope.reference")
            try:
                peak = timing.peak_extra_mb(call, sets[0])
                times = timing.cuda_time(call, sets, rep_ms=self.rep_ms)
            except torch.cuda.OutOfMemoryError as e:
                bound.clear()
                self.skip(case, provider, f"OOM: {str(e).splitlines()[0][:300]}")
            except Exception as e:
                self.fail(case, provider, f"raised {type(e).__name__} while timed: {str(e)[:300]}")
            extra = dict(bound.get("extra", {}))
            if case.is_decode and not case.op.startswith("model"):
                # a decode call of a few microseconds measures its host launch path; its GPU time alone, from
                # replays of a CUDA graph (decode is graph-safe), goes beside it ("ms_graph")
                try:
                    extra["ms_graph"] = statistics.median(timing.graph_time(call, sets[0]))
                except Exception as e:  # noqa: BLE001 - a provider that cannot be captured keeps its eager time
                    extra["ms_graph"] = None
                    extra["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    torch.cuda.synchronize()
            entry = records.result_entry(case, provider, times, peak_mem_mb=round(peak, 2),
                                        ceilings=self.record["ceilings"], rel_err=rel, input_sets=len(sets),
                                        **extra)
            self.record["results"].append(entry)
            _feed_benchmark(benchmark, times, call, sets)
            benchmark.extra_info.update({k: v for k, v in entry.items() if isinstance(v, (int, float, str))})
            return entry
        finally:
            bound.clear()
            torch.cuda.empty_cache()


def _feed_benchmark(benchmark, times_ms, call, sets) -> None:
    """Hand the per-repetition CUDA-event times to pytest-benchmark as its measurements.

    Uses the fixture's stats object (pytest-benchmark 4/5); if that changes, falls back to its
    pedantic mode around a synchronised call (host-timed, so slightly higher than the events).
    """
    if getattr(benchmark, "disabled", False):
        return
    if hasattr(benchmark, "_make_stats") and getattr(benchmark, "_mode", "") is None:
        benchmark._mode = "benchmark.pedantic(...) [CUDA events]"
        stats = benchmark._make_stats(1)
        for t in times_ms:
            stats.update(t / 1e3)
        return
    if call is None:  # times the test took itself: they are in the record, nothing to re-run
        return

    def synced():
        call(sets[0])
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=max(5, min(50, len(times_ms))), warmup_rounds=2)
