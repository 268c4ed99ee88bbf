// Per-element terms of the likelihoods and their derivatives, shared by the C++ CPU kernels and
// the CUDA kernels (host/device functions; no torch headers). Formulas: docs/math.md.
#pragma once
#include <cmath>
#include <type_traits>

#include "common.h"

#if defined(__CUDACC__)
#define EHM_HD __host__ __device__ __forceinline__
#else
#define EHM_HD inline
#endif

// Device code calls CUDA's global math overloads, host code the std:: ones.
#ifdef __CUDA_ARCH__
#define EHM_MATH(f) ::f
#else
#define EHM_MATH(f) std::f
#endif

namespace ehm {

// The kind numbers are ehm_fast/ops/contract.py's (tests/test_kernel_contract.py checks they agree).
// Image likelihoods: -log p(x|z) per pixel; the decoder output `m` is the mean, the location or the logit.
enum class ImageKind : int { Gaussian = 0, Laplace = 1, Bernoulli = 2 };
// Code terms: which of the operands (a, b, c, e) they read is listed per kind.
enum class CodeKind : int {
  Latent = 0,     // -log N(a; b, exp(c))
  StdNormal = 1,  // -log N(a; 0, 1)
  KlStd = 2,      // KL(N(a, exp(b)) || N(0, 1))
  KlPair = 3,     // KL(N(a, exp(b)) || N(c, exp(e)))
};

namespace terms {

constexpr double kHalfLog2Pi = 0.91893853320467274178;
constexpr double kLog2 = 0.69314718055994530942;

// softplus(l) = max(l, 0) + log1p(exp(-|l|)): finite for every finite l.
template <typename A>
EHM_HD A softplus(A l) {
  return (l > A(0) ? l : A(0)) + EHM_MATH(log1p)(EHM_MATH(exp)(-EHM_MATH(fabs)(l)));
}

template <typename A>
EHM_HD A sigmoid(A l) {
  const A e = EHM_MATH(exp)(-EHM_MATH(fabs)(l));
  return l >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
}

// One pixel: -log p(x | m, s) with s the pixel's log_scale (unused by Bernoulli).
template <ImageKind K, typename A>
EHM_HD A image_term(A x, A m, A s) {
  if constexpr (K == ImageKind::Gaussian) {
    const A r = x - m;
    return A(0.5) * r * r * EHM_MATH(exp)(A(-2) * s) + s + A(kHalfLog2Pi);
  } else if constexpr (K == ImageKind::Laplace) {
    return EHM_MATH(fabs)(x - m) * EHM_MATH(exp)(-s) + s + A(kLog2);
  } else {
    return softplus(m) - x * m;
  }
}

template <typename A>
struct Grad3 {
  A dx, dm, ds;
};

// Derivatives of image_term with respect to x, m and s.
template <ImageKind K, typename A>
EHM_HD Grad3<A> image_grad(A x, A m, A s) {
  if constexpr (K == ImageKind::Gaussian) {
    const A r = x - m, iv = EHM_MATH(exp)(A(-2) * s);
    return {r * iv, -r * iv, A(1) - r * r * iv};
  } else if constexpr (K == ImageKind::Laplace) {
    const A r = x - m, ib = EHM_MATH(exp)(-s);
    const A sg = r > A(0) ? A(1) : (r < A(0) ? A(-1) : A(0));
    return {sg * ib, -sg * ib, A(1) - EHM_MATH(fabs)(r) * ib};
  } else {
    return {-m, sigmoid(m) - x, A(0)};
  }
}

// One code element of the given kind (operands a, b, c, e as documented on CodeKind).
template <CodeKind K, typename A>
EHM_HD A code_term(A a, A b, A c, A e) {
  if constexpr (K == CodeKind::Latent) {
    const A r = a - b;
    return A(0.5) * r * r * EHM_MATH(exp)(-c) + A(0.5) * c + A(kHalfLog2Pi);
  } else if constexpr (K == CodeKind::StdNormal) {
    return A(0.5) * a * a + A(kHalfLog2Pi);
  } else if constexpr (K == CodeKind::KlStd) {
    return A(0.5) * (a * a + EHM_MATH(exp)(b) - A(1) - b);
  } else {
    const A r = a - c;
    return A(0.5) * (e - b + EHM_MATH(exp)(b - e) + r * r * EHM_MATH(exp)(-e) - A(1));
  }
}

template <typename A>
struct Grad4 {
  A da, db, dc, de;
};

template <CodeKind K, typename A>
EHM_HD Grad4<A> code_grad(A a, A b, A c, A e) {
  if constexpr (K == CodeKind::Latent) {
    const A r = a - b, iv = EHM_MATH(exp)(-c);
    return {r * iv, -r * iv, A(0.5) - A(0.5) * r * r * iv, A(0)};
  } else if constexpr (K == CodeKind::StdNormal) {
    return {a, A(0), A(0), A(0)};
  } else if constexpr (K == CodeKind::KlStd) {
    return {a, A(0.5) * (EHM_MATH(exp)(b) - A(1)), A(0), A(0)};
  } else {
    const A r = a - c, iv2 = EHM_MATH(exp)(-e), ratio = EHM_MATH(exp)(b - e);
    return {r * iv2, A(0.5) * (ratio - A(1)), -r * iv2, A(0.5) * (A(1) - ratio - r * r * iv2)};
  }
}

// Calls f with std::integral_constant tags of the kind, so kernels instantiate one path per kind.
template <typename F>
void dispatch_image(ImageKind kind, F&& f) {
  switch (kind) {
    case ImageKind::Gaussian: f(std::integral_constant<ImageKind, ImageKind::Gaussian>{}); break;
    case ImageKind::Laplace: f(std::integral_constant<ImageKind, ImageKind::Laplace>{}); break;
    case ImageKind::Bernoulli: f(std::integral_constant<ImageKind, ImageKind::Bernoulli>{}); break;
  }
}

template <typename F>
void dispatch_code(CodeKind kind, F&& f) {
  switch (kind) {
    case CodeKind::Latent: f(std::integral_constant<CodeKind, CodeKind::Latent>{}); break;
    case CodeKind::StdNormal: f(std::integral_constant<CodeKind, CodeKind::StdNormal>{}); break;
    case CodeKind::KlStd: f(std::integral_constant<CodeKind, CodeKind::KlStd>{}); break;
    case CodeKind::KlPair: f(std::integral_constant<CodeKind, CodeKind::KlPair>{}); break;
  }
}

}  // namespace terms
}  // namespace ehm
