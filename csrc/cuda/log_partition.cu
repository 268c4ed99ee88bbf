// CUDA kernels of the log-partition estimate. Forward: an online (max, sum) logsumexp per block;
// a long row is split over several blocks whose partials a second kernel combines. Backward:
// elementwise, recomputing w = exp(s - p - lse) from the saved per-row lse.
#include <cmath>

#include "cuda/scalar.cuh"
#include "log_partition.h"

namespace ehm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMinPerSplit = 16384;

template <typename A>
struct MS {
  A m, s;  // running max and sum of exp(x - m); for jensen only s (a plain sum) is used
};

template <typename A>
__device__ __forceinline__ MS<A> ms_add(MS<A> a, A x) {
  if (x == -INFINITY) return a;
  if (x > a.m) {
    a.s = a.s * exp(a.m - x) + A(1);
    a.m = x;
  } else {
    a.s += exp(x - a.m);
  }
  return a;
}

template <typename A>
__device__ __forceinline__ MS<A> ms_combine(MS<A> a, MS<A> b) {
  if (b.m > a.m) {
    const MS<A> t = a;
    a = b;
    b = t;
  }
  if (b.m == -INFINITY) {  // b saw no finite value: its sum is 0 or NaN
    if (isnan(b.s)) a.s = b.s;
    return a;
  }
  a.s += b.s * exp(b.m - a.m);
  return a;
}

template <typename A, bool JENSEN>
__device__ MS<A> block_reduce(MS<A> v, A* sm, A* ss) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MS<A> o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    if (JENSEN) v.s += o.s; else v = ms_combine(v, o);
  }
  if (lane == 0) { sm[warp] = v.m; ss[warp] = v.s; }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    v = lane < warps ? MS<A>{sm[lane], ss[lane]} : MS<A>{A(-INFINITY), A(0)};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      MS<A> o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
      if (JENSEN) v.s += o.s; else v = ms_combine(v, o);
    }
  }
  return v;  // valid in thread 0
}

template <typename T, typename A, bool JENSEN>
__device__ __forceinline__ void finish(MS<A> v, int64_t M, int64_t row, T* out, A* lse) {
  if (JENSEN) {
    const A mean = v.s / static_cast<A>(M);
    lse[row] = mean;
    out[row] = from_acc<T>(mean);
  } else {
    const A l = v.m + log(v.s);
    lse[row] = l;
    out[row] = from_acc<T>(l - log(static_cast<A>(M)));
  }
}

// One block per (row, split). With splits == 1 it writes the final result.
template <typename T, bool JENSEN>
__global__ void __launch_bounds__(kThreads) lp_partial(const T* __restrict__ s, const T* __restrict__ p, int64_t M,
                                                       int64_t splits, acc_t<T>* ws, T* out, acc_t<T>* lse,
                                                       int64_t R) {
  using A = acc_t<T>;
  __shared__ A sm[32], ss[32];
  const int64_t block = blockIdx.x;
  const int64_t row = block / splits, split = block % splits;
  const int64_t per = (M + splits - 1) / splits;
  const int64_t begin = row * M + split * per;
  const int64_t end = row * M + (split * per + per < M ? split * per + per : M);
  MS<A> acc{A(-INFINITY), A(0)};
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(kThreads) * kUnroll) {
    A x[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      x[k] = i < end ? to_acc(s[i]) - (p ? to_acc(p[i]) : A(0)) : (JENSEN ? A(0) : A(-INFINITY));
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (JENSEN) acc.s += x[k]; else acc = ms_add(acc, x[k]);
    }
  }
  acc = block_reduce<A, JENSEN>(acc, sm, ss);
  if (threadIdx.x != 0) return;
  if (splits == 1) {
    finish<T, A, JENSEN>(acc, M, row, out, lse);
  } else {
    ws[block] = acc.m;
    ws[R * splits + block] = acc.s;
  }
}

template <typename T, bool JENSEN>
__global__ void __launch_bounds__(kThreads) lp_combine(const acc_t<T>* ws, int64_t M, int64_t splits, int64_t R,
                                                       T* out, acc_t<T>* lse) {
  using A = acc_t<T>;
  __shared__ A sm[32], ss[32];
  const int64_t row = blockIdx.x;
  MS<A> acc{A(-INFINITY), A(0)};
  for (int64_t i = threadIdx.x; i < splits; i += kThreads) {
    const MS<A> part{ws[row * splits + i], ws[R * splits + row * splits + i]};
    if (JENSEN) acc.s += part.s; else acc = ms_combine(acc, part);
  }
  acc = block_reduce<A, JENSEN>(acc, sm, ss);
  if (threadIdx.x == 0) finish<T, A, JENSEN>(acc, M, row, out, lse);
}

template <typename T, bool JENSEN>
__global__ void __launch_bounds__(kThreads) lp_backward(const acc_t<T>* __restrict__ grad, const T* __restrict__ s,
                                                        const T* __restrict__ p, const acc_t<T>* __restrict__ lse,
                                                        int64_t R, int64_t M, T* gs, T* gp) {
  using A = acc_t<T>;
  const int64_t n = R * M;
  const A inv_m = A(1) / static_cast<A>(M);
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t row = i / M;
    A w;
    if (JENSEN) {
      w = inv_m;
    } else {
      const A l = lse[row];
      w = l == -INFINITY ? A(0) : exp(to_acc(s[i]) - (p ? to_acc(p[i]) : A(0)) - l);
    }
    const A d = grad[row] * w;
    if (gs) gs[i] = from_acc<T>(d);
    if (gp) gp[i] = from_acc<T>(-d);
  }
}

}  // namespace

int64_t log_partition_splits(int64_t R, int64_t M) {
  if (R >= 512 || M <= kMinPerSplit) return 1;
  int64_t splits = (M + kMinPerSplit - 1) / kMinPerSplit;
  const int64_t cap = 1024 / R > 1 ? 1024 / R : 1;
  return splits < cap ? splits : cap;
}

void log_partition_fwd(DType dtype, const void* s, const void* p, int64_t R, int64_t M, bool jensen, void* out,
                       void* lse, void* workspace, void* stream) {
  if (R == 0) return;  // a launch of 0 blocks is an error
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t splits = log_partition_splits(R, M);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    auto run = [&](auto jensen_tag) {
      constexpr bool J = decltype(jensen_tag)::value;
      lp_partial<T, J><<<static_cast<unsigned>(R * splits), kThreads, 0, st>>>(
          static_cast<const T*>(s), static_cast<const T*>(p), M, splits, static_cast<A*>(workspace),
          static_cast<T*>(out), static_cast<A*>(lse), R);
      if (splits > 1)
        lp_combine<T, J><<<static_cast<unsigned>(R), kThreads, 0, st>>>(static_cast<const A*>(workspace), M, splits, R,
                                                                         static_cast<T*>(out), static_cast<A*>(lse));
    };
    if (jensen) run(std::true_type{}); else run(std::false_type{});
  });
}

void log_partition_bwd(DType dtype, const void* grad, const void* s, const void* p, const void* lse, int64_t R,
                       int64_t M, bool jensen, void* gs, void* gp, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const unsigned blocks = grid_for(R * M, kThreads);
    auto run = [&](auto jensen_tag) {
      constexpr bool J = decltype(jensen_tag)::value;
      lp_backward<T, J><<<blocks, kThreads, 0, st>>>(static_cast<const A*>(grad), static_cast<const T*>(s),
                                                     static_cast<const T*>(p), static_cast<const A*>(lse), R, M,
                                                     static_cast<T*>(gs), static_cast<T*>(gp));
    };
    if (jensen) run(std::true_type{}); else run(std::false_type{});
  });
}

}  // namespace ehm::cuda
