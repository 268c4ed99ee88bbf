// Entry of the VampPrior op: checks arguments, allocates fresh outputs and dispatches on the device.
#include "vamp.h"

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

void check_vamp(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& lv) {
  TORCH_CHECK(z.dim() == 2 && z.size(0) > 0, "ehm_fast: z must be [B, D] with B > 0, got ", z.sizes());
  TORCH_CHECK(mu.dim() == 2 && mu.size(0) > 0 && mu.size(1) == z.size(1), "ehm_fast: mu_k must be [K, D] with D = ",
              z.size(1), ", got ", mu.sizes());
  TORCH_CHECK(lv.sizes() == mu.sizes(), "ehm_fast: logvar_k must have the shape of mu_k");
  EHM_CHECK_INPUT(z, "z");
  EHM_CHECK_INPUT(mu, "mu_k");
  EHM_CHECK_INPUT(lv, "logvar_k");
  EHM_CHECK_SAME(z, mu, "z", "mu_k");
  EHM_CHECK_SAME(z, lv, "z", "logvar_k");
}

}  // namespace

std::vector<at::Tensor> vamp_fwd(const at::Tensor& z, const at::Tensor& mu_k, const at::Tensor& logvar_k,
                                 const std::optional<at::Tensor>& base) {
  check_vamp(z, mu_k, logvar_k);
  const int64_t B = z.size(0), K = mu_k.size(0), D = z.size(1);
  const auto acc = acc_type_of(z);
  if (base) {
    TORCH_CHECK(base->dim() == 1 && base->size(0) == B && base->is_contiguous() && base->scalar_type() == acc &&
                    base->device() == z.device(),
                "ehm_fast: base must be a contiguous [B] vector of ", acc, " on ", z.device());
  }
  auto out = at::empty({B}, z.options());
  auto lse = at::empty({B}, z.options().dtype(acc));
  const void* base_ptr = base ? base->data_ptr() : nullptr;
  if (z.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    TORCH_CHECK(D <= cuda::vamp_max_code_size(dtype_of(z)), "ehm_fast: the CUDA VampPrior kernels support codes of at most ",
                cuda::vamp_max_code_size(dtype_of(z)), " dims on this device, got D = ", D,
                "; use backend='triton' or 'torch'");
    cuda::vamp_fwd(dtype_of(z), z.data_ptr(), mu_k.data_ptr(), logvar_k.data_ptr(), base_ptr, B, K, D, out.data_ptr(),
                   lse.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  }
  TORCH_CHECK(z.is_cpu(), "ehm_fast: unsupported device ", z.device());
  cpu::vamp_fwd(dtype_of(z), z.data_ptr(), mu_k.data_ptr(), logvar_k.data_ptr(), base_ptr, B, K, D, out.data_ptr(),
                lse.data_ptr());
  return {out, lse};
}

std::vector<at::Tensor> vamp_bwd(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu_k,
                                 const at::Tensor& logvar_k, const at::Tensor& lse, bool need_z, bool need_mu,
                                 bool need_logvar) {
  check_vamp(z, mu_k, logvar_k);
  const int64_t B = z.size(0), K = mu_k.size(0), D = z.size(1);
  const auto acc = acc_type_of(z);
  TORCH_CHECK(grad.numel() == B && lse.numel() == B && lse.scalar_type() == acc && lse.is_contiguous(),
              "ehm_fast: grad and lse must hold one value per code (lse in ", acc, ")");
  const auto g = grad.to(acc).contiguous();
  auto gz = need_z ? at::empty_like(z) : z.new_empty({0});
  auto gmu = need_mu ? at::empty_like(mu_k) : z.new_empty({0});
  auto glv = need_logvar ? at::empty_like(mu_k) : z.new_empty({0});
  if (!need_z && !need_mu && !need_logvar) return {gz, gmu, glv};
  if (z.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    TORCH_CHECK(D <= cuda::vamp_max_code_size(dtype_of(z)), "ehm_fast: code size D = ", D,
                " is too large for the CUDA VampPrior kernels");
    const int64_t rows = cuda::vamp_rows_per_chunk(B, K), chunks = (B + rows - 1) / rows;
    auto pmu = need_mu ? at::empty({chunks, K, D}, z.options().dtype(acc)) : z.new_empty({0});
    auto plv = need_logvar ? at::empty({chunks, K, D}, z.options().dtype(acc)) : z.new_empty({0});
    cuda::vamp_bwd(dtype_of(z), g.data_ptr(), z.data_ptr(), mu_k.data_ptr(), logvar_k.data_ptr(), lse.data_ptr(), B, K,
                   D, need_z ? gz.data_ptr() : nullptr, need_mu ? pmu.data_ptr() : nullptr,
                   need_logvar ? plv.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_mu) gmu = pmu.sum(0).to(z.scalar_type());
    if (need_logvar) glv = plv.sum(0).to(z.scalar_type());
    return {gz, gmu, glv};
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  }
  cpu::vamp_bwd(dtype_of(z), g.data_ptr(), z.data_ptr(), mu_k.data_ptr(), logvar_k.data_ptr(), lse.data_ptr(), B, K, D,
                need_z ? gz.data_ptr() : nullptr, need_mu ? gmu.data_ptr() : nullptr,
                need_logvar ? glv.data_ptr() : nullptr);
  return {gz, gmu, glv};
}

}  // namespace ehm
