#!/usr/bin/env bash
# Installs what ehm_fast needs on a fresh machine of this project's kind and builds it in place.
# torch==2.14.1 installs from local files here; elsewhere pip fetches it. Idempotent: the C++ build
# (a few minutes on 2 cores, longer with the CUDA kernels) runs again only when csrc/, setup.py,
# torch or the build switches changed since the last build (build/setup.stamp).
#   EHM_FAST_CUDA=1 bash scripts/setup.sh   also compiles the CUDA kernels (needs nvcc; CI does this)
#   EHM_FAST_REBUILD=1 bash scripts/setup.sh   builds even when nothing changed
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
echo "setup: Python packages (seconds when they are installed already)"
python -m pip install -q --disable-pip-version-check \
  "torch==2.14.1" "torchvision==0.29.1" ninja numpy pillow tqdm pyyaml pytest \
  scikit-learn scikit-image lmdb tensorboard torchmetrics matplotlib pytest-timeout ruff
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi

# Everything the extension's build depends on; the same hash means the same build.
build_key() {
  {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py
    python -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)"
    echo "cuda=${EHM_FAST_CUDA:-} arch=${TORCH_CUDA_ARCH_LIST:-} cuda_home=${CUDA_HOME:-} nvcc=$(command -v nvcc || true)"
  } | sha256sum | cut -d' ' -f1
}
stamp=build/setup.stamp
key=$(build_key)
# The stamp alone is not enough: the built module must import from outside the checkout too
# (the editable install that puts ehm-train on the PATH).
if [ -z "${EHM_FAST_REBUILD:-}" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] \
   && (cd / && python -c "import ehm_fast._C") 2>/dev/null; then
  echo "setup: the extension is up to date (csrc/, setup.py and torch unchanged), no rebuild"
else
  mkdir -p build
  log=build/setup.log
  # The C++ kernels are about 3 CPU-minutes of compiling (measured: 3 min 4 s), so 1.5-3 minutes on 2 cores.
  echo "setup: building the extension (C++ kernels${EHM_FAST_CUDA:+ and CUDA kernels}; the C++ part alone is about" \
       "3 CPU-minutes of compiling), full log in $log"
  # pip -v streams the compiler's steps; show ninja's "[k/n]" lines, one short line per source.
  if ! python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
      | tee "$log" \
      | sed -nu -E 's#^ *\[([0-9]+/[0-9]+)\].* -c ([^ ]+).*#  [\1] \2#p' \
      | sed -u "s#$(pwd)/##"; then
    tail -40 "$log"
    echo "setup: the build failed; full log in $log" >&2
    exit 1
  fi
  echo "$key" > "$stamp"
fi
python -c "import ehm_fast, ehm_fast._C as C; print('ehm_fast built; CUDA kernels:', C.with_cuda())"
echo "setup: $(( $(date +%s) - start )) s"
