// Every fastbig op schema, in one place. Kernels register with TORCH_LIBRARY_IMPL beside
// their sources (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cu); fake impls and autograd live in
// fastbig/ops/<op>.py.
#include <torch/extension.h>
#ifdef FASTBIG_WITH_CUDA
#include <cuda.h>
#endif

#ifndef FASTBIG_TORCH_VERSION
#define FASTBIG_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fastbig, m) {
  // ---- LSTM -----------------------------------------------------------------------------
  // One cell step from pre-activation gates [B, 4H] (i, f, g, o) and c_prev [B, H].
  // Returns h, c and the activated gates [B, 4H] that the backward needs.
  m.def("lstm_cell(Tensor gates, Tensor c_prev) -> (Tensor h, Tensor c, Tensor act)");
  m.def(
      "lstm_cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor act, Tensor c_prev, Tensor c)"
      " -> (Tensor grad_gates, Tensor grad_c_prev)");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef FASTBIG_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(FASTBIG_CUDA_ARCHS);
#ifdef CUDA_VERSION
  d["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#endif
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string("");
#endif
  d["torch_version"] = std::string(FASTBIG_TORCH_VERSION);
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbig C++/CUDA kernels; ops are registered under torch.ops.fastbig";
  m.def("build_info", &build_info, "What this extension was built with");
}
