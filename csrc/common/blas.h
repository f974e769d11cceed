// The Fortran BLAS GEMMs that libtorch_cpu exports when torch is built with MKL (ATen's own
// cpublas wrapper is not exported). Declared weak: a torch without them still loads the
// extension; callers check blas::available() and take an ATen path otherwise.
// Called on a thread inside an OpenMP parallel region, MKL runs single-threaded on that thread:
// the fused CPU kernels use that to run several independent GEMMs at once, one per core.
#pragma once
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastbig {
namespace blas {

inline bool available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Column-major, as BLAS: C [m x n] = op(A) [m x k] @ op(B) [k x n] + beta * C. Sizes fit in int
// (callers check).
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ila = int(lda), ilb = int(ldb), ilc = int(ldc);
  const float one = 1.f;
  sgemm_(&ca, &cb, &im, &in, &ik, &one, a, &ila, b, &ilb, &beta, c, &ilc);
}
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                 int64_t ldb, double beta, double* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ila = int(lda), ilb = int(ldb), ilc = int(ldc);
  const double one = 1.0;
  dgemm_(&ca, &cb, &im, &in, &ik, &one, a, &ila, b, &ilb, &beta, c, &ilc);
}

// Row-major: C [M x N] = op(A) [M x K] @ op(B) [K x N] + beta * C (the column-major call on the
// transposes: C^T = op(B)^T op(A)^T).
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
                    int64_t ldb, T beta, T* c, int64_t ldc) {
  gemm(tb, ta, N, M, K, b, ldb, a, lda, beta, c, ldc);
}

}  // namespace blas
}  // namespace fastbig
