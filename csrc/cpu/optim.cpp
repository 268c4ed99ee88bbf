// C++ CPU kernels of the control-variate optimizer updates: one OpenMP loop over the
// (tensor, chunk) pairs of a bucket. The operation order follows torch.optim's single-tensor
// Adam and SGD on the CPU (lerp, mul-then-addcmul, addcdiv), so alpha = 0 reproduces them.
#include <cmath>
#include <utility>
#include <vector>

#include "cpu/scalar.h"
#include "optim.h"

namespace ehm::cpu {
namespace {

// (tensor, first element) of every chunk of every non-empty tensor.
std::vector<std::pair<int64_t, int64_t>> chunks_of(const TensorLists& l) {
  std::vector<std::pair<int64_t, int64_t>> work;
  for (int64_t t = 0; t < l.n; ++t)
    for (int64_t start = 0; start < l.sizes[t]; start += kOptimChunk) work.emplace_back(t, start);
  return work;
}

// The control-variate direction: exactly g when there is no control variate, exactly the anchor
// when g == g_ref and alpha == 1.
template <typename A>
inline A direction_of(A g, const A* g_ref, const A* anchor, A alpha) {
  if (!g_ref) return g;
  return (g - alpha * *g_ref) + alpha * *anchor;
}

template <typename T>
void adam(const TensorLists& l, const AdamScalars& s) {
  using A = acc_t<T>;
  const A alpha = A(s.alpha), wd = A(s.weight_decay), eps = A(s.eps), beta2 = A(s.beta2);
  const A one_minus_beta1 = A(1 - s.beta1), one_minus_beta2 = A(1 - s.beta2);
  const A decay = A(1 - s.lr * s.weight_decay), neg_step = A(-s.step_size), bc2 = A(s.bias_correction2_sqrt);
  const auto work = chunks_of(l);
#pragma omp parallel for schedule(static)
  for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
    const auto [t, start] = work[w];
    const int64_t end = std::min(l.sizes[t], start + kOptimChunk);
    T* p = static_cast<T*>(l.param[t]);
    const T* g = static_cast<const T*>(l.grad[t]);
    const T* gr = l.ref_grad ? static_cast<const T*>(l.ref_grad[t]) : nullptr;
    const A* an = l.anchor ? static_cast<const A*>(l.anchor[t]) : nullptr;
    A* m = static_cast<A*>(l.state1[t]);
    A* v2 = static_cast<A*>(l.state2[t]);
    A* dir = l.direction ? static_cast<A*>(l.direction[t]) : nullptr;
    for (int64_t i = start; i < end; ++i) {
      A param = static_cast<A>(p[i]);
      A ref = gr ? static_cast<A>(gr[i]) : A(0);
      A d = direction_of(static_cast<A>(g[i]), gr ? &ref : nullptr, an ? an + i : nullptr, alpha);
      if (dir) dir[i] = d;
      if (wd != A(0)) {
        if (s.decoupled) param = param * decay;
        else d = d + wd * param;
      }
      // torch's lerp for weight < 0.5 (beta1 > 0.5), else its other branch
      m[i] = one_minus_beta1 < A(0.5) ? m[i] + one_minus_beta1 * (d - m[i])
                                      : d - (d - m[i]) * (A(1) - one_minus_beta1);
      v2[i] = v2[i] * beta2 + one_minus_beta2 * d * d;
      const A denom = std::sqrt(v2[i]) / bc2 + eps;
      param = param + neg_step * m[i] / denom;
      p[i] = static_cast<T>(param);
    }
  }
}

template <typename T>
void sgd(const TensorLists& l, const SgdScalars& s) {
  using A = acc_t<T>;
  const A alpha = A(s.alpha), wd = A(s.weight_decay), mom = A(s.momentum), keep = A(1 - s.dampening);
  const A neg_lr = A(-s.lr);
  const auto work = chunks_of(l);
#pragma omp parallel for schedule(static)
  for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
    const auto [t, start] = work[w];
    const int64_t end = std::min(l.sizes[t], start + kOptimChunk);
    T* p = static_cast<T*>(l.param[t]);
    const T* g = static_cast<const T*>(l.grad[t]);
    const T* gr = l.ref_grad ? static_cast<const T*>(l.ref_grad[t]) : nullptr;
    const A* an = l.anchor ? static_cast<const A*>(l.anchor[t]) : nullptr;
    A* buf = l.state1 ? static_cast<A*>(l.state1[t]) : nullptr;
    A* dir = l.direction ? static_cast<A*>(l.direction[t]) : nullptr;
    for (int64_t i = start; i < end; ++i) {
      const A param = static_cast<A>(p[i]);
      A ref = gr ? static_cast<A>(gr[i]) : A(0);
      A d = direction_of(static_cast<A>(g[i]), gr ? &ref : nullptr, an ? an + i : nullptr, alpha);
      if (dir) dir[i] = d;
      if (wd != A(0)) d = d + wd * param;
      if (buf) {
        buf[i] = s.first ? d : buf[i] * mom + keep * d;
        d = s.nesterov ? d + mom * buf[i] : buf[i];
      }
      p[i] = static_cast<T>(param + neg_lr * d);
    }
  }
}

}  // namespace

void cv_adam(DType dtype, const TensorLists& lists, const AdamScalars& s) {
  dispatch(dtype, [&](auto* tag) { adam<std::remove_pointer_t<decltype(tag)>>(lists, s); });
}

void cv_sgd(DType dtype, const TensorLists& lists, const SgdScalars& s) {
  dispatch(dtype, [&](auto* tag) { sgd<std::remove_pointer_t<decltype(tag)>>(lists, s); });
}

}  // namespace ehm::cpu
