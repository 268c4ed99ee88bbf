// Entry of the control-variate optimizer updates: checks one bucket of tensor lists (one device,
// one parameter dtype, state in the accumulation type), gathers raw pointers and dispatches.
#include "optim.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

#include "dtype.h"
#include "ops.h"

#ifdef EHM_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ehm {
namespace {

// Raw pointers and sizes of the lists of one bucket; owns the arrays TensorLists points into.
struct Gathered {
  std::vector<int64_t> sizes;
  std::vector<void*> ptrs[8];
  TensorLists lists;
};

// Same strides wherever the size is > 1 (a size-1 dimension's stride is arbitrary).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return true;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Checks list `name` against the parameters: same length, shape, strides (so elements match in
// memory order), device and the expected dtype.
void check_list(const std::vector<at::Tensor>& list, const std::vector<at::Tensor>& params, const char* name,
                at::ScalarType dtype) {
  TORCH_CHECK(list.size() == params.size(), "ehm_fast: ", name, " has ", list.size(), " tensors, params has ",
              params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    const auto& p = params[i];
    TORCH_CHECK(t.layout() == at::kStrided, "ehm_fast: ", name, "[", i, "] must be a dense tensor");
    TORCH_CHECK(t.device() == p.device(), "ehm_fast: ", name, "[", i, "] is on ", t.device(), ", params[", i,
                "] on ", p.device(), " (one bucket is one device)");
    TORCH_CHECK(t.scalar_type() == dtype, "ehm_fast: ", name, "[", i, "] must be ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == p.sizes(), "ehm_fast: ", name, "[", i, "] must have the shape of params[", i, "]");
    TORCH_CHECK(same_layout(t, p), "ehm_fast: ", name, "[", i,
                "] must have the strides of params[", i, "]");
  }
}

void check_params(const std::vector<at::Tensor>& params) {
  TORCH_CHECK(!params.empty(), "ehm_fast: params is empty");
  const auto& p0 = params[0];
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.layout() == at::kStrided, "ehm_fast: params[", i, "] must be a dense tensor");
    TORCH_CHECK(p.device() == p0.device(), "ehm_fast: params[", i, "] is on ", p.device(), ", params[0] on ",
                p0.device(), " (one bucket is one device)");
    TORCH_CHECK(p.scalar_type() == p0.scalar_type(), "ehm_fast: params[", i, "] is ", p.scalar_type(),
                ", params[0] is ", p0.scalar_type(), " (one bucket is one dtype)");
    TORCH_CHECK(p.numel() == 0 || p.is_non_overlapping_and_dense(), "ehm_fast: params[", i,
                "] must be non-overlapping and dense (e.g. contiguous or channels_last)");
  }
  dtype_of(p0);
}

// One 0-d float32 step count per parameter, on its device.
void check_steps(const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& params) {
  TORCH_CHECK(steps.size() == params.size(), "ehm_fast: steps has ", steps.size(), " tensors, params has ",
              params.size());
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK(steps[i].dim() == 0 && steps[i].scalar_type() == at::kFloat && steps[i].device() == params[i].device(),
                "ehm_fast: steps[", i, "] must be a 0-d float32 tensor on ", params[i].device());
}

const float* found_inf_ptr(const std::optional<at::Tensor>& found_inf, const at::Tensor& p0) {
  if (!found_inf.has_value()) return nullptr;
  const auto& f = *found_inf;
  TORCH_CHECK(f.numel() == 1 && f.scalar_type() == at::kFloat && f.device() == p0.device(),
              "ehm_fast: found_inf must be one float32 element on ", p0.device());
  return f.data_ptr<float>();
}

// Which lists are present: ref_grads and anchors together, the rest as given.
Gathered gather(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
                const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
                const std::vector<at::Tensor>& directions, const std::vector<at::Tensor>& steps, bool need_state1,
                bool need_state2) {
  check_params(params);
  const auto dtype = params[0].scalar_type();
  const auto acc = acc_type_of(params[0]);
  check_list(grads, params, "grads", dtype);
  TORCH_CHECK(ref_grads.empty() == anchors.empty(), "ehm_fast: ref_grads and anchors are given together or not at all");
  if (!ref_grads.empty()) {
    check_list(ref_grads, params, "ref_grads", dtype);
    check_list(anchors, params, "anchors", acc);
  }
  if (need_state1) check_list(state1, params, "state1", acc);
  if (need_state2) check_list(state2, params, "state2", acc);
  if (!directions.empty()) check_list(directions, params, "out_directions", acc);
  if (!steps.empty()) check_steps(steps, params);

  Gathered g;
  const std::vector<at::Tensor>* lists[8] = {&params, &grads,  &ref_grads,  &anchors,
                                             &state1, &state2, &directions, &steps};
  const bool used[8] = {true,        true,        !ref_grads.empty(), !anchors.empty(),
                        need_state1, need_state2, !directions.empty(), !steps.empty()};
  for (size_t i = 0; i < params.size(); ++i) {
    g.sizes.push_back(params[i].numel());
    for (int k = 0; k < 8; ++k)
      if (used[k]) g.ptrs[k].push_back((*lists[k])[i].numel() ? (*lists[k])[i].data_ptr() : nullptr);
  }
  auto at_or_null = [&](int k) { return used[k] ? g.ptrs[k].data() : nullptr; };
  g.lists.n = static_cast<int64_t>(params.size());
  g.lists.sizes = g.sizes.data();
  g.lists.param = at_or_null(0);
  g.lists.grad = at_or_null(1);
  g.lists.ref_grad = at_or_null(2);
  g.lists.anchor = at_or_null(3);
  g.lists.state1 = at_or_null(4);
  g.lists.state2 = at_or_null(5);
  g.lists.direction = at_or_null(6);
  g.lists.step = at_or_null(7);
  return g;
}

template <typename Scalars, typename CpuFn, typename CudaFn>
void run(const at::Tensor& p0, const TensorLists& lists, const Scalars& s, CpuFn cpu_fn, CudaFn cuda_fn) {
  if (p0.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(p0.device());
    cuda_fn(dtype_of(p0), lists, s, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    (void)cuda_fn;
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  } else {
    TORCH_CHECK(p0.is_cpu(), "ehm_fast: unsupported device ", p0.device());
    cpu_fn(dtype_of(p0), lists, s);
  }
}

}  // namespace

void cv_adam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
              const std::vector<at::Tensor>& directions, double alpha, int64_t step, double lr, double beta1,
              double beta2, double eps, double weight_decay, bool decoupled, const std::vector<at::Tensor>& steps,
              const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(!steps.empty() || step >= 1, "ehm_fast: step must be >= 1, got ", step);
  auto g = gather(params, grads, ref_grads, anchors, exp_avgs, exp_avg_sqs, directions, steps, true, true);
  g.lists.found_inf = found_inf_ptr(found_inf, params[0]);
  // as torch.optim.Adam computes them, in double on the host (or in the kernel from `steps`)
  const double t = static_cast<double>(std::max<int64_t>(step, 1));
  const double bc1 = 1 - std::pow(beta1, t);
  const double bc2 = 1 - std::pow(beta2, t);
  const AdamScalars s{alpha, lr, beta1, beta2, eps, weight_decay, lr / bc1, std::pow(bc2, 0.5), decoupled};
  run(params[0], g.lists, s, cpu::cv_adam,
#ifdef EHM_FAST_WITH_CUDA
      cuda::cv_adam
#else
      nullptr
#endif
  );
}

void cv_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
             const std::vector<at::Tensor>& ref_grads, const std::vector<at::Tensor>& anchors,
             const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& directions, double alpha,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool first,
             const std::optional<at::Tensor>& found_inf) {
  const bool has_buf = momentum != 0;
  auto g = gather(params, grads, ref_grads, anchors, momentum_buffers, {}, directions, {}, has_buf, false);
  g.lists.found_inf = found_inf_ptr(found_inf, params[0]);
  const SgdScalars s{alpha, lr, momentum, dampening, weight_decay, nesterov, first};
  run(params[0], g.lists, s, cpu::cv_sgd,
#ifdef EHM_FAST_WITH_CUDA
      cuda::cv_sgd
#else
      nullptr
#endif
  );
}

}  // namespace ehm
