// C++ CPU kernels of the VampPrior. log N(z_b; mu_k, exp(lv_k)) is recomputed wherever it is
// needed (forward, and each backward loop) so nothing of size [B, K] or [B, K, D] is stored.
#include "vamp.h"

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/scalar.h"
#include "terms.h"

namespace ehm::cpu {
namespace {

// -log N(z; mu_k, exp(lv_k)) for one code z and component k; the vectors are D long. The sum runs
// in double: in float, D = 600 terms adding up to ~1e3 lose ~1e-3 in order, which moves the
// responsibilities of competing components by as much (5x the error of PyTorch's pairwise sums).
template <typename T, typename A = acc_t<T>>
A neg_log_normal(const T* z, const T* mu, const T* lv, int64_t D) {
  double sum = 0;
  for (int64_t j = 0; j < D; ++j)
    sum += terms::code_term<CodeKind::Latent, A>(static_cast<A>(z[j]), static_cast<A>(mu[j]), static_cast<A>(lv[j]), A(0));
  return static_cast<A>(sum);
}

// Responsibility of component k for z_b: exp(log N - lse); 0 for a row whose lse is -inf.
template <typename A>
A responsibility(A neg_log_n, A lse) {
  return lse == -std::numeric_limits<A>::infinity() ? A(0) : std::exp(-neg_log_n - lse);
}

template <typename T>
void fwd(const T* z, const T* mu, const T* lv, const acc_t<T>* base, int64_t B, int64_t K, int64_t D, T* out,
         acc_t<T>* lse) {
  using A = acc_t<T>;
  const A log_k = std::log(static_cast<A>(K));
#pragma omp parallel for schedule(static) if (B * K * D >= kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    A m = -std::numeric_limits<A>::infinity(), s = 0;  // running max and sum of exp(x - m)
    for (int64_t k = 0; k < K; ++k) {
      const A x = -neg_log_normal<T>(z + b * D, mu + k * D, lv + k * D, D);
      if (x == -std::numeric_limits<A>::infinity()) continue;
      if (x > m) {
        s = s * std::exp(m - x) + A(1);
        m = x;
      } else {
        s += std::exp(x - m);  // NaN in x makes s NaN
      }
    }
    const A l = m + std::log(s);
    lse[b] = l;
    out[b] = static_cast<T>(log_k - l + (base ? base[b] : A(0)));
  }
}

template <typename T>
void bwd(const acc_t<T>* grad, const T* z, const T* mu, const T* lv, const acc_t<T>* lse, int64_t B, int64_t K,
         int64_t D, T* gz, T* gmu, T* glv) {
  using A = acc_t<T>;
  if (gz) {
#pragma omp parallel for schedule(static) if (B * K * D >= kParallelMin)
    for (int64_t b = 0; b < B; ++b) {
      std::vector<A> acc(static_cast<size_t>(D), A(0));
      const T* zb = z + b * D;
      for (int64_t k = 0; k < K; ++k) {
        const A q = grad[b] * responsibility(neg_log_normal<T>(zb, mu + k * D, lv + k * D, D), lse[b]);
        for (int64_t j = 0; j < D; ++j)
          acc[j] += q * terms::code_grad<CodeKind::Latent, A>(static_cast<A>(zb[j]), static_cast<A>(mu[k * D + j]),
                                                              static_cast<A>(lv[k * D + j]), A(0)).da;
      }
      for (int64_t j = 0; j < D; ++j) gz[b * D + j] = static_cast<T>(acc[j]);
    }
  }
  if (!gmu && !glv) return;
#pragma omp parallel for schedule(static) if (B * K * D >= kParallelMin)
  for (int64_t k = 0; k < K; ++k) {
    std::vector<A> acc_mu(static_cast<size_t>(D), A(0)), acc_lv(static_cast<size_t>(D), A(0));
    const T* mk = mu + k * D;
    const T* lk = lv + k * D;
    for (int64_t b = 0; b < B; ++b) {
      const T* zb = z + b * D;
      const A q = grad[b] * responsibility(neg_log_normal<T>(zb, mk, lk, D), lse[b]);
      for (int64_t j = 0; j < D; ++j) {
        const auto t = terms::code_grad<CodeKind::Latent, A>(static_cast<A>(zb[j]), static_cast<A>(mk[j]),
                                                             static_cast<A>(lk[j]), A(0));
        acc_mu[j] += q * t.db;
        acc_lv[j] += q * t.dc;
      }
    }
    for (int64_t j = 0; j < D; ++j) {
      if (gmu) gmu[k * D + j] = static_cast<T>(acc_mu[j]);
      if (glv) glv[k * D + j] = static_cast<T>(acc_lv[j]);
    }
  }
}

}  // namespace

void vamp_fwd(DType dtype, const void* z, const void* mu, const void* lv, const void* base, int64_t B, int64_t K,
              int64_t D, void* out, void* lse) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    fwd<T>(static_cast<const T*>(z), static_cast<const T*>(mu), static_cast<const T*>(lv), static_cast<const A*>(base),
           B, K, D, static_cast<T*>(out), static_cast<A*>(lse));
  });
}

void vamp_bwd(DType dtype, const void* grad, const void* z, const void* mu, const void* lv, const void* lse, int64_t B,
              int64_t K, int64_t D, void* gz, void* gmu, void* glv) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    bwd<T>(static_cast<const A*>(grad), static_cast<const T*>(z), static_cast<const T*>(mu), static_cast<const T*>(lv),
           static_cast<const A*>(lse), B, K, D, static_cast<T*>(gz), static_cast<T*>(gmu), static_cast<T*>(glv));
  });
}

}  // namespace ehm::cpu
