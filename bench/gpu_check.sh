#!/usr/bin/env bash
# One call on a GPU machine: install fastalign (building the CUDA kernels), run the GPU tests, check the CUDA
# kernels with compute-sanitizer, run the benchmarks; logs and tables go to OUT.
#   bench/gpu_check.sh OUT [all|tests|sanitize|bench|smoke]
# GPU machines have no internet: torch, triton and pytest are expected to be installed already. Peer libraries
# (liger-kernel, cut-cross-entropy) are installed from wheels in .whl/ when that folder exists.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT [all|tests|sanitize|bench|smoke]}
what=${2:-all}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastalign-peers .whl/*.whl \
    > "$out/peers.log" 2>&1 && export PYTHONPATH=/tmp/fastalign-peers${PYTHONPATH:+:$PYTHONPATH}
fi
# FASTALIGN_BUILD_CUDA=1: a GPU machine without nvcc should fail here, not quietly skip the CUDA kernels.
if ! FASTALIGN_BUILD_CUDA=1 "$py" -m pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1; then
  echo "install failed:"; tail -n 30 "$out/install.log"; exit 1
fi
"$py" -c "import fastalign; print(fastalign.backends()); from fastalign import _C; print(_C.build_info())"
command -v cuobjdump >/dev/null && cuobjdump --list-elf fastalign/_C*.so | tee "$out/cuobjdump.txt"

status=0
if [[ $what == all || $what == tests ]]; then
  "$py" -m pytest -m gpu -q -rs --junitxml="$out/gpu_tests.xml" tests 2>&1 | tee "$out/gpu_tests.log"
  (( PIPESTATUS[0] == 0 )) || status=1
fi
if [[ $what == all || $what == sanitize ]]; then
  # memcheck over the CUDA kernels' GPU tests (torch's own kernels run too; the sizes are the tests' small ones).
  # The policy loss's option matrix runs in bfloat16 only here (float32 takes the same code paths), and the run
  # is capped so that it fits one 10-minute device call.
  timeout "${SANITIZE_SECONDS:-480}" compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$py" -m pytest -m gpu -q -x -k "cuda and not (matches_torch and float32)" \
    tests/test_cuda_logprobs.py tests/test_cuda_policy.py tests/test_cuda_dpo.py 2>&1 | tee "$out/memcheck.log"
  (( PIPESTATUS[0] == 0 )) || status=1
fi
if [[ $what == smoke ]]; then
  "$py" -m bench --preset gpu-small --out "$out" 2>&1 | tee "$out/bench_gpu_small.log"
  (( PIPESTATUS[0] == 0 )) || status=1
fi
if [[ $what == all || $what == bench ]]; then
  "$py" -m bench --preset gpu --out "$out" 2>&1 | tee "$out/bench_gpu.log"
  (( PIPESTATUS[0] == 0 )) || status=1
fi
exit $status
