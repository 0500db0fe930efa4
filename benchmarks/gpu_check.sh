#!/usr/bin/env bash
# The GPU check, one prepared command for a machine with python3, torch and nvcc but no
# network, in stages that each have a time limit (13 minutes in all at most; 4.5 minutes on
# an H200 with 16 cores, 2.6 on an H100 before the paths stage), so that a hang cannot
# spend a short lease and a cut-short run keeps what it measured:
#
#   preflight   versions and device properties                     versions.txt
#   build       in place for this GPU, all cores                   build.log
#   tests-fast  the CUDA operator and module tests                 tests.log
#   bench       the first-run rows against cuDNN (eager, graphed)  bench.csv/.md/.log
#   tests-cuda  every other test with a CUDA case                  tests.log
#   racecheck   compute-sanitizer racecheck over small calls       sanitizer.txt
#   profile     the kernels of one training step                   profile.txt
#   steps       a step's cost by CUDA path, T=1000 B=16            profile.txt
#   paths       fused against standard path, bf16 and TF32          profile.txt
#
#   benchmarks/gpu_check.sh OUT        (or: make gpu-check OUT=dir)
#
# Everything goes to OUT as it is made (8 files at most); one line per stage is printed.
# Without a GPU the build still runs (it proves the CUDA code compiles) and the GPU stages
# say that they skipped. QUICK=1 (a rerun after a fix): the build, the fast tests and the
# issue-4 rows only. SANITIZE=1: the build, then memcheck and racecheck over every kernel.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
start=$(date +%s)
failed=0

# stage NAME LIMIT LOG CMD...: runs CMD with a time limit, appending its output to LOG.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit} s)" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: exit $rc$([ $rc = 124 ] && echo ' (time limit)'), at $(( $(date +%s) - start )) s"
  [ $rc = 0 ] || failed=1
  return $rc
}
# gpu_stage: stage, or a line saying it skipped where there is no GPU.
gpu_stage() {
  if [ "$gpu" = 1 ]; then stage "$@"; else echo "$1: skipped, no GPU present"; fi
}

"$py" benchmarks/preflight.py > "$out/versions.txt" 2>&1
preflight_rc=$?
gpu=$([ $preflight_rc = 0 ] && echo 1 || echo 0)
{ nvidia-smi; git rev-parse HEAD || echo "commit: not a git checkout"; } >> "$out/versions.txt" 2>&1
head -n 2 "$out/versions.txt"

if ! stage build 180 "$out/build.log" env FORCE_CUDA=1 "$py" setup.py build_ext --inplace; then
  tail -n 40 "$out/build.log"
  exit 1
fi

sanitize() {  # sanitize TOOL LIMIT
  gpu_stage "$1" "$2" "$out/sanitizer.txt" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$1" --error-exitcode 9 "$py" benchmarks/sanitize_cuda.py
}
if [ "${SANITIZE:-0}" = 1 ]; then
  sanitize memcheck 240
  sanitize racecheck 240
  exit $failed
fi

# Tests in 8 processes where pytest-xdist is there, and a test that hangs (a kernel waiting
# at a barrier forever) ended after 60 s where pytest-timeout is, so one bad case cannot
# take a stage's whole time limit and hide every other result.
pytest=("$py" -m pytest -q -rfE -p no:cacheprovider --maxfail=20)
"$py" -c "import xdist" 2>/dev/null && pytest+=(-n 8)
"$py" -c "import pytest_timeout" 2>/dev/null && pytest+=(--timeout=60 --timeout-method=thread)
gpu_stage tests-fast 90 "$out/tests.log" "${pytest[@]}" tests/test_cuda_ops.py tests/test_cuda_modules.py
rows=(--only 100,1,512,512 --only 100,8,512,512 --only 100,64,512,512 --only 1000,16,128,128
  --only 50,256,1024,1024)
[ "${QUICK:-0}" = 1 ] && rows=(--only 100,64,512,512 --only 100,1,512,512)
gpu_stage bench 170 "$out/bench.log" "$py" benchmarks/bench.py --device cuda \
  --csv "$out/bench.csv" --markdown "$out/bench.md" "${rows[@]}"
rm -f "$out/bench.png"  # 8 files come back at most; the chart is drawn again from the CSV
if [ "${QUICK:-0}" != 1 ]; then
  # test_module_db needs expecttest; the emulation of the CUDA engine is for machines
  # without a GPU. -k cuda: the tests with a CUDA case (the CPU ones ran in CI).
  skip=(--ignore=tests/test_cuda_ops.py --ignore=tests/test_cuda_modules.py
    --ignore=tests/test_cuda_emulated.py)
  "$py" -c "import expecttest" 2>/dev/null || skip+=(--ignore=tests/test_module_db.py)
  gpu_stage tests-cuda 90 "$out/tests.log" "${pytest[@]}" tests "${skip[@]}" -k cuda
  sanitize racecheck 60
  gpu_stage profile 30 "$out/profile.txt" "$py" benchmarks/profile_cuda.py
  gpu_stage steps 40 "$out/profile.txt" "$py" benchmarks/step_cost.py --quick
  gpu_stage paths 120 "$out/profile.txt" "$py" benchmarks/path_choice.py
fi

if [ "$gpu" = 1 ]; then
  echo
  echo "== tests (last lines; log: $out/tests.log)"
  tail -n 8 "$out/tests.log"
  echo
  echo "== benchmark (table: $out/bench.md)"
  [ -f "$out/bench.csv" ] && "$py" benchmarks/summarize.py "$out/bench.csv"
fi
exit $failed
