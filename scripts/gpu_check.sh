#!/usr/bin/env bash
# The one-command check for a machine with a CUDA GPU (make gpu-check):
#   1. build the package in place (pip install -e: the C++/CUDA extension with ninja),
#   2. print the build facts and the backends per device (python -m deltal_kernels),
#   3. run the whole test suite with CUDA present: the cuda and triton backends on the GPU, Triton
#      compiled for real (TRITON_INTERPRET unset), the bigmem and 64-bit offset cases included,
#   4. run the GPU benchmark (python -m deltal_kernels.bench --device cuda).
# Every step's log goes under bench/results/ (gpu-check-<UTC time>-*.log); the benchmark writes its
# own CSV/JSON/PNG there. All steps run even if one fails; the exit status is non-zero if any did.
#
# Environment: PY (python of the venv, default: python), MAX_JOBS (parallel compile jobs, default:
# the CPU count), TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX, see setup.py), PYTEST_ARGS, BENCH_ARGS.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=bench/results
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$OUT/gpu-check-$STAMP"
unset TRITON_INTERPRET
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
failed=()

step() {  # step NAME COMMAND...: run, tee to the step's log, remember a failure
  local name=$1
  shift
  echo "== gpu-check: $name ($LOG-$name.log)"
  "$@" 2>&1 | tee "$LOG-$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== gpu-check: $name FAILED (exit $rc)"
    failed+=("$name")
  fi
  return "$rc"
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: torch sees no CUDA device; this check needs a GPU machine" >&2
  exit 2
fi
nvidia-smi > "$LOG-nvidia-smi.log" 2>&1 || true

step build "$PY" -m pip install --no-build-isolation --no-deps -v -e . || {
  echo "gpu-check: the build failed, see $LOG-build.log" >&2
  exit 1
}
step info "$PY" -m deltal_kernels
step backends "$PY" -c "
import torch, deltal_kernels as dk
from deltal_kernels import dispatch
for name in ('cuda', 'triton'):
    reason = dispatch.unavailable_reason(name, 'cuda')
    assert reason is None, f'backend {name} is not available on CUDA: {reason}'
print('cuda tensors, auto order:', dk.available_backends('cuda'))
"
# shellcheck disable=SC2086
step tests "$PY" -m pytest tests -ra -p no:cacheprovider ${PYTEST_ARGS:-}
# shellcheck disable=SC2086
step bench "$PY" -m deltal_kernels.bench --device cuda --out "$OUT" ${BENCH_ARGS:-}

if [ ${#failed[@]} -ne 0 ]; then
  echo "gpu-check: FAILED steps: ${failed[*]} (logs: $LOG-*.log)"
  exit 1
fi
echo "gpu-check: all steps passed (logs: $LOG-*.log)"
