// Python bindings of ehm_fast._C. Function names match kernels/ (the Triton backend), so
// ehm_fast._backend.kernels_for() can hand either module to an op (tests/test_kernel_contract.py checks).
#include <torch/extension.h>
#include <torch/version.h>

#include "ops.h"
#include "optim.h"

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

  m.def("image_nll_fwd", &ehm::image_nll_fwd, py::arg("x"), py::arg("mean"), py::arg("log_scale"), py::arg("kind"));
  m.def("image_nll_bwd", &ehm::image_nll_bwd, py::arg("grad"), py::arg("x"), py::arg("mean"), py::arg("log_scale"),
        py::arg("kind"), py::arg("need_x"), py::arg("need_mean"), py::arg("need_scale"));
  m.def("code_nll_fwd", &ehm::code_nll_fwd, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("e"), py::arg("base"),
        py::arg("kind"));
  m.def("code_nll_bwd", &ehm::code_nll_bwd, py::arg("grad"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("e"),
        py::arg("kind"), py::arg("need_a"), py::arg("need_b"), py::arg("need_c"), py::arg("need_e"));
  m.def("vamp_fwd", &ehm::vamp_fwd, py::arg("z"), py::arg("mu_k"), py::arg("logvar_k"), py::arg("base"));
  m.def("vamp_bwd", &ehm::vamp_bwd, py::arg("grad"), py::arg("z"), py::arg("mu_k"), py::arg("logvar_k"),
        py::arg("lse"), py::arg("need_z"), py::arg("need_mu"), py::arg("need_logvar"));
  m.def("cv_adam_", &ehm::cv_adam_, py::arg("params"), py::arg("grads"), py::arg("ref_grads"), py::arg("anchors"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("directions"), py::arg("alpha"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("steps"), py::arg("found_inf"), py::call_guard<py::gil_scoped_release>());
  m.def("cv_sgd_", &ehm::cv_sgd_, py::arg("params"), py::arg("grads"), py::arg("ref_grads"), py::arg("anchors"),
        py::arg("momentum_buffers"), py::arg("directions"), py::arg("alpha"), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("first"), py::arg("found_inf"),
        py::call_guard<py::gil_scoped_release>());
  m.def("optim_chunk_size", [] { return ehm::kOptimChunk; });
}
