// Python bindings of ehm_fast._C. Function names match kernels/ (the Triton backend), so
// ehm_fast._backend.kernels_for() can hand either module to an op.
#include <torch/extension.h>
#include <torch/version.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ehm_fast C++ CPU and CUDA kernels";
  m.def("with_cuda", [] {
#ifdef EHM_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("torch_version", [] { return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR); });

  m.def("log_partition_fwd", &ehm::log_partition_fwd, py::arg("scores"), py::arg("log_proposal"), py::arg("jensen"));
  m.def("log_partition_bwd", &ehm::log_partition_bwd, py::arg("grad"), py::arg("scores"), py::arg("log_proposal"),
        py::arg("lse"), py::arg("jensen"), py::arg("need_scores"), py::arg("need_proposal"));
}
