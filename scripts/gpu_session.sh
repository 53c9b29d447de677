#!/usr/bin/env bash
# One device command for a session with a GPU: install, GPU test tier, quick benchmark record, report.
#
#   bash scripts/gpu_session.sh            # from the repository root, on the GPU machine
#
# Fits one 10-minute device command (total budget SESSION_BUDGET_S, default 540 s): the GPU tests
# are time-boxed (GPU_TESTS_TIMEOUT_S, default 180 s), the benchmarks get what is left (their cases
# past the budget are skipped with that reason, and an interrupt still writes the record).
# Everything useful lands in $OUT (at most 8 files): the record JSON, its markdown report and two
# PNG plots, and the logs. Knobs (environment): BENCH_ARGS (default "--quick"; "" for the full
# suite, which needs several commands: select with DROPE_BENCH_OPS / DROPE_BENCH_PROVIDERS / -k),
# GPU_TESTS_TIMEOUT_S=0 to leave the GPU tests out, DROPE_GIT_SHA when the tree has no .git.
# Full suite, one op per command, then one merged report here:
#   GPU_TESTS_TIMEOUT_S=0 BENCH_ARGS="" DROPE_BENCH_OPS=decode bash scripts/gpu_session.sh
#   python -m benchmarks.report benchmarks/results/<run1>.json benchmarks/results/<run2>.json ...
set -u -o pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
export DROPE_GIT_SHA=${DROPE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null)}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SESSION_BUDGET_S=${SESSION_BUDGET_S:-540}
GPU_TESTS_TIMEOUT_S=${GPU_TESTS_TIMEOUT_S:-180}
BENCH_ARGS=${BENCH_ARGS---quick}
elapsed() { echo $(( $(date +%s) - START )); }

{
  echo "== $(date -u +%FT%TZ) git ${DROPE_GIT_SHA:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
    --format=csv 2>&1 || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import transformers, pytest_benchmark; print('transformers', transformers.__version__, 'pytest-benchmark', pytest_benchmark.__version__)" || true
  $PY -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"
  echo "== install"
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . ; then
    echo "pip install failed: using PYTHONPATH=$PWD"
  fi
} > "$OUT/env_install.log" 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cat "$OUT/env_install.log"

if [ "$GPU_TESTS_TIMEOUT_S" -gt 0 ]; then
  echo "== GPU test tier (time box ${GPU_TESTS_TIMEOUT_S}s) at $(elapsed)s"
  timeout -s INT -k 15 "$GPU_TESTS_TIMEOUT_S" $PY -m pytest -m gpu tests -x -q -p no:cacheprovider -rs \
    > "$OUT/gpu_tests.log" 2>&1
  TESTS_RC=$?
  tail -n 25 "$OUT/gpu_tests.log"
  echo "gpu tests rc=$TESTS_RC (124: time box reached)"
else
  TESTS_RC=skipped
  echo "== GPU test tier skipped (GPU_TESTS_TIMEOUT_S=0)"
fi

LEFT=$(( SESSION_BUDGET_S - $(elapsed) - 45 ))
BUDGET=$(( LEFT - 60 ))
if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
echo "== benchmarks ($BENCH_ARGS) at $(elapsed)s: budget ${BUDGET}s, hard stop ${LEFT}s"
before=$(ls benchmarks/results/*.json 2>/dev/null | sort)
DROPE_BENCH_BUDGET_S=$BUDGET timeout -s INT -k 20 "$LEFT" $PY -m pytest benchmarks --benchmark-only $BENCH_ARGS \
  -q -p no:cacheprovider -rs --benchmark-columns=min,median,iqr,rounds --benchmark-sort=name \
  > "$OUT/bench.log" 2>&1
BENCH_RC=$?
grep -E "drope benchmark record|passed|failed|error" "$OUT/bench.log" | tail -n 5
echo "benchmarks rc=$BENCH_RC"

RECORD=$(comm -13 <(echo "$before") <(ls benchmarks/results/*.json 2>/dev/null | sort) | tail -n 1)
if [ -n "$RECORD" ]; then
  cp "$RECORD" "$OUT/"
  $PY -m benchmarks.report "$RECORD" --out "$OUT" > /dev/null 2> "$OUT/report.err" || cat "$OUT/report.err"
  rm -f "$OUT/report.err"
  echo "== record $(basename "$RECORD") at $(elapsed)s"
  $PY - "$RECORD" <<'PY'
import json, sys
rec = json.load(open(sys.argv[1]))
c = rec["ceilings"]
print(f"{rec['device']}: copy {c['copy_gbps']:.0f} GB/s, bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s; "
      f"{len(rec['results'])} results, {len(rec['skipped'])} skipped, {len(rec['failed'])} failed")
for r in rec["results"]:
    if r["provider"] in ("drope_triton", "sdpa_flash", "unfused", "sdpa"):
        rate = f"{r['tflops']:.0f} TFLOP/s" if r.get("tflops") else (f"{r['gbps']:.0f} GB/s" if r.get("gbps") else
               f"{r.get('tokens_per_s', 0):.0f} tok/s")
        print(f"{r['op']:16s} {r['provider']:13s} B{r['B']:<3d} H{r['H']:<3d} Hkv{r['Hkv']:<3d} S{r['S']:<7d} "
              f"D{r['D']:<4d} {r['ms']:9.4f} ms  {rate}")
for f in rec["failed"]:
    print("FAILED", f["op"], f["provider"], f"S{f['S']}", f["reason"][:150])
PY
else
  echo "no benchmark record was written (see bench.log)"
  tail -n 40 "$OUT/bench.log"
fi
echo "== done at $(elapsed)s; tests rc=$TESTS_RC, benchmarks rc=$BENCH_RC; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
