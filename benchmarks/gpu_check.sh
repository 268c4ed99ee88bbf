#!/usr/bin/env bash
# The one script for a GPU machine (the device tool): build against the machine's torch, run the
# whole test suite on CUDA, run the benchmarks, print a short table last. Budget: under 8 minutes
# on an H100/H200 in the usual case (the time limits below add up to about 9 at worst). Logs and
# result files go to $OUT (the device tool brings that folder back) and to benchmarks/results/.
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
timeout 150 python -m pytest tests -q -p no:cacheprovider > "$out/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "passed|failed|error" "$out/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20

# Most important first; every benchmark saves its results as it goes, so a timeout keeps them.
bench() {  # bench <timeout s> <log name> <command...>
  local limit=$1 log=$2; shift 2
  echo "== $*"
  timeout "$limit" "$@" > "$out/$log" 2>&1
  echo "rc=$? after $(( $(date +%s) - start )) s"
}
bench 60 bench_log_partition.log python benchmarks/bench_kernels.py --family log_partition
bench 100 bench_train.log python benchmarks/bench_train.py --batch 64 --batch 256
bench 60 bench_likelihood.log python benchmarks/bench_kernels.py --family likelihood
bench 45 bench_optim.log python benchmarks/bench_kernels.py --family optim
today=$(date +%Y-%m-%d)
for f in benchmarks/results/kernels_*"$today".md benchmarks/results/train_*"$today".md; do  # at most 8 files come back
  [ -f "$f" ] && cp "$f" "${f%.md}.json" "$out/" 2>/dev/null
done

echo "== summary ($(( $(date +%s) - start )) s)"
for log in bench_log_partition bench_likelihood bench_optim; do
  sed -n '/copy bandwidth/,$p' "$out/$log.log" | grep -E "ehm:|^\|---|family" | head -40
done
tail -14 "$out/bench_train.log"
exit 0
