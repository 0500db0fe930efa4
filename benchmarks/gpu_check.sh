#!/usr/bin/env bash
# The GPU check, one prepared command for a machine with python3, torch and nvcc but no
# network: build in place for this machine's GPU with all cores, run the tests (CUDA ones
# included), then the CUDA benchmark against cuDNN. Logs, a CSV and a markdown table go to
# OUT; a short summary is printed last.
#
#   benchmarks/gpu_check.sh OUT        (or: make gpu-check OUT=dir)
#
# QUICK=1 (make gpu-check OUT=dir QUICK=1), for a rerun after a fix: only the CUDA tests
# and the benchmark's issue-4 rows (100,64,512,512 and 100,1,512,512). SANITIZE=1: only
# compute-sanitizer over every kernel (a run of its own: it takes minutes).
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
nvidia-smi > "$out/versions.txt" 2>&1
if ! FORCE_CUDA=1 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "gpu-check: build failed (log: $out/build.log)"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

# SANITIZE=1: instead of the tests and the benchmark, compute-sanitizer (memcheck, then
# racecheck) over small calls of every kernel, without the caching allocator so that
# memcheck sees each buffer's own bounds; its report goes to OUT/sanitizer.txt.
if [ "${SANITIZE:-0}" = 1 ]; then
  rc=0
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool" >> "$out/sanitizer.txt"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 "$py" benchmarks/sanitize_cuda.py >> "$out/sanitizer.txt" 2>&1
    tool_rc=$?
    echo "sanitizer $tool: $(( $(date +%s) - start )) s, exit $tool_rc"
    rc=$(( rc || tool_rc ))
  done
  tail -n 20 "$out/sanitizer.txt"
  exit $rc
fi

# test_module_db imports torch.testing._internal, which needs expecttest: run it only
# where that is installed.
ignore=()
"$py" -c "import expecttest" 2>/dev/null || ignore=(--ignore=tests/test_module_db.py)
# The CPU emulation of the CUDA engine is for machines without a GPU; here it runs for real.
ignore+=(--ignore=tests/test_cuda_emulated.py)
select=()
only=()
if [ "${QUICK:-0}" = 1 ]; then
  select=(-k cuda)
  only=(--only 100,64,512,512 --only 100,1,512,512)
fi
# Each stage has a time limit, so that a hang cannot spend the machine's whole lease; the
# benchmark writes its files after every row, so a cut-short run keeps what it measured.
timeout 240 "$py" -m pytest -q --maxfail=30 -p no:cacheprovider tests "${ignore[@]}" ${select[@]+"${select[@]}"} \
  > "$out/tests.log" 2>&1
tests_rc=$?
echo "tests: $(( $(date +%s) - start )) s, exit $tests_rc"

timeout 300 "$py" benchmarks/bench.py --device cuda --csv "$out/bench.csv" --markdown "$out/bench.md" \
  ${only[@]+"${only[@]}"} > "$out/bench.log" 2>&1
bench_rc=$?
echo "bench: $(( $(date +%s) - start )) s, exit $bench_rc"

timeout 60 "$py" benchmarks/profile_cuda.py > "$out/profile.txt" 2>&1
profile_rc=$?
echo "profile: $(( $(date +%s) - start )) s, exit $profile_rc"

{
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
  nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
} >> "$out/versions.txt" 2>&1

echo
echo "== tests (last lines; log: $out/tests.log)"
tail -n 15 "$out/tests.log"
echo
echo "== benchmark (table: $out/bench.md; kernels: $out/profile.txt)"
"$py" benchmarks/summarize.py "$out/bench.csv"
exit $(( tests_rc != 0 || bench_rc != 0 ))
