#!/usr/bin/env bash
# The one script for a GPU machine (the device tool): build against the machine's torch, run the
# whole test suite on CUDA, run the benchmarks, print a short table last. Budget: < 8 minutes on
# an H100/H200. Logs and result files go to $OUT (the device tool brings that folder back) and to
# benchmarks/results/.
#   run: bash benchmarks/gpu_check.sh            (from the repository root)
# The GPU machine has no lmdb and no network: first, here,
#   pip download lmdb --python-version 3.12 --only-binary=:all: --no-deps -d .gpu_wheels
# and name .gpu_wheels in the device tool's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ehm_gpu_check}
mkdir -p "$out"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
start=$(date +%s)
python -c "import lmdb" 2>/dev/null || python -m pip install -q --no-index --find-links .gpu_wheels lmdb \
  || echo "lmdb is missing: the LSUN tests will fail"

echo "== build"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; exit 1
fi
python -c "import ehm_fast._C as C; assert C.with_cuda(), 'built without CUDA'; print('CUDA kernels built')"
echo "build: $(( $(date +%s) - start )) s"

echo "== tests (CUDA and Triton-GPU paths included)"
timeout 200 python -m pytest tests -q -p no:cacheprovider > "$out/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "passed|failed|error" "$out/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20

echo "== kernel benchmarks"
timeout 150 python benchmarks/bench_kernels.py > "$out/bench_kernels.log" 2>&1
echo "bench_kernels rc=$? after $(( $(date +%s) - start )) s"
if [ -f benchmarks/bench_train.py ]; then
  echo "== training-step benchmark"
  timeout 120 python benchmarks/bench_train.py > "$out/bench_train.log" 2>&1
  echo "bench_train rc=$? after $(( $(date +%s) - start )) s"
fi
today=$(date +%Y-%m-%d)
for f in benchmarks/results/kernels_*"$today".md benchmarks/results/train_*"$today".md; do
  [ -f "$f" ] && cp "$f" "${f%.md}.json" "$out/" 2>/dev/null
done

echo "== summary ($(( $(date +%s) - start )) s)"
sed -n '/copy bandwidth/,$p' "$out/bench_kernels.log" | tail -40
[ -f "$out/bench_train.log" ] && tail -15 "$out/bench_train.log"
exit 0
