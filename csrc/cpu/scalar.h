// Element loads/stores for the CPU kernels: fp16/bf16 widen to float, fp64 stays double.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace ehm::cpu {

// Elements of work below which an OpenMP region costs more than it saves (and, on a loaded
// machine, can wait a whole time slice at its barrier).
constexpr int64_t kParallelMin = 1 << 16;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f with a null pointer of the element type for `dtype` (a typed tag).
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(static_cast<float*>(nullptr)); break;
    case DType::Float64: f(static_cast<double*>(nullptr)); break;
    case DType::Float16: f(static_cast<c10::Half*>(nullptr)); break;
    case DType::BFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
  }
}

}  // namespace ehm::cpu
