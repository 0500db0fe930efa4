#!/usr/bin/env bash
# The GPU check, one prepared command for a machine with python3, torch and nvcc but no
# network: build in place for this machine's GPU with all cores, run the tests (CUDA ones
# included), then the CUDA benchmark against cuDNN. Logs, a CSV and a markdown table go to
# OUT; a short summary is printed last.
#
#   benchmarks/gpu_check.sh OUT        (or: make gpu-check OUT=dir)
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
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
if ! FORCE_CUDA=1 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "gpu-check: build failed (log: $out/build.log)"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

# test_module_db imports torch.testing._internal, which needs expecttest: run it only
# where that is installed.
ignore=()
"$py" -c "import expecttest" 2>/dev/null || ignore=(--ignore=tests/test_module_db.py)
"$py" -m pytest -q --maxfail=30 -p no:cacheprovider tests "${ignore[@]}" > "$out/tests.log" 2>&1
tests_rc=$?
echo "tests: $(( $(date +%s) - start )) s, exit $tests_rc"

"$py" benchmarks/bench.py --device cuda --csv "$out/bench.csv" --markdown "$out/bench.md" \
  > "$out/bench.log" 2>&1
bench_rc=$?
echo "bench: $(( $(date +%s) - start )) s, exit $bench_rc"

echo
echo "== tests (last lines; log: $out/tests.log)"
tail -n 15 "$out/tests.log"
echo
echo "== benchmark summary (table: $out/bench.md)"
"$py" - "$out/bench.csv" <<'PY'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit("no benchmark CSV")
print(f"{'cell':5} {'shape':18} {'dtype':5} {'kind':8} {'cuDNN':>8} {'ours':>8} {'graph':>8} {'speedup':>7}")
for r in rows:
    print(f"{r['cell']:5} {r['shape']:18} {r['dtype']:5} {r['kind']:8} {float(r['cuDNN']):8.3f} "
          f"{float(r['rnn_fused']):8.3f} {float(r['cuDNN graph'] or 'nan'):8.3f} {float(r['speedup']):7.2f}")
PY
exit $(( tests_rc != 0 || bench_rc != 0 ))
