#!/usr/bin/env bash
# Compile one .cu file of csrc/ with nvcc for one arch (default sm_90), without linking:
# the quick check that CUDA code compiles, without building the whole extension. The command
# line is setup.py's (its NVCC_FLAGS plus torch's flags and headers; tools/nvcc_flags.py).
#   tools/nvcc_check.sh csrc/lstm/lstm_cuda.cu [arch]
set -eu
src=$1; arch=${2:-90}
cd "$(dirname "$0")/.."
out=/tmp/nvcc_check_$$.o
trap 'rm -f "$out"' EXIT
${PYTHON:-python3} tools/nvcc_flags.py "$src" --arch "$arch" -c "$out"
echo "nvcc_check: $src compiles for sm_$arch"
