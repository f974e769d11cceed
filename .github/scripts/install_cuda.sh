#!/usr/bin/env bash
# Installs the CUDA toolkit (nvcc + headers + cuBLAS dev) inside a manylinux_2_28 container.
set -euxo pipefail
ver=${FASTBIG_CUDA_VERSION:-12.6}
pkgver=${ver/./-}
dnf install -y dnf-plugins-core
dnf config-manager --add-repo https://developer.download.nvidia.com/compute/cuda/repos/rhel8/x86_64/cuda-rhel8.repo
dnf install -y "cuda-nvcc-${pkgver}" "cuda-cudart-devel-${pkgver}" "libcublas-devel-${pkgver}" \
  "libcusparse-devel-${pkgver}" "libcusolver-devel-${pkgver}" "cuda-nvtx-${pkgver}" "cuda-profiler-api-${pkgver}"
ln -sfn "/usr/local/cuda-${ver}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
