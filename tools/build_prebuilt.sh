#!/usr/bin/env bash
# Build fastbig._C for the GPU machine (Python 3.12, torch 2.11.0+cu130, sm_90) HERE, without a
# GPU, into prebuilt/ (git-ignored), so that bench/gpu_run.sh skips its build step there (it
# checks prebuilt/STAMP: same Python tag, torch, archs and sources, else it builds itself).
#
#   PYTHON=/work/venv-gpu312/bin/python bash tools/build_prebuilt.sh [ARCHS]   # ARCHS default 9.0
#
# PYTHON must have the GPU machine's torch (the extension is tied to torch's C++ ABI):
#   /root/.pyenv/versions/3.12.1/bin/python -m venv /work/venv-gpu312
#   /work/venv-gpu312/bin/pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130
#   /work/venv-gpu312/bin/pip install ninja setuptools wheel pybind11
# (torch is several GB). The build takes ~6 minutes of both cores here (nvcc on torch's headers);
# it holds /tmp/fastbig-build.lock. Then carry prebuilt/ to the GPU machine (run's carry:
# ["prebuilt"]; the .so is ~10-30 MB, the carry limit 64 MiB) and run bench/gpu_run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCHS=${1:-9.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A copy of the sources: the in-place build of this checkout (its CPU _C) stays as it is.
mkdir -p "$tmp/src"
cp -r csrc setup.py pyproject.toml "$tmp/src/"
mkdir -p "$tmp/src/fastbig"
touch "$tmp/src/fastbig/__init__.py"
(cd "$tmp/src" && TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS=${MAX_JOBS:-2} \
  flock /tmp/fastbig-build.lock "$PY" setup.py -q build_ext --inplace)
so=$(ls "$tmp"/src/fastbig/_C*.so)
mkdir -p prebuilt
rm -f prebuilt/_C*.so
cp "$so" prebuilt/
"$PY" tools/prebuilt_stamp.py --archs "$ARCHS" > prebuilt/STAMP
echo "build_prebuilt: $(ls prebuilt/_C*.so) ($(du -h prebuilt/_C*.so | cut -f1)); stamp: $(cat prebuilt/STAMP)"
