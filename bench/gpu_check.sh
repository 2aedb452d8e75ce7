#!/usr/bin/env bash
# GPU validation of fusedloss in one go: build the CUDA extension, run the GPU and Triton
# tests and the sharded ops over a 1-rank NCCL group, run the tests named *memcheck_subset*
# under compute-sanitizer (memcheck, then racecheck for shared-memory hazards), run the GPU
# benchmarks.
#
#   bash bench/gpu_check.sh [OUT_DIR] [build] [tests] [memcheck] [bench]
#
# OUT_DIR (relative to the current directory) defaults to the repository's bench/results.
# The stages named run in the order above (all four when none is named). A failing stage
# does not stop the later ones, except that a failed build skips everything after it. The
# whole run keeps within GPU_CHECK_BUDGET_S seconds (default 540): each stage gets at most
# its own limit and never more than the time left.
#
# Writes into OUT_DIR: gpu_check.log (every command's output), gpu_check_summary.md (date,
# GPU, versions, each stage's status and duration, and the GPU tests this machine skipped
# with their reasons, such as the two-device test on one GPU; rewritten after every stage)
# and, from the bench stage, bench_cuda.md, bench_cuda.json and bench_cuda.png. Exits 0 only
# if every stage asked for succeeded.
#
# The tests stage runs the tests marked gpu or triton, except those marked both gpu and dist,
# which then run on their own (row "sharded-nccl"): the sharded ops over a 1-rank NCCL group
# against the fp64 reference of the unsharded ops
# (tests/test_sharded.py::test_sharded_ops_over_a_one_rank_nccl_group).
#
# The bench stage first installs, offline (--no-index --no-deps), any wheels in bench/wheels/:
# the peer libraries of the benchmark, downloaded beforehand on a machine with network access
# (`pip download --no-deps -d bench/wheels cut-cross-entropy liger-kernel
# pytorch-metric-learning`), since the GPU machine has none (bench/wheels/ is git-ignored:
# carry it along); it logs which peers are then present. It runs the default families, then
# those in GPU_CHECK_BENCH_WITH (default "pairs sharded", each passed as --with), in one
# `python -m fusedloss.bench` run; GPU_CHECK_BENCH_ARGS adds arguments (e.g. "--family
# margin_linear", which replaces the default families), GPU_CHECK_BENCH_LIMIT_S changes its
# limit. The benchmark rewrites bench_cuda.md/.json after every case, so a bench stage that
# times out still leaves its finished cases.
set -uo pipefail

readonly ALL_STAGES=(build tests memcheck bench)
readonly BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
readonly PYTHON=${PYTHON:-python}
# Per-stage limits in seconds (each further capped by the time left).
readonly BUILD_LIMIT_S=240 TESTS_LIMIT_S=300 NCCL_LIMIT_S=90 MEMCHECK_LIMIT_S=150
readonly RACECHECK_LIMIT_S=120
readonly BENCH_LIMIT_S=${GPU_CHECK_BENCH_LIMIT_S:-240}
readonly MIN_STAGE_S=20  # a stage with less time left than this is skipped

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO

is_stage() {
  local s
  for s in "${ALL_STAGES[@]}"; do [[ $1 == "$s" ]] && return 0; done
  return 1
}

# --- arguments -----------------------------------------------------------------------
out_arg="$REPO/bench/results"
if [[ $# -gt 0 ]] && ! is_stage "$1"; then
  out_arg=$1
  shift
fi
declare -A wanted=()
for arg in "$@"; do
  if ! is_stage "$arg"; then
    echo "gpu_check: unknown stage '$arg' (stages: ${ALL_STAGES[*]})" >&2
    exit 2
  fi
  wanted[$arg]=1
done
if [[ ${#wanted[@]} -eq 0 ]]; then
  for s in "${ALL_STAGES[@]}"; do wanted[$s]=1; done
fi

mkdir -p "$out_arg" || exit 2
OUT=$(cd "$out_arg" && pwd)
readonly OUT
readonly LOG="$OUT/gpu_check.log"
readonly SUMMARY="$OUT/gpu_check_summary.md"
cd "$REPO" || exit 2
: >"$LOG"

readonly START_S=$SECONDS
declare -A status=() duration=()
not_run=""
stage_order=()
any_failed=0

log() { echo "$*" | tee -a "$LOG"; }
seconds_left() { echo $((BUDGET_S - (SECONDS - START_S))); }

# --- environment ---------------------------------------------------------------------
gpu_info=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1)
versions=$("$PYTHON" - 2>&1 <<'EOF'
import importlib.metadata as md
import platform
import torch
print(f"python {platform.python_version()}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"device available: {torch.cuda.is_available()})")
try:
    print(f"triton {md.version('triton')}")
except md.PackageNotFoundError:
    print("triton not installed")
EOF
)
nvcc_version=$(nvcc --version 2>&1 | tail -n 1)
{
  echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $REPO"
  echo "$gpu_info"
  echo "$versions"
  echo "nvcc: $nvcc_version"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git status --porcelain 2>/dev/null | grep -q . && echo '(uncommitted changes)')"
} | tee -a "$LOG"

write_summary() {
  {
    echo "# gpu_check summary"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- nvcc: $nvcc_version"
    echo "- ${versions//$'\n'/$'\n'- }"
    echo
    echo '```'
    echo "$gpu_info"
    echo '```'
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---|"
    local s
    for s in "${stage_order[@]}"; do
      echo "| $s | ${status[$s]} | ${duration[$s]} |"
    done
    echo
    if [[ -n $not_run ]]; then
      echo "GPU checks skipped on this machine (pytest -rs):"
      echo
      echo '```'
      echo "$not_run"
      echo '```'
      echo
    fi
    echo "Full output: gpu_check.log"
  } >"$SUMMARY"
}

# record NAME STATUS SECONDS FAILED(0|1)
record() {
  stage_order+=("$1")
  status[$1]=$2
  duration[$1]=$3
  ((any_failed |= $4))
  log "-- $1: $2 (${3}s)"
  write_summary
}

# run_step NAME LIMIT_S CMD...: runs CMD with output appended to the log, under a timeout
# of min(LIMIT_S, time left). Sets step_rc (124: timed out, 200: skipped, no time left)
# and step_s.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(seconds_left)
  ((left < limit)) && limit=$left
  step_s=0
  if ((limit < MIN_STAGE_S)); then
    log "== $name: skipped, ${left}s left of the ${BUDGET_S}s budget"
    step_rc=200
    return
  fi
  log "== $name (limit ${limit}s): $*"
  local t0=$SECONDS first_line
  first_line=$(($(wc -l <"$LOG") + 1))
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  step_rc=$?
  step_s=$((SECONDS - t0))
  if ((step_rc != 0)); then
    echo "   last lines of its output:"
    tail -n "+$first_line" "$LOG" | tail -n 25 | sed 's/^/   | /'
  fi
}

# Sets step_text and step_failed from an exit status (pytest's 5: nothing selected).
describe_rc() {
  step_failed=1
  case $1 in
    0) step_failed=0 step_text="ok" ;;
    5) step_text="NO TESTS SELECTED (pytest exit 5), nothing checked" ;;
    124 | 137) step_text="TIMED OUT (exit $1)" ;;
    200) step_text="SKIPPED (time budget spent)" ;;
    *) step_text="FAILED (exit $1)" ;;
  esac
}

# --- stages --------------------------------------------------------------------------
build_ok=1

stage_build() {
  run_step build "$BUILD_LIMIT_S" env TORCH_CUDA_ARCH_LIST=9.0 FUSEDLOSS_CUDA=1 MAX_JOBS=16 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
  local rc=$step_rc seconds=$step_s
  if ((rc == 0)); then
    run_step build-import 60 "$PYTHON" -c \
      "import fusedloss._C as C; assert C.with_cuda == 1, 'fusedloss._C built without CUDA'; print('fusedloss._C with CUDA')"
    rc=$step_rc
    seconds=$((seconds + step_s))
  fi
  describe_rc "$rc"
  ((step_failed)) && build_ok=0
  record build "$step_text" "$seconds" "$step_failed"
}

# The tests marked gpu and dist: the sharded ops over a 1-rank NCCL group.
stage_sharded_nccl() {
  run_step sharded-nccl "$NCCL_LIMIT_S" "$PYTHON" -m pytest -m "gpu and dist" -q \
    tests/test_sharded.py
  describe_rc "$step_rc"
  record sharded-nccl "$step_text (tests/test_sharded.py -m 'gpu and dist')" "$step_s" \
    "$step_failed"
}

stage_tests() {
  local first_line=$(($(wc -l <"$LOG") + 1))
  run_step tests "$TESTS_LIMIT_S" "$PYTHON" -m pytest -q -rs tests/ \
    -m "(gpu or triton) and not (gpu and dist)"
  describe_rc "$step_rc"
  # The GPU-only checks this machine could not run (e.g. the two-device guard test on one GPU).
  not_run=$(tail -n "+$first_line" "$LOG" | grep '^SKIPPED' || true)
  record tests "$step_text" "$step_s" "$step_failed"
  stage_sharded_nccl
  if "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fusedloss.info') is None)" \
    2>/dev/null; then
    log "== python -m fusedloss.info"
    timeout 60 "$PYTHON" -m fusedloss.info 2>&1 | tee -a "$LOG"
  fi
}

sanitizer() {
  if command -v compute-sanitizer >/dev/null; then
    command -v compute-sanitizer
  elif [[ -x /usr/local/cuda/bin/compute-sanitizer ]]; then
    echo /usr/local/cuda/bin/compute-sanitizer
  fi
}

# memcheck (out-of-bounds and misaligned accesses) and racecheck (shared-memory hazards)
# on the tests whose names contain memcheck_subset. The caching allocator is off so that
# an access past the end of a tensor is past the end of an allocation.
stage_memcheck() {
  local tool
  tool=$(sanitizer)
  if [[ -z $tool ]]; then
    log "compute-sanitizer not found"
    record memcheck "FAILED (compute-sanitizer not found)" 0 1
    return
  fi
  local check
  for check in memcheck racecheck; do
    local limit=$MEMCHECK_LIMIT_S selection=memcheck_subset
    if [[ $check == racecheck ]]; then
      # Our CUDA kernels only: Triton's own shared-memory pipelining is not ours to judge.
      limit=$RACECHECK_LIMIT_S
      selection="memcheck_subset and cuda"
    fi
    run_step "$check" "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$tool" --tool "$check" --error-exitcode 1 \
      "$PYTHON" -m pytest -q -m gpu -k "$selection" tests/
    describe_rc "$step_rc"
    [[ $step_rc == 1 ]] && step_text="FAILED (exit 1: $check errors or failing tests)"
    record "$check" "$step_text" "$step_s" "$step_failed"
    [[ $step_rc == 5 ]] && return  # racecheck would select nothing either
  done
}

# Installs the wheels in bench/wheels/ (peer libraries), offline; a failure is logged, not fatal.
install_bench_wheels() {
  local wheels=("$REPO"/bench/wheels/*.whl)
  if [[ ! -e ${wheels[0]} ]]; then
    log "== bench-wheels: no wheels in bench/wheels/ (peers only if already installed)"
    return
  fi
  run_step bench-wheels 90 env PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}"
  if ((step_rc != 0)); then
    log "   bench-wheels: pip install failed (exit $step_rc), the benchmark runs without them"
  fi
}

# Logs the benchmark's peer libraries: version and whether they import; one line each.
bench_peers() {
  "$PYTHON" - 2>&1 <<'EOF'
import importlib
import importlib.metadata as md
for dist, mod in (("cut-cross-entropy", "cut_cross_entropy"), ("liger-kernel", "liger_kernel"),
                  ("pytorch-metric-learning", "pytorch_metric_learning")):
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
        continue
    try:
        importlib.import_module(mod)
        print(f"{dist} {version}: importable")
    except Exception as e:  # noqa: BLE001
        print(f"{dist} {version}: installed, import fails ({type(e).__name__}: {e})")
EOF
}

stage_bench() {
  install_bench_wheels
  local peers extra=()
  peers=$(bench_peers)
  log "== bench peers:"
  log "$peers"
  read -ra extra <<<"${GPU_CHECK_BENCH_ARGS:-}"
  local family
  for family in ${GPU_CHECK_BENCH_WITH-pairs sharded}; do
    extra+=(--with "$family")
  done
  run_step bench "$BENCH_LIMIT_S" "$PYTHON" -m fusedloss.bench --device cuda --out "$OUT" \
    "${extra[@]}"
  describe_rc "$step_rc"
  step_text="$step_text; peers: ${peers//$'\n'/, }"
  record bench "$step_text" "$step_s" "$step_failed"
  [[ -f $OUT/bench_cuda.md ]] && cat "$OUT/bench_cuda.md"
}

for s in "${ALL_STAGES[@]}"; do
  [[ -n ${wanted[$s]:-} ]] || continue
  if ((!build_ok)); then
    record "$s" "SKIPPED (build failed)" 0 1
    continue
  fi
  case $s in
    build) stage_build ;;
    tests) stage_tests ;;
    memcheck) stage_memcheck ;;
    bench) stage_bench ;;
  esac
done

log "== gpu_check done in $((SECONDS - START_S))s: $( ((any_failed)) && echo FAILED || echo ok)"
cat "$SUMMARY"
exit "$any_failed"
