// CUDA kernels of the per-sample likelihood terms (formulas in terms.h, shared with the CPU).
// Image forward: one block per (row, split) so a small batch of large images still fills the GPU;
// the entry adds the per-split partial sums. Image backward: a block owns 256 columns and a chunk
// of rows, writes the pixel gradients and one partial column sum of the log_scale gradient per
// chunk (added by the entry: deterministic, no atomics). Code terms: a warp per row forward,
// elementwise backward.
#include "cuda/scalar.cuh"
#include "likelihood.h"
#include "terms.h"

namespace ehm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMinPerSplit = 1024;
constexpr int64_t kTargetBlocks = 4096;
constexpr int kMinRowsPerChunk = 8;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename A = acc_t<T>>
__device__ __forceinline__ A load_or_zero(const T* p, int64_t i) {
  return p ? static_cast<A>(to_acc(p[i])) : A(0);
}

template <typename T, ImageKind K>
__global__ void __launch_bounds__(kThreads) image_fwd_kernel(const T* __restrict__ x, const T* __restrict__ m,
                                                             const acc_t<T>* __restrict__ s, int64_t d,
                                                             int64_t per_split, int64_t splits, acc_t<T>* partial) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  const int64_t block = blockIdx.x;
  const int64_t row = block / splits, begin = (block % splits) * per_split;
  const int64_t end = begin + per_split < d ? begin + per_split : d;
  const T* xr = x + row * d;
  const T* mr = m + row * d;
  A acc = 0;
#pragma unroll 4
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads)
    acc += terms::image_term<K, A>(to_acc(xr[j]), to_acc(mr[j]), s ? s[j] : A(0));
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[block] = acc;
}

template <typename T, ImageKind K>
__global__ void __launch_bounds__(kThreads) image_bwd_kernel(const acc_t<T>* __restrict__ grad,
                                                             const T* __restrict__ x, const T* __restrict__ m,
                                                             const acc_t<T>* __restrict__ s, int64_t B, int64_t d,
                                                             int64_t rows_per_chunk, T* gx, T* gm,
                                                             acc_t<T>* gs_partial) {
  using A = acc_t<T>;
  const int64_t col = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (col >= d) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < B ? r0 + rows_per_chunk : B;
  const A sj = s ? s[col] : A(0);
  A acc = 0;
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r * d + col;
    const A g = grad[r];
    const auto t = terms::image_grad<K, A>(to_acc(x[i]), to_acc(m[i]), sj);
    if (gx) gx[i] = from_acc<T>(g * t.dx);
    if (gm) gm[i] = from_acc<T>(g * t.dm);
    acc += g * t.ds;
  }
  if (gs_partial) gs_partial[blockIdx.y * d + col] = acc;
}

template <typename T, CodeKind K>
__global__ void __launch_bounds__(kThreads) code_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                            const T* __restrict__ c, const T* __restrict__ e,
                                                            const acc_t<T>* __restrict__ base, int64_t B, int64_t D,
                                                            T* out) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x * int64_t(kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= B) return;  // a whole warp leaves together
  A acc = 0;
  for (int64_t i = row * D + lane; i < (row + 1) * D; i += 32)
    acc += terms::code_term<K, A>(load_or_zero(a, i), load_or_zero(b, i), load_or_zero(c, i), load_or_zero(e, i));
  acc = warp_sum(acc);
  if (lane == 0) out[row] = from_acc<T>(acc + (base ? base[row] : A(0)));
}

template <typename T, CodeKind K>
__global__ void __launch_bounds__(kThreads) code_bwd_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ a,
                                                            const T* __restrict__ b, const T* __restrict__ c,
                                                            const T* __restrict__ e, int64_t n, int64_t D, T* ga,
                                                            T* gb, T* gc, T* ge) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const A g = grad[i / D];
    const auto t =
        terms::code_grad<K, A>(load_or_zero(a, i), load_or_zero(b, i), load_or_zero(c, i), load_or_zero(e, i));
    if (ga) ga[i] = from_acc<T>(g * t.da);
    if (gb) gb[i] = from_acc<T>(g * t.db);
    if (gc) gc[i] = from_acc<T>(g * t.dc);
    if (ge) ge[i] = from_acc<T>(g * t.de);
  }
}

}  // namespace

int64_t image_splits(int64_t B, int64_t d) {
  const int64_t by_size = cdiv(d, kMinPerSplit), by_blocks = cdiv(kTargetBlocks, B);
  const int64_t splits = by_size < by_blocks ? by_size : by_blocks;
  return splits > 1 ? splits : 1;
}

int64_t image_rows_per_chunk(int64_t B, int64_t d) {
  const int64_t rows = cdiv(B * cdiv(d, kThreads), kTargetBlocks);
  return rows > kMinRowsPerChunk ? rows : kMinRowsPerChunk;
}

void image_nll_fwd(DType dtype, ImageKind kind, const void* x, const void* m, const void* s, int64_t B, int64_t d,
                   void* partial, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t splits = image_splits(B, d), per_split = cdiv(d, splits);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    terms::dispatch_image(kind, [&](auto k) {
      image_fwd_kernel<T, decltype(k)::value><<<static_cast<unsigned>(B * splits), kThreads, 0, st>>>(
          static_cast<const T*>(x), static_cast<const T*>(m), static_cast<const A*>(s), d, per_split, splits,
          static_cast<A*>(partial));
    });
  });
}

void image_nll_bwd(DType dtype, ImageKind kind, const void* grad, const void* x, const void* m, const void* s,
                   int64_t B, int64_t d, void* gx, void* gm, void* gs_partial, void* stream) {
  if (B == 0 || d == 0) return;  // a grid of 0 columns is a launch error; nothing to write
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t rows = image_rows_per_chunk(B, d);
  const dim3 grid(static_cast<unsigned>(cdiv(d, kThreads)), static_cast<unsigned>(cdiv(B, rows)));
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    terms::dispatch_image(kind, [&](auto k) {
      image_bwd_kernel<T, decltype(k)::value><<<grid, kThreads, 0, st>>>(
          static_cast<const A*>(grad), static_cast<const T*>(x), static_cast<const T*>(m), static_cast<const A*>(s), B,
          d, rows, static_cast<T*>(gx), static_cast<T*>(gm), static_cast<A*>(gs_partial));
    });
  });
}

void code_nll_fwd(DType dtype, CodeKind kind, const void* a, const void* b, const void* c, const void* e,
                  const void* base, int64_t B, int64_t D, void* out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    terms::dispatch_code(kind, [&](auto k) {
      code_fwd_kernel<T, decltype(k)::value><<<static_cast<unsigned>(cdiv(B, kThreads / 32)), kThreads, 0, st>>>(
          static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(c), static_cast<const T*>(e),
          static_cast<const A*>(base), B, D, static_cast<T*>(out));
    });
  });
}

void code_nll_bwd(DType dtype, CodeKind kind, const void* grad, const void* a, const void* b, const void* c,
                  const void* e, int64_t B, int64_t D, void* ga, void* gb, void* gc, void* ge, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    terms::dispatch_code(kind, [&](auto k) {
      code_bwd_kernel<T, decltype(k)::value><<<grid_for(B * D, kThreads), kThreads, 0, st>>>(
          static_cast<const A*>(grad), static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(c),
          static_cast<const T*>(e), B * D, D, static_cast<T*>(ga), static_cast<T*>(gb), static_cast<T*>(gc),
          static_cast<T*>(ge));
    });
  });
}

}  // namespace ehm::cuda
