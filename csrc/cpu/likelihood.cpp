// C++ CPU kernels of the per-sample likelihood terms. Forward: per-(row, chunk) partial sums, so a
// few huge rows still use every core. Backward: elementwise, with the log_scale gradient reduced
// over fixed chunks of rows and then over the chunks (deterministic whatever the thread count).
#include "likelihood.h"

#include <algorithm>
#include <vector>

#include "cpu/scalar.h"

namespace ehm::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;    // elements of one row per forward task
constexpr int64_t kRowChunk = 16;      // rows per backward task
constexpr int64_t kColChunk = 1 << 12;  // columns per backward task

template <typename T, ImageKind K>
void image_fwd(const T* x, const T* m, const acc_t<T>* s, int64_t B, int64_t d, acc_t<T>* out) {
  using A = acc_t<T>;
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  std::vector<A> parts(static_cast<size_t>(B * chunks));
#pragma omp parallel for schedule(static) if (B * d >= kParallelMin)
  for (int64_t task = 0; task < B * chunks; ++task) {
    const int64_t r = task / chunks, begin = (task % chunks) * kChunk, end = std::min(d, begin + kChunk);
    const T* xr = x + r * d;
    const T* mr = m + r * d;
    auto term = [&](int64_t j) {
      return terms::image_term<K, A>(static_cast<A>(xr[j]), static_cast<A>(mr[j]), s ? s[j] : A(0));
    };
    // kLanes independent partial sums: the reduction vectorises without -ffast-math
    constexpr int kLanes = 8;
    A lanes[kLanes] = {};
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes)
      for (int k = 0; k < kLanes; ++k) lanes[k] += term(j + k);
    A sum = 0;
    for (; j < end; ++j) sum += term(j);
    for (int k = 0; k < kLanes; ++k) sum += lanes[k];
    parts[task] = sum;
  }
  for (int64_t r = 0; r < B; ++r) {
    A sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += parts[r * chunks + c];
    out[r] = sum;
  }
}

template <typename T, ImageKind K>
void image_bwd(const acc_t<T>* grad, const T* x, const T* m, const acc_t<T>* s, int64_t B, int64_t d, T* gx, T* gm,
               acc_t<T>* gs) {
  using A = acc_t<T>;
  const int64_t row_chunks = (B + kRowChunk - 1) / kRowChunk, col_chunks = (d + kColChunk - 1) / kColChunk;
  std::vector<A> parts(gs ? static_cast<size_t>(row_chunks * d) : 0);
#pragma omp parallel for schedule(static) if (B * d >= kParallelMin)
  for (int64_t task = 0; task < row_chunks * col_chunks; ++task) {
    const int64_t rc = task / col_chunks, c0 = (task % col_chunks) * kColChunk, c1 = std::min(d, c0 + kColChunk);
    A* part = gs ? parts.data() + rc * d : nullptr;
    if (part) std::fill(part + c0, part + c1, A(0));
    for (int64_t r = rc * kRowChunk; r < std::min(B, (rc + 1) * kRowChunk); ++r) {
      const A g = grad[r];
      for (int64_t j = c0; j < c1; ++j) {
        const int64_t i = r * d + j;
        const auto t = terms::image_grad<K, A>(static_cast<A>(x[i]), static_cast<A>(m[i]), s ? s[j] : A(0));
        if (gx) gx[i] = static_cast<T>(g * t.dx);
        if (gm) gm[i] = static_cast<T>(g * t.dm);
        if (part) part[j] += g * t.ds;
      }
    }
  }
  if (!gs) return;
#pragma omp parallel for schedule(static) if (row_chunks * d >= kParallelMin)
  for (int64_t j = 0; j < d; ++j) {
    A sum = 0;
    for (int64_t rc = 0; rc < row_chunks; ++rc) sum += parts[rc * d + j];
    gs[j] = sum;
  }
}

template <typename T, CodeKind K>
void code_fwd(const T* a, const T* b, const T* c, const T* e, const acc_t<T>* base, int64_t B, int64_t D, T* out) {
  using A = acc_t<T>;
  auto at = [](const T* p, int64_t i) { return p ? static_cast<A>(p[i]) : A(0); };
#pragma omp parallel for schedule(static) if (B * D >= kParallelMin)
  for (int64_t r = 0; r < B; ++r) {
    A sum = base ? base[r] : A(0);
    for (int64_t i = r * D; i < (r + 1) * D; ++i) sum += terms::code_term<K, A>(at(a, i), at(b, i), at(c, i), at(e, i));
    out[r] = static_cast<T>(sum);
  }
}

template <typename T, CodeKind K>
void code_bwd(const acc_t<T>* grad, const T* a, const T* b, const T* c, const T* e, int64_t B, int64_t D, T* ga, T* gb,
              T* gc, T* ge) {
  using A = acc_t<T>;
  auto at = [](const T* p, int64_t i) { return p ? static_cast<A>(p[i]) : A(0); };
#pragma omp parallel for schedule(static) if (B * D >= kParallelMin)
  for (int64_t r = 0; r < B; ++r) {
    const A g = grad[r];
    for (int64_t i = r * D; i < (r + 1) * D; ++i) {
      const auto t = terms::code_grad<K, A>(at(a, i), at(b, i), at(c, i), at(e, i));
      if (ga) ga[i] = static_cast<T>(g * t.da);
      if (gb) gb[i] = static_cast<T>(g * t.db);
      if (gc) gc[i] = static_cast<T>(g * t.dc);
      if (ge) ge[i] = static_cast<T>(g * t.de);
    }
  }
}

}  // namespace

void image_nll_fwd(DType dtype, ImageKind kind, const void* x, const void* m, const void* s, int64_t B, int64_t d,
                   void* out) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    terms::dispatch_image(kind, [&](auto k) {
      image_fwd<T, decltype(k)::value>(static_cast<const T*>(x), static_cast<const T*>(m), static_cast<const A*>(s), B,
                                       d, static_cast<A*>(out));
    });
  });
}

void image_nll_bwd(DType dtype, ImageKind kind, const void* grad, const void* x, const void* m, const void* s,
                   int64_t B, int64_t d, void* gx, void* gm, void* gs) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    terms::dispatch_image(kind, [&](auto k) {
      image_bwd<T, decltype(k)::value>(static_cast<const A*>(grad), static_cast<const T*>(x), static_cast<const T*>(m),
                                       static_cast<const A*>(s), B, d, static_cast<T*>(gx), static_cast<T*>(gm),
                                       static_cast<A*>(gs));
    });
  });
}

void code_nll_fwd(DType dtype, CodeKind kind, const void* a, const void* b, const void* c, const void* e,
                  const void* base, int64_t B, int64_t D, void* out) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    terms::dispatch_code(kind, [&](auto k) {
      code_fwd<T, decltype(k)::value>(static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(c),
                                      static_cast<const T*>(e), static_cast<const acc_t<T>*>(base), B, D,
                                      static_cast<T*>(out));
    });
  });
}

void code_nll_bwd(DType dtype, CodeKind kind, const void* grad, const void* a, const void* b, const void* c,
                  const void* e, int64_t B, int64_t D, void* ga, void* gb, void* gc, void* ge) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    terms::dispatch_code(kind, [&](auto k) {
      code_bwd<T, decltype(k)::value>(static_cast<const acc_t<T>*>(grad), static_cast<const T*>(a),
                                      static_cast<const T*>(b), static_cast<const T*>(c), static_cast<const T*>(e), B, D,
                                      static_cast<T*>(ga), static_cast<T*>(gb), static_cast<T*>(gc),
                                      static_cast<T*>(ge));
    });
  });
}

}  // namespace ehm::cpu
