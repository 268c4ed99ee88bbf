// Entry of the likelihood op family (image and code terms): checks arguments, allocates fresh
// outputs and dispatches on the device.
#include "likelihood.h"

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

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }
void* out_ptr(bool need, at::Tensor& t) { return need ? t.data_ptr() : nullptr; }

void check_rows(const at::Tensor& ref, const char* ref_name, const std::optional<at::Tensor>& t, const char* name) {
  if (!t) return;
  EHM_CHECK_INPUT(*t, name);
  EHM_CHECK_SAME(ref, *t, ref_name, name);
  TORCH_CHECK(t->sizes() == ref.sizes(), "ehm_fast: ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t->sizes());
}

// A [n] vector in the accumulation type of `ref`, on its device.
void check_acc_vector(const at::Tensor& ref, const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous(), "ehm_fast: ", name,
              " must be a contiguous vector of ", n, " values, got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == acc_type_of(ref) && t->device() == ref.device(), "ehm_fast: ", name, " must be ",
              acc_type_of(ref), " on ", ref.device());
}

void check_image(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& s, int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "ehm_fast: unknown image likelihood kind ", kind);
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, "ehm_fast: x must be [B, d] rows with B > 0, got ", x.sizes());
  EHM_CHECK_INPUT(x, "x");
  check_rows(x, "x", m, "mean");
  TORCH_CHECK(static_cast<ImageKind>(kind) == ImageKind::Bernoulli || s.has_value(),
              "ehm_fast: the Gaussian and Laplace likelihoods need log_scale");
  check_acc_vector(x, s, x.size(1), "log_scale");
}

// Which operands a code kind reads.
void check_code(const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
                const std::optional<at::Tensor>& e, int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 3, "ehm_fast: unknown code term kind ", kind);
  TORCH_CHECK(a.dim() == 2 && a.size(0) > 0, "ehm_fast: codes must be [B, D] rows with B > 0, got ", a.sizes());
  EHM_CHECK_INPUT(a, "a");
  const int uses = kind == 0 ? 3 : kind == 1 ? 1 : kind == 2 ? 2 : 4;
  TORCH_CHECK(b.has_value() == (uses >= 2) && c.has_value() == (uses >= 3) && e.has_value() == (uses >= 4),
              "ehm_fast: code term kind ", kind, " reads ", uses, " operands");
  check_rows(a, "a", b, "b");
  check_rows(a, "a", c, "c");
  check_rows(a, "a", e, "e");
}

}  // namespace

at::Tensor image_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const std::optional<at::Tensor>& log_scale,
                         int64_t kind) {
  check_image(x, mean, log_scale, kind);
  const int64_t B = x.size(0), d = x.size(1);
  const auto k = static_cast<ImageKind>(kind);
  if (x.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t splits = cuda::image_splits(B, d);
    auto partial = at::empty({B, splits}, x.options().dtype(acc_type_of(x)));
    cuda::image_nll_fwd(dtype_of(x), k, x.data_ptr(), mean.data_ptr(), ptr_or_null(log_scale), B, d,
                        partial.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return splits == 1 ? partial.view({B}) : partial.sum(1);
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "ehm_fast: unsupported device ", x.device());
  auto out = at::empty({B}, x.options().dtype(acc_type_of(x)));
  cpu::image_nll_fwd(dtype_of(x), k, x.data_ptr(), mean.data_ptr(), ptr_or_null(log_scale), B, d, out.data_ptr());
  return out;
}

std::vector<at::Tensor> image_nll_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                      const std::optional<at::Tensor>& log_scale, int64_t kind, bool need_x,
                                      bool need_mean, bool need_scale) {
  check_image(x, mean, log_scale, kind);
  const int64_t B = x.size(0), d = x.size(1);
  TORCH_CHECK(grad.numel() == B, "ehm_fast: grad must hold one value per row");
  need_scale = need_scale && log_scale.has_value();
  const auto g = grad.to(acc_type_of(x)).contiguous();
  auto gx = need_x ? at::empty_like(x) : x.new_empty({0});
  auto gm = need_mean ? at::empty_like(x) : x.new_empty({0});
  auto gs = x.new_empty({need_scale ? d : 0}, x.options().dtype(acc_type_of(x)));
  if (!need_x && !need_mean && !need_scale) return {gx, gm, gs};
  const auto k = static_cast<ImageKind>(kind);
  if (x.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t rows = cuda::image_rows_per_chunk(B, d), chunks = (B + rows - 1) / rows;
    auto partial = need_scale ? at::empty({chunks, d}, gs.options()) : gs;
    cuda::image_nll_bwd(dtype_of(x), k, g.data_ptr(), x.data_ptr(), mean.data_ptr(), ptr_or_null(log_scale), B, d,
                        out_ptr(need_x, gx), out_ptr(need_mean, gm), out_ptr(need_scale, partial),
                        c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_scale) gs = chunks == 1 ? partial.view({d}) : partial.sum(0);
    return {gx, gm, gs};
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  }
  cpu::image_nll_bwd(dtype_of(x), k, g.data_ptr(), x.data_ptr(), mean.data_ptr(), ptr_or_null(log_scale), B, d,
                     out_ptr(need_x, gx), out_ptr(need_mean, gm), out_ptr(need_scale, gs));
  return {gx, gm, gs};
}

at::Tensor code_nll_fwd(const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
                        const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& base, int64_t kind) {
  check_code(a, b, c, e, kind);
  const int64_t B = a.size(0), D = a.size(1);
  check_acc_vector(a, base, B, "base");
  auto out = at::empty({B}, a.options());
  const auto k = static_cast<CodeKind>(kind);
  if (a.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(a.device());
    cuda::code_nll_fwd(dtype_of(a), k, a.data_ptr(), ptr_or_null(b), ptr_or_null(c), ptr_or_null(e),
                       ptr_or_null(base), B, D, out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  }
  TORCH_CHECK(a.is_cpu(), "ehm_fast: unsupported device ", a.device());
  cpu::code_nll_fwd(dtype_of(a), k, a.data_ptr(), ptr_or_null(b), ptr_or_null(c), ptr_or_null(e), ptr_or_null(base),
                    B, D, out.data_ptr());
  return out;
}

std::vector<at::Tensor> code_nll_bwd(const at::Tensor& grad, const at::Tensor& a, const std::optional<at::Tensor>& b,
                                     const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& e,
                                     int64_t kind, bool need_a, bool need_b, bool need_c, bool need_e) {
  check_code(a, b, c, e, kind);
  const int64_t B = a.size(0), D = a.size(1);
  TORCH_CHECK(grad.numel() == B, "ehm_fast: grad must hold one value per row");
  need_b = need_b && b.has_value();
  need_c = need_c && c.has_value();
  need_e = need_e && e.has_value();
  const auto g = grad.to(acc_type_of(a)).contiguous();
  auto fresh = [&](bool need) { return need ? at::empty_like(a) : a.new_empty({0}); };
  auto ga = fresh(need_a), gb = fresh(need_b), gc = fresh(need_c), ge = fresh(need_e);
  if (!need_a && !need_b && !need_c && !need_e) return {ga, gb, gc, ge};
  const auto k = static_cast<CodeKind>(kind);
  if (a.is_cuda()) {
#ifdef EHM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(a.device());
    cuda::code_nll_bwd(dtype_of(a), k, g.data_ptr(), a.data_ptr(), ptr_or_null(b), ptr_or_null(c), ptr_or_null(e), B,
                       D, out_ptr(need_a, ga), out_ptr(need_b, gb), out_ptr(need_c, gc), out_ptr(need_e, ge),
                       c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {ga, gb, gc, ge};
#else
    TORCH_CHECK(false, "ehm_fast was built without CUDA");
#endif
  }
  cpu::code_nll_bwd(dtype_of(a), k, g.data_ptr(), a.data_ptr(), ptr_or_null(b), ptr_or_null(c), ptr_or_null(e), B, D,
                    out_ptr(need_a, ga), out_ptr(need_b, gb), out_ptr(need_c, gc), out_ptr(need_e, ge));
  return {ga, gb, gc, ge};
}

}  // namespace ehm
