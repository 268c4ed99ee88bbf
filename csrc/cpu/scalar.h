// Element loads/stores for the CPU kernels: fp16/bf16 widen to float, fp64 stays double.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
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

// exp for float in a form the compiler vectorises (no libm call): 2^n * p(r) with
// r = x - n ln2, |r| <= ln2/2, Cephes' polynomial, about 1 ulp. x < -87 gives 0 (so -inf -> 0),
// NaN stays NaN. double uses std::exp.
inline float vexp(float x) {
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f)));
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : (x > 88.f ? INFINITY : p * scale);
}
inline double vexp(double x) { return std::exp(x); }

}  // namespace ehm::cpu
