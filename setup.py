"""Build fastbig._C from csrc/.

CUDA build when the installed torch has CUDA and nvcc is found (CUDA_HOME or PATH), unless
FASTBIG_CPU_ONLY=1; otherwise a C++-only build. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
MAX_JOBS defaults to what the cores and memory allow (nvcc needs ~2.5 GiB a job).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# nvcc flags of the CUDA build (torch's cpp_extension adds its own: the arch -gencode flags,
# -std=c++20, the __CUDA_NO_HALF*__ defines, --expt-relaxed-constexpr, -Xcompiler -fPIC).
# No --use_fast_math: it turns tanhf into tanh.approx.f32 (~5e-4 relative error: the CUDA LSTM
# could not meet the float32 bound) and divisions into div.approx/div.full; these kernels are
# memory-bound, the accurate instructions cost nothing measurable. tests/test_build_flags.py
# compiles the fp32 kernels to PTX with these flags and checks that no approximate tanh or
# division is left. Import this list (tools/nvcc_flags.py does) instead of copying it.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fvisibility=hidden"]


def _mem_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return 8.0


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(nvcc))
        if os.path.isdir(os.path.join(home, "include")):
            return home
    return None


def _nvidia_wheel_includes():
    """cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes live in the nvidia wheels."""
    out = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in out:
                out.append(d)
        for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "include"))):
            if d not in out and os.path.exists(os.path.join(d, "cublas_v2.h")):
                out.append(d)
    return out


def main():
    import torch
    from torch.utils import cpp_extension

    cpu_only = os.environ.get("FASTBIG_CPU_ONLY", "0") not in ("", "0", "false", "False")
    cuda_home = None if cpu_only else _find_cuda_home()
    with_cuda = (not cpu_only) and torch.version.cuda is not None and cuda_home is not None
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if "MAX_JOBS" not in os.environ:
        per_job = 2.5 if with_cuda else 1.0
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(_mem_gib() // per_job))))

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-fvisibility=hidden"]  # torch picks the C++ standard it needs (C++20 for 2.14)
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    define_macros = [("FASTBIG_TORCH_VERSION", '"%s"' % torch.__version__.split("+")[0])]
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("FASTBIG_WITH_CUDA", "1"), ("FASTBIG_CUDA_ARCHS", '"%s"' % archs)]
        include_dirs += _nvidia_wheel_includes()
        ext = cpp_extension.CUDAExtension(
            "fastbig._C",
            sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": list(NVCC_FLAGS),
            },
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastbig._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    print(f"fastbig: building {'CUDA (' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU-only'} "
          f"extension with MAX_JOBS={os.environ['MAX_JOBS']}", flush=True)
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """Keeps objects in build/temp-{cuda,cpu} even for editable installs (which otherwise
        build in a fresh temp dir), so ninja rebuilds only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp-cuda" if with_cuda else "temp-cpu")

    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})


if __name__ == "__main__":  # pip's setuptools backend and `python setup.py` both run it as __main__;
    main()                  # importing setup.py (tools/nvcc_flags.py) only reads NVCC_FLAGS
