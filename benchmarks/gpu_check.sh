#!/usr/bin/env bash
# The one script for a GPU machine (the device tool): build against the machine's torch, then the
# most important measurement first: bench_train.py at batches 256 and 64 (the issue's target rows,
# the layer levers' rows right after row 3), profile_train.py at 256 (phases, layers, top kernels),
# then the whole test suite on CUDA, then the other benchmarks; a short table last. Every step has
# its own time limit and all of them stop by DEADLINE seconds (default 540), so the call fits a
# 10-minute lease with the machine's start-up; what does not fit is skipped, least important last.
# Logs and results go to $OUT as one archive plus the tables (the device tool brings at most 8
# files back) and to benchmarks/results/.
#   run: bash benchmarks/gpu_check.sh            (from the repository root)
# The GPU machine has no lmdb and no network: first, here,
#   pip download lmdb --python-version 3.12 --only-binary=:all: --no-deps -d .gpu_wheels
# and name .gpu_wheels in the device tool's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ehm_gpu_check}
logs=$out/logs
mkdir -p "$logs"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
start=$(date +%s)
deadline=${DEADLINE:-540}
elapsed() { echo $(( $(date +%s) - start )); }
# STEPS="train profile" runs only those; all of them take longer than one call: on an H100 the build
# took 60 s, bench_train at two batch sizes 90 s (more now, with the lever rows), the suite 60 s, so
# split them, e.g. STEPS="train profile tests", then STEPS="data cpp_probe trainer log_partition".
# Batch 1024 and a profile at 64 are left out: a second run of bench_train.py or profile_train.py
# would overwrite that day's train_* or profile_* results of the first.
steps=" ${STEPS:-train profile conv tests trainer cpp_probe log_partition likelihood optim data} "
want() { [[ $steps == *" $1 "* ]]; }

step() {  # step <limit s> <log name> <command...>: runs within both its limit and the deadline
  local limit=$1 log=$2; shift 2
  local left=$(( deadline - $(elapsed) ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "== skipped (deadline): $*"; return 124; fi
  echo "== $* (limit ${limit} s)"
  timeout "$limit" "$@" > "$logs/$log" 2>&1
  local rc=$?
  echo "rc=$rc after $(elapsed) s"
  return $rc
}

finish() {
  find benchmarks/results -newer "$logs/gpu.txt" ! -name 'trace_*' \( -name '*.md' -o -name '*.json' \) -exec cp {} "$logs/" \;
  tar -C "$out" -czf "$out/gpu_check.tgz" logs && rm -rf "$logs"
}
trap finish EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$logs/gpu.txt"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$logs/gpu.txt"
python -c "import lmdb" 2>/dev/null || python -m pip install -q --no-index --find-links .gpu_wheels lmdb \
  || echo "lmdb is missing: the LSUN tests will fail"

if ! step 200 build.log python -m pip install --no-build-isolation --no-deps -e .; then
  tail -40 "$logs/build.log"; exit 1
fi
python -c "import ehm_fast._C as C; assert C.with_cuda(), 'built without CUDA'; print('CUDA kernels built')" || exit 1

# Most important first; every benchmark saves its results as it goes, so a timeout keeps them.
want train && step 200 bench_train.log python benchmarks/bench_train.py --batch 256 --batch 64
want profile && step 70 profile_train.log python benchmarks/profile_train.py --batch 256
# the Triton convolution gate: each kernel at every layer's batch-256 and -64 shape against cuDNN
# and a same-shape cuBLAS matmul, TFLOP/s and % of the bf16 matmul peak (tuning + JIT included)
want conv && step 150 bench_conv.log python benchmarks/bench_kernels.py --family conv

# pytest-xdist spreads the Triton JIT compiles over the cores (two threads per worker, not 16);
# pytest-timeout names a test that hangs.
opts=(-q -rfE --tb=short -p no:cacheprovider --durations=10)
python -c "import xdist" 2>/dev/null && opts+=(-n 12)
python -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout 90)
if want tests; then
  step 170 tests.log env OMP_NUM_THREADS=2 python -X faulthandler -m pytest tests "${opts[@]}"
  pkill -9 -f "execnet|xdist" 2>/dev/null  # workers of a timed-out run must not load the benchmarks
  grep -E "passed|failed|error" "$logs/tests.log" | tail -2
  grep -E "^(FAILED|ERROR)" "$logs/tests.log" | cut -c1-220 | head -25
fi

# building the synthetic LMDB alone takes about 13 ms per image (photo-like pixels, WebP encoding)
want data && step 100 bench_data.log python benchmarks/bench_data.py --write --images 3200
want cpp_probe && step 90 cpp_probe.log python scripts/cpp_error_probe.py
want trainer && step 60 trainer.log python -m ehm_fast.train --steps 200 --log-every 50 --out /tmp/ehm_gpu_run
want log_partition && step 45 bench_log_partition.log python benchmarks/bench_kernels.py --family log_partition
want optim && step 35 bench_optim.log python benchmarks/bench_kernels.py --family optim
want likelihood && step 45 bench_likelihood.log python benchmarks/bench_kernels.py --family likelihood

echo "== summary ($(elapsed) s)"
grep -h "copy bandwidth\|matmul peak" "$logs"/bench_*.log | head -3
grep -E "^\| conv" "$logs/bench_conv.log" 2>/dev/null | cut -d'|' -f3,4,7,10,15,16
# results written by this run only (saved after every case: there even after a timeout)
for f in $(find benchmarks/results -name 'kernels_*.md' -newer "$logs/gpu.txt" | sort); do
  [ -f "$f" ] && grep -E "ehm:cuda|ehm:triton" "$f" | cut -d'|' -f3,4,7,9,10,11,13,14 | head -14
done
# the profile's breakdown table (up to its blank line) and its ceiling lines
if [ -f "$logs/profile_train.log" ]; then
  sed -n '/^| share of one/,/^$/p' "$logs/profile_train.log"; grep -A1 "^row 2 (plain" "$logs/profile_train.log"
fi
grep -h "^losses," "$logs/bench_train.log"
tail -3 "$logs/trainer.log" 2>/dev/null | cut -c1-200
cat "$logs/cpp_probe.log" 2>/dev/null
sed -n '/^| what/,$p' "$logs/bench_data.log" 2>/dev/null
find benchmarks/results -name 'train_*.md' -newer "$logs/gpu.txt" -exec tail -24 {} \;
exit 0
