#!/usr/bin/env bash
# Compile one .cu file of csrc/ with nvcc for one arch (default sm_90), without linking:
# the quick check that CUDA code compiles, without building the whole extension.
#   tools/nvcc_check.sh csrc/lstm/lstm_cuda.cu [arch]
set -eu
src=$1; arch=${2:-90}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
TI=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths(device_type='cuda')))")
PI=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NV=$(python3 -c "import site,glob,os; print(' '.join('-I'+d for p in site.getsitepackages() for d in glob.glob(os.path.join(p,'nvidia','cu1*','include'))))")
"$CUDA_HOME/bin/nvcc" -c "$src" -o /tmp/nvcc_check_$$.o -Icsrc $TI $NV -I"$PI" \
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -DFASTBIG_WITH_CUDA=1 \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  -std=c++20 -O3 --expt-relaxed-constexpr --use_fast_math -gencode arch=compute_$arch,code=sm_$arch \
  --compiler-options "'-fPIC'"
rm -f /tmp/nvcc_check_$$.o
echo "nvcc_check: $src compiles for sm_$arch"
