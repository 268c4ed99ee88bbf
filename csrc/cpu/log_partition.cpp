// C++ CPU kernels of the log-partition estimate: an online (max, sum) logsumexp per chunk of a
// row, chunks combined per row, so one huge row still uses every core.
#include "log_partition.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/scalar.h"

namespace ehm::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kTile = 256;

template <typename A>
struct Partial {
  A m = -std::numeric_limits<A>::infinity();
  A s = 0;  // sum of exp(x - m); for jensen, the plain sum
};

// Adds a tile of x = s - p to the running (max, sum): a max pass, one rescale, then a sum of
// exponentials. -inf adds nothing, NaN poisons the sum.
template <typename T, typename A>
inline void add_tile(Partial<A>& acc, const T* s, const T* p, int64_t n) {
  // kLanes independent partial maxima and sums: the reductions vectorise without -ffast-math.
  constexpr int kLanes = 8;
  A x[kTile];
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<A>(s[i]) - (p ? static_cast<A>(p[i]) : A(0));
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = n; i < padded; ++i) x[i] = -std::numeric_limits<A>::infinity();
  A lane_max[kLanes], lane_sum[kLanes] = {};
  for (int j = 0; j < kLanes; ++j) lane_max[j] = acc.m;
  for (int64_t i = 0; i < padded; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_max[j] = x[i + j] > lane_max[j] ? x[i + j] : lane_max[j];
  A top = lane_max[0];
  for (int j = 1; j < kLanes; ++j) top = lane_max[j] > top ? lane_max[j] : top;
  if (top == -std::numeric_limits<A>::infinity()) {  // nothing finite yet: only NaN can matter
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(x[i])) acc.s = x[i];
    return;
  }
  for (int64_t i = 0; i < padded; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_sum[j] += std::exp(x[i + j] - top);
  A sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lane_sum[j];
  acc.s = acc.s * std::exp(acc.m - top) + sum;  // acc.m = -inf: 0 * 0
  acc.m = top;
}

template <typename A>
inline Partial<A> combine(Partial<A> a, Partial<A> b) {
  if (b.m > a.m) std::swap(a, b);  // a has the larger max (or a NaN-free one)
  if (b.m == -std::numeric_limits<A>::infinity()) {  // b saw no finite value: its sum is 0 or NaN
    if (std::isnan(b.s)) a.s = b.s;
    return a;
  }
  a.s += b.s * std::exp(b.m - a.m);
  return a;
}

template <typename T>
void fwd(const T* s, const T* p, int64_t R, int64_t M, bool jensen, T* out, acc_t<T>* lse) {
  using A = acc_t<T>;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  std::vector<Partial<A>> parts(static_cast<size_t>(R * chunks));
#pragma omp parallel for schedule(static) if (R * M >= kParallelMin)
  for (int64_t task = 0; task < R * chunks; ++task) {
    const int64_t r = task / chunks, c = task % chunks;
    const int64_t begin = r * M + c * kChunk, end = r * M + std::min(M, (c + 1) * kChunk);
    Partial<A> acc;
    if (jensen) {
      A sum = 0;
      for (int64_t i = begin; i < end; ++i) sum += static_cast<A>(s[i]) - (p ? static_cast<A>(p[i]) : A(0));
      acc.s = sum;
    } else {
      for (int64_t t = begin; t < end; t += kTile) add_tile(acc, s + t, p ? p + t : nullptr, std::min(kTile, end - t));
    }
    parts[task] = acc;
  }
#pragma omp parallel for schedule(static) if (R * 64 >= kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
    A value;
    if (jensen) {
      A sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += parts[r * chunks + c].s;
      value = sum / static_cast<A>(M);
      lse[r] = value;
    } else {
      Partial<A> acc = parts[r * chunks];
      for (int64_t c = 1; c < chunks; ++c) acc = combine(acc, parts[r * chunks + c]);
      const A l = acc.m + std::log(acc.s);  // all -inf: -inf + log(0) = -inf
      lse[r] = l;
      value = l - std::log(static_cast<A>(M));
    }
    out[r] = static_cast<T>(value);
  }
}

template <typename T>
void bwd(const acc_t<T>* grad, const T* s, const T* p, const acc_t<T>* lse, int64_t R, int64_t M, bool jensen, T* gs,
         T* gp) {
  using A = acc_t<T>;
  const A inv_m = A(1) / static_cast<A>(M);
  const int64_t chunks = (M + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (R * M >= kParallelMin)
  for (int64_t task = 0; task < R * chunks; ++task) {
    const int64_t r = task / chunks;
    const A g = grad[r], l = lse[r];
    const bool empty = !jensen && l == -std::numeric_limits<A>::infinity();  // all -inf: zero weights
    const int64_t begin = r * M + (task % chunks) * kChunk, end = std::min(r * M + M, begin + kChunk);
    A d[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t n = std::min(kTile, end - t);
      if (jensen || empty) {
        for (int64_t i = 0; i < n; ++i) d[i] = jensen ? g * inv_m : A(0);
      } else {
        for (int64_t i = 0; i < n; ++i) d[i] = g * std::exp(static_cast<A>(s[t + i]) - (p ? static_cast<A>(p[t + i]) : A(0)) - l);
      }
      if (gs)
        for (int64_t i = 0; i < n; ++i) gs[t + i] = static_cast<T>(d[i]);
      if (gp)
        for (int64_t i = 0; i < n; ++i) gp[t + i] = static_cast<T>(-d[i]);
    }
  }
}

}  // namespace

void log_partition_fwd(DType dtype, const void* s, const void* p, int64_t R, int64_t M, bool jensen, void* out,
                       void* lse) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwd<T>(static_cast<const T*>(s), static_cast<const T*>(p), R, M, jensen, static_cast<T*>(out),
           static_cast<acc_t<T>*>(lse));
  });
}

void log_partition_bwd(DType dtype, const void* grad, const void* s, const void* p, const void* lse, int64_t R,
                       int64_t M, bool jensen, void* gs, void* gp) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    bwd<T>(static_cast<const acc_t<T>*>(grad), static_cast<const T*>(s), static_cast<const T*>(p),
           static_cast<const acc_t<T>*>(lse), R, M, jensen, static_cast<T*>(gs), static_cast<T*>(gp));
  });
}

}  // namespace ehm::cpu
