// Raw-pointer kernels of the control-variate optimizer updates (ehm_fast.optim.functional).
//
// One call updates a bucket of n tensors that share a device and a parameter dtype. Parameters,
// gradients and reference gradients are in `dtype`; anchors, optimizer state and directions are in
// the state type (double for Float64, float otherwise). Each tensor is updated elementwise over its
// numel() elements in memory order. Absent lists are null: ref_grad and anchor together (plain
// gradient), direction (not kept), state1/state2 as the rule says.
//
//   v = (g - alpha * g_ref) + alpha * anchor          the control-variate direction
//
// fed to Adam/AdamW (state1 = exp_avg, state2 = exp_avg_sq) or SGD (state1 = momentum buffer)
// with torch.optim's semantics.
//
// Device-side step control (no host synchronisation, capturable in a CUDA graph): `step` holds a
// float step count per tensor (the count after this update; Adam's bias corrections are then
// computed from it in double), and where `found_inf` is nonzero no element changes.
#pragma once
#include "common.h"

namespace ehm {

// Elements per chunk: the unit of the work lists of every backend (kernels/optim.py uses the same;
// the GPU kernels split each chunk over several blocks).
constexpr int64_t kOptimChunk = 1 << 16;

struct TensorLists {
  int64_t n = 0;
  const int64_t* sizes = nullptr;
  void* const* param = nullptr;
  const void* const* grad = nullptr;
  const void* const* ref_grad = nullptr;  // null: no control variate
  const void* const* anchor = nullptr;
  void* const* state1 = nullptr;
  void* const* state2 = nullptr;
  void* const* direction = nullptr;  // null: v is not written out
  const void* const* step = nullptr;  // float counts; null: AdamScalars' step_size and bias_correction2_sqrt
  const float* found_inf = nullptr;   // null: never skip
};

// Typed element pointers of one tensor's lists (null where a list is absent); T is the parameter
// dtype, A the state type.
template <typename T, typename A>
struct TensorViews {
  T* p;
  const T* g;
  const T* gr;
  const A* an;
  A* s1;
  A* s2;
  A* dir;
  const float* step;
};

struct AdamScalars {
  double alpha, lr, beta1, beta2, eps, weight_decay;
  double step_size;               // lr / (1 - beta1^step), unless TensorLists::step
  double bias_correction2_sqrt;   // sqrt(1 - beta2^step), unless TensorLists::step
  bool decoupled;                 // AdamW
};

struct SgdScalars {
  double alpha, lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool first;  // momentum buffers are initialised to the direction (torch.optim.SGD's first step)
};

namespace cpu {
void cv_adam(DType dtype, const TensorLists& lists, const AdamScalars& s);
void cv_sgd(DType dtype, const TensorLists& lists, const SgdScalars& s);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t. Launches once per group of tensors that fits the argument block.
void cv_adam(DType dtype, const TensorLists& lists, const AdamScalars& s, void* stream);
void cv_sgd(DType dtype, const TensorLists& lists, const SgdScalars& s, void* stream);
}  // namespace cuda
}  // namespace ehm
