// The `fastft._C` Python module: importing it loads the library, whose static initialisers register
// torch.ops.fastft (ops.cpp and the kernel files); the module itself only carries the build facts.
// pybind11 is the copy torch ships (a second pybind11 could clash with torch's at import), header-only,
// and no torch type crosses it. This is the one file compiled without TORCH_TARGET_VERSION: torch's
// pybind11 refuses that macro, and nothing here touches torch's ABI.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastft compiled kernels (registered as torch.ops.fastft)";
  m.attr("torch_version") = FASTFT_TORCH_VERSION;          // the torch whose headers it was compiled with
  m.attr("torch_min_version") = FASTFT_TORCH_MIN_VERSION;  // TORCH_TARGET_VERSION: it loads under this and later
#ifdef FASTFT_WITH_CUDA
  m.attr("cuda") = true;
  m.attr("cuda_version") = FASTFT_CUDA_VERSION;  // the toolkit (nvcc, static runtime) it was compiled with
  m.attr("cuda_archs") = FASTFT_CUDA_ARCHS;      // e.g. "sm_80,sm_90,compute_90": SASS, and PTX for JIT
#else
  m.attr("cuda") = false;
  m.attr("cuda_version") = "";
  m.attr("cuda_archs") = "";
#endif
}
