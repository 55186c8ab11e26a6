#!/usr/bin/env bash
# The GPU check, as two commands that each fit one call of a lent GPU machine (15 minutes of device time in all,
# the machine's start included; at most 10 minutes a command):
#
#   bench/gpu_check.sh OUT [core]   at most 8 minutes: environment, build, core tests, core benchmark
#   bench/gpu_check.sh OUT rest     at most 10 minutes: the full GPU suite, compute-sanitizer, the full benchmark
#
# Every step runs under its own timeout (the budgets below, which sum to less than the mode's limit; the
# variable GPU_CHECK_SECONDS_<STEP>, e.g. GPU_CHECK_SECONDS_TESTS=200, changes one) and writes its log under OUT
# as it runs; OUT/summary.txt gets a line per step (status, seconds, budget, the log's last word) as each ends,
# so a run cut short still reports. A mode writes at most 8 files into OUT (what the device tool brings back).
#
# GPU machines have no internet: torch, triton and pytest are expected there (pytest-xdist runs the suites in
# parallel where installed). TRL (for trl.kernels), liger-kernel and cut-cross-entropy come from wheels in .whl/
# (carry it; docs/development.md says how to fetch them), installed into a folder of their own and put on the
# path of the benchmark steps only: TRL without `datasets` would break the collection of tests that import it.
#
# The rehearsal, on a machine without a GPU:  FASTALIGN_CHECK_DEVICE=cpu bench/gpu_check.sh OUT [core|rest]
# runs every Python step on the CPU: the core tests at toy shapes with Triton in its interpreter, the
# benchmarks through `python -m bench --rehearse`, the suite and sanitizer selections as collections, and the
# packages the GPU image lacks hidden (bench/rehearsal/sitecustomize.py). Left out there: nvidia-smi,
# compute-sanitizer itself and the CUDA kernels' launches; the pip install runs without the CUDA build, and the
# CUDA build itself runs out of tree (with nvcc) so the checkout's built extension is not touched.
# GPU_CHECK_SKIP="build peers" leaves steps out (tests/benchmarks/test_gpu_check.py rehearses the core mode
# without the build).
# PYTHON picks the interpreter (default python3).
# shellcheck disable=SC2317  # the step functions are called by name, through `bash -c` under timeout
set -uo pipefail

usage="usage: [FASTALIGN_CHECK_DEVICE=cpu] bench/gpu_check.sh OUT [core|rest]"
[[ $# -ge 1 && $# -le 2 ]] || { echo "$usage" >&2; exit 2; }
mode=${2:-core}
[[ $mode == core || $mode == rest ]] || { echo "unknown mode '$mode'; $usage" >&2; exit 2; }
check_device=${FASTALIGN_CHECK_DEVICE:-cuda}
[[ $check_device == cuda || $check_device == cpu ]] || {
  echo "FASTALIGN_CHECK_DEVICE must be cuda (the default) or cpu (the rehearsal), not '$check_device'" >&2; exit 2; }
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
py=${PYTHON:-python3}
command -v "$py" >/dev/null || { echo "PYTHON=$py: not found" >&2; exit 2; }
export PYTHONUNBUFFERED=1 FASTALIGN_CHECK_DEVICE=$check_device
grace=5  # seconds a step may take to stop after its timeout's SIGTERM before it is killed

# Budgets in seconds. core: 20+20+120+150+140 = 450, + 5 steps' grace = 475 <= 480 (8 minutes).
# rest: 20+20+120+170+140+80 = 550, + 6 steps' grace = 580 <= 600 (10 minutes). The build is ninja's: on a
# machine still warm from the core call it only relinks.
declare -A budget=([env]=20 [peers]=20 [build]=120 [tests]=150 [bench]=140 [suite]=170 [sanitize]=140)
[[ $mode == rest ]] && budget[bench]=80
for name in "${!budget[@]}"; do
  override=GPU_CHECK_SECONDS_${name^^}
  [[ -n ${!override:-} ]] && budget[$name]=${!override}
done

if [[ $check_device == cpu ]]; then
  rehearse=--rehearse
  jobs=${MAX_JOBS:-$(nproc)}
  # The GPU image lacks these (KINDS.md's package list); the benchmark step gets back those carried as wheels.
  hide=${FASTALIGN_REHEARSAL_HIDE-datasets,trl,liger_kernel,cut_cross_entropy}
  export TRITON_INTERPRET=1 PYTHONPATH=$root/bench/rehearsal${PYTHONPATH:+:$PYTHONPATH}
  export FASTALIGN_REHEARSAL_HIDE=$hide
else
  rehearse=
  jobs=${MAX_JOBS:-16}
fi
workers=${GPU_CHECK_WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
if (( workers > 1 )) && "$py" -c "import xdist" 2>/dev/null; then xdist_workers=$workers; else xdist_workers=; fi
peers_dir=${TMPDIR:-/tmp}/fastalign-peers
peers_path=
bench_hide=
# The GPU test files, in every folder of tests/: those with gpu-marked tests (other files may import what the GPU
# image lacks).
mapfile -t gpu_files < <(grep -rl --include="test_*.py" "pytest.mark.gpu" tests | sort |
  grep -vx "tests/kernels/test_gpu_core.py")
export out root py check_device rehearse jobs xdist_workers peers_dir

summary=$out/summary.txt
started=$SECONDS
failed=0
{
  echo "# bench/gpu_check.sh $mode on $check_device, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python $py"
  printf '%-9s %-13s %7s %7s  %s\n' step status seconds budget "last line of its log"
} > "$summary"

note_of() {  # the line of a log that says most: pytest's result, the benchmark's progress, or the last line
  local log=$1 line
  line=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran|interrupted).* =+$' "$log" | tail -n 1)
  [[ -z $line ]] && line=$(grep -E '^\[[0-9]+/[0-9]+\]' "$log" | tail -n 1)
  [[ -z $line ]] && line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
  echo "${line:0:110}"
}

step() {  # step NAME LOG FUNCTION ARGS...: FUNCTION under NAME's budget, its output teed to OUT/LOG; recorded
  local name=$1 log=$out/$2 seconds=${budget[$1]} start=$SECONDS rc status
  shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    printf '%-9s %-13s %7s %7s  %s\n' "$name" skipped - "$seconds" "GPU_CHECK_SKIP" >> "$summary"
    return 0
  fi
  echo "=== $name (budget ${seconds}s): $*" | tee -a "$log"
  # timeout runs a program: the step function (exported) in a fresh bash, in timeout's own process group.
  # shellcheck disable=SC2016  # $0 and $@ are the inner bash's
  timeout -k "$grace" "$seconds" bash -c '"$0" "$@"' "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  [[ $rc == 0 ]] || failed=1
  printf '%-9s %-13s %7s %7s  %s\n' "$name" "$status" $((SECONDS - start)) "$seconds" "$(note_of "$log")" >> "$summary"
  echo "=== $name: $status after $((SECONDS - start))s" | tee -a "$log"
  return "$rc"
}

skip() {  # skip NAME REASON: a step that cannot run here, recorded as such
  printf '%-9s %-13s %7s %7s  %s\n' "$1" skipped - "${budget[$1]}" "$2" >> "$summary"
}

step_env() {
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  echo "mode $1, device $check_device, $(nproc) cores, $(uname -sr)"
  git -C "$root" log -1 --format='commit %H (%cd) %s' 2>/dev/null || echo "no git history in this copy"
  git -C "$root" status --short 2>/dev/null | head -n 30
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1
  "$py" - <<'EOF'
import importlib.metadata
import platform
import sys

import torch


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "(CUDA", torch.version.cuda, ")", *(f"{n} {version(n)}" for n in (
    "triton", "transformers", "pytest", "pytest-xdist", "trl", "liger-kernel", "cut-cross-entropy")))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees no CUDA device")
EOF
}

step_peers() {
  rm -rf "$peers_dir"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$peers_dir" .whl/*.whl &&
    ls "$peers_dir"
}

step_build() {
  if [[ $check_device == cuda ]]; then
    # FASTALIGN_BUILD_CUDA=1: a GPU machine without nvcc fails here instead of quietly skipping the kernels.
    FASTALIGN_BUILD_CUDA=1 MAX_JOBS=$jobs "$py" -m pip install --no-deps --no-build-isolation -e . || return
    "$py" -c "import fastalign; from fastalign import _C; print(fastalign.backends()); print(_C.build_info())" ||
      return
    if command -v cuobjdump >/dev/null; then cuobjdump --list-elf fastalign/_C*.so; fi
    return 0
  fi
  # Rehearsal: the same install without the CUDA build, then the CUDA build out of tree, where nvcc is.
  FASTALIGN_BUILD_CUDA=0 "$py" -m pip install --no-deps --no-build-isolation -e . || return
  if command -v nvcc >/dev/null; then
    local scratch=${TMPDIR:-/tmp}/fastalign-rehearsal-build
    FASTALIGN_BUILD_CUDA=1 MAX_JOBS=$jobs "$py" setup.py -q build_ext --build-temp "$scratch/temp" \
      --build-lib "$scratch/lib" || return
    ls "$scratch"/lib/fastalign
  else
    echo "nvcc: not found; the CUDA build is not rehearsed"
  fi
  "$py" -c "import fastalign; print(fastalign.backends())"
}

step_tests() {  # step_tests PYTEST-ARGS...: the GPU tests (the gpu marker; FASTALIGN_CHECK_DEVICE decides where)
  local parallel=()
  [[ -n $xdist_workers ]] && parallel=(-n "$xdist_workers")
  "$py" -m pytest -m gpu -p no:cacheprovider -v -rfEs --durations=25 "${parallel[@]}" "$@"
}

step_sanitize() {
  # memcheck over the CUDA kernels' GPU tests (torch's own kernels run too; the sizes are the tests' small
  # ones), one process, stopping at the first error. The policy loss's option matrix runs in bfloat16 only
  # here (float32 takes the same code paths).
  local tests=(-m gpu -p no:cacheprovider -q -x -rfEs -k "cuda and not (matches_torch and float32)"
    tests/kernels/test_cuda_logprobs.py tests/kernels/test_cuda_dpo.py tests/kernels/test_cuda_policy.py)
  if [[ $check_device == cpu ]]; then
    echo "rehearsal: the sanitizer's pytest selection alone (compute-sanitizer needs the GPU)"
    "$py" -m pytest "${tests[@]}"
  elif command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 1 "$py" -m pytest "${tests[@]}"
  else
    echo "compute-sanitizer: not found"
    return 1
  fi
}

step_bench() {  # step_bench BENCH-ARGS...: python -m bench, with the carried peers on its path
  local flags=(--out "$out")
  [[ -n $rehearse ]] && flags+=("$rehearse")
  PYTHONPATH=${peers_path:+$peers_path:}${PYTHONPATH:-} FASTALIGN_REHEARSAL_HIDE=$bench_hide \
    "$py" -m bench "${flags[@]}" "$@"
}

export -f step_env step_peers step_build step_tests step_sanitize step_bench

step env env.log step_env "$mode"
if compgen -G ".whl/*.whl" >/dev/null; then
  if step peers build.log step_peers; then peers_path=$peers_dir; fi
else
  skip peers "no .whl/*.whl: TRL, liger-kernel and cut-cross-entropy are not benchmarked"
fi
if [[ $check_device == cpu ]]; then  # the benchmark step gets back the hidden packages carried as wheels
  for name in ${hide//,/ }; do
    [[ -n $peers_path && -d $peers_path/$name ]] || bench_hide+=${bench_hide:+,}$name
  done
fi
export peers_path bench_hide
step build build.log step_build || {
  [[ " ${GPU_CHECK_SKIP:-} " == *" build "* ]] || echo "the build failed: later steps test what is installed" >&2
}

if [[ $mode == core ]]; then
  step tests tests.log step_tests tests/kernels/test_gpu_core.py
  step bench bench.log step_bench --preset gpu-core
else
  step suite suite.log step_tests "${gpu_files[@]}"
  step sanitize sanitize.log step_sanitize
  # The ops the core benchmark did not time first, then the rest: a run cut short keeps the new ones.
  step bench bench.log step_bench --preset gpu \
    --ops linear_distill linear_dpo linear_grpo policy_loss dpo_loss linear_logprobs linear_cross_entropy logprobs_from_logits
fi

printf '%-9s %-13s %7s\n' total "$([[ $failed == 0 ]] && echo ok || echo FAILED)" $((SECONDS - started)) >> "$summary"
echo
cat "$summary"
exit "$failed"
