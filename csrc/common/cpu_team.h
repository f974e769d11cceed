// The OpenMP team runner of the fused CPU loops: a team of threads that meet at their own
// barriers (one per step), instead of a fork/join per parallel region.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastbig {

// Runs worker(tid, nt) on a team of nt <= min(max_threads, torch's thread count) OpenMP threads
// that meet at the worker's own barriers; one thread (0, 1) inside an enclosing parallel region or
// without OpenMP. nt is the team OpenMP actually gave, which may be smaller than asked.
template <typename F>
inline void run_team(int64_t max_threads, const F& worker) {
  const int64_t want = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), max_threads);
#ifdef _OPENMP
  if (want > 1) {
#pragma omp parallel num_threads(static_cast<int>(want))
    worker(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  worker(0, 1);
}

}  // namespace fastbig
