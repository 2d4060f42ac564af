#!/usr/bin/env bash
# CI step: the ms_xent CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer and
# called directly (tests/sanitizers/run_kernels.py, no MindSpore) with fuzz-style inputs.
# Exits non-zero on any sanitizer report or unexpected kernel return code.
#
#   bash tests/sanitizers/run.sh            (uses .venv/bin/python, or $PYTHON)
#
# The sanitized library is cached apart from the production one, under
# $MS_XENT_SANITIZER_CACHE_DIR (default: ${XDG_CACHE_HOME:-~/.cache}/ms_xent_sanitizers).
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
CXX=${CXX:-g++}
export CXX
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}
export MS_XENT_CACHE_DIR=${MS_XENT_SANITIZER_CACHE_DIR:-$cache_root/ms_xent_sanitizers}
# float-cast-overflow is not part of GCC's -fsanitize=undefined; add it explicitly.
checks="address,undefined,float-cast-overflow"
export MS_XENT_EXTRA_CXXFLAGS="-fsanitize=$checks -fno-sanitize-recover=$checks
  -fno-omit-frame-pointer -g"

asan=$("$CXX" -print-file-name=libasan.so)
ubsan=$("$CXX" -print-file-name=libubsan.so)
if [ ! -e "$asan" ] || [ ! -e "$ubsan" ]; then
  echo "sanitizers: $CXX has no libasan.so / libubsan.so" >&2
  exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Python itself is not instrumented and leaks by design: no leak checking. Any report aborts.
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
LD_PRELOAD="$asan:$ubsan" \
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
  "$PYTHON" tests/sanitizers/run_kernels.py >"$log" 2>&1
status=$?
# The kernels report each out-of-range target and non-finite weight, and the linear kernel a
# call without its matrix-product library, on stderr (all provoked here): show the rest.
grep -vE "^ms_xent (linear_)?cross_entropy: (target|weight|the oneDNN matrix-product library is not loaded)" "$log"

if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: UndefinedBehaviorSanitizer" "$log"; then
  echo "sanitizers: report found (see above)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitizers: run_kernels.py exited with status $status" >&2
  exit "$status"
fi
echo "sanitizers: clean"
