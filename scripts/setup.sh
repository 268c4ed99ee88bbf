#!/usr/bin/env bash
# Installs what ehm_fast needs on a fresh machine of this project's kind and builds it in place.
# torch==2.14.1 installs from local files here; elsewhere pip fetches it. Idempotent.
#   EHM_FAST_CUDA=1 bash scripts/setup.sh   also compiles the CUDA kernels (needs nvcc; CI does this)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check \
  "torch==2.14.1" "torchvision==0.29.1" ninja numpy pillow tqdm pyyaml pytest \
  scikit-learn scikit-image lmdb tensorboard torchmetrics matplotlib pytest-timeout ruff
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import ehm_fast, ehm_fast._C as C; print('ehm_fast built; CUDA kernels:', C.with_cuda())"
