#!/usr/bin/env bash
# Version skew (issue 13, item 6): run the interpreter kernel tests and the compile inspector under
# triton 3.6.0, the GPU machines' version, beside the CPU torch, in a throwaway venv outside the repo.
#
#   bash scripts/check_triton36.sh                 # numpy < 2.4 (see NUMPY below)
#   NUMPY='numpy==2.4.6' bash scripts/check_triton36.sh   # shows the interpreter failure
#   NUMPY_MATRIX='numpy==1.26.4 numpy==2.0.2 numpy==2.3.5 numpy==2.4.6' bash scripts/check_triton36.sh
#
# Env: VENV (default /tmp/venv-t36), PYTHON (python3.11+), TRITON (3.6.0), TORCH (2.13.0, the CPU wheel),
# TRANSFORMERS (5.17.0, the GPU machines'), NUMPY (a pip spec), NUMPY_MATRIX (specs to try in turn:
# a subset of the interpreter tests, TESTS_K_MATRIX, runs for each), TESTS_K (-k of the full run; empty = all).
# Prints one "numpy <version>: interpreter PASS|FAIL" line per numpy tried and exits non-zero if the
# full run (interpreter subset + inspector test) fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-/tmp/venv-t36}
PYTHON=${PYTHON:-python3}
TRITON=${TRITON:-3.6.0}
TORCH=${TORCH:-2.13.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
# triton 3.6's interpreter converts one-element arrays with int(), which numpy 2.4 turned from a
# DeprecationWarning into a TypeError ("only 0-dimensional arrays can be converted to Python scalars");
# triton 3.9 squeezes first. With triton 3.6 the interpreter needs numpy < 2.4 (compiled kernels do not care).
NUMPY=${NUMPY:-"numpy<2.4"}
# the interpreter tests of every kernel file (about a minute on 2 cores); NUMPY_MATRIX runs a subset
TESTS_K=${TESTS_K:-}
TESTS_K_MATRIX=${TESTS_K_MATRIX:-"(test_matches_reference and (Sq1-Sk1- or B2-Hq8-Hkv2-Sq63 or Smax77)) \
or test_autograd_matches_reference or test_gqa_equals_repeated_kv or test_no_visible_key_gives_zeros"}

case "$VENV" in "$ROOT"|"$ROOT"/*) echo "VENV must be outside the repository: $VENV" >&2; exit 2 ;; esac

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first (the CPU wheel: it has no triton dependency), then triton without letting it touch torch
"${PIP[@]}" "torch==$TORCH"
"${PIP[@]}" --no-deps "triton==$TRITON"
"${PIP[@]}" "transformers==$TRANSFORMERS" accelerate einops safetensors tokenizers tqdm matplotlib pytest hypothesis "$NUMPY"
# drope itself from a copy (pip builds in the source folder: keep build/ and *.egg-info out of the repo)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/drope" "$WORK/src/"
"${PIP[@]}" --no-deps "$WORK/src"

PY="$VENV/bin/python"
"$PY" - <<'EOF'
import numpy, torch, triton, transformers
print(f"triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"transformers {transformers.__version__}")
EOF

# run from a scratch folder so `import drope` is the installed copy, with the repo's tests and pytest config
mkdir "$WORK/run"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/run/"
cd "$WORK/run"

interpreter_tests() {
    # $1: a -k expression ("" = all); conftest sets TRITON_INTERPRET=1 before drope is imported (no CUDA here)
    local k=$1; shift
    "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_attention_bwd.py tests/test_decode.py \
        ${k:+-k "$k"} "$@"
}

if [ -n "${NUMPY_MATRIX:-}" ]; then
    for spec in $NUMPY_MATRIX; do
        "${PIP[@]}" "$spec"
        v=$("$PY" -c "import numpy; print(numpy.__version__)")
        if interpreter_tests "$TESTS_K_MATRIX" -x >"$WORK/np-$v.log" 2>&1; then r=PASS; else r=FAIL; fi
        echo "numpy $v: interpreter $r ($(tail -n 1 "$WORK/np-$v.log"))"
        if [ "$r" = FAIL ]; then grep -m 3 -E "InterpreterError|Error" "$WORK/np-$v.log" || true; fi
    done
    "${PIP[@]}" "$NUMPY"
fi

status=0
interpreter_tests "$TESTS_K" || status=1
"$PY" -m pytest -q -p no:cacheprovider tests/test_inspect.py || status=1
exit $status
