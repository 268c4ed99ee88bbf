// Entry of the log-partition op family: checks arguments and dispatches on the device.
#include "log_partition.h"

#include <ATen/ATen.h>

#include "dtype.h"
#include "ops.h"

#ifdef EHM_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ehm {
namespace {

const void* data_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

void check_rows(const at::Tensor& s, const std::optional<at::Tensor>& p) {
  TORCH_CHECK(s.dim() == 2, "ehm_fast: scores must be [R, M], got ", s.sizes());
  TORCH_CHECK(s.size(1) > 0, "ehm_fast: scores must have M > 0 samples");
  EHM_CHECK_INPUT(s, "scores");
  if (p) {
    EHM_CHECK_INPUT(*p, "log_proposal");
    EHM_CHECK_SAME(s, *p, "scores", "log_proposal");
    TORCH_CHECK(p->sizes() == s.sizes(), "ehm_fast: log_proposal must have the shape of scores");
  }
}

}  // namespace

std::vector<at::Tensor> log_partition_fwd(const at::Tensor& s, const std::optional<at::Tensor>& p, bool jensen) {
  check_rows(s, p);
  const int64_t R = s.size(0), M = s.size(1);
  auto out = at::empty({R}, s.options());
  auto lse = at::empty({R}, s.options().dtype(acc_type_of(s)));
  if (s.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(s.device());
    const int64_t splits = cuda::log_partition_splits(R, M);
    auto ws = at::empty({splits > 1 ? 2 * R * splits : 0}, lse.options());
    cuda::log_partition_fwd(dtype_of(s), s.data_ptr(), data_or_null(p), R, M, jensen, out.data_ptr(), lse.data_ptr(),
                            ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  } else {
    TORCH_CHECK(s.is_cpu(), "ehm_fast: unsupported device ", s.device());
    cpu::log_partition_fwd(dtype_of(s), s.data_ptr(), data_or_null(p), R, M, jensen, out.data_ptr(), lse.data_ptr());
  }
  return {out, lse};
}

std::vector<at::Tensor> log_partition_bwd(const at::Tensor& grad, const at::Tensor& s,
                                          const std::optional<at::Tensor>& p, const at::Tensor& lse, bool jensen,
                                          bool need_s, bool need_p) {
  check_rows(s, p);
  const int64_t R = s.size(0), M = s.size(1);
  TORCH_CHECK(grad.numel() == R && lse.numel() == R, "ehm_fast: grad and lse must hold one value per row");
  const auto acc = grad.to(lse.scalar_type()).contiguous();
  auto gs = need_s ? at::empty_like(s) : s.new_empty({0});
  auto gp = need_p ? at::empty_like(s) : s.new_empty({0});
  void* gs_ptr = need_s ? gs.data_ptr() : nullptr;
  void* gp_ptr = need_p ? gp.data_ptr() : nullptr;
  if (!need_s && !need_p) return {gs, gp};
  if (s.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(s.device());
    cuda::log_partition_bwd(dtype_of(s), acc.data_ptr(), s.data_ptr(), data_or_null(p), lse.data_ptr(), R, M, jensen,
                            gs_ptr, gp_ptr, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  } else {
    cpu::log_partition_bwd(dtype_of(s), acc.data_ptr(), s.data_ptr(), data_or_null(p), lse.data_ptr(), R, M, jensen,
                           gs_ptr, gp_ptr);
  }
  return {gs, gp};
}

}  // namespace ehm
