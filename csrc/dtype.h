// Tensor -> ehm::DType and argument checks for the entry files (these include ATen).
#pragma once
#include <ATen/ATen.h>

#include "common.h"

namespace ehm {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK_TYPE(false, "ehm_fast: unsupported dtype ", t.scalar_type(), " (expected a floating type)");
  }
}

// fp64 inputs accumulate in fp64, everything else in fp32 (Python: ehm_fast/ops/contract.py's acc_dtype).
inline at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

#define EHM_CHECK_INPUT(t, name)                                                              \
  TORCH_CHECK((t).is_contiguous(), "ehm_fast: ", name, " must be contiguous");                \
  TORCH_CHECK((t).is_floating_point(), "ehm_fast: ", name, " must be a floating-point tensor")

#define EHM_CHECK_SAME(a, b, name_a, name_b)                                                  \
  TORCH_CHECK((a).device() == (b).device(), "ehm_fast: ", name_a, " and ", name_b,           \
              " must be on one device");                                                      \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), "ehm_fast: ", name_a, " and ", name_b, \
              " must have one dtype")

}  // namespace ehm
