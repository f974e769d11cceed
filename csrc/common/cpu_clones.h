// FB_CPU_CLONES: compile a CPU hot loop twice, for AVX2 and for the baseline
// x86-64 the extension is built for, and pick one when the library loads (GCC/Clang target_clones,
// an ELF ifunc). Elsewhere (other architectures, non-ELF targets) it is nothing: one plain build.
// Put it on non-template functions; templates they call should be always_inline (FB_CPU_INLINE)
// so that their loops are compiled inside each clone. (Not arch=haswell, which would add FMA: GCC
// then refuses to inline the plain inline math helpers, conv_bn_relu_math.h, into the clone.)
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__) && !defined(__CUDACC__)
#define FB_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FB_CPU_CLONES
#endif
#define FB_CPU_INLINE __attribute__((always_inline)) inline
