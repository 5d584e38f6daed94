#!/usr/bin/env bash
# The one-command check for a machine with a CUDA GPU, as that machine is: the python3 on PATH (or
# PY=...) with torch, Triton, pytest already installed; no venv, no package registry.
#
#   scripts/gpu_check.sh             # the check (about 6-9 minutes on an H200, BUDGET_S=540 at most)
#   scripts/gpu_check.sh --dry-run   # on any machine: the script's own plumbing, no GPU needed
#   scripts/gpu_check.sh --list      # the steps, their time caps and which need a GPU
#
# Steps (all run even when one fails; each has a time cap and the whole run a deadline, BUDGET_S):
#   preflight   nvidia-smi, versions of python/torch/Triton/nvcc/compute-sanitizer/ncu, pytest plugins
#   build       pip install -e . with TORCH_CUDA_ARCH_LIST = the GPU's (9.0 on an H200), MAX_JOBS = all cores
#   info        python -m deltal_kernels (build facts, backends per device); cuda + triton must be usable
#   clusters    scripts/cluster_smoke.py: the CUDA cluster schedule (sm_90+) once per cluster size, within a
#               short cap; when it fails or hangs, DELTAL_KERNELS_CUDA_CLUSTER=1 for every later step
#               (tests/test_cuda_clusters.py left out, the sanitizers on one block per row), so one bad
#               kernel cannot take the rest of the check with it
#   liger       liger-kernel from a wheel in $WHEELS (default wheels/, `make gpu-wheels`), pip --no-index
#               --target into a temporary folder put on PYTHONPATH (it is pure Python over Triton)
#   tests       pytest tests on CUDA (cuda and triton backends, Triton compiled, bigmem/64-bit cases), a
#               per-test timeout, pytest-xdist workers when installed; trl/verl tests skip themselves
#   sanitize    compute-sanitizer memcheck, racecheck and synccheck (in parallel, and beside the tests)
#               over scripts/sanitize_kernels.py: every CUDA kernel variant and the Triton kernels
#   bench       deltal-bench --quick --device cuda (with liger when found), once the GPU is idle
#   kernel-report   python -m deltal_kernels.kernel_report --arch sm_XY, when that module exists
#   ncu         Nsight Compute on one forward, one fused and one gradient launch per backend at N=16384,
#               V=151936 bf16 (DRAM throughput, issue slots, L2 hit rate), if time is left
#
# Results: one flat folder, $OUT when set (the device tool's folder), else --out DIR, else
# bench/results/gpu-<gpu>-<UTC date>/, with at most 8 files: summary.txt (one screen: every step's
# status and the headline numbers; also printed at the end), gpu-check.log (every step's log, each cut
# to LOG_CAP_BYTES), cuda-quick.{json,csv,md,png} (the benchmark), kernel-report.txt, ncu.csv.
# summary.txt and gpu-check.log are rewritten after every step, so a run cut short still leaves them.
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 for a usage error.
#
# GPU_CHECK_ASSUME_GPU=1 runs the real path on a machine without a GPU (with stand-ins for
# compute-sanitizer and ncu on PATH): the rehearsal of the non-dry-run plumbing.
# Environment: PY (default python3), OUT, GPU_CHECK_COMMIT (the commit recorded where the tree has no
# .git, as the device tool's copy; else git's, or "unknown"), WHEELS (default wheels), BUDGET_S
# (default 540), MAX_JOBS (default: the CPU count), TORCH_CUDA_ARCH_LIST (default: the GPU's capability, else 9.0),
# TEST_WORKERS (pytest-xdist workers, default 8; 0: none), TEST_TIMEOUT (per test, default 300 s),
# PYTEST_ARGS, BENCH_ARGS, LOG_CAP_BYTES (default 1.5 MiB per step: the 10 stay under the 16 MiB a
# file may have); in a dry run, REHEARSE: the steps rehearsed here ("all", the default, "none", or
# step names).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

DRY_RUN=0
LIST=0
OUT_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --list) LIST=1 ;;
    --out) OUT_ARG=${2:?--out needs a folder}; shift ;;
    --out=*) OUT_ARG=${1#--out=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# name | needs a GPU | time cap (s) | seconds kept for it when earlier steps run long (0: optional)
STEPS="preflight|no|60|10
build|no|240|60
info|yes|60|10
clusters|yes|45|10
liger|no|60|5
tests|yes|240|90
sanitize|yes|180|60
bench|yes|180|60
kernel-report|no|60|15
ncu|yes|120|0"

if [ "$LIST" = 1 ]; then
  printf '%-14s %-10s %s\n' step "needs GPU" "time cap (s)"
  while IFS='|' read -r name gpu cap _; do printf '%-14s %-10s %s\n' "$name" "$gpu" "$cap"; done <<< "$STEPS"
  exit 0
fi

PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-540}
WHEELS=${WHEELS:-wheels}
LOG_CAP_BYTES=${LOG_CAP_BYTES:-1572864}
TEST_WORKERS=${TEST_WORKERS:-8}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))

if ! command -v "$PY" > /dev/null 2>&1; then
  echo "gpu_check: no python at PY=$PY" >&2
  exit 2
fi
if ! "$PY" -c "import torch" > /dev/null 2>&1; then
  echo "gpu_check: $PY cannot import torch; set PY to the python that has torch" >&2
  exit 2
fi

HAVE_GPU=0
GPU_NAME=none
if [ "$DRY_RUN" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  HAVE_GPU=1
  GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2> /dev/null || echo unknown)
fi
if [ "$DRY_RUN" = 0 ] && [ "${GPU_CHECK_ASSUME_GPU:-0}" = 1 ]; then  # rehearsing the real path without a GPU
  HAVE_GPU=1
  GPU_NAME="assumed (GPU_CHECK_ASSUME_GPU=1)"
fi
gpu_slug=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | sed 's/nvidia//; s/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
OUT=${OUT:-${OUT_ARG:-bench/results/gpu-${gpu_slug:-none}-$(date -u +%Y%m%dT%H%MZ)}}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dk-gpu-check.XXXXXX") || exit 2
STATUS="$WORK/steps.tsv"
LOG="$OUT/gpu-check.log"
: > "$STATUS"
# the commit checked: git's where ROOT is a repository's top; else GPU_CHECK_COMMIT (a copy without .git,
# as the device tool sends); else unknown, said so
if [ "$(git -C "$ROOT" rev-parse --show-toplevel 2> /dev/null)" = "$(cd "$ROOT" && pwd -P)" ]; then
  COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo "none yet")
  git -C "$ROOT" diff --quiet HEAD 2> /dev/null || COMMIT="$COMMIT+local changes"
elif [ -n "${GPU_CHECK_COMMIT:-}" ]; then
  COMMIT="$GPU_CHECK_COMMIT (GPU_CHECK_COMMIT)"
else
  COMMIT="unknown (no .git, no GPU_CHECK_COMMIT)"
fi
{
  echo "gpu_check $(date -u +%FT%TZ) on $(hostname): $([ "$DRY_RUN" = 1 ] && echo 'DRY RUN, ')GPU: $GPU_NAME"
  echo "repo $ROOT, commit $COMMIT"
  echo "PY=$PY ($(command -v "$PY")), OUT=$OUT, BUDGET_S=$BUDGET_S"
} > "$LOG"
cat "$LOG"
# the CUDA tools where a toolkit keeps them, when they are not on PATH already
for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer /opt/nvidia/nsight-compute/*; do
  if [ -d "$d" ] && [[ ":$PATH:" != *":$d:"* ]]; then PATH="$PATH:$d"; fi
done
export PATH
unset TRITON_INTERPRET  # Triton compiled for the GPU, never interpreted
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=9.0
  [ "$HAVE_GPU" = 1 ] && TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2> /dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST
ARCH=sm_${TORCH_CUDA_ARCH_LIST//./}
ARCH=${ARCH%%[^a-z0-9_]*}

step_field() {  # step_field NAME FIELD(2: needs GPU, 3: cap, 4: reserve)
  echo "$STEPS" | awk -F'|' -v n="$1" -v f="$2" '$1 == n { print $f }'
}

# Seconds the step NAME may take: its cap, less what the later steps must keep; 0: no time left.
step_timeout() {
  local name=$1 cap reserve=0 later=0 now left
  cap=$(step_field "$name" 3)
  while IFS='|' read -r n _ _ r; do
    [ "$later" = 1 ] && reserve=$((reserve + r))
    [ "$n" = "$name" ] && later=1
  done <<< "$STEPS"
  now=$(date +%s)
  left=$((DEADLINE - now - reserve))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -lt 5 ] && cap=0
  echo "$cap"
}

record() {  # record NAME STATUS RC SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(step_field "$1" 2)" "$5" >> "$STATUS"
}

# Append a step's log to gpu-check.log (a log over LOG_CAP_BYTES keeps its head and tail).
append_log() {  # append_log NAME STATUS
  local file="$WORK/$1.log" size half
  {
    echo
    echo "===== $1: $2 ====="
    if [ -f "$file" ]; then
      size=$(wc -c < "$file")
      if [ "$size" -gt "$LOG_CAP_BYTES" ]; then
        half=$((LOG_CAP_BYTES / 2))
        head -c "$half" "$file"
        echo
        echo "[... $((size - LOG_CAP_BYTES)) bytes of this log cut ...]"
        tail -c "$half" "$file"
      else
        cat "$file"
      fi
    fi
  } >> "$LOG"
}

summarize() {
  "$PY" "$ROOT/scripts/gpu_check_summary.py" --work "$WORK" --out "$OUT" --gpu "$GPU_NAME" \
    --commit "$COMMIT" --elapsed $(($(date +%s) - START)) --budget "$BUDGET_S" $([ "$DRY_RUN" = 1 ] && echo --dry-run) \
    > /dev/null 2>> "$WORK/summary-errors.log" || echo "gpu_check: the summary failed (see $WORK/summary-errors.log)" >&2
}

# finish NAME RC SECONDS [NOTE]: the status from the exit code, the log appended, the summary redone
finish() {
  local name=$1 rc=$2 secs=$3 note=${4:-} status
  case "$rc" in
    0) status=ok ;;
    3) status=skipped; note=$(grep -v '^\$ ' "$WORK/$name.log" 2> /dev/null | tail -n 1) ;;  # not applicable here
    124|137) status=TIMEOUT; note="${note:+$note; }stopped at its time cap" ;;
    *) status=FAILED ;;
  esac
  record "$name" "$status" "$rc" "$secs" "$note"
  append_log "$name" "$status (exit $rc, ${secs} s)"
  echo "== gpu_check: $name: $status (exit $rc, ${secs} s)${note:+: $note}"
  summarize
}

skip() {  # skip NAME WHY
  record "$1" skipped "-" 0 "$2"
  append_log "$1" "skipped: $2"
  echo "== gpu_check: $1: skipped: $2"
  summarize
}

# run_step NAME COMMAND...: in the foreground, within its time cap; output to the screen and its log.
# In a dry run a step that needs a GPU runs DRY_<NAME> instead when set (a rehearsal), else nothing.
run_step() {
  local name=$1 t t0 rc sig=TERM
  shift
  # pytest stopped by SIGINT still prints its counts (KeyboardInterrupt), SIGTERM would lose them
  [ "$name" = tests ] && sig=INT
  t=$(step_timeout "$name")
  if [ "$t" = 0 ]; then skip "$name" "no time left in BUDGET_S=$BUDGET_S"; return 0; fi
  echo "== gpu_check: $name (at most $t s): $*"
  echo "\$ $*" > "$WORK/$name.log"
  t0=$(date +%s)
  if declare -F "$1" > /dev/null; then  # a function of this script (exported below)
    timeout -s "$sig" -k 20 "$t" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$WORK/$name.log"
  else
    timeout -s "$sig" -k 20 "$t" "$@" 2>&1 | tee -a "$WORK/$name.log"
  fi
  rc=${PIPESTATUS[0]}
  finish "$name" "$rc" $(($(date +%s) - t0))
  return "$rc"
}

# A step that needs a GPU: skipped without one, rehearsed by REHEARSAL (a command line) in a dry run.
gpu_step() {  # gpu_step NAME REHEARSAL COMMAND...
  local name=$1 rehearsal=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    dry_step "$name" "$rehearsal" "$@"
  elif [ "$HAVE_GPU" = 0 ]; then
    skip "$name" "no CUDA device"
  else
    run_step "$name" "$@"
  fi
}

dry_step() {  # dry_step NAME REHEARSAL COMMAND...: prints the command, runs the rehearsal if any
  local name=$1 rehearsal=$2 rc=0 t0
  shift 2
  case " ${REHEARSE:-all} " in
    *" all "*|*" $name "*) ;;
    *) rehearsal="" ;;
  esac
  t0=$(date +%s)
  {
    echo "dry run: would run: $*"
    if [ -n "$rehearsal" ]; then
      echo "rehearsal: $rehearsal"
      timeout -k 10 "$(step_field "$name" 3)" bash -o pipefail -c "$rehearsal" 2>&1
      rc=$?
      echo "rehearsal exit status: $rc"
    fi
  } > "$WORK/$name.log" 2>&1
  tail -n 4 "$WORK/$name.log"
  local note="not run in a dry run"
  [ "$(step_field "$name" 2)" = yes ] && note="needs a GPU: not run"
  [ -n "$rehearsal" ] && note="$note; rehearsed here"
  if [ "$rc" = 0 ]; then
    record "$name" dry-run 0 $(($(date +%s) - t0)) "$note"
  else
    record "$name" FAILED "$rc" $(($(date +%s) - t0)) "$note; the rehearsal failed"
  fi
  append_log "$name" "dry run"
  echo "== gpu_check: $name: dry run ($note)"
  summarize
}

# ---- the steps -----------------------------------------------------------------------------------

# preflight: machine, versions, tools (also in a dry run: it says what is missing here)
preflight() {
  echo "## nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "## versions"
  "$PY" - << 'EOF'
import importlib.metadata as md, importlib.util, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
      + (f", sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}, "
         f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if torch.cuda.is_available() else ""))
# versions from the installed metadata: importing trl or verl would take longer than the whole step
for dist in ("triton", "pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "rich", "matplotlib", "numpy",
             "ninja", "pybind11", "setuptools", "liger-kernel", "trl", "verl"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
EOF
  echo "## tools"
  for tool in nvcc compute-sanitizer ncu ninja c++; do
    if command -v "$tool" > /dev/null; then
      echo "$tool: $(command -v "$tool"): $("$tool" --version 2>&1 | grep -iE 'release|version|ninja|[0-9]+\.[0-9]+' | tail -n 1)"
    else
      echo "$tool: not on PATH"
    fi
  done
  echo "cores: $(nproc), MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo "disk: $(df -h . | tail -n 1)"
}

build() {
  # --no-index: no registry is needed (no build isolation, no dependencies) nor reached
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e "$ROOT"
}

info() {
  "$PY" -m deltal_kernels || return 1
  "$PY" - << 'EOF'
import deltal_kernels as dk
from deltal_kernels import dispatch
bad = {n: dispatch.unavailable_reason(n, "cuda") for n in ("cuda", "triton")}
bad = {n: r for n, r in bad.items() if r is not None}
print("cuda tensors, auto order:", dk.available_backends("cuda"))
for n, r in bad.items():
    print(f"NOT AVAILABLE on CUDA: {n}: {r}")
raise SystemExit(1 if bad else 0)
EOF
}

LIGER_SITE="$WORK/liger-site"
liger() {
  local whl
  whl=$(ls "$ROOT/$WHEELS"/liger_kernel-*.whl "$WHEELS"/liger_kernel-*.whl 2> /dev/null | head -n 1)
  if [ -z "$whl" ]; then
    echo "no liger_kernel-*.whl in $WHEELS/ (make gpu-wheels, then carry the folder): liger not benchmarked"
    return 3
  fi
  "$PY" -m pip install --no-index --no-deps --no-compile -q --target "$LIGER_SITE" "$whl" || return 1
  PYTHONPATH="$LIGER_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
import liger_kernel.transformers.grpo_loss as m, importlib.metadata as md
print('liger-kernel', md.version('liger-kernel'), 'importable from', m.__file__)"
}

test_args() {  # the pytest arguments: plugins only when installed
  # -v: a line per test, so a run cut short still shows what passed; the dry-run test is plumbing
  # checked without a GPU, not worth the GPU machine's time
  local args=(tests -v -ra -p no:cacheprovider --durations=15 --ignore=tests/test_gpu_check_script.py)
  if "$PY" -c "import pytest_timeout" 2> /dev/null; then args+=(--timeout "$TEST_TIMEOUT"); fi
  if [ "$TEST_WORKERS" != 0 ] && "$PY" -c "import xdist" 2> /dev/null; then args+=(-n "$TEST_WORKERS"); fi
  echo "${args[@]}"
}

SAN_TOOLS="memcheck racecheck synccheck"
# compute-sanitizer TOOL over the kernel driver; its log is $WORK/sanitize-TOOL.log
sanitize_one() {
  local tool=$1
  # shellcheck disable=SC2086
  compute-sanitizer --tool "$tool" --print-limit 50 --error-exitcode 9 "$PY" "$ROOT/scripts/sanitize_kernels.py" \
    ${SANITIZE_ARGS:-} > "$WORK/sanitize-$tool.log" 2>&1
}

sanitize() {  # the three tools in parallel; fails when one fails (the summary reads their error counts)
  local tool pids=() rc=0
  if ! command -v compute-sanitizer > /dev/null; then echo "compute-sanitizer: not on PATH"; return 1; fi
  for tool in $SAN_TOOLS; do
    sanitize_one "$tool" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for tool in $SAN_TOOLS; do
    echo "## compute-sanitizer --tool $tool"
    cat "$WORK/sanitize-$tool.log"
  done
  return "$rc"
}

kernel_report() {
  if ! "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('deltal_kernels.kernel_report') else 3)"; then
    echo "no module deltal_kernels.kernel_report in this version of the package"
    return 3
  fi
  "$PY" -m deltal_kernels.kernel_report --arch "$ARCH" > "$OUT/kernel-report.txt" 2>&1
  local rc=$?
  cat "$OUT/kernel-report.txt"
  return "$rc"
}

NCU_METRICS="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,\
dram__bytes_write.sum,sm__inst_issued.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct,\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size"
ncu_step() {
  if ! command -v ncu > /dev/null; then echo "ncu: not on PATH"; return 1; fi
  ncu --profile-from-start off --clock-control none --kernel-name regex:'forward|grad' --metrics "$NCU_METRICS" \
    --force-overwrite -o "$WORK/ncu" "$PY" "$ROOT/scripts/ncu_kernels.py" || return 1
  ncu --import "$WORK/ncu.ncu-rep" --csv --page raw > "$OUT/ncu.csv" || return 1
  echo "ncu.csv: $(($(wc -l < "$OUT/ncu.csv") - 2)) kernels"
  cat "$OUT/ncu.csv"
}

# ---- the run ---------------------------------------------------------------------------------------

# the steps' functions run under `timeout ... bash -c`: they and what they read are exported
export -f preflight build info liger test_args sanitize sanitize_one kernel_report ncu_step
export PY ROOT WORK OUT WHEELS LIGER_SITE TEST_TIMEOUT TEST_WORKERS SAN_TOOLS NCU_METRICS ARCH

run_step preflight preflight
if [ "$DRY_RUN" = 1 ]; then
  # the build needs no GPU, but would replace this clone's compiled extension: shown, not run
  dry_step build "command -v nvcc && $PY -c 'import setuptools, torch.utils.cpp_extension' && echo build prerequisites present" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e "$ROOT"
else
  run_step build build
fi
gpu_step info "$PY -m deltal_kernels" info
export SANITIZE_ARGS=""
gpu_step clusters "$PY $ROOT/scripts/cluster_smoke.py --dry-run" "$PY" "$ROOT/scripts/cluster_smoke.py"
if [ "$DRY_RUN" = 0 ] && [ "$HAVE_GPU" = 1 ] && ! awk -F'\t' '$1 == "clusters" && ($2 == "ok" || $2 == "skipped") { ok = 1 } END { exit !ok }' "$STATUS"; then
  echo "the later steps run with DELTAL_KERNELS_CUDA_CLUSTER=1 (one block per row)" | tee -a "$WORK/clusters.log" "$LOG"
  summarize
  export DELTAL_KERNELS_CUDA_CLUSTER=1
  SANITIZE_ARGS="--clusters 1"
  PYTEST_ARGS="${PYTEST_ARGS:-} --ignore=tests/test_cuda_clusters.py"
fi
run_step liger liger
[ -d "$LIGER_SITE" ] && export PYTHONPATH="$LIGER_SITE${PYTHONPATH:+:$PYTHONPATH}"

# tests and sanitizers side by side (functional checks both: neither times anything), then the bench
# on an idle GPU
read -r -a TEST_ARGS <<< "$(test_args)"
# shellcheck disable=SC2206
TEST_ARGS+=(${PYTEST_ARGS:-})
if [ "$DRY_RUN" = 1 ]; then
  dry_step tests "$PY -m pytest --collect-only -q ${TEST_ARGS[*]} | tail -n 3" "$PY" -m pytest "${TEST_ARGS[@]}"
  dry_step sanitize "$PY $ROOT/scripts/sanitize_kernels.py --device cpu --backends cpu --quick" \
    compute-sanitizer --tool "{$SAN_TOOLS}" "$PY" "$ROOT/scripts/sanitize_kernels.py"
elif [ "$HAVE_GPU" = 0 ]; then
  skip tests "no CUDA device"
  skip sanitize "no CUDA device"
else
  san_t=$(step_timeout sanitize)
  # the tests' cap counts the sanitizers' time as theirs too: they run at the same time
  if [ "$san_t" -gt 0 ]; then
    echo "== gpu_check: sanitize (at most $san_t s, beside the tests): compute-sanitizer {$SAN_TOOLS} scripts/sanitize_kernels.py"
    san_t0=$(date +%s)
    (timeout -k 10 "$san_t" bash -c sanitize > "$WORK/sanitize.log" 2>&1; echo $? > "$WORK/sanitize.rc") &
    san_pid=$!
  fi
  STEPS=$(echo "$STEPS" | sed 's/^sanitize|yes|\([0-9]*\)|[0-9]*$/sanitize|yes|\1|0/')  # already running
  run_step tests "$PY" -m pytest "${TEST_ARGS[@]}"
  if [ "$san_t" -gt 0 ]; then
    wait "$san_pid"
    finish sanitize "$(cat "$WORK/sanitize.rc" 2> /dev/null || echo 1)" $(($(date +%s) - san_t0))
  else
    skip sanitize "no time left in BUDGET_S=$BUDGET_S"
  fi
fi
# shellcheck disable=SC2086
gpu_step bench "$PY -m deltal_kernels.bench --help > /dev/null && echo 'deltal-bench: arguments parse'" \
  "$PY" -m deltal_kernels.bench --quick --device cuda --out "$OUT" ${BENCH_ARGS:-}
if [ "$DRY_RUN" = 1 ]; then
  dry_step kernel-report "if $PY -c \"import importlib.util as u, sys; sys.exit(not u.find_spec('deltal_kernels.kernel_report'))\"; \
then $PY -m deltal_kernels.kernel_report --help | head -n 3; else echo 'no module deltal_kernels.kernel_report: skipped'; fi" \
    "$PY" -m deltal_kernels.kernel_report --arch "$ARCH"
elif [ "$HAVE_GPU" = 1 ]; then
  run_step kernel-report kernel_report
else
  skip kernel-report "no CUDA device"
fi
gpu_step ncu "$PY $ROOT/scripts/ncu_kernels.py --dry-run" ncu_step

summarize
echo
cat "$OUT/summary.txt" 2> /dev/null || echo "gpu_check: no summary (see $WORK)"
nfiles=$(find "$OUT" -type f | wc -l)
if [ "$nfiles" -gt 8 ]; then
  echo "gpu_check: WARNING: $nfiles files in $OUT (the device tool brings back 8)" >&2
fi
rc=0
awk -F'\t' '$2 == "FAILED" || $2 == "TIMEOUT" { bad = 1 } END { exit bad }' "$STATUS" || rc=1
[ -s "$WORK/summary-errors.log" ] && rc=1 && cat "$WORK/summary-errors.log" >&2
rm -rf "$WORK"
exit "$rc"
