// C++ CPU kernels of the control-variate optimizer updates: one OpenMP loop over the
// (tensor, chunk) pairs of a bucket. The operation order follows torch.optim's single-tensor
// Adam and SGD on the CPU (lerp, mul-then-addcmul, addcdiv), so alpha = 0 reproduces them.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "cpu/scalar.h"
#include "optim.h"

namespace ehm::cpu {
namespace {

template <typename T>
using Views = TensorViews<T, acc_t<T>>;

template <typename T>
Views<T> views(const TensorLists& l, int64_t t) {
  using A = acc_t<T>;
  auto at = [t](auto* const* list) { return list ? list[t] : nullptr; };
  return {static_cast<T*>(l.param[t]),        static_cast<const T*>(l.grad[t]),
          static_cast<const T*>(at(l.ref_grad)), static_cast<const A*>(at(l.anchor)),
          static_cast<A*>(at(l.state1)),       static_cast<A*>(at(l.state2)),
          static_cast<A*>(at(l.direction)),   static_cast<const float*>(at(l.step))};
}

// Calls body(views, begin, end) for every chunk of every non-empty tensor, chunks in parallel;
// nothing where found_inf is set (a CPU tensor: read here).
template <typename T, typename Body>
void for_each_chunk(const TensorLists& l, Body body) {
  if (l.found_inf && *l.found_inf != 0.0f) return;
  std::vector<std::pair<int64_t, int64_t>> work;  // (tensor, first element)
  int64_t total = 0;
  for (int64_t t = 0; t < l.n; ++t) {
    total += l.sizes[t];
    for (int64_t start = 0; start < l.sizes[t]; start += kOptimChunk) work.emplace_back(t, start);
  }
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
    const auto [t, start] = work[w];
    body(views<T>(l, t), start, std::min(l.sizes[t], start + kOptimChunk));
  }
}

// The control-variate direction at element i: exactly g when there is no control variate,
// exactly the anchor when g == g_ref and alpha == 1.
template <typename T, typename A>
inline A direction_at(const Views<T>& x, int64_t i, A alpha) {
  const A g = static_cast<A>(x.g[i]);
  if (!x.gr) return g;
  return (g - alpha * static_cast<A>(x.gr[i])) + alpha * x.an[i];
}

// (lr / (1 - beta1^t), sqrt(1 - beta2^t)) in double, as torch.optim.Adam computes them: from the
// tensor's own count when there is one.
inline std::pair<double, double> bias_corrections(const AdamScalars& s, const float* step) {
  if (!step) return {s.step_size, s.bias_correction2_sqrt};
  const double t = *step;
  return {s.lr / (1 - std::pow(s.beta1, t)), std::pow(1 - std::pow(s.beta2, t), 0.5)};
}

template <typename T>
void adam(const TensorLists& l, const AdamScalars& s) {
  using A = acc_t<T>;
  const A alpha = A(s.alpha), wd = A(s.weight_decay), eps = A(s.eps), beta2 = A(s.beta2);
  const A one_minus_beta1 = A(1 - s.beta1), one_minus_beta2 = A(1 - s.beta2);
  const A decay = A(1 - s.lr * s.weight_decay);
  for_each_chunk<T>(l, [&](const Views<T>& x, int64_t begin, int64_t end) {
    const auto [step_size, bc2_sqrt] = bias_corrections(s, x.step);
    const A neg_step = A(-step_size), bc2 = A(bc2_sqrt);
    A* m = x.s1;
    A* v2 = x.s2;
    for (int64_t i = begin; i < end; ++i) {
      A param = static_cast<A>(x.p[i]);
      A d = direction_at(x, i, alpha);
      if (x.dir) x.dir[i] = d;
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
      x.p[i] = static_cast<T>(param);
    }
  });
}

template <typename T>
void sgd(const TensorLists& l, const SgdScalars& s) {
  using A = acc_t<T>;
  const A alpha = A(s.alpha), wd = A(s.weight_decay), mom = A(s.momentum), keep = A(1 - s.dampening);
  const A neg_lr = A(-s.lr);
  for_each_chunk<T>(l, [&](const Views<T>& x, int64_t begin, int64_t end) {
    A* buf = x.s1;
    for (int64_t i = begin; i < end; ++i) {
      const A param = static_cast<A>(x.p[i]);
      A d = direction_at(x, i, alpha);
      if (x.dir) x.dir[i] = d;
      if (wd != A(0)) d = d + wd * param;
      if (buf) {
        buf[i] = s.first ? d : buf[i] * mom + keep * d;
        d = s.nesterov ? d + mom * buf[i] : buf[i];
      }
      x.p[i] = static_cast<T>(param + neg_lr * d);
    }
  });
}

}  // namespace

void cv_adam(DType dtype, const TensorLists& lists, const AdamScalars& s) {
  dispatch(dtype, [&](auto* tag) { adam<std::remove_pointer_t<decltype(tag)>>(lists, s); });
}

void cv_sgd(DType dtype, const TensorLists& lists, const SgdScalars& s) {
  dispatch(dtype, [&](auto* tag) { sgd<std::remove_pointer_t<decltype(tag)>>(lists, s); });
}

}  // namespace ehm::cpu
